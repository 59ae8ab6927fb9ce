"""liftft: Low-rank Informed Sparse Fine-Tuning (LIFT) for Hugging Face causal LMs."""

from liftft.engine.calibration import gradient_scores
from liftft.engine.config import LiftConfig
from liftft.deltas.delta import apply_delta, load_delta, save_delta
from liftft.engine.optim import LiftAdamW
from liftft.engine.selection import budget, select_indices
from liftft.engine.trainable import print_trainable_parameters, trainable_parameters
from liftft.deltas.unmerge import remove_delta

__all__ = [
    "LiftAdamW",
    "LiftConfig",
    "LiftTrainerCallback",
    "apply_delta",
    "budget",
    "from_pretrained",
    "gradient_scores",
    "lift_optimizers",
    "load_delta",
    "print_trainable_parameters",
    "push_to_hub",
    "remove_delta",
    "save_delta",
    "select_indices",
    "trainable_parameters",
]
__version__ = "0.1.0"


# Imported on first use, so that `import liftft` does not import transformers or huggingface_hub.
_LAZY = {"LiftTrainerCallback": "liftft.training.integrations", "lift_optimizers": "liftft.training.integrations",
         "from_pretrained": "liftft.deltas.hub", "push_to_hub": "liftft.deltas.hub"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'liftft' has no attribute {name!r}")
