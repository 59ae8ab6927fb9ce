"""Choosing which entries of a weight matrix to train: the Principal Weights and the baselines."""

from __future__ import annotations

import warnings
from typing import Callable, Iterator, Sequence

import torch

from liftft.engine.config import PRINCIPAL_SELECTORS, SELECTORS, SVD_METHODS, check_block_size
from liftft.engine.layout import index_dtype

# Randomized SVD sketches 2 * rank columns (at least rank + 16) with 4 power
# iterations: on slowly decaying spectra (sigma_i ~ i^-0.5) a smaller sketch
# lost ~5% of the exact selection; this one keeps >99% (tests/test_selection.py).
MIN_OVERSAMPLE = 16
POWER_ITERATIONS = 4
# select_many stacks same-shaped matrices for one batched SVD. A group holds at
# most this many entries (at least one matrix), so selection's workspace, a few
# fp32 copies of one group, stays bounded however many matrices share a shape:
# 2**24 is one 8192x2048 MLP matrix of Llama-3.2-1B, what selecting it alone needs.
MAX_GROUP_NUMEL = 2**24


def budget(shape, rank: int | None = None, density: float | None = None) -> int:
    """Number of entries k to train in a matrix of ``shape`` (m, n).

    ``rank`` gives LoRA parity, k = min((m + n) * rank, m * n); ``density`` gives
    k = max(1, round(density * m * n)). Exactly one must be set.
    """
    if len(shape) != 2:
        raise ValueError(f"budget needs a 2-D shape, got {tuple(shape)}")
    m, n = shape
    if (rank is None) == (density is None):
        raise ValueError(f"set exactly one of rank and density (got rank={rank!r}, density={density!r})")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        return min((m + n) * rank, m * n)
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    return max(1, min(m * n, round(density * m * n)))


def selection_seed(seed: int, ordinal: int, refreshes: int = 0) -> int:
    """The seed of target number ``ordinal``'s selection after ``refreshes`` refreshes (used by "random" and randomized SVD)."""
    return seed + 7919 * ordinal + 104729 * refreshes


def select_indices(
    weight: torch.Tensor,
    k: int,
    selector: str = "principal",
    filter_rank: int = 64,
    svd: str = "exact",
    seed: int = 0,
    block_size: int | None = None,
) -> torch.Tensor:
    """Sorted flat indices of the ``k`` entries of ``weight`` to train.

    ``"principal"`` takes the k largest |W_r|, where W_r is the rank-``filter_rank``
    SVD approximation of W in fp32; ``"principal-smallest"`` the k smallest;
    ``"magnitude"`` the k largest |W|; ``"random"`` k uniform entries drawn from
    ``seed``. Ties are broken towards the lower flat index, so the result is a
    function of the weight and seed alone. Work happens on the weight's device;
    the result is int32 when the matrix has fewer than 2**31 entries.

    ``block_size`` b (principal selectors only; b must divide both dimensions)
    selects whole b x b blocks instead of entries: see :func:`top_k_blocks`.
    """
    _check_selection(weight, k, selector, block_size)
    numel = weight.numel()
    with torch.no_grad():
        if selector == "random":
            idx = _random_indices(numel, k, seed, weight.device)
        elif selector == "magnitude":
            idx = top_k_indices(weight.detach().float().abs().flatten(), k)
        else:
            scores = low_rank_approximation(weight, filter_rank, svd, seed).abs_()
            idx = top_k_principal(scores, k, selector == "principal", block_size)
    return idx.to(index_dtype(numel))


def select_many(
    weights: Sequence[torch.Tensor],
    ks: int | Sequence[int],
    selector: str = "principal",
    filter_rank: int = 64,
    svd: str = "exact",
    seeds: int | Sequence[int] = 0,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_group_numel: int = MAX_GROUP_NUMEL,
    block_size: int | None = None,
) -> list[torch.Tensor]:
    """:func:`select_indices` for many matrices: entry i is ``select_indices(prepare(weights[i]), ks[i], ..., seeds[i])``.

    Principal selectors stack matrices of the same shape and device into groups
    of at most ``max_group_numel`` entries and run one batched SVD per group;
    each matrix keeps its own sketch seed, so the result does not depend on the
    grouping. ``prepare`` maps a weight to the matrix actually scored (e.g. with
    fp32 master values written in); it is called only when that matrix's group
    is processed, so at most one group's copies exist at a time. ``ks`` and
    ``seeds`` take one value for all or one per matrix.
    """
    weights = list(weights)
    chosen: list[torch.Tensor | None] = [None] * len(weights)
    for i, idx in iter_select_many(weights, ks, selector, filter_rank, svd, seeds, prepare, max_group_numel,
                                   block_size):
        chosen[i] = idx
    return chosen


def iter_select_many(
    weights: Sequence[torch.Tensor],
    ks: int | Sequence[int],
    selector: str = "principal",
    filter_rank: int = 64,
    svd: str = "exact",
    seeds: int | Sequence[int] = 0,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_group_numel: int = MAX_GROUP_NUMEL,
    block_size: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`select_many` one group at a time: yields (position in ``weights``, sorted indices) as each group is done.

    Every argument is checked before anything is selected. A caller that turns
    each result into state before asking for the next group never holds more
    than one group's new indices besides what it keeps.
    """
    weights = list(weights)
    ks = _per_matrix("ks", ks, len(weights))
    seeds = _per_matrix("seeds", seeds, len(weights))
    for weight, k in zip(weights, ks):
        _check_selection(weight, k, selector, block_size)
    if isinstance(max_group_numel, bool) or not isinstance(max_group_numel, int) or max_group_numel < 1:
        raise ValueError(f"max_group_numel must be an integer >= 1, got {max_group_numel!r}")
    return _selections(weights, ks, selector, filter_rank, svd, seeds, prepare or (lambda w: w), max_group_numel,
                       block_size)


def _selections(weights, ks, selector, filter_rank, svd, seeds, prepare, max_group_numel, block_size):
    if selector not in PRINCIPAL_SELECTORS:
        for i, (w, k, s) in enumerate(zip(weights, ks, seeds)):
            yield i, select_indices(prepare(w), k, selector, filter_rank, svd, s)
        return
    for group in shape_groups(weights, max_group_numel):
        with torch.no_grad():
            stacked = torch.stack([prepare(weights[i]).detach().float() for i in group])
            scores = low_rank_approximation(stacked, filter_rank, svd, [seeds[i] for i in group]).abs_()
            del stacked
            picked = [top_k_principal(scores[row], ks[i], selector == "principal", block_size)
                      for row, i in enumerate(group)]
            del scores
        for i, idx in zip(group, picked):
            yield i, idx.to(index_dtype(weights[i].numel()))


def low_rank_approximation(
    weight: torch.Tensor, rank: int, svd: str = "exact", seed: int | Sequence[int] = 0
) -> torch.Tensor:
    """The rank-``rank`` SVD approximation U_r Σ_r V_rᵀ of ``weight``, in fp32.

    ``rank`` above min(m, n) is clamped with a one-time warning. Leading batch
    dimensions are allowed, so same-shaped matrices can share one call; ``seed``
    may then give one randomized-SVD seed per matrix of a (b, m, n) stack.
    """
    if svd not in SVD_METHODS:
        raise ValueError(f"unknown svd {svd!r}; allowed: {', '.join(SVD_METHODS)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"filter_rank must be an integer >= 1, got {rank!r}")
    w = weight.detach().float()
    full_rank = min(w.shape[-2:])
    if rank > full_rank:
        _warn_clamped(rank, full_rank)
        rank = full_rank
    if svd == "exact" or 2 * rank >= full_rank:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    else:
        u, s, vh = randomized_svd(w, rank, seed)
    return (u * s.unsqueeze(-2)) @ vh


def randomized_svd(w: torch.Tensor, rank: int, seed: int | Sequence[int] = 0):
    """Top-``rank`` singular triplets of fp32 ``w`` by a seeded Halko sketch with power iterations.

    With a sequence of seeds, ``w`` is a (b, m, n) stack and matrix i is sketched
    from ``seed[i]`` exactly as it would be alone, so batching never changes a result.
    """
    m, n = w.shape[-2:]
    sketch = min(rank + max(rank, MIN_OVERSAMPLE), m, n)
    if isinstance(seed, int):
        omega = _gaussian((*w.shape[:-2], n, sketch), seed, w)
    else:
        if w.dim() != 3 or len(seed) != w.shape[0]:
            raise ValueError(f"{len(seed)} seeds for a stack of shape {tuple(w.shape)}; give one per matrix of a 3-D stack")
        omega = torch.stack([_gaussian((n, sketch), s, w) for s in seed])
    q = torch.linalg.qr(w @ omega).Q
    for _ in range(POWER_ITERATIONS):
        q = torch.linalg.qr(w.mT @ q).Q
        q = torch.linalg.qr(w @ q).Q
    ub, s, vh = torch.linalg.svd(q.mT @ w, full_matrices=False)
    return (q @ ub)[..., :rank], s[..., :rank], vh[..., :rank, :]


def top_k_indices(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Sorted int64 indices of the k largest (or smallest) of 1-D ``scores``, ties to the lower index."""
    kth = torch.topk(scores, k, largest=largest, sorted=False).values
    threshold = kth.min() if largest else kth.max()
    beyond = (scores > threshold) if largest else (scores < threshold)
    chosen = beyond.nonzero().squeeze(1)
    tied = (scores == threshold).nonzero().squeeze(1)[: k - chosen.numel()]
    return torch.cat([chosen, tied]).sort().values


def top_k_principal(scores: torch.Tensor, k: int, largest: bool, block_size: int | None) -> torch.Tensor:
    """The principal selectors' choice from the (m, n) scores |W_r|: k entries, or whole blocks with ``block_size``."""
    if block_size is None:
        return top_k_indices(scores.flatten(), k, largest)
    return top_k_blocks(scores, k, block_size, largest)


def top_k_blocks(scores: torch.Tensor, k: int, block_size: int, largest: bool = True) -> torch.Tensor:
    """Sorted int64 flat indices of every entry of the max(1, k // b**2) b x b blocks of (m, n) ``scores`` whose
    sums are the largest (or smallest).

    A block's score is the sum of its entries' scores (for the principal
    selectors, the L1 norm of W_r over the block); ties go to the lower block
    in row-major block order. b must divide m and n. At most k entries are
    selected, except that a k below b**2 still takes one block.
    """
    m, n = scores.shape
    b = block_size
    sums = scores.reshape(m // b, b, n // b, b).sum(dim=(1, 3), dtype=torch.float32).flatten()
    blocks = top_k_indices(sums, min(max(1, k // (b * b)), sums.numel()), largest)
    offsets = torch.arange(b, device=scores.device)
    rows = (blocks // (n // b) * b).unsqueeze(1) + offsets
    cols = (blocks % (n // b) * b).unsqueeze(1) + offsets
    return (rows.unsqueeze(2) * n + cols.unsqueeze(1)).flatten().sort().values


def _gaussian(shape, seed: int, like: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(*shape, generator=gen, device=like.device, dtype=like.dtype)


def _check_selection(weight: torch.Tensor, k, selector: str, block_size: int | None = None) -> None:
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; allowed: {', '.join(SELECTORS)}")
    if weight.dim() != 2:
        raise ValueError(f"selection needs a 2-D weight, got shape {tuple(weight.shape)}")
    numel = weight.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= numel:
        raise ValueError(f"k must be an integer in [1, {numel}] for shape {tuple(weight.shape)}, got {k!r}")
    if block_size is not None:
        check_block_size(block_size, selector)
        check_blocks_fit(block_size, tuple(weight.shape), "the weight")


def check_blocks_fit(block_size: int, shape: tuple, what: str) -> None:
    """Raise ValueError, naming ``what``, unless ``block_size`` divides both dimensions of ``shape``."""
    if shape[0] % block_size or shape[1] % block_size:
        raise ValueError(f"block_size {block_size} does not divide the shape {shape} of {what}; whole blocks must "
                         f"tile the matrix (choose a block size dividing every target's dimensions)")


def _per_matrix(name: str, value, count: int) -> list:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} values for {count} matrices")
    return values


def shape_groups(weights: list[torch.Tensor], max_group_numel: int) -> list[list[int]]:
    """Positions of ``weights`` grouped by (shape, device), each group at most max_group_numel entries (>= 1 matrix)."""
    by_shape: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        by_shape.setdefault((tuple(w.shape), w.device), []).append(i)
    groups = []
    for (shape, _), positions in by_shape.items():
        size = max(1, max_group_numel // (shape[0] * shape[1]))
        groups += [positions[start : start + size] for start in range(0, len(positions), size)]
    return groups


def _random_indices(numel: int, k: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    keys = torch.rand(numel, generator=gen, device=device)
    return top_k_indices(keys, k)


_warned_clamps: set[tuple[int, int]] = set()


def _warn_clamped(requested: int, full_rank: int) -> None:
    if (requested, full_rank) not in _warned_clamps:
        _warned_clamps.add((requested, full_rank))
        warnings.warn(f"filter_rank {requested} exceeds min(m, n) = {full_rank}; using {full_rank}", stacklevel=3)
