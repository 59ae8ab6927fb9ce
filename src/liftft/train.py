"""One `liftft train` run: its settings, data, method, output directory and outputs (the loop is liftft.loop)."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

import torch

import liftft
from liftft import distributed, run_dir
from liftft.atomic import atomic_directory, write_json_atomic
from liftft.calibration import calibration_batches_for, run_gradient_scores
from liftft.checkpoint import disk_errors_named
from liftft.card import CARD_FILE, write_model_cards
from liftft.config import LiftConfig, clip_norm
from liftft.data import encode_dataset, load_records, split_validation
from liftft.delta import DELTA_FILE, META_FILE, save_delta
from liftft.fsdp import gathered_model, load_sharded
from liftft.hf import load_model, load_tokenizer, set_activation_checkpointing
from liftft.loop import TrainingLoop
from liftft.loss import check_loss_mode
from liftft.merge import merge_delta
from liftft.methods import METHODS, PEFT_METHODS, SPARSE_SELECTORS, method_config, setup_method
from liftft.preflight import check_budget, meta_model
from liftft.reporting import Reporter, check_report_to, open_reporter

logger = logging.getLogger("liftft")

RUN_FILE = run_dir.RUN_FILE
MERGED_DIR = "merged"
ADAPTER_DIR = "adapter"
# Everything `liftft train` writes in its output dir besides checkpoints and logs.
OUTPUT_NAMES = (RUN_FILE, DELTA_FILE, META_FILE, CARD_FILE, MERGED_DIR, ADAPTER_DIR)
# Settings that may differ between a run and its resumption.
# "loss" is among them: its modes differ by float rounding only.
_RESUMABLE = ("resume", "merge", "progress", "save_steps", "save_total_limit", "dist_timeout", "loss", "report_to",
              "logging_steps", "eval_steps")


@dataclass
class TrainArgs:
    """Every setting of one `liftft train` run (the CLI flags, one to one).

    ``lift`` holds the budget, targets and selection settings (its rank and
    target modules also shape the PEFT methods' adapters). The method decides
    the selector and ``seed`` seeds everything, so ``lift.selector`` and
    ``lift.seed`` are left at their defaults or agree with them; see
    :meth:`lift_config`. ``max_grad_norm`` is stored as
    :func:`liftft.config.clip_norm` reads it: 0 becomes None, no clipping.
    ``loss`` is the mode of :func:`liftft.loss.causal_lm_loss_sum` (chunked,
    full or liger). ``fsdp`` shards the model with FSDP2 (:mod:`liftft.fsdp`),
    for the sparse methods. ``data_split``, ``data_config`` and ``columns``
    are :func:`liftft.records.load_records`' ``split``, ``config`` and ``columns``.
    ``calibration_batches`` is for method ``gradient`` (default
    :data:`liftft.calibration.DEFAULT_CALIBRATION_BATCHES`): the run's first
    micro-batches whose |gradient| it selects by.
    ``report_to`` is one of :data:`liftft.reporting.REPORT_TO`; ``logging_steps``
    and ``eval_steps`` (which needs ``val_size``) are the steps between log
    records and between evaluations of the held-out records.
    """

    model: str
    data: list[str]
    output: str
    method: str = "lift"
    lift: LiftConfig = field(default_factory=LiftConfig)
    calibration_batches: int | None = None
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
    fsdp: bool = False
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    loss: str = "chunked"
    val_size: int = 0
    eval_steps: int | None = None
    template: str = "alpaca"
    data_split: str = "train"
    data_config: str | None = None
    columns: dict[str, str] | None = None
    seed: int = 43
    resume: bool = False
    merge: bool = False
    save_steps: int | None = 200
    save_total_limit: int = 2
    dist_timeout: float = 1800.0
    device: str = "auto"
    progress: bool = True
    report_to: str = "none"
    logging_steps: int = 1

    def __post_init__(self):
        if isinstance(self.data, str):
            self.data = [self.data]
        if self.method not in METHODS:
            raise ValueError(f"unknown --method {self.method!r}; allowed: {', '.join(METHODS)}")
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("--epochs and --max-steps contradict each other: give one")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give --epochs or --max-steps")
        if not isinstance(self.lift, LiftConfig):
            raise TypeError(f"lift must be a LiftConfig, got {type(self.lift).__name__}")
        if self.lift.seed not in (LiftConfig.seed, self.seed):
            raise ValueError(f"lift.seed={self.lift.seed} contradicts seed={self.seed}: seed seeds the whole run, "
                             "selection included; set seed alone")
        self.lift_config()  # refuses a selector that contradicts the method now, before any work
        self.calibration_batches = calibration_batches_for(self.method, self.calibration_batches)
        self.max_grad_norm = clip_norm(self.max_grad_norm)
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
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"--lr must be a finite number >= 0, got {self.lr!r}")
        if self.save_total_limit < 1:
            raise ValueError(f"--save-total-limit must be >= 1, got {self.save_total_limit}")
        if not self.dist_timeout > 0:
            raise ValueError(f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.save_steps is not None and self.save_steps < 1:
            raise ValueError(f"--save-steps must be >= 1, got {self.save_steps}")
        self._check_reporting()
        check_loss_mode(self.loss)
        if self.step_in_backward:
            self._check_step_in_backward()
        if self.fsdp:
            self._check_fsdp()

    def _check_reporting(self) -> None:
        if self.logging_steps < 1:
            raise ValueError(f"--logging-steps must be >= 1, got {self.logging_steps}")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ValueError(f"--eval-steps must be >= 1, got {self.eval_steps}")
        if self.eval_steps is not None and not self.val_size:
            raise ValueError(f"--eval-steps {self.eval_steps} evaluates held-out records: give --val-size N too")
        check_report_to(self.report_to)

    def _check_step_in_backward(self) -> None:
        if self.method not in SPARSE_SELECTORS:
            raise ValueError(f"--step-in-backward is for the sparse methods ({', '.join(SPARSE_SELECTORS)}), "
                             f"not --method {self.method}")
        if self.grad_accum != 1:
            raise ValueError(f"--step-in-backward updates during each backward pass, so it needs --grad-accum 1 "
                             f"(got {self.grad_accum}); raise --batch-size instead")
        if self.max_grad_norm is not None:
            raise ValueError(f"--step-in-backward cannot clip: pass --max-grad-norm 0 (got {self.max_grad_norm})")

    def _check_fsdp(self) -> None:
        if self.method == "gradient":
            raise ValueError("--method gradient does not run under --fsdp: its calibration gradients need the whole "
                             "weights; drop --fsdp")
        if self.method in PEFT_METHODS:
            raise ValueError(f"--fsdp trains the sparse methods ({', '.join(SPARSE_SELECTORS)}) and full, not "
                             f"--method {self.method}; run {self.method} data-parallel, without --fsdp")
        if self.step_in_backward:
            raise ValueError("--step-in-backward runs in one process without sharding; drop --fsdp or it")

    @classmethod
    def from_flat(cls, **settings) -> "TrainArgs":
        """TrainArgs from flat settings with LiftConfig's fields among them, the form :meth:`run_record` writes.

        ``seed`` is the run's (see the class docstring); LiftConfig's other
        fields build ``lift``. Unknown names raise TypeError.
        """
        own = {f.name for f in fields(cls)}
        lift = {f.name: settings.pop(f.name) for f in fields(LiftConfig) if f.name in settings and f.name not in own}
        return cls(**settings, lift=LiftConfig(**lift))

    def lift_config(self) -> LiftConfig:
        """``lift`` with the method's selector and the run's seed filled in: the settings the run trains with."""
        return replace(method_config(self.method, self.lift), seed=self.seed)

    def run_record(self) -> dict:
        """The settings that define the run (what a resumption must match), flat.

        ``lift``'s fields stand at the top level beside the others, as liftft
        has always recorded rank, density and the rest; its selector and seed
        are left out, being the method's and ``seed``.
        """
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _RESUMABLE and f.name != "lift"}
        return {**record, **_lift_record(self.lift.to_dict())}

    def options(self) -> dict:
        """The settings a resumption may change (logging, reporting, outputs), as this invocation has them."""
        return {name: getattr(self, name) for name in _RESUMABLE}


def _lift_record(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in ("selector", "seed")}


def _record_defaults() -> dict:
    """The default of every recorded setting: what a run recorded before that setting existed used."""
    lift = _lift_record({f.name: f.default for f in fields(LiftConfig)})
    return {**lift, **{f.name: f.default for f in fields(TrainArgs) if f.default is not MISSING}}


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
    joined = distributed.init_from_launcher(device.type, timeout_s=args.dist_timeout)
    joined = joined or (args.fsdp and distributed.init_alone(device.type))
    try:
        with distributed.named_timeouts(args.dist_timeout):
            result = _run_training(args, device)
            # Rank 0 writes the outputs after the others are done; a rank that tore its group down meanwhile could
            # abort at exit ("terminate called without an active exception"), so all finish together.
            distributed.barrier()
            return result
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _run_training(args: TrainArgs, device: torch.device):
    out = Path(args.output)
    main = distributed.is_main_process()
    # Reading is quick; tokenising waits until every check has passed.
    records = load_records(args.data, split=args.data_split, config=args.data_config, columns=args.columns)
    created = not out.exists()
    lock = run_dir.take(out)
    try:
        run_dir.check_continues(out, args.run_record(), _record_defaults(), args.resume)
        budget_note = check_budget(meta_model(args.model), args.lift_config(), args.method in SPARSE_SELECTORS)
        distributed.barrier()  # every rank has read the output dir before rank 0 writes to it
        if main:
            _announce(args, budget_note, run_dir.remove_run_leftovers(out, OUTPUT_NAMES))
        return _train_in(args, device, out, records)
    except BaseException:
        if created and lock is not None:
            run_dir.release(lock)
            run_dir.remove_if_empty(out)
        raise
    finally:
        if lock is not None:
            run_dir.release(lock)


def _train_in(args: TrainArgs, device: torch.device, out: Path, records: list[dict]):
    """Train in ``out``, logging to DIR/train.log from the first step of the work on (rank 0)."""
    handler = _log_to(out) if distributed.is_main_process() else logging.NullHandler()
    try:
        logger.info("liftft train %s: %s", liftft.__version__, json.dumps(args.run_record(), default=str))
        return _train_logged(args, device, out, records)
    finally:
        logger.removeHandler(handler)
        handler.close()


def _train_logged(args: TrainArgs, device: torch.device, out: Path, records: list[dict]):
    main = distributed.is_main_process()
    bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda" and torch.cuda.is_bf16_supported()

    tokenizer = load_tokenizer(args.model)
    train_examples, val_examples, data_stats = _prepare_data(args, records, tokenizer)
    torch.manual_seed(args.seed)
    # Frozen or sparsely trained weights stay in bf16; full FT keeps fp32 weights under autocast.
    weight_dtype = torch.bfloat16 if bf16 and args.method != "full" else torch.float32
    model = _load_base(args, weight_dtype, device, bf16)
    scores = run_gradient_scores(args, model, train_examples, tokenizer.pad_token_id, device, bf16)
    setup = setup_method(model, args.method, args.lift_config(), lr=args.lr, weight_decay=args.weight_decay,
                         max_grad_norm=args.max_grad_norm, step_in_backward=args.step_in_backward, scores=scores)
    model = setup.model
    share = f"{setup.trainable / sum(p.numel() for p in model.parameters()):.2%} of {type(model).__name__}"
    logger.info("method %s: %s trainable values (%s)", args.method, f"{setup.trainable:,}", share)
    if main:
        print(f"liftft train: method={args.method} trainable={setup.trainable:,} ({share})")

    run_info = {"args": args.run_record(), "options": args.options(), "world_size": distributed.world_size()}
    if main:
        write_json_atomic(out / RUN_FILE, {**run_info, "status": "running", "data": data_stats,
                                           "trainable": setup.trainable})
    settings = {**run_info["args"], **run_info["options"]}
    with open_reporter(args.report_to, out, settings) if main else Reporter() as reporter:
        loop = TrainingLoop(args, model, setup, train_examples, tokenizer.pad_token_id, device, bf16,
                            val_examples=val_examples, reporter=reporter)
        loop.maybe_resume()
        metrics = loop.run()
    metrics.update(trainable=setup.trainable, data=data_stats)
    if main or args.fsdp:  # under FSDP2 every rank contributes its rows or shards to what rank 0 writes
        with disk_errors_named(out):
            _write_outputs(args, setup, tokenizer, metrics)
    if main:
        write_json_atomic(out / RUN_FILE, {**run_info, "status": "done", "metrics": metrics,
                                           "trainable": setup.trainable})
    logger.info("done: %s", json.dumps({k: v for k, v in metrics.items() if k != "data"}))
    return model, metrics


def _load_base(args: TrainArgs, dtype: torch.dtype, device: torch.device, bf16: bool):
    """The base model in ``dtype`` on ``device``: whole, or under --fsdp sharded as it loads (rank 0 reads it)."""
    if args.fsdp:
        return load_sharded(args.model, dtype, device, bf16, checkpointing=args.gradient_checkpointing)
    model = load_model(args.model, dtype=dtype, device=device)
    if args.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    return model


def _announce(args: TrainArgs, budget_note: str | None, removed: list[Path]) -> None:
    """Say what will run (processes, global batch), and what the launcher asked for if it differs; report the
    budget's note and the leftovers of interrupted writes that were removed."""
    world = distributed.world_size()
    sharding = ", FSDP2-sharded" if args.fsdp else ""
    print(f"liftft train: {world} process{'es' if world > 1 else ''}{sharding}, global batch {args.batch_size} x "
          f"{args.grad_accum} x {world} = {args.batch_size * args.grad_accum * world} examples per optimizer step")
    asked = distributed.requested_processes(distributed.launcher_cmdline())
    if asked is not None and asked > world:
        print(f"liftft train: warning: the launcher asked for {asked} processes but {world} joined (accelerate "
              "launch --cpu runs one process without MPI; torchrun --nproc-per-node N runs N on the CPU)")
    if budget_note:
        print(f"liftft train: warning: {budget_note}")
    if removed:
        print(f"liftft train: removed {len(removed)} leftover(s) of interrupted writes: "
              f"{', '.join(p.name for p in removed)}")


def _prepare_data(args: TrainArgs, records: list[dict], tokenizer):
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


def _write_outputs(args: TrainArgs, setup, tokenizer, metrics: dict) -> None:
    """Write the run's outputs from rank 0; under --fsdp every rank calls this, to gather the delta or model."""
    out = Path(args.output)
    model = setup.model
    if setup.kind == "sparse":
        save_delta(setup.optimizer, out, base_model=args.model, training_args=args.run_record(), metrics=metrics)
        if args.merge and args.fsdp and distributed.is_main_process():
            merge_delta(args.model, str(out), str(out / MERGED_DIR))  # the base plus the delta, on the CPU
        elif args.merge and not args.fsdp:
            _save_hf(model, tokenizer, out / MERGED_DIR, args.gradient_checkpointing)
    elif setup.kind == "peft":
        with atomic_directory(out / ADAPTER_DIR) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if args.merge:
            _save_hf(model.merge_and_unload(), tokenizer, out / MERGED_DIR, args.gradient_checkpointing)
    elif args.fsdp:  # the whole model, gathered on rank 0's CPU
        whole = gathered_model(model)
        if whole is not None:
            _save_hf(whole, tokenizer, out / MERGED_DIR, checkpointing=False)
    else:
        _save_hf(model, tokenizer, out / MERGED_DIR, args.gradient_checkpointing)
    if distributed.is_main_process():
        write_model_cards([out, out / MERGED_DIR], {"base_model": args.model, "config": args.lift_config().to_dict(),
                                                    "training_args": args.run_record(), "metrics": metrics})


def _save_hf(model, tokenizer, path: Path, checkpointing: bool) -> None:
    if checkpointing:
        set_activation_checkpointing(model, False)
    model.config.use_cache = True
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
