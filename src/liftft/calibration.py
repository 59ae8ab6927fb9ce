"""Gradient magnitudes over a few calibration batches: the scores of the paper's gradient-selection ablation,
for any model and batches, and for a `liftft train --method gradient` run from its own first micro-batches."""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from liftft import distributed
from liftft.checkpoint import latest_checkpoint
from liftft.targets import find_targets, freeze_all_but

# Micro-batches `liftft train --method gradient` sums |gradient| over unless --calibration-batches says otherwise:
# one optimizer step at the default --grad-accum.
DEFAULT_CALIBRATION_BATCHES = 16


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
    :class:`~liftft.config.LiftConfig` finds them (pass the same
    ``target_modules`` and ``exclude_modules``); give the result to
    ``LiftAdamW(model, LiftConfig(selector="gradient", update_interval=None),
    scores=...)``. ``loss_fn(model, batch)`` returns the loss; by default
    ``model(**batch).loss``. Only the targets compute gradients, one dense
    gradient at a time is freed as soon as it is added, and afterwards every
    parameter's ``requires_grad`` and ``.grad`` are as they were; the weights
    do not change. The model's train/eval mode is the caller's (dropout).
    """
    targets = find_targets(model, target_modules, exclude_modules)
    held = [name for name, p in targets.items() if p.grad is not None]
    if held:
        raise ValueError(f"{held[0]} already holds a gradient; call zero_grad() before computing gradient scores")
    loss_fn = loss_fn or _model_loss
    scores = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in targets.items()}
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    handles = []
    try:
        freeze_all_but(model, list(targets.values()))
        handles = [p.register_post_accumulate_grad_hook(partial(_add_magnitude, scores[name]))
                   for name, p in targets.items()]
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
        for p in targets.values():
            p.grad = None  # a batch that raised may have left some
        for p, flag in requires_grad:
            p.requires_grad_(flag)
    return scores


def _add_magnitude(total: torch.Tensor, p: torch.Tensor) -> None:
    total.add_(p.grad.abs())
    p.grad = None


def _model_loss(model: nn.Module, batch) -> torch.Tensor:
    loss = model(**batch).loss
    if loss is None:
        raise ValueError("the model returned no loss: give batches with labels, or a loss_fn(model, batch)")
    return loss


def placeholder_scores(model: nn.Module, target_modules: str | Sequence[str] = "all-linear",
                       exclude_modules: str | Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Zero scores of every target's shape, taking no memory (expanded from one zero).

    For a gradient-selecting :class:`~liftft.optim.LiftAdamW` whose state is
    loaded right after it is built (a resumed run): the checkpoint's
    selection replaces the arbitrary one these give, so the calibration
    batches need not be run again.
    """
    targets = find_targets(model, target_modules, exclude_modules)
    return {name: torch.zeros((), dtype=torch.float32, device=p.device).expand(p.shape) for name, p in targets.items()}


def first_micro_batches(examples: Sequence, count: int, *, seed: int, batch_size: int, grad_accum: int,
                        world: int = 1, rank: int = 0) -> list[list]:
    """The first ``count`` micro-batches of a `liftft train` run, this rank's share of each, in its loop's order
    (:func:`liftft.data.step_micro_batches`), continued across epochs; micro-batches that leave this rank nothing
    at an epoch's end are counted but empty."""
    from liftft.data import step_micro_batches  # loads transformers, which `import liftft` does not need

    if not examples:
        raise ValueError("no training examples to take calibration micro-batches from")
    batches: list[list] = []
    step = 0
    while len(batches) < count:
        batches += step_micro_batches(list(examples), step, seed=seed, batch_size=batch_size, grad_accum=grad_accum,
                                      world=world, rank=rank)
        step += 1
    return batches[:count]


def calibration_batches_for(method: str, calibration_batches: int | None) -> int | None:
    """The calibration micro-batches of a `liftft train` run of ``method``: None except for ``gradient``, whose
    default is :data:`DEFAULT_CALIBRATION_BATCHES`; a count given to another method, or below 1, is refused."""
    if method != "gradient":
        if calibration_batches is not None:
            raise ValueError(f"--calibration-batches is for --method gradient, not --method {method}")
        return None
    count = DEFAULT_CALIBRATION_BATCHES if calibration_batches is None else calibration_batches
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"--calibration-batches must be an integer >= 1, got {count!r}")
    return count


def run_gradient_scores(args, model: nn.Module, examples: Sequence[dict], pad_token_id: int,
                        device: torch.device, bf16: bool) -> dict[str, torch.Tensor] | None:
    """The scores of a `liftft train` run with TrainArgs ``args``: None unless its method is ``gradient``.

    A resumed run (``args.resume`` and a checkpoint in ``args.output``) takes
    its selection from the checkpoint's optimizer state, so it gets
    :func:`placeholder_scores` and runs no calibration batch. Otherwise,
    |dL/dW| summed over the run's first ``args.calibration_batches``
    micro-batches (:func:`first_micro_batches`), each micro-batch's L being
    the mean over its target tokens of the loss the loop trains with
    (:func:`liftft.loss.causal_lm_loss_sum`, mode ``args.loss``, under bf16
    autocast with ``bf16``), in train mode. Across processes each rank scores
    its share of every micro-batch and the ranks average the scores, so all
    select alike.
    """
    # Imported here: they load transformers, which `import liftft` does not need.
    from liftft.data import IGNORE_INDEX, DataCollator
    from liftft.loss import causal_lm_loss_sum, loss_path

    if args.method != "gradient":
        return None
    if args.resume and latest_checkpoint(args.output) is not None:
        return placeholder_scores(model, args.lift.target_modules, args.lift.exclude_modules)
    if distributed.is_main_process():
        print(f"liftft train: selecting by |gradient| summed over the first {args.calibration_batches} micro-batches")
    collate = DataCollator(pad_token_id)
    mode = loss_path(model, args.loss)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def token_mean_loss(model: nn.Module, batch: dict) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            total = causal_lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"], mode=mode)
        return total / max(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), 1)

    micro = first_micro_batches(examples, args.calibration_batches, seed=args.seed, batch_size=args.batch_size,
                                grad_accum=args.grad_accum, world=distributed.world_size(), rank=distributed.rank())
    model.train()
    if distributed.world_size() > 1 and not any(micro):  # too few records to give this rank any: it adds nothing
        scores = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                  for name, p in find_targets(model, args.lift.target_modules, args.lift.exclude_modules).items()}
    else:
        scores = gradient_scores(model, (collate(b) for b in micro if b), args.lift.target_modules,
                                 args.lift.exclude_modules, token_mean_loss)
    if distributed.world_size() > 1:
        distributed.average_across_ranks(list(scores.values()))
    return scores
