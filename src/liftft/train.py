"""The fine-tuning loop behind `liftft train`: data, method, schedule, checkpoints, outputs."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from liftft import distributed
from liftft.atomic import write_json_atomic
from liftft.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from liftft.data import IGNORE_INDEX, DataCollator, encode_dataset, load_records, split_validation
from liftft.delta import apply_delta, delta_from_optimizer, save_delta, write_delta
from liftft.hf import load_model, load_tokenizer
from liftft.methods import METHODS, SPARSE_SELECTORS, setup_method

logger = logging.getLogger("liftft")

RUN_FILE = "run.json"
LOG_FILE = "train_log.jsonl"
MERGED_DIR = "merged"
ADAPTER_DIR = "adapter"
# Settings that may differ between a run and its resumption.
_RESUMABLE = ("resume", "merge", "progress", "save_steps")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


@dataclass
class TrainArgs:
    """Every setting of one `liftft train` run (the CLI flags, one to one)."""

    model: str
    data: list[str]
    output: str
    method: str = "lift"
    rank: int | None = 128
    density: float | None = None
    filter_rank: int = 64
    update_interval: int | None = 400
    target_modules: str | list[str] = "all-linear"
    lr: float = 2e-4
    epochs: float | None = 3
    max_steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 16
    max_seq_len: int = 2048
    warmup_ratio: float = 0.03
    scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    step_in_backward: bool = False
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    val_size: int = 0
    template: str = "alpaca"
    seed: int = 43
    resume: bool = False
    merge: bool = False
    save_steps: int | None = 200
    svd: str = "randomized"
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.data, str):
            self.data = [self.data]
        if self.method not in METHODS:
            raise ValueError(f"unknown --method {self.method!r}; allowed: {', '.join(METHODS)}")
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("--epochs and --max-steps contradict each other: give one")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give --epochs or --max-steps")
        if self.rank is not None and self.density is not None:
            raise ValueError("--rank and --density contradict each other: give one")
        for name in ("batch_size", "grad_accum", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.scheduler not in ("linear", "cosine", "constant"):
            raise ValueError(f"unknown --scheduler {self.scheduler!r}; allowed: linear, cosine, constant")
        if self.save_steps is not None and self.save_steps < 1:
            raise ValueError(f"--save-steps must be >= 1, got {self.save_steps}")
        if self.step_in_backward:
            self._check_step_in_backward()

    def _check_step_in_backward(self) -> None:
        if self.method not in SPARSE_SELECTORS:
            raise ValueError(f"--step-in-backward is for the sparse methods ({', '.join(SPARSE_SELECTORS)}), "
                             f"not --method {self.method}")
        if self.grad_accum != 1:
            raise ValueError(f"--step-in-backward updates during each backward pass, so it needs --grad-accum 1 "
                             f"(got {self.grad_accum}); raise --batch-size instead")
        if self.max_grad_norm:
            raise ValueError(f"--step-in-backward cannot clip: pass --max-grad-norm 0 (got {self.max_grad_norm})")

    def run_record(self) -> dict:
        """The settings that define the run (what a resumption must match)."""
        return {k: v for k, v in asdict(self).items() if k not in _RESUMABLE}


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; under a multi-process launcher, CUDA is this process's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and distributed.launched_distributed():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return torch.device(device)


def train(args: TrainArgs) -> dict:
    """Run one fine-tune and write its outputs to ``args.output``; returns the final metrics."""
    return run_training(args)[1]


def run_training(args: TrainArgs):
    """Like :func:`train`, returning (trained model, metrics).

    Under torchrun or accelerate launch every process joins the launcher's
    process group and trains on its share of each batch; rank 0 alone writes.
    """
    distributed.reject_deepspeed()
    device = resolve_device(args.device)
    if device.type == "cuda" and distributed.launched_distributed():
        torch.cuda.set_device(device)
    joined = distributed.init_from_launcher(device.type)
    try:
        return _run_training(args, device)
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _run_training(args: TrainArgs, device: torch.device):
    out = Path(args.output)
    _check_output_dir(out, args)
    distributed.barrier()  # every rank has read the output dir before rank 0 writes to it
    main = distributed.is_main_process()
    bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda" and torch.cuda.is_bf16_supported()

    tokenizer = load_tokenizer(args.model)
    train_examples, val_examples, data_stats = _prepare_data(args, tokenizer)
    torch.manual_seed(args.seed)
    # Frozen or sparsely trained weights stay in bf16; full FT keeps fp32 weights under autocast.
    weight_dtype = torch.bfloat16 if bf16 and args.method != "full" else torch.float32
    model = load_model(args.model, dtype=weight_dtype, device=device)
    setup = setup_method(
        model, args.method, rank=args.rank if args.density is None else None, density=args.density,
        filter_rank=args.filter_rank, update_interval=args.update_interval, target_modules=args.target_modules,
        lr=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, svd=args.svd, seed=args.seed,
        step_in_backward=args.step_in_backward,
    )
    model = setup.model
    if main:
        print(f"liftft train: method={args.method} trainable={setup.trainable:,} "
              f"({setup.trainable / sum(p.numel() for p in model.parameters()):.2%} of {type(model).__name__})")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    run_info = {"args": args.run_record(), "world_size": distributed.world_size()}
    if main:
        out.mkdir(parents=True, exist_ok=True)
    handler = _log_to(out) if main else logging.NullHandler()
    try:
        if main:
            write_json_atomic(out / RUN_FILE, {**run_info, "status": "running", "data": data_stats,
                                               "trainable": setup.trainable})
        loop = _Loop(args, model, setup, train_examples, tokenizer.pad_token_id, device, bf16)
        loop.maybe_resume()
        metrics = loop.run()
        if val_examples:
            metrics["eval_loss"] = loop.evaluate(val_examples)
            logger.info("eval loss %.4f on %d held-out examples", metrics["eval_loss"], len(val_examples))
        metrics.update(trainable=setup.trainable, data=data_stats)
        if main:
            _write_outputs(args, setup, tokenizer, metrics)
            write_json_atomic(out / RUN_FILE, {**run_info, "status": "done", "metrics": metrics,
                                               "trainable": setup.trainable})
    finally:
        logger.removeHandler(handler)
        handler.close()
    return model, metrics


def _check_output_dir(out: Path, args: TrainArgs) -> None:
    record = out / RUN_FILE
    if not record.is_file():
        return
    run = json.loads(record.read_text())
    current = args.run_record()
    # A setting that an older liftft did not record had its default value then.
    defaults = {f.name: f.default for f in fields(TrainArgs) if f.name in current and f.default is not MISSING}
    previous = {**defaults, **run.get("args", {})}
    differing = sorted(k for k in set(previous) | set(current)
                       if json.dumps(previous.get(k), default=str) != json.dumps(current.get(k), default=str))
    if differing:
        raise ValueError(f"output dir {out} holds a different run (differs in: {', '.join(differing)}); "
                         "choose another --output")
    if not args.resume:
        raise ValueError(f"output dir {out} already holds this run; pass --resume to continue it or choose another --output")
    if run.get("world_size", 1) != distributed.world_size():
        raise ValueError(f"output dir {out} holds a run on {run.get('world_size', 1)} processes; resume it on as many "
                         f"(torchrun --nproc-per-node {run.get('world_size', 1)}), not {distributed.world_size()}")


def _prepare_data(args: TrainArgs, tokenizer):
    records = load_records(args.data)
    train_records, val_records = split_validation(records, args.val_size, args.seed)
    train_examples, stats = encode_dataset(train_records, tokenizer, template=args.template, max_seq_len=args.max_seq_len)
    val_examples = encode_dataset(val_records, tokenizer, template=args.template, max_seq_len=args.max_seq_len)[0] if val_records else []
    logger.info("data: %s", stats)
    return train_examples, val_examples, stats


def _log_to(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


class _Loop:
    """Steps over micro-batches in a seeded order; checkpoints and resumes at step boundaries."""

    def __init__(self, args, model, setup, examples, pad_token_id, device, bf16):
        self.args, self.model, self.setup = args, model, setup
        self.optimizer = setup.optimizer
        self.examples = examples
        self.collate = DataCollator(pad_token_id)
        self.device = device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        # Each of the world's ranks takes batch_size examples of every micro-batch.
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.is_main = self.rank == 0
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
        self.out = Path(args.output)

    def maybe_resume(self) -> None:
        checkpoint = latest_checkpoint(self.out) if self.args.resume else None
        if checkpoint is None:
            return
        tensors, state = load_checkpoint(checkpoint)
        if self.setup.kind == "sparse":
            apply_delta(self.model, checkpoint)
        else:
            self.model.load_state_dict(tensors, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        logger.info("resumed from %s at step %d", checkpoint, self.step)
        if self.is_main:
            print(f"liftft train: resumed from {checkpoint} at step {self.step}")

    def run(self) -> dict:
        args = self.args
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {args.method}",
                   disable=not args.progress or not self.is_main)
        loss = float("nan")
        start = time.perf_counter() - self.elapsed
        while self.step < self.total_steps:
            lr = self.scheduler.get_last_lr()[0]
            loss, tokens = self._train_step(self._micro_batches(self.step))
            if not math.isfinite(loss):
                last = latest_checkpoint(self.out)
                raise TrainingDiverged(f"loss became {loss} at step {self.step + 1}; stopped. "
                                       f"Last good checkpoint: {last or 'none'}")
            self.step += 1
            self.tokens += tokens
            self.elapsed = time.perf_counter() - start
            self._log({"step": self.step, "loss": loss, "lr": lr, "tokens": self.tokens, "seconds": round(self.elapsed, 3)})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
            if args.save_steps and self.step % args.save_steps == 0 and self.step < self.total_steps and self.is_main:
                self.save()
        bar.close()
        return {"train_loss": loss, "steps": self.step, "tokens": self.tokens, "train_seconds": round(self.elapsed, 3)}

    def _micro_batches(self, step: int) -> list[list[dict]]:
        """The micro-batches of optimizer step ``step``: a function of the seed and the position alone."""
        args = self.args
        epoch, within = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        first = within * args.grad_accum
        micro = range(first, min(first + args.grad_accum, self.micro_per_epoch))
        size = args.batch_size * self.world
        # This rank's slice of each global micro-batch; at an epoch's end it may be short or empty.
        mine = [order[m * size:(m + 1) * size][self.rank * args.batch_size:(self.rank + 1) * args.batch_size] for m in micro]
        return [[self.examples[i] for i in part.tolist()] for part in mine]

    def _train_step(self, micro_batches) -> tuple[float, int]:
        batches = [self.collate(b) for b in micro_batches if b]
        # Token-weighted loss over the whole accumulated batch of all ranks, so accumulation and data
        # parallelism equal one big batch; the gradients are then averaged over ranks, hence * world.
        (n_tokens,) = distributed.sum_across_ranks([sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)])
        total = 0.0
        for batch in batches:
            loss_sum = self._loss_sum(batch)
            (loss_sum / n_tokens * self.world).backward()
            total += loss_sum.item()
        seen = sum(int(b["attention_mask"].sum()) for b in batches)
        total, seen = distributed.sum_across_ranks([total, seen])
        if self.setup.kind != "sparse" and self.world > 1:  # LiftAdamW averages its own gathered gradients
            trained = [p for p in self.model.parameters() if p.requires_grad]
            for p in trained:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            distributed.average_across_ranks([p.grad for p in trained])
        if self.setup.kind != "sparse" and self.args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.args.max_grad_norm)
        if math.isfinite(total):
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / max(n_tokens, 1), int(seen)

    def _loss_sum(self, batch) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.autocast:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    @torch.no_grad()
    def evaluate(self, examples) -> float:
        """Token-averaged loss on ``examples``."""
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(examples), self.args.batch_size):
            batch = self.collate(examples[i:i + self.args.batch_size])
            total += self._loss_sum(batch).item()
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.model.train()
        return total / max(count, 1)

    def save(self) -> Path:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": torch.get_rng_state(), "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed}
        if self.setup.kind == "sparse":
            delta = delta_from_optimizer(self.optimizer)
            path = save_checkpoint(self.out, self.step, tensors=None, write_extra=lambda d: write_delta(delta, d), state=state)
        else:
            trained = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
            path = save_checkpoint(self.out, self.step, tensors=trained, state=state)
        logger.info("checkpoint %s", path)
        return path

    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.out / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


def _write_outputs(args: TrainArgs, setup, tokenizer, metrics: dict) -> None:
    out = Path(args.output)
    model = setup.model
    if setup.kind == "sparse":
        save_delta(setup.optimizer, out, base_model=args.model, training_args=args.run_record(), metrics=metrics)
        if args.merge:
            _save_hf(model, tokenizer, out / MERGED_DIR, args.gradient_checkpointing)
    elif setup.kind == "peft":
        model.save_pretrained(out / ADAPTER_DIR)
        tokenizer.save_pretrained(out / ADAPTER_DIR)
        if args.merge:
            _save_hf(model.merge_and_unload(), tokenizer, out / MERGED_DIR, args.gradient_checkpointing)
    else:
        _save_hf(model, tokenizer, out / MERGED_DIR, args.gradient_checkpointing)


def _save_hf(model, tokenizer, path: Path, checkpointing: bool) -> None:
    from liftft.atomic import atomic_directory

    if checkpointing:
        model.gradient_checkpointing_disable()
    model.config.use_cache = True
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
