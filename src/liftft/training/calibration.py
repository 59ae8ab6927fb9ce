"""The calibration pass of a `liftft train --method gradient` run: |gradient| summed over its own first
micro-batches, in its loop's order, with the loss it trains with."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch
from torch import nn

from liftft.engine.calibration import gradient_scores, placeholder_scores
from liftft.engine.targets import find_targets
from liftft.training.checkpoint import latest_checkpoint
from liftft.utils import distributed

# Micro-batches `liftft train --method gradient` sums |gradient| over unless --calibration-batches says otherwise:
# one optimizer step at the default --grad-accum.
DEFAULT_CALIBRATION_BATCHES = 16


def first_micro_batches(examples: Sequence, count: int, *, seed: int, batch_size: int, grad_accum: int,
                        world: int = 1, rank: int = 0) -> list[list]:
    """The first ``count`` micro-batches of a `liftft train` run, this rank's share of each, in its loop's order
    (:func:`liftft.data.batches.step_micro_batches`), continued across epochs; micro-batches that leave this rank nothing
    at an epoch's end are counted but empty."""
    from liftft.data.batches import step_micro_batches  # loads transformers, which `import liftft` does not need

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
    (:func:`liftft.engine.loss.causal_lm_loss_sum`, mode ``args.loss``, under bf16
    autocast with ``bf16``), in train mode. Across processes each rank scores
    its share of every micro-batch and the ranks average the scores, so all
    select alike.
    """
    # Imported here: they load transformers, which `import liftft` does not need.
    from liftft.data.batches import IGNORE_INDEX, DataCollator
    from liftft.engine.loss import causal_lm_loss_sum, loss_path

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
