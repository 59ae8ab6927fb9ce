"""`LiftConfig`: the validated settings of a LIFT run, and the checks of `LiftAdamW`'s other arguments."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass
from typing import Sequence

from liftft.utils import distributed

# Selectors that choose from one matrix alone (what select_indices takes).
SELECTORS = ("principal", "principal-smallest", "magnitude", "random")
PRINCIPAL_SELECTORS = ("principal", "principal-smallest")
# Selectors that need more than the matrix: its role in the model (s2ft) or calibration gradients (gradient).
MODEL_SELECTORS = ("s2ft", "gradient")
SVD_METHODS = ("exact", "randomized")
BIAS_CORRECTIONS = ("matrix", "entry")
TARGET_PRESETS = ("all-linear", "mlp", "attn")


@dataclass
class LiftConfig:
    """Which entries LIFT trains and how often it re-selects them.

    Exactly one of ``rank`` and ``density`` sets the budget k per matrix:
    ``rank`` gives LoRA parity, k = min((m + n) * rank, m * n); ``density`` gives
    k = round(density * m * n). ``filter_rank`` is the rank of the SVD
    approximation whose largest entries are selected. ``update_interval`` counts
    optimizer steps between refreshes (None never refreshes). ``target_modules``
    is ``"all-linear"``, ``"mlp"``, ``"attn"``, a list of module-name suffixes, or
    a regular expression matched against whole module names; ``exclude_modules``
    takes the same list or regex forms. ``master_weights`` keeps an fp32 copy of
    the selected entries of 16-bit weights, so that updates below the weight's
    resolution still accumulate. ``sampled_grad`` makes target nn.Linear layers
    compute their weight gradient only at the selected entries (see
    :mod:`liftft.engine.sampled`) instead of forming the dense gradient and gathering.

    ``selector`` is one of :data:`SELECTORS` (see
    :func:`liftft.engine.selection.select_indices`), ``"s2ft"`` (random whole
    channels and heads, see :mod:`liftft.engine.structured`) or ``"gradient"`` (the
    largest |gradient| summed over calibration batches, passed to LiftAdamW as
    ``scores``; selected once, so ``update_interval`` must be None).
    ``block_size`` b makes the principal selectors take whole b x b blocks, the
    max(1, k // b**2) whose L1 norm of W_r is largest (smallest).

    ``bias_correction`` says whose step count AdamW's bias correction uses.
    ``"matrix"`` (the paper's, and the default) uses the matrix's: an entry
    newly selected at a refresh starts with zero moments but the matrix's large
    step count, so its second moment is under-corrected and its steps grow
    larger than a fresh AdamW's. With a constant gradient and a refresh at step
    400 they reach 1.1x a fresh AdamW's under betas (0.9, 0.95), but 3.8x under
    (0.9, 0.999), torch's and the HF Trainer's default, still 1.4x 300 steps
    later. ``"entry"`` counts each entry's steps from the refresh that selected
    it, as a fresh AdamW would, for 1 more byte per selected entry (and the
    torch path instead of the Triton kernel); use it whenever beta2 is close to
    1. Entries selected 255 or more refreshes ago count from the matrix's
    first step.
    """

    rank: int | None = 128
    density: float | None = None
    filter_rank: int = 64
    update_interval: int | None = 400
    selector: str = "principal"
    block_size: int | None = None
    svd: str = "randomized"
    target_modules: str | Sequence[str] = "all-linear"
    exclude_modules: str | Sequence[str] | None = None
    master_weights: bool = True
    sampled_grad: bool = False
    bias_correction: str = "matrix"
    seed: int = 0

    def __post_init__(self):
        if (self.rank is None) == (self.density is None):
            raise ValueError(
                f"set exactly one of rank and density (got rank={self.rank!r}, density={self.density!r})"
            )
        if self.rank is not None:
            _check_int("rank", self.rank, minimum=1)
        if self.density is not None:
            if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
                raise TypeError(f"density must be a number in (0, 1], got {self.density!r}")
            if not 0 < self.density <= 1:
                raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        _check_int("filter_rank", self.filter_rank, minimum=1)
        if self.update_interval is not None:
            _check_int("update_interval", self.update_interval, minimum=1)
        _check_choice("selector", self.selector, (*SELECTORS, *MODEL_SELECTORS))
        if self.block_size is not None:
            check_block_size(self.block_size, self.selector)
        if self.selector == "gradient" and self.update_interval is not None:
            raise ValueError(f"selector 'gradient' selects once, from the calibration gradients given to LiftAdamW, "
                             f"and cannot refresh; set update_interval=None (got {self.update_interval!r})")
        _check_choice("svd", self.svd, SVD_METHODS)
        _check_choice("bias_correction", self.bias_correction, BIAS_CORRECTIONS)
        _check_pattern("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            _check_pattern("exclude_modules", self.exclude_modules)
        for name in ("master_weights", "sampled_grad"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _check_int("seed", self.seed, minimum=0)

    def to_dict(self) -> dict:
        """A JSON-ready dict of the settings."""
        d = asdict(self)
        for key in ("target_modules", "exclude_modules"):
            if isinstance(d[key], (list, tuple)):
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LiftConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise."""
        return cls(**d)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def check_block_size(block_size, selector: str) -> None:
    """Raise unless ``block_size`` is an integer >= 1 and ``selector`` is one of the principal selectors."""
    _check_int("block_size", block_size, minimum=1)
    if selector not in PRINCIPAL_SELECTORS:
        raise ValueError(f"block_size={block_size} is for the principal selectors ({', '.join(PRINCIPAL_SELECTORS)}), "
                         f"not selector {selector!r}")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _check_pattern(name, value):
    if isinstance(value, str):
        if value in TARGET_PRESETS:
            return
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{name} {value!r} is neither a preset {TARGET_PRESETS} nor a valid regex: {err}")
        return
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return
    raise TypeError(
        f"{name} must be one of {TARGET_PRESETS}, a regex string, or a non-empty list of module-name suffixes; got {value!r}"
    )


def clip_norm(max_grad_norm) -> float | None:
    """The global gradient-norm threshold that ``max_grad_norm`` asks for; None means no clipping.

    None and 0 both mean no clipping (0 is how the CLI and the transformers
    Trainer say "off"); a finite number > 0 is the threshold, as a float.
    Anything else (a negative number, nan, inf, a bool, a non-number) is
    refused, naming the value, rather than silently disabling clipping.
    """
    if max_grad_norm is None:
        return None
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, numbers.Real):
        raise TypeError(f"max_grad_norm must be a number or None, got {max_grad_norm!r}")
    if max_grad_norm == 0:
        return None
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a finite number > 0, or 0 or None for no clipping; "
                         f"got {max_grad_norm!r}")
    return float(max_grad_norm)


def checked_clip(max_grad_norm, step_in_backward: bool) -> float | None:
    """LiftAdamW's clipping threshold, at construction and whenever ``max_grad_norm`` is set: :func:`clip_norm`'s, and
    refused (ValueError) where ``step_in_backward`` updates each target before the global norm is known."""
    max_norm = clip_norm(max_grad_norm)
    if step_in_backward and max_norm is not None:
        raise ValueError(f"step_in_backward=True updates each target before the global gradient norm is known, so it "
                         f"cannot clip (max_grad_norm={max_grad_norm!r}); set max_grad_norm=None or step_in_backward=False")
    return max_norm


def check_optimizer_settings(cfg, lr, betas, eps, weight_decay, step_in_backward, max_grad_norm) -> None:
    """Raise, naming the setting, for LiftAdamW arguments it cannot run with."""
    if not isinstance(cfg, LiftConfig):
        raise TypeError(f"cfg must be a LiftConfig, got {type(cfg).__name__}")
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not isinstance(step_in_backward, bool):
        raise TypeError(f"step_in_backward must be True or False, got {step_in_backward!r}")
    checked_clip(max_grad_norm, step_in_backward)
    if step_in_backward and distributed.world_size() > 1:
        raise ValueError(f"step_in_backward=True runs in one process only (world size {distributed.world_size()}): "
                         "the ranks must average gradients before any update")
