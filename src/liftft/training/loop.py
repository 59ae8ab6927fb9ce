"""The training loop of `liftft train`: seeded micro-batch order, accumulation, clipping, checkpoints, resume."""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file

from liftft.utils import distributed
from liftft.utils.atomic import atomic_write
from liftft.utils.progress import progress_bar
from liftft.training.checkpoint import (CHECKPOINTS, checkpoint_name, disk_errors_named, latest_checkpoint, load_checkpoint,
                               prune_checkpoints, save_checkpoint, set_aside_diverged)
from liftft.data.batches import IGNORE_INDEX, DataCollator, step_micro_batches
from liftft.deltas.delta import apply_delta, delta_from_optimizer, load_delta, write_delta
from liftft.training.fsdp import (RANK_FILE, apply_delta_to_shards, gathered_state_dicts, load_local_state,
                         local_state, stage_rank_file, take_rank_files)
from liftft.utils.errors import TrainingDiverged
from liftft.engine.loss import causal_lm_loss_sum, full_path_reason, loss_path
from liftft.training.reporting import Reporter

logger = logging.getLogger("liftft")

LOG_FILE = "train_log.jsonl"


class TrainingLoop:
    """Steps over micro-batches in a seeded order; checkpoints and resumes at step boundaries.

    :func:`liftft.training.train.run_training` builds one per run from its ``TrainArgs``
    ``args``, the :class:`liftft.engine.methods.MethodSetup` ``setup`` and the encoded
    ``examples``. ``train_step`` (one optimizer step) and ``loss_sum`` (one
    forward) are its seams: wrapping them interrupts or corrupts a run at a
    chosen ``step``. The held-out ``val_examples`` are evaluated every
    ``args.eval_steps`` and at the end; every record logged also goes to
    ``reporter`` (:mod:`liftft.training.reporting`).
    """

    def __init__(self, args, model, setup, examples, pad_token_id, device, bf16, val_examples=(),
                 reporter: Reporter | None = None):
        self.args, self.model, self.setup = args, model, setup
        self.optimizer = setup.optimizer
        self.examples = examples
        self.val_examples = val_examples
        self.reporter = reporter or Reporter()
        self.collate = DataCollator(pad_token_id)
        self.device = device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.loss_mode = loss_path(model, args.loss)
        if self.loss_mode != args.loss:
            logger.warning("--loss %s: %s, so the loss is computed from the full logits", args.loss,
                           full_path_reason(model))
        # Each of the world's ranks takes batch_size examples of every micro-batch.
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.is_main = self.rank == 0
        self.sharded = args.fsdp  # FSDP2: forward, backward and checkpoints are collectives of every rank
        self.micro_per_epoch = math.ceil(len(examples) / (args.batch_size * self.world))
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / args.grad_accum)
        self.total_steps = args.max_steps or math.ceil(args.epochs * self.steps_per_epoch)
        from transformers import get_scheduler

        name = "constant_with_warmup" if args.scheduler == "constant" else args.scheduler
        self.scheduler = get_scheduler(name, self.optimizer,
                                       num_warmup_steps=math.ceil(args.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.loop_grad_norm = None  # the norm the loop clipped by at the last step (methods it clips for)
        self.out = Path(args.output)
        # The newest checkpoint is not known good until the step after it ran with a finite loss: until then the
        # one before it is kept too, beyond --save-total-limit (see save and _diverged).
        self._prune_pending = False
        # The settings this run changed on --resume (run_dir.check_continues), as {name: (recorded, now)}.
        self.changed: dict[str, tuple] = {}

    def maybe_resume(self) -> None:
        """With ``args.resume``, continue from the latest checkpoint in the output dir, if there is one."""
        checkpoint = latest_checkpoint(self.out) if self.args.resume else None
        if checkpoint is None:
            if self.args.resume and self.is_main:
                self._forget_log_after(0)  # an earlier attempt's records: this run logs those steps again
                if self.changed:
                    print(f"liftft train: no checkpoint in {self.out / CHECKPOINTS}: starting from step 0"
                          f"{self.changes_note()}")
            return
        tensors, state = load_checkpoint(checkpoint)
        if self.sharded and self.setup.kind != "sparse":  # this rank's shards of the weights and of AdamW's state
            load_local_state(self.model, self.optimizer, load_file(checkpoint / RANK_FILE.format(self.rank)),
                             state["optimizer_param_groups"])
        elif self.sharded:
            apply_delta_to_shards(self.model, load_delta(checkpoint))
            self.optimizer.load_state_dict(state["optimizer_shards"][self.rank])
        else:
            if self.setup.kind == "sparse":
                apply_delta(self.model, checkpoint)
            else:
                self.model.load_state_dict(tensors, strict=False)
            self.optimizer.load_state_dict(state["optimizer"])
        fresh = list(self.scheduler.base_lrs)  # this invocation's --lr: it may differ from the checkpoint's
        self.scheduler.load_state_dict(state["scheduler"])
        self._reschedule(fresh)
        torch.set_rng_state(state["rng"])
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        logger.info("resumed from %s at step %d", checkpoint, self.step)
        if self.is_main:
            self._forget_log_after(self.step)
            print(f"liftft train: resumed from {checkpoint} at step {self.step}{self.changes_note()}")

    def changes_note(self) -> str:
        """``; lr 1e+10 -> 0.001 from step 2 on`` for the settings this resumption changed, else empty."""
        if not self.changed:
            return ""
        changes = ", ".join(f"{name} {_shown(old)} -> {_shown(new)}" for name, (old, new) in self.changed.items())
        return f"; {changes} from step {self.step + 1} on"

    def _reschedule(self, base_lrs: list[float]) -> None:
        """Make ``base_lrs`` (this run's peak lr of each group) the schedule's, at the resumed position.

        A checkpoint's scheduler and optimizer state hold the lr of the run that
        wrote it; --resume with another --lr replaces it. The schedule's length
        is this run's already (its lambdas are not part of the state).
        """
        scheduler = self.scheduler
        scheduler.base_lrs = list(base_lrs)
        lrs = [base * lam(scheduler.last_epoch) for base, lam in zip(base_lrs, scheduler.lr_lambdas)]
        for group, base, lr in zip(self.optimizer.param_groups, base_lrs, lrs):
            group["initial_lr"], group["lr"] = base, lr
        scheduler._last_lr = lrs

    def run(self) -> dict:
        """Train up to the last step, logging every ``logging_steps``, evaluating every ``eval_steps`` and at the end,
        checkpointing every ``save_steps``; returns the metrics.

        ``seconds`` in the log counts training alone: evaluations stop the clock.
        """
        args = self.args
        self.model.train()
        bar = progress_bar(total=self.total_steps, initial=self.step, desc=f"train {args.method}", unit="step",
                           disable=not args.progress or not self.is_main)
        loss, losses = float("nan"), []
        last = {"tokens": self.tokens, "seconds": round(self.elapsed, 6)}  # the previous record, or the resume point
        start = time.perf_counter() - self.elapsed
        while self.step < self.total_steps:
            lr = self.scheduler.get_last_lr()[0]
            step_start = time.perf_counter()
            try:
                loss, tokens = self.train_step(self._micro_batches(self.step))
            except ValueError as err:  # LIFT's refresh cannot select from non-finite weights
                bad = self._nonfinite_tensor()
                if bad is None:
                    raise
                raise TrainingDiverged(self._diverged(f"{bad} holds non-finite values after step {self.step + 1}'s "
                                                      "update, which no checkpoint or output will hold",
                                                      weights_of=self.step)) from err
            if not math.isfinite(loss):
                raise TrainingDiverged(self._diverged(f"the loss became {loss} at step {self.step + 1}",
                                                      weights_of=self.step))
            if self._prune_pending and self.is_main:  # the newest checkpoint just proved good
                prune_checkpoints(self.out, args.save_total_limit)
            self._prune_pending = False
            self.step += 1
            self.tokens += tokens
            self.elapsed = time.perf_counter() - start
            losses.append(loss)
            if self.step % args.logging_steps == 0 or self.step == self.total_steps:
                last = self._train_record(losses, lr, last)
                self._log(last)
                losses = []
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                            tokens_per_s=f"{tokens / max(time.perf_counter() - step_start, 1e-6):,.0f}")
            bar.update(1)
            if self.val_examples and args.eval_steps and self.step % args.eval_steps == 0 and self.step < self.total_steps:
                start += self._evaluate_and_log()[1]
            if args.save_steps and self.step % args.save_steps == 0 and self.step < self.total_steps and (
                    self.is_main or self.sharded):
                self.save()
        bar.close()
        self._refuse_nonfinite()
        metrics = {"train_loss": loss, "steps": self.step, "tokens": self.tokens, "train_seconds": round(self.elapsed, 3)}
        if self.val_examples:
            metrics["eval_loss"] = self._evaluate_and_log()[0]
        return metrics

    def _train_record(self, losses: list[float], lr: float, last: dict) -> dict:
        """The train_log.jsonl record of the steps since record ``last``: their mean ``loss``, the last step's ``lr``
        and ``grad_norm``, ``tokens`` and ``seconds`` so far, and tokens/s since ``last`` and since the start."""
        seconds = round(self.elapsed, 6)
        return {"step": self.step, "loss": sum(losses) / len(losses), "lr": lr, "grad_norm": self._grad_norm(),
                "tokens": self.tokens, "seconds": seconds,
                "tokens_per_s": round((self.tokens - last["tokens"]) / max(seconds - last["seconds"], 1e-6), 1),
                "cumulative_tokens_per_s": round(self.tokens / max(seconds, 1e-6), 1)}

    def _grad_norm(self) -> float | None:
        """The gradient norm of the last step, before clipping; None when nothing clips."""
        norm = self.optimizer.grad_norm if self.setup.kind == "sparse" else self.loop_grad_norm
        if norm is not None and distributed.is_dtensor(norm):  # clip_grad_norm_ of FSDP2's gradients
            norm = norm.full_tensor()
        return None if norm is None else float(norm)

    def _evaluate_and_log(self) -> tuple[float, float]:
        """Evaluate the held-out examples and log the loss as an eval record; returns (the loss, the seconds it took)."""
        began = time.perf_counter()
        loss = self.evaluate(self.val_examples)
        seconds = time.perf_counter() - began
        self._log({"step": self.step, "eval_loss": loss, "eval_seconds": round(seconds, 3)})
        return loss, seconds

    def _micro_batches(self, step: int) -> list[list[dict]]:
        """The micro-batches of optimizer step ``step``: a function of the seed and the position alone."""
        args = self.args
        return step_micro_batches(self.examples, step, seed=args.seed, batch_size=args.batch_size,
                                  grad_accum=args.grad_accum, world=self.world, rank=self.rank)

    def train_step(self, micro_batches) -> tuple[float, int]:
        """One optimizer step over this rank's ``micro_batches``: (mean loss per target token, tokens seen)."""
        batches = [self.collate(b) for b in micro_batches if b]
        # Token-weighted loss over the whole accumulated batch of all ranks, so accumulation and data
        # parallelism equal one big batch; the gradients are then averaged over ranks, hence * world.
        (n_tokens,) = distributed.sum_across_ranks([sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)])
        total = 0.0
        for batch in batches:
            loss_sum = self.loss_sum(batch)
            (loss_sum / n_tokens * self.world).backward()
            total += loss_sum.item()
        if self.sharded:  # FSDP2's forward and backward are collectives: match the ranks with more micro-batches
            for _ in range(len(micro_batches) - len(batches)):
                (self.loss_sum(self.collate(self.examples[:1])) * 0.0).backward()
        seen = sum(int(b["attention_mask"].sum()) for b in batches)
        total, seen = distributed.sum_across_ranks([total, seen])
        # LiftAdamW averages its own gathered gradients, and FSDP2 reduce-scatters every gradient itself.
        if self.setup.kind != "sparse" and self.world > 1 and not self.sharded:
            trained = [p for p in self.model.parameters() if p.requires_grad]
            for p in trained:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            distributed.average_across_ranks([p.grad for p in trained])
        if self.setup.loop_clip_norm is not None:
            self.loop_grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                                 self.setup.loop_clip_norm)
        if math.isfinite(total):
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / max(n_tokens, 1), int(seen)

    def loss_sum(self, batch) -> torch.Tensor:
        """The summed next-token cross-entropy of one collated ``batch`` over its target tokens."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.autocast:
            return causal_lm_loss_sum(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                      mode=self.loss_mode)

    @torch.no_grad()
    def evaluate(self, examples) -> float:
        """Token-averaged loss on ``examples``."""
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(examples), self.args.batch_size):
            batch = self.collate(examples[i:i + self.args.batch_size])
            total += self.loss_sum(batch).item()
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.model.train()
        return total / max(count, 1)

    def save(self) -> Path | None:
        """Write a checkpoint of the trained values, optimizer, scheduler and position; returns its directory.

        Under FSDP2 every rank calls it and rank 0 writes (the others get None).

        Raises :class:`TrainingDiverged` instead when a trained value is not
        finite, so every checkpoint written holds a state worth resuming.
        """
        self._refuse_nonfinite()
        state = {"scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(), "step": self.step,
                 "tokens": self.tokens, "elapsed": self.elapsed}
        tensors, write_extra = None, None
        with disk_errors_named(self.out):
            if self.sharded and self.setup.kind != "sparse":  # every rank stages a file of its own shards
                mine = stage_rank_file(self.out / CHECKPOINTS, checkpoint_name(self.step),
                                       local_state(self.model, self.optimizer))
                staged = distributed.gather_to_rank0(mine)
                state["optimizer_param_groups"] = self.optimizer.state_dict()["param_groups"]
                write_extra = partial(take_rank_files, staged)
            elif self.sharded:  # each rank's state, of its own rows' entries; the delta gathers every rank's rows
                state["optimizer_shards"] = gathered_state_dicts(self.optimizer)
                delta = delta_from_optimizer(self.optimizer)
                write_extra = partial(write_delta, delta)
            else:
                state["optimizer"] = self.optimizer.state_dict()
                if self.setup.kind == "sparse":
                    write_extra = partial(write_delta, delta_from_optimizer(self.optimizer))
                else:
                    tensors = self._trained_tensors()
            if not self.is_main:
                return None
            path = save_checkpoint(self.out, self.step, tensors=tensors, write_extra=write_extra, state=state,
                                   keep=self.args.save_total_limit + 1)
            self._prune_pending = True
        logger.info("checkpoint %s", path)
        return path

    def _trained_tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors by name: under FSDP2, this rank's shards."""
        if self.setup.kind == "sparse":
            return {name: p for name, p, _ in self.optimizer.trained_parameters()}
        return {n: p.to_local() if self.sharded else p for n, p in self.model.named_parameters() if p.requires_grad}

    def _nonfinite_tensor(self) -> str | None:
        """The name of a trained tensor (of this rank) that holds a non-finite value, or None."""
        return next((name for name, p in self._trained_tensors().items() if not bool(torch.isfinite(p).all())), None)

    def _refuse_nonfinite(self) -> None:
        bad = self._nonfinite_tensor()
        # Under FSDP2 each rank checks its own rows, and all stop together.
        (ranks_bad,) = distributed.sum_across_ranks([bad is not None]) if self.sharded else (bad is not None,)
        if ranks_bad:
            where = bad or "a weight on another rank"
            raise TrainingDiverged(self._diverged(f"{where} holds non-finite values after step {self.step}, "
                                                  "which no checkpoint or output will hold", weights_of=self.step - 1))

    def _diverged(self, what: str, weights_of: int) -> str:
        """One line for a diverged run: what happened, and the last good checkpoint.

        The weights of step ``weights_of`` made the next step's loss or trained
        values non-finite (a finite loss can still give infinite gradients), so
        a checkpoint of that step is not good: it is set aside
        (:func:`set_aside_diverged`), and LATEST names the newest checkpoint
        before it, from which training went on with a finite loss and values.
        """
        if self.is_main:
            moved, last = set_aside_diverged(self.out, weights_of)
        else:
            moved, last = None, latest_checkpoint(self.out)
        aside = (f" Checkpoint {checkpoint_name(weights_of)}, whose weights led there, was moved to {moved}."
                 if moved else "")
        if last:
            advice = (" (training went on from it with a finite loss: continue from it with --resume and a lower "
                      "--lr)")
        else:
            advice = " (--resume with a lower --lr starts over from step 0)"
        return f"training diverged: {what}; stopped.{aside} Last good checkpoint: {last or 'none'}{advice}"

    def _forget_log_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` from DIR/train_log.jsonl, which the resumed run logs again (and
        a line a kill cut short)."""
        path = self.out / LOG_FILE
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))

    def _log(self, record: dict) -> None:
        """Append ``record`` to DIR/train_log.jsonl, say it in train.log and report it (rank 0 alone)."""
        if not self.is_main:
            return
        if "eval_loss" in record:
            logger.info("step %d: eval loss %.4f on %d held-out examples", record["step"], record["eval_loss"],
                        len(self.val_examples))
        else:
            logger.info("step %d: loss %.4f, lr %.3g, %d tokens, %.0f tokens/s", record["step"], record["loss"],
                        record["lr"], record["tokens"], record["tokens_per_s"])
        with open(self.out / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.reporter.log(record)


def _shown(value) -> str:
    """A setting's value as the start line shows it: floats short (1e+10, 0.001)."""
    return f"{value:g}" if isinstance(value, float) else str(value)
