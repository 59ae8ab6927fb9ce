"""`TrainArgs`: every setting of one `liftft train` run, checked, and what its run.json records of them."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace

from liftft.training.calibration import calibration_batches_for
from liftft.utils.quantization import check_4bit_settings, require_bitsandbytes
from liftft.engine.config import LiftConfig, clip_norm
from liftft.engine.loss import check_loss_mode
from liftft.engine.methods import METHODS, PEFT_METHODS, SPARSE_SELECTORS, method_config
from liftft.training.reporting import check_report_to

# Settings that may differ between a run and its resumption.
# "loss" is among them: its modes differ by float rounding only.
_RESUMABLE = ("resume", "merge", "progress", "save_steps", "save_total_limit", "dist_timeout", "loss", "report_to",
              "logging_steps", "eval_steps")
# Recorded settings that --resume may change all the same (the learning rate and the schedule's length, e.g. to
# continue a diverged run at a lower lr); run.json records each change and the step it took effect at.
RESCHEDULABLE = ("lr", "max_steps", "epochs")


@dataclass
class TrainArgs:
    """Every setting of one `liftft train` run (the CLI flags, one to one).

    ``lift`` holds the budget, targets and selection settings (its rank and
    target modules also shape the PEFT methods' adapters). The method decides
    the selector and ``seed`` seeds everything, so ``lift.selector`` and
    ``lift.seed`` are left at their defaults or agree with them; see
    :meth:`lift_config`. ``max_grad_norm`` is stored as
    :func:`liftft.engine.config.clip_norm` reads it: 0 becomes None, no clipping.
    ``loss`` is the mode of :func:`liftft.engine.loss.causal_lm_loss_sum` (chunked,
    full or liger). ``load_in_4bit`` loads the base with bitsandbytes in 4 bits
    (``bnb_4bit_quant_type``, ``use_bnb_nested_quant``; :mod:`liftft.utils.quantization`):
    the sparse methods are then QLIFT, lora and dora QLoRA and QDoRA.
    ``fsdp`` shards the model with FSDP2 (:mod:`liftft.training.fsdp`),
    for the sparse methods. ``data_split``, ``data_config`` and ``columns``
    are :func:`liftft.data.records.load_records`' ``split``, ``config`` and ``columns``.
    ``calibration_batches`` is for method ``gradient`` (default
    :data:`liftft.training.calibration.DEFAULT_CALIBRATION_BATCHES`): the run's first
    micro-batches whose |gradient| it selects by.
    ``report_to`` is one of :data:`liftft.training.reporting.REPORT_TO`; ``logging_steps``
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
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    use_bnb_nested_quant: bool = False
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
        check_4bit_settings(self.method, fsdp=self.fsdp, load_in_4bit=self.load_in_4bit,
                            quant_type=self.bnb_4bit_quant_type, nested=self.use_bnb_nested_quant)
        if self.load_in_4bit:
            require_bitsandbytes()
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


def record_defaults() -> dict:
    """The default of every recorded setting: what a run recorded before that setting existed used."""
    lift = _lift_record({f.name: f.default for f in fields(LiftConfig)})
    return {**lift, **{f.name: f.default for f in fields(TrainArgs) if f.default is not MISSING}}
