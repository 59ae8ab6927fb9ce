"""Selection overlap: how different LIFT's Principal Weights are from plain magnitude,
from random entries, from a randomized SVD's choice and from other filter ranks."""

from __future__ import annotations

from itertools import combinations

import torch

from liftft.analysis.matrices import group_means, layer_depth, layer_type, target_budgets
from liftft.engine.config import LiftConfig
from liftft.engine.selection import selection_seed
from liftft.engine.selection import select_indices
from liftft.engine.targets import find_targets
from liftft.utils.progress import progress_bar


def overlap(
    model,
    *,
    rank: int | None = None,
    density: float | None = None,
    filter_ranks=(LiftConfig.filter_rank,),
    seed: int = 0,
    target_modules="all-linear",
    progress: bool = False,
) -> dict:
    """Jaccard overlap of selections of the same k entries per target matrix.

    Principal selection uses exact SVD at the first of ``filter_ranks`` and is
    compared with magnitude, with random (seeded as training seeds it), with
    principal selection by randomized SVD, and, for every pair of ``filter_ranks``,
    principal selections at the two ranks. k comes from ``rank`` or ``density``
    (LiftConfig's rank when neither is set).

    Returns ``{"comparisons": [names], "matrices": {name: {"layer_type", "depth",
    "shape", "k", *comparisons}}, "by_type": {type: {"count", *comparisons}},
    "mean": {"count", *comparisons}}``.
    """
    filter_ranks = _check_filter_ranks(filter_ranks)
    reference = filter_ranks[0]
    targets = find_targets(model, target_modules)
    ks = target_budgets(targets, rank, density)
    pairs = list(combinations(filter_ranks, 2))
    comparisons = ["principal vs magnitude", "principal vs random", "exact vs randomized SVD"]
    comparisons += [f"filter rank {a} vs {b}" for a, b in pairs]
    rows = {}
    for ordinal, (name, weight) in enumerate(progress_bar(targets.items(), desc="overlap", disable=not progress)):
        seed_here = selection_seed(seed, ordinal)

        def pick(selector, filter_rank=reference, svd="exact"):
            return select_indices(weight, ks[name], selector, filter_rank, svd, seed_here)

        principal = {f: pick("principal", f) for f in filter_ranks}
        values = [
            jaccard(principal[reference], pick("magnitude")),
            jaccard(principal[reference], pick("random")),
            jaccard(principal[reference], pick("principal", svd="randomized")),
        ]
        values += [jaccard(principal[a], principal[b]) for a, b in pairs]
        rows[name] = {
            "layer_type": layer_type(name),
            "depth": layer_depth(name),
            "shape": list(weight.shape),
            "k": ks[name],
            **dict(zip(comparisons, values)),
        }
    return {
        "comparisons": comparisons,
        "matrices": rows,
        "by_type": group_means(rows, lambda name, row: row["layer_type"], comparisons),
        "mean": group_means(rows, lambda name, row: "all", comparisons)["all"],
    }


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A ∩ B| / |A ∪ B| of two sets of distinct indices given as 1-D tensors; 1 for two empty sets."""
    a, b = a.long(), b.long().to(a.device)
    common = torch.isin(a, b).sum().item()
    union = a.numel() + b.numel() - common
    return common / union if union else 1.0


def _check_filter_ranks(filter_ranks) -> tuple[int, ...]:
    ranks = (filter_ranks,) if isinstance(filter_ranks, int) else tuple(dict.fromkeys(filter_ranks))
    if not ranks:
        raise ValueError("no filter ranks given")
    for f in ranks:
        if isinstance(f, bool) or not isinstance(f, int) or f < 1:
            raise ValueError(f"filter rank {f!r} must be an integer >= 1")
    return ranks
