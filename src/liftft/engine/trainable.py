"""How many values a run trains: the figure to report, in PEFT's words.

Under LiftAdamW the target matrices keep ``requires_grad=True`` (their
gradients must flow to be gathered), so counting parameters that require
gradients, as transformers and PEFT do, reports every target entry: about 9x
what LIFT trains at rank 128. The true count is the optimizer's.
"""

from __future__ import annotations

import torch
from torch import nn

from liftft.utils import distributed
from liftft.engine.optim import LiftAdamW
from liftft.engine.quantized import parameter_count


def trainable_parameters(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[int, int]:
    """(values trained per step, all parameter values of ``model``).

    With ``optimizer``, which must be a :class:`liftft.LiftAdamW` or wrap one
    (as accelerate's does; TypeError otherwise), the trained values are its
    selected entries plus its dense params, summed over the ranks when its
    targets are FSDP2-sharded (a collective then). Without one, the values of
    the parameters that require gradients. A 4-bit weight counts as the
    matrix it stands for.
    """
    total = parameter_count(model)
    if optimizer is None:
        return sum(p.numel() for p in model.parameters() if p.requires_grad), total
    optimizer = unwrap_lift_optimizer(optimizer)
    dense = sum(p.numel() for _, p, kind in optimizer.trained_parameters() if kind == "dense")
    if optimizer.sharded:
        (selected,) = distributed.sum_across_ranks([optimizer.num_selected])
        return int(selected) + dense, total
    return optimizer.num_selected + dense, total


def unwrap_lift_optimizer(optimizer: torch.optim.Optimizer) -> LiftAdamW:
    """The LiftAdamW inside wrappers such as accelerate's AcceleratedOptimizer; TypeError if there is none."""
    while not isinstance(optimizer, LiftAdamW):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            raise TypeError(f"expected a LiftAdamW (possibly wrapped), got {type(optimizer).__name__}")
        optimizer = inner
    return optimizer


def trainable_summary(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> str:
    """PEFT's line "trainable params: N || all params: M || trainable%: P" with :func:`trainable_parameters`."""
    trained, total = trainable_parameters(model, optimizer)
    return f"trainable params: {trained:,d} || all params: {total:,d} || trainable%: {100 * trained / total:.4f}"


def print_trainable_parameters(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Print :func:`trainable_summary`, as PEFT's ``model.print_trainable_parameters()`` does."""
    print(trainable_summary(model, optimizer))
