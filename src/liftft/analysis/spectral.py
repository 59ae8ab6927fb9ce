"""Spectral analysis of a fine-tune (the paper's Figures 5 and 13): how large and how
low-rank each update ΔW = W_tuned − W_base is, and how far it turns W's top singular subspaces."""

from __future__ import annotations

import torch

from liftft.analysis.matrices import group_means, layer_depth, layer_type
from liftft.engine.targets import find_targets
from liftft.utils.progress import progress_bar

METRICS = ("delta_norm", "relative_delta_norm", "effective_rank", "stable_rank", "left_alignment", "right_alignment")


def spectrum(
    base_model,
    tuned_model,
    *,
    top: int = 64,
    target_modules="all-linear",
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict:
    """Spectral metrics (see :func:`matrix_spectrum`) of every target matrix of ``base_model``
    against the same-named weight of ``tuned_model``.

    The SVDs run on ``device`` (default: where each base weight lives), one
    matrix pair at a time, so both models may stay on the CPU. Raises
    ValueError, before any SVD, when the tuned model lacks a target or its shape differs.

    Returns ``{"matrices": {name: {"layer_type", "depth", "shape", *METRICS}},
    "by_type": {type: {"count", *METRICS}}, "by_depth": {depth: {"count", *METRICS}}}``,
    where the groups hold means over their matrices.
    """
    _check_top(top)
    base = find_targets(base_model, target_modules)
    tuned = _matching_weights(tuned_model, base)
    rows = {}
    for name, weight in progress_bar(base.items(), desc="spectrum", disable=not progress):
        where = weight.device if device is None else device
        rows[name] = {
            "layer_type": layer_type(name),
            "depth": layer_depth(name),
            "shape": list(weight.shape),
            **matrix_spectrum(weight.to(where), tuned[name].to(where), top),
        }
    return {
        "matrices": rows,
        "by_type": group_means(rows, lambda name, row: row["layer_type"], METRICS),
        "by_depth": group_means(rows, lambda name, row: row["depth"], METRICS),
    }


def matrix_spectrum(base: torch.Tensor, tuned: torch.Tensor, top: int = 64) -> dict[str, float | None]:
    """Metrics of one update ΔW = tuned − base, computed in fp32 on ``base``'s device.

    ``delta_norm`` is ‖ΔW‖_F and ``relative_delta_norm`` ‖ΔW‖_F / ‖W_base‖_F
    (None for a zero base); ``effective_rank`` and ``stable_rank`` are those of
    ΔW; ``left_alignment`` and ``right_alignment`` are the mean cosines of the
    principal angles between the top-``top`` left (right) singular subspaces of
    base and tuned, ``top`` capped at min(m, n).
    """
    _check_top(top)
    if base.dim() != 2 or base.shape != tuned.shape:
        raise ValueError(f"matrix_spectrum needs two matrices of one shape, got {tuple(base.shape)} and {tuple(tuned.shape)}")
    w_base = base.detach().float()
    w_tuned = tuned.detach().to(w_base.device).float()
    delta = w_tuned - w_base
    delta_singular = torch.linalg.svdvals(delta)
    u_base, _, vh_base = torch.linalg.svd(w_base, full_matrices=False)
    u_tuned, _, vh_tuned = torch.linalg.svd(w_tuned, full_matrices=False)
    r = min(top, *w_base.shape)
    base_norm = torch.linalg.matrix_norm(w_base).item()
    delta_norm = torch.linalg.matrix_norm(delta).item()
    return {
        "delta_norm": delta_norm,
        "relative_delta_norm": delta_norm / base_norm if base_norm else None,
        "effective_rank": effective_rank(delta_singular),
        "stable_rank": stable_rank(delta_singular),
        "left_alignment": subspace_alignment(u_base[:, :r], u_tuned[:, :r]),
        "right_alignment": subspace_alignment(vh_base[:r].mT, vh_tuned[:r].mT),
    }


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp of the entropy of the singular values normalized to sum to 1 (Roy & Vetterli's
    effective rank); 0 for a zero matrix."""
    s = singular_values.double()
    total = s.sum()
    if total == 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum()).item()


def stable_rank(singular_values: torch.Tensor) -> float:
    """‖A‖_F² / ‖A‖_2² from A's singular values; 0 for a zero matrix."""
    s = singular_values.double()
    largest = s.max()
    if largest == 0:
        return 0.0
    return ((s**2).sum() / largest**2).item()


def subspace_alignment(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine of the principal angles between the spans of the orthonormal columns of ``a`` and ``b``.

    The cosines are the singular values of aᵀb; 1 means the same subspace, 0 orthogonal ones.
    """
    if a.shape != b.shape:
        raise ValueError(f"subspace_alignment needs bases of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    cosines = torch.linalg.svdvals(a.mT @ b).clamp(max=1.0)
    return cosines.mean().item()


def _matching_weights(tuned_model, base_targets: dict) -> dict:
    """The tuned model's weights named as the base targets, checked for presence and shape."""
    tuned = dict(tuned_model.named_parameters(remove_duplicate=False))
    missing = [name for name in base_targets if name not in tuned]
    if missing:
        raise ValueError(
            f"the tuned model has no {missing[0]!r} ({len(missing)} of the base's {len(base_targets)} target weights are missing)"
        )
    for name, weight in base_targets.items():
        if tuned[name].shape != weight.shape:
            raise ValueError(
                f"tuned weight {name} has shape {tuple(tuned[name].shape)} but the base's has {tuple(weight.shape)}; "
                "the tuned model must be a fine-tune of this base"
            )
    return {name: tuned[name] for name in base_targets}


def _check_top(top) -> None:
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an integer >= 1, got {top!r}")
