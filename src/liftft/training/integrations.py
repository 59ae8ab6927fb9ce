"""Using LiftAdamW inside transformers' Trainer and TRL's trainers (SFTTrainer, GRPOTrainer)."""

from __future__ import annotations

import logging
import os
import warnings

from transformers import TrainerCallback, get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging as hf_logging

from liftft.engine.config import LiftConfig
from liftft.deltas.delta import save_delta
from liftft.engine.optim import LiftAdamW
from liftft.engine.trainable import trainable_parameters, trainable_summary, unwrap_lift_optimizer

logger = logging.getLogger("liftft")
# The Trainer reports its (wrong) trainable count here; the true one goes beside it, at the same verbosity.
trainer_logger = hf_logging.get_logger("transformers.trainer")


def lift_optimizers(model, training_args, cfg: LiftConfig, *, dense_params=None, num_training_steps: int | None = None):
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``, built from ``training_args`` so none is ignored.

    The :class:`LiftAdamW` over ``model`` takes ``learning_rate``,
    ``adam_beta1``/``adam_beta2``, ``adam_epsilon``, ``weight_decay`` and
    ``max_grad_norm`` from the TrainingArguments (a LiftAdamW built by hand
    keeps its own, and the Trainer would silently use those). The scheduler is
    transformers' ``get_scheduler`` of ``lr_scheduler_type``, with
    ``get_warmup_steps`` and ``lr_scheduler_kwargs``, over
    ``num_training_steps``, or ``max_steps`` when that is set. When neither is
    known (the count depends on the dataset's length), the scheduler is None:
    the Trainer then builds this same one from the same arguments once it
    knows the number of steps. Use it with :class:`LiftTrainerCallback`.
    """
    args = training_args
    optimizer = LiftAdamW(model, cfg, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                          eps=args.adam_epsilon, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                          dense_params=dense_params)
    steps = num_training_steps or (args.max_steps if args.max_steps > 0 else None)
    if steps is None:
        return optimizer, None
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(steps),
                              num_training_steps=steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
    return optimizer, scheduler


class LiftTrainerCallback(TrainerCallback):
    """What a Trainer needs to train, report and save correctly with a LiftAdamW.

    Use it as ``Trainer(..., optimizers=lift_optimizers(model, args, cfg), callbacks=[LiftTrainerCallback()])``
    (TRL's SFTTrainer and GRPOTrainer take the same arguments). Gradient
    accumulation and selection refreshes need nothing: the optimizer's hooks
    accumulate across micro-batches and ``step()`` counts optimizer steps. The callback:

    - **clips**: the Trainer's ``clip_grad_norm_`` sees no target gradients
      (they are gathered and freed in backward), so at train start it moves
      ``TrainingArguments.max_grad_norm`` into the optimizer, and sets the
      Trainer's own to 0 during each step only, so that training_args.bin
      records the clipping that was done. With ``LiftAdamW(step_in_backward=True)``
      it instead checks that the Trainer neither clips nor accumulates;
    - **warns** when the optimizer's lr, betas, eps or weight decay differ from
      the TrainingArguments', which the Trainer would otherwise ignore silently;
    - **reports** the values trained per step (the Trainer counts every entry
      of the target matrices), and the optimizer's gradient norm as the logs'
      ``grad_norm`` (the Trainer's is 0: it sees no target gradients), or no
      ``grad_norm`` when the optimizer does not clip. trainer_state.json, the
      console and later callbacks get it; ``report_to`` integrations, which the
      Trainer calls before the callbacks it is given, still get the Trainer's;
    - **saves** the compact delta (delta.safetensors and liftft.json, each
      written atomically) into every checkpoint dir and, at train end, into
      ``output_dir``, unless ``save_deltas=False``.
    """

    def __init__(self, save_deltas: bool = True):
        self.save_deltas = save_deltas
        self._max_grad_norm = 0.0

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        opt = unwrap_lift_optimizer(optimizer)
        _warn_on_ignored_arguments(opt, args)
        if state.is_world_process_zero:
            trainer_logger.info("liftft: %s (the Trainer's count includes every entry of the target matrices)",
                                trainable_summary(model, opt))
        if opt.step_in_backward:
            _check_step_in_backward_fits(args)
            return control
        if args.max_grad_norm and args.max_grad_norm > 0:
            if opt.max_grad_norm is not None and opt.max_grad_norm != args.max_grad_norm:
                raise ValueError(f"TrainingArguments.max_grad_norm={args.max_grad_norm} conflicts with "
                                 f"LiftAdamW(max_grad_norm={opt.max_grad_norm}); set one of them")
            opt.max_grad_norm = args.max_grad_norm
            logger.info("LiftAdamW now clips at %s over its gathered gradients", opt.max_grad_norm)
        self._max_grad_norm = args.max_grad_norm
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        args.max_grad_norm = 0.0  # the Trainer's clip_grad_norm_ would clip the dense params a second time
        return control

    def on_step_end(self, args, state, control, **kwargs):
        args.max_grad_norm = self._max_grad_norm
        return control

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None or "grad_norm" not in logs:
            return control
        norm = unwrap_lift_optimizer(optimizer).grad_norm
        # The Trainer appended these logs to log_history (as a copy) just before calling on_log.
        targets = [logs]
        if state.log_history and "grad_norm" in state.log_history[-1]:
            targets.append(state.log_history[-1])
        for target in targets:
            if norm is None:
                del target["grad_norm"]
            else:
                target["grad_norm"] = float(norm)
        return control

    def on_save(self, args, state, control, optimizer=None, model=None, **kwargs):
        if self.save_deltas:
            checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            _save_delta(checkpoint, args, state, optimizer, model)
        return control

    def on_train_end(self, args, state, control, optimizer=None, model=None, **kwargs):
        args.max_grad_norm = self._max_grad_norm
        if self.save_deltas:
            _save_delta(args.output_dir, args, state, optimizer, model)
        return control


def _save_delta(directory: str, args, state, optimizer, model) -> None:
    """Save the delta of ``optimizer``'s run into ``directory`` from the process that saves (under FSDP2 every
    process takes part, since the delta is gathered from each one's rows; untested under the Trainer)."""
    opt = unwrap_lift_optimizer(optimizer)
    if not (args.should_save or opt.sharded):
        return
    losses = [entry for entry in state.log_history if "loss" in entry]
    metrics = {"global_step": state.global_step, "epoch": state.epoch, "trainable": trainable_parameters(model, opt)[0],
               **({"loss": losses[-1]["loss"]} if losses else {})}
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    save_delta(opt, directory, base_model=base, training_args=args.to_dict(), metrics=metrics)


def _warn_on_ignored_arguments(opt: LiftAdamW, args) -> None:
    """Warn, naming each, when the optimizer's hyperparameters are not the TrainingArguments' (the Trainer uses the
    optimizer's and ignores these)."""
    group = opt.param_groups[0]
    pairs = {"learning_rate": (args.learning_rate, group.get("initial_lr", group["lr"])),
             "adam_beta1": (args.adam_beta1, group["betas"][0]), "adam_beta2": (args.adam_beta2, group["betas"][1]),
             "adam_epsilon": (args.adam_epsilon, group["eps"]), "weight_decay": (args.weight_decay, group["weight_decay"])}
    differing = [f"{name}={wanted} (LiftAdamW has {used})" for name, (wanted, used) in pairs.items() if wanted != used]
    if differing:
        warnings.warn(f"TrainingArguments {', '.join(differing)}: the Trainer trains with the optimizer's values and "
                      "ignores these; build the optimizer with liftft.lift_optimizers(model, training_args, cfg)",
                      stacklevel=2)


def _check_step_in_backward_fits(args) -> None:
    """LiftAdamW(step_in_backward=True) updates during each backward: no clipping, no accumulation."""
    if args.max_grad_norm and args.max_grad_norm > 0:
        raise ValueError(f"LiftAdamW(step_in_backward=True) cannot clip; set TrainingArguments(max_grad_norm=0) "
                         f"(it is {args.max_grad_norm})")
    if args.gradient_accumulation_steps != 1:
        raise ValueError(f"LiftAdamW(step_in_backward=True) cannot accumulate gradients; set "
                         f"TrainingArguments(gradient_accumulation_steps=1) (it is {args.gradient_accumulation_steps})")
