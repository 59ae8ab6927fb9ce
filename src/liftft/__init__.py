"""liftft: Low-rank Informed Sparse Fine-Tuning (LIFT) for Hugging Face causal LMs."""

from liftft.config import LiftConfig
from liftft.optim import LiftAdamW
from liftft.selection import budget, select_indices

__all__ = ["LiftConfig", "LiftAdamW", "budget", "select_indices"]
__version__ = "0.1.0"
