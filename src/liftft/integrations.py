"""Using LiftAdamW inside transformers' Trainer and TRL's SFTTrainer."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from liftft.optim import LiftAdamW

logger = logging.getLogger("liftft")


def unwrap_lift_optimizer(optimizer) -> LiftAdamW:
    """The LiftAdamW inside wrappers such as accelerate's AcceleratedOptimizer."""
    while not isinstance(optimizer, LiftAdamW):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            raise TypeError(f"expected a LiftAdamW (possibly wrapped), got {type(optimizer).__name__}")
        optimizer = inner
    return optimizer


class LiftTrainerCallback(TrainerCallback):
    """Makes a Trainer clip gradients correctly when its optimizer is a LiftAdamW.

    Use it as ``Trainer(..., optimizers=(opt, scheduler), callbacks=[LiftTrainerCallback()])``
    (TRL's SFTTrainer takes the same arguments). Gradient accumulation and
    selection refreshes need nothing: the optimizer's hooks accumulate across
    micro-batches and ``step()`` counts optimizer steps. Clipping does: the
    Trainer's ``clip_grad_norm_`` sees no target gradients (they are gathered and
    freed in backward), so at train start this callback moves
    ``TrainingArguments.max_grad_norm`` into the optimizer and sets the
    Trainer's own to 0. With ``LiftAdamW(step_in_backward=True)`` it instead
    checks that the Trainer neither clips nor accumulates, which that mode cannot do.
    """

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap_lift_optimizer(optimizer)
        if opt.step_in_backward:
            _check_step_in_backward_fits(args)
            return control
        if args.max_grad_norm and args.max_grad_norm > 0:
            if opt.max_grad_norm is not None and opt.max_grad_norm != args.max_grad_norm:
                raise ValueError(f"TrainingArguments.max_grad_norm={args.max_grad_norm} conflicts with "
                                 f"LiftAdamW(max_grad_norm={opt.max_grad_norm}); set one of them")
            opt.max_grad_norm = args.max_grad_norm
            args.max_grad_norm = 0.0
            logger.info("LiftAdamW now clips at %s over its gathered gradients", opt.max_grad_norm)
        return control


def _check_step_in_backward_fits(args) -> None:
    """LiftAdamW(step_in_backward=True) updates during each backward: no clipping, no accumulation."""
    if args.max_grad_norm and args.max_grad_norm > 0:
        raise ValueError(f"LiftAdamW(step_in_backward=True) cannot clip; set TrainingArguments(max_grad_norm=0) "
                         f"(it is {args.max_grad_norm})")
    if args.gradient_accumulation_steps != 1:
        raise ValueError(f"LiftAdamW(step_in_backward=True) cannot accumulate gradients; set "
                         f"TrainingArguments(gradient_accumulation_steps=1) (it is {args.gradient_accumulation_steps})")
