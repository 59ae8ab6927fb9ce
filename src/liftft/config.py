"""`LiftConfig`: the validated settings of a LIFT run."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Sequence

SELECTORS = ("principal", "principal-smallest", "magnitude", "random")
SVD_METHODS = ("exact", "randomized")
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
    :mod:`liftft.sampled`) instead of forming the dense gradient and gathering.
    """

    rank: int | None = 128
    density: float | None = None
    filter_rank: int = 64
    update_interval: int | None = 400
    selector: str = "principal"
    svd: str = "randomized"
    target_modules: str | Sequence[str] = "all-linear"
    exclude_modules: str | Sequence[str] | None = None
    master_weights: bool = True
    sampled_grad: bool = False
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
        _check_choice("selector", self.selector, SELECTORS)
        _check_choice("svd", self.svd, SVD_METHODS)
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
