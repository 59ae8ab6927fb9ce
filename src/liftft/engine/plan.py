"""`SelectionPlan`: how LiftAdamW selects its targets, whatever the selector, fixed when the optimizer is built.

The selectors of :data:`liftft.engine.config.SELECTORS` need nothing but each
matrix; ``"s2ft"`` needs each target's role in the model (computed once, by
:func:`liftft.engine.structured.s2ft_channels`); ``"gradient"`` needs calibration
scores (:func:`liftft.engine.calibration.gradient_scores`).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from liftft.engine.config import LiftConfig
from liftft.engine.layout import index_dtype
from liftft.engine.selection import check_blocks_fit, iter_select_many, selection_seed, top_k_indices
from liftft.engine.structured import channel_indices, s2ft_channels


class SelectionPlan:
    """Selects every target of one LiftAdamW: the first selection and each refresh.

    Built by :func:`selection_plan`. For ``"gradient"`` the scores are used by
    the first selection and then released, so they do not stay alive for the
    whole run; that selector never refreshes.
    """

    def __init__(self, names: list[str], cfg: LiftConfig, channels=None, scores=None):
        self.names = names
        self.cfg = cfg
        self._channels = channels
        self._scores = scores

    def iter_select(
        self, weights: list[torch.Tensor], ks: list[int], refreshes: int, prepare: Callable[[torch.Tensor], torch.Tensor]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (position, sorted flat indices) for every target, as :func:`liftft.engine.selection.iter_select_many` does.

        ``weights`` are the targets' whole matrices in the order of ``names``,
        ``ks`` their budgets, ``refreshes`` the refresh count (it seeds the
        random selector and the randomized SVD), and ``prepare`` maps a weight
        to the matrix a weight-based selector scores.
        """
        cfg = self.cfg
        if cfg.selector == "s2ft":
            return self._s2ft(weights, ks)
        if cfg.selector == "gradient":
            return self._gradient(weights, ks)
        seeds = [selection_seed(cfg.seed, ordinal, refreshes) for ordinal in range(len(weights))]
        return iter_select_many(weights, ks, cfg.selector, cfg.filter_rank, cfg.svd, seeds, prepare,
                                block_size=cfg.block_size)

    def _s2ft(self, weights, ks):
        for i, (name, weight, k) in enumerate(zip(self.names, weights, ks)):
            idx = channel_indices(self._channels[name], tuple(weight.shape), k, self.cfg.seed)
            yield i, idx.to(device=weight.device, dtype=index_dtype(weight.numel()))

    def _gradient(self, weights, ks):
        if self._scores is None:
            raise RuntimeError("selector 'gradient' selected once, from its calibration scores, which are released; "
                               "it cannot refresh")
        scores, self._scores = self._scores, None
        for i, (name, weight, k) in enumerate(zip(self.names, weights, ks)):
            with torch.no_grad():
                idx = top_k_indices(scores.pop(name).to(weight.device, torch.float32).flatten(), k)
            yield i, idx.to(index_dtype(weight.numel()))


def selection_plan(model: nn.Module, targets: dict[str, torch.Tensor], cfg: LiftConfig,
                   scores: dict[str, torch.Tensor] | None = None) -> SelectionPlan:
    """The plan that selects ``targets`` ({name: weight} of ``model``) as ``cfg`` says; checks everything first.

    ``scores`` ({target name: non-negative scores of the weight's shape}) is
    required by, and only allowed with, ``cfg.selector == "gradient"``.
    Raises ValueError naming the target for a ``cfg.block_size`` that does not
    divide its shape, or scores that miss or mismatch a target or hold
    non-finite or negative values.
    """
    names = list(targets)
    if cfg.block_size is not None:
        for name, weight in targets.items():
            check_blocks_fit(cfg.block_size, tuple(weight.shape), f"target {name}")
    if (cfg.selector == "gradient") != (scores is not None):
        raise ValueError("selector 'gradient' needs scores=liftft.gradient_scores(model, batches), and only it takes "
                         f"scores (selector {cfg.selector!r}, scores {'given' if scores is not None else 'missing'})")
    if scores is not None:
        _check_scores(scores, targets)
        return SelectionPlan(names, cfg, scores=dict(scores))
    if cfg.selector == "s2ft":
        return SelectionPlan(names, cfg, channels=s2ft_channels(model, targets))
    return SelectionPlan(names, cfg)


def _check_scores(scores: dict, targets: dict[str, torch.Tensor]) -> None:
    if not isinstance(scores, dict):
        raise TypeError(f"scores must be a dict of target name to tensor, got {type(scores).__name__}")
    missing = [name for name in targets if name not in scores]
    extra = [name for name in scores if name not in targets]
    if missing or extra:
        raise ValueError(f"scores must hold exactly the targets; missing: {', '.join(missing) or 'none'}; "
                         f"not targets: {', '.join(extra) or 'none'}")
    for name, weight in targets.items():
        score = scores[name]
        if not isinstance(score, torch.Tensor) or tuple(score.shape) != tuple(weight.shape):
            raise ValueError(f"scores[{name!r}] must be a tensor of the weight's shape {tuple(weight.shape)}, got "
                             f"{tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__}")
        if not bool(torch.isfinite(score).all()):
            raise ValueError(f"scores[{name!r}] holds non-finite values")
        # Selection takes the largest scores, so signed gradients would drop the most negative, most important ones.
        if bool((score < 0).any()):
            raise ValueError(f"scores[{name!r}] holds negative values; scores must be non-negative, such as |gradient| "
                             "(liftft.gradient_scores returns them)")
