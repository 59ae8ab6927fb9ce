"""liftft: Low-rank Informed Sparse Fine-Tuning (LIFT) for Hugging Face causal LMs."""

from liftft.calibration import gradient_scores
from liftft.config import LiftConfig
from liftft.delta import apply_delta, load_delta, save_delta
from liftft.optim import LiftAdamW
from liftft.selection import budget, select_indices

__all__ = [
    "LiftAdamW",
    "LiftConfig",
    "LiftTrainerCallback",
    "apply_delta",
    "budget",
    "gradient_scores",
    "load_delta",
    "save_delta",
    "select_indices",
]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that `import liftft` does not import transformers.
    if name == "LiftTrainerCallback":
        from liftft.integrations import LiftTrainerCallback

        return LiftTrainerCallback
    raise AttributeError(f"module 'liftft' has no attribute {name!r}")
