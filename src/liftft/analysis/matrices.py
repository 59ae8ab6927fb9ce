"""What every analysis shares: the target matrices' budgets and selection seeds, and the
layer type and depth that a parameter name encodes."""

from __future__ import annotations

import warnings
from statistics import fmean

from liftft.engine.config import LiftConfig
from liftft.engine.selection import selection_seed
from liftft.engine.selection import budget, select_indices


def target_budgets(targets: dict, rank: int | None = None, density: float | None = None) -> dict[str, int]:
    """k for each target weight, exactly as training computes it.

    With neither ``rank`` nor ``density`` set, LiftConfig's default rank is used.
    Warns when k covers a whole matrix, since every selector then picks the same entries.
    """
    if rank is None and density is None:
        rank = LiftConfig.rank
    ks = {name: budget(tuple(w.shape), rank=rank, density=density) for name, w in targets.items()}
    full = [name for name, w in targets.items() if ks[name] == w.numel()]
    if full:
        warnings.warn(
            f"k covers every entry of {len(full)} of {len(ks)} target matrices (e.g. {full[0]}), "
            f"so all selectors pick the same entries there; lower rank (now {rank}) or density (now {density})",
            stacklevel=2,
        )
    return ks


def select_as_training(targets: dict, ks: dict[str, int], selector: str, filter_rank: int, svd: str,
                       seed: int) -> dict:
    """Each target's sorted flat indices, from the same select_indices call LiftAdamW makes at its first selection."""
    return {
        name: select_indices(weight, ks[name], selector, filter_rank, svd, selection_seed(seed, ordinal))
        for ordinal, (name, weight) in enumerate(targets.items())
    }


def layer_type(name: str) -> str:
    """The module's own name: ``model.layers.3.self_attn.q_proj.weight`` gives ``q_proj``."""
    parts = name.split(".")
    return parts[-2] if len(parts) > 1 and parts[-1] == "weight" else parts[-1]


def layer_depth(name: str) -> int | None:
    """The block index in a parameter name (its first all-digit part), or None when it has none."""
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def group_means(rows: dict[str, dict], group_of, metrics) -> dict[str, dict[str, float]]:
    """Mean of each metric over the rows sharing a group, groups in order of first appearance.

    ``group_of(name, row)`` gives a row's group (None leaves the row out); None
    metric values are skipped. Group keys are strings so the result is JSON-ready.
    """
    grouped: dict[str, list[dict]] = {}
    for name, row in rows.items():
        group = group_of(name, row)
        if group is not None:
            grouped.setdefault(str(group), []).append(row)
    means = {}
    for group, members in grouped.items():
        means[group] = {"count": len(members)}
        for metric in metrics:
            values = [m[metric] for m in members if m[metric] is not None]
            means[group][metric] = fmean(values) if values else None
    return means
