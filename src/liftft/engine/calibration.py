"""Gradient magnitudes over a few calibration batches: the scores of the paper's gradient-selection ablation,
for any model and batches (a `liftft train` run takes its own: :mod:`liftft.training.calibration`)."""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from liftft.engine.gradients import SinkHandle
from liftft.engine.quantized import quantized_targets
from liftft.engine.targets import find_targets, freeze_all_but


def gradient_scores(
    model: nn.Module,
    batches: Iterable,
    target_modules: str | Sequence[str] = "all-linear",
    exclude_modules: str | Sequence[str] | None = None,
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """{target name: sum over ``batches`` of |dL/dW|}, fp32 on each weight's device.

    Each batch's gradient is added in absolute value, so opposite gradients of
    two batches do not cancel. The targets are found as
    :class:`~liftft.engine.config.LiftConfig` finds them (pass the same
    ``target_modules`` and ``exclude_modules``); give the result to
    ``LiftAdamW(model, LiftConfig(selector="gradient", update_interval=None),
    scores=...)``. ``loss_fn(model, batch)`` returns the loss; by default
    ``model(**batch).loss``. Only the targets compute gradients, one dense
    gradient at a time is freed as soon as it is added, and afterwards every
    parameter's ``requires_grad`` and ``.grad`` are as they were; the weights
    do not change. The model's train/eval mode is the caller's (dropout).
    A 4-bit target's gradient is that of dequant(W₄) + Δ (:mod:`liftft.engine.quantized`),
    formed in its layer's backward from dY and X.
    """
    targets = find_targets(model, target_modules, exclude_modules)
    quantized = quantized_targets(model, targets)
    held = [name for name, p in targets.items() if p.grad is not None]
    if held:
        raise ValueError(f"{held[0]} already holds a gradient; call zero_grad() before computing gradient scores")
    loss_fn = loss_fn or _model_loss
    scores = {name: torch.zeros(quantized[name].shape if name in quantized else p.shape, dtype=torch.float32,
                                device=p.device) for name, p in targets.items()}
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    attached = [target for target in quantized.values() if not target.attached]
    handles = []
    try:
        freeze_all_but(model, [p for name, p in targets.items() if name not in quantized])
        handles = [p.register_post_accumulate_grad_hook(partial(_add_magnitude, scores[name]))
                   for name, p in targets.items() if name not in quantized]
        handles += [SinkHandle(target, partial(_add_product_magnitude, scores[name]))
                    for name, target in quantized.items()]
        for target in attached:
            target.attach()
        count = 0
        for count, batch in enumerate(batches, start=1):
            loss = loss_fn(model, batch)
            if not math.isfinite(loss.item()):
                raise ValueError(f"calibration batch {count} gave a non-finite loss ({loss.item()})")
            loss.backward()
        if count == 0:
            raise ValueError("gradient_scores got no calibration batches")
    finally:
        for handle in handles:
            handle.remove()
        for target in attached:
            target.detach()
        for p in targets.values():
            p.grad = None  # a batch that raised may have left some
        for p, flag in requires_grad:
            p.requires_grad_(flag)
    return scores


def _add_magnitude(total: torch.Tensor, p: torch.Tensor) -> None:
    total.add_(p.grad.abs())
    p.grad = None


def _add_product_magnitude(total: torch.Tensor, key, grad_output: torch.Tensor, inputs: torch.Tensor) -> None:
    m, n = total.shape
    total.add_((grad_output.reshape(-1, m).float().t() @ inputs.reshape(-1, n).float()).abs_())


def _model_loss(model: nn.Module, batch) -> torch.Tensor:
    loss = model(**batch).loss
    if loss is None:
        raise ValueError("the model returned no loss: give batches with labels, or a loss_fn(model, batch)")
    return loss


def placeholder_scores(model: nn.Module, target_modules: str | Sequence[str] = "all-linear",
                       exclude_modules: str | Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Zero scores of every target's shape, taking no memory (expanded from one zero).

    For a gradient-selecting :class:`~liftft.engine.optim.LiftAdamW` whose state is
    loaded right after it is built (a resumed run): the checkpoint's
    selection replaces the arbitrary one these give, so the calibration
    batches need not be run again.
    """
    targets = find_targets(model, target_modules, exclude_modules)
    quantized = quantized_targets(model, targets)
    return {name: torch.zeros((), dtype=torch.float32, device=p.device).expand(
        quantized[name].shape if name in quantized else p.shape) for name, p in targets.items()}
