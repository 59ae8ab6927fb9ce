"""`liftft reproduce`, one command per table of the paper: train every method by the authors' protocol,
evaluate it, and report beside the paper.

Output layout: ``DIR/<method>/train`` (a `liftft train` output dir),
``DIR/<method>/eval`` (a `liftft eval` output dir), and ``DIR/results.json``,
``DIR/results.md``, ``DIR/results.png``. A method whose training is done (its
run.json says so) is not trained again and an interrupted one resumes from its
last checkpoint; `liftft eval` skips the tasks it has already done. A rerun
with other settings is refused by name rather than mixed with the old results.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from liftft.commands import DefaultsShown, comma_list, lift_fields_as_flags
from liftft.commands import eval as eval_command
from liftft.data.records import load_records
from liftft.engine.methods import PEFT_METHODS, SPARSE_SELECTORS
from liftft.eval import EXTRACTORS, read_results, resolve_tasks
from liftft.eval.tasks import TEST_FILE, find_test_file
from liftft.reproduce import report
from liftft.reproduce.protocol import Row, check_methods, choose_row, load_protocol, method_settings, table_names
from liftft.training import run_dir
from liftft.training.args import record_defaults
from liftft.training.train import ADAPTER_DIR, MERGED_DIR, RUN_FILE, TrainArgs, train

DEFAULT_METHODS = ("lift", "full", "lora", "dora", "pissa", "s2ft")
# A smoke run whose data cannot spare the protocol's held-out records holds out 1 in this many.
SPARE_FRACTION = 10
# Where `git clone https://github.com/AGI-Edgerunners/LLM-Adapters` puts the test sets.
DEFAULT_TEST_DIR = "LLM-Adapters/dataset"
GET_DATA = ("math_10k.json and commonsense_170k.json are in ft-training_set/ of "
            "https://github.com/AGI-Edgerunners/LLM-Adapters (git clone it, or pass --data a path or dataset name)")


@dataclass
class ReproduceArgs:
    """Every setting of one `liftft reproduce` run (the CLI flags, one to one).

    ``data`` defaults to the table's training set inside an LLM-Adapters
    clone in the working directory, ``tasks`` to the table's suite. The
    ``None`` settings fall back on the protocol (protocol.json); given, they
    override it for every method. ``batch_size`` alone keeps the effective
    batch of 16 by dividing the accumulation, so it must divide 16 (give
    ``grad_accum`` too to set the effective batch). ``limit`` cuts each test set.
    ``val_size`` None holds out the protocol's 100 records; a smoke run (with
    ``max_steps`` or ``limit``) holds out what its data can spare instead
    (:meth:`resolve_val_size`).
    """

    table: str
    model: str
    output: str
    data: list[str] | None = None
    data_dir: str = DEFAULT_TEST_DIR
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    tasks: str | None = None
    row: str | None = None
    limit: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    max_seq_len: int | None = None
    val_size: int | None = None
    seed: int | None = None
    gradient_checkpointing: bool | None = None
    lr: float | None = None
    rank: int | None = None
    filter_rank: int | None = None
    bf16: bool | None = None
    device: str = "auto"
    eval_batch_size: int = 16
    max_new_tokens: int | None = None
    num_beams: int | None = None
    extractor: str | None = None
    progress: bool = True

    def __post_init__(self):
        self.row_used = choose_row(self.table, self.model, self.row)  # also refuses an unknown table or row
        self.methods = check_methods(self.methods)
        self.task_names = [task.name for task in resolve_tasks(self.tasks or self.table)]
        if self.data is None:
            self.data = [load_protocol()["tables"][self.table]["training_set"]]
        elif isinstance(self.data, str):
            self.data = [self.data]
        sizes = ("limit", "max_steps", "batch_size", "grad_accum", "eval_batch_size", "max_new_tokens", "num_beams")
        for name in sizes:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        effective = _effective_batch()
        if self.batch_size is not None and self.grad_accum is None and effective % self.batch_size:
            divisors = ", ".join(str(d) for d in range(1, effective + 1) if effective % d == 0)
            raise ValueError(f"--batch-size {self.batch_size} does not divide the protocol's effective batch of "
                             f"{effective}, which --batch-size alone keeps by dividing the accumulation: pass one of "
                             f"{divisors}, or --grad-accum too to choose the effective batch")

    def resolve_val_size(self, records: int) -> str | None:
        """Check the held-out count against the ``records`` of --data; returns a note to print, or None.

        Unset, it is the protocol's; a smoke run (--max-steps or --limit)
        whose data cannot spare that many (it holds no more) holds out a tenth
        of its records instead. Data that can spare them keeps the protocol's
        count, as earlier liftft did, so that its output dirs still continue.
        Every refusal names --val-size.
        """
        if self.val_size is not None:
            if self.val_size < 0:
                raise ValueError(f"--val-size must be >= 0 (0 holds out none), got {self.val_size}")
            if self.val_size >= records:
                raise ValueError(f"--val-size {self.val_size} leaves no record to train on: --data holds {records}; "
                                 f"pass --val-size below {records} (0 holds out none)")
            return None
        protocol = load_protocol()["training"]["val_size"]
        if protocol < records:
            return None
        spare = records // SPARE_FRACTION
        if self.max_steps is None and self.limit is None:
            raise ValueError(f"the protocol holds out {protocol} records for the held-out loss, but --data holds "
                             f"{records}; pass --val-size N (below {records}; 0 holds out none)")
        self.val_size = spare
        return (f"--val-size unset: holding out {spare} of the {records} training records (a tenth, as the data cannot "
                f"spare the protocol's {protocol}); --val-size N chooses")

    def training(self) -> dict:
        """The protocol's training settings with this run's overrides."""
        settings = dict(load_protocol()["training"])
        if self.batch_size is not None and self.grad_accum is None:
            settings["grad_accum"] = _effective_batch() // self.batch_size
        for name in ("batch_size", "grad_accum", "max_seq_len", "val_size", "seed", "gradient_checkpointing"):
            if getattr(self, name) is not None:
                settings[name] = getattr(self, name)
        if self.max_steps is not None:
            settings.update(epochs=None, max_steps=self.max_steps)
        return settings

    def evaluation(self) -> dict:
        """The protocol's evaluation settings with this run's overrides."""
        settings = dict(load_protocol()["evaluation"])
        for name in ("num_beams", "max_new_tokens", "extractor"):
            if getattr(self, name) is not None:
                settings[name] = getattr(self, name)
        return {**settings, "limit": self.limit, "batch_size": self.eval_batch_size}

    def method_settings(self, method: str) -> dict:
        """The row's hyperparameters of ``method``, with --lr, --rank and --filter-rank over those it has."""
        settings = method_settings(self.row_used, method)
        for name in ("lr", "rank", "filter_rank"):
            if getattr(self, name) is not None and name in settings:
                settings[name] = getattr(self, name)
        return settings

    def train_args(self, method: str) -> TrainArgs:
        """The `liftft train` run of ``method``, resuming whatever its output dir holds."""
        return TrainArgs.from_flat(
            model=self.model, data=list(self.data), output=str(Path(self.output) / method / "train"), method=method,
            bf16=self.bf16, device=self.device, progress=self.progress, resume=True,
            **self.training(), **self.method_settings(method),
        )


def reproduce(args: ReproduceArgs) -> dict:
    """Train and evaluate every method of ``args``, write DIR/results.{json,md,png}, and return the results."""
    out = Path(args.output)
    _announce(args.row_used, args.model)
    note = args.resolve_val_size(_check_training_data(args.data))
    if note:
        print(f"liftft reproduce: {note}")
    plans = {method: args.train_args(method) for method in args.methods}  # every setting checked before any work
    _check_test_files(args.data_dir, args.task_names)
    out.mkdir(parents=True, exist_ok=True)
    evaluations, trainable = {}, {}
    for method, train_args in plans.items():
        trainable[method] = _train(method, train_args)
        evaluations[method] = _evaluate(args, method, train_args)
    results = report.build_results(args, evaluations, trainable)
    report.write_outputs(out, results)
    print(report.markdown(results))
    return results


def _effective_batch() -> int:
    """The protocol's sequences per optimizer step: batch size times accumulation."""
    training = load_protocol()["training"]
    return training["batch_size"] * training["grad_accum"]


def _announce(row: Row, model: str) -> None:
    reasons = {
        "matched": f"matched by the model's name {model}",
        "chosen": "chosen with --row",
        "default": f"the default, as the paper did not fine-tune {model}: no paper numbers; --row picks a row",
    }
    print(f"liftft reproduce: {row.table} table, hyperparameters of row {row.name} ({reasons[row.how]})")


def _check_test_files(data_dir: str, task_names: list[str]) -> None:
    """Refuse a --data-dir without any of the tasks' test files before training; name the missing ones."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir!r} does not exist; it holds <task>/{TEST_FILE}, as "
                                "LLM-Adapters' dataset/ folder does (git clone "
                                "https://github.com/AGI-Edgerunners/LLM-Adapters)")
    missing = [name for name in task_names if find_test_file(folder, name) is None]
    if len(missing) == len(task_names):
        raise FileNotFoundError(f"--data-dir {data_dir} holds no test file (<task>/{TEST_FILE}) of "
                                f"{', '.join(task_names)}")
    if missing:
        print(f"liftft reproduce: warning: no test file in {data_dir} for {', '.join(missing)}; the averages leave "
              "them out, unlike the paper's")


def _check_training_data(data: list[str]) -> int:
    """Read the training data once before any training, so that a missing file is named with where to get it;
    returns its number of records."""
    try:
        return len(load_records(data))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}; {GET_DATA}") from err


def _train(method: str, train_args: TrainArgs) -> int:
    """Train ``method`` unless its output dir holds the same run finished; returns its trained count."""
    out = Path(train_args.output)
    run = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).is_file() else {}
    if run.get("status") != "done":
        # `liftft train --resume` may change --lr; the protocol's runs may not, so that no result mixes two rates.
        run_dir.check_continues(out, train_args.run_record(), record_defaults(), resume=True)
        return train(train_args)["trainable"]
    run_dir.check_continues(out, train_args.run_record(), {}, resume=True)  # a finished run of other settings
    print(f"liftft reproduce: {method}: already trained in {out}, skipped")
    return run["trainable"]


def _evaluate(args: ReproduceArgs, method: str, train_args: TrainArgs) -> dict:
    """`liftft eval` of ``method``'s training output on the tasks; returns its results.json."""
    eval_dir = Path(args.output) / method / "eval"
    settings = args.evaluation()
    argv = ["--output", str(eval_dir), "--tasks", ",".join(args.task_names), "--data-dir", args.data_dir,
            "--batch-size", str(settings["batch_size"]), "--max-new-tokens", str(settings["max_new_tokens"]),
            "--num-beams", str(settings["num_beams"]), "--extractor", settings["extractor"],
            "--scoring", settings["scoring"], "--template", train_args.template, *_trained_model(method, train_args)]
    if settings["limit"] is not None:
        argv += ["--limit", str(settings["limit"])]
    if args.bf16 is not None:
        argv.append("--bf16" if args.bf16 else "--no-bf16")
    if args.device != "auto":
        argv += ["--device", args.device]
    print(f"liftft reproduce: {method}: evaluating on {', '.join(args.task_names)}")
    eval_command.run(_eval_flags(argv))
    return read_results(eval_dir)


def _trained_model(method: str, train_args: TrainArgs) -> list[str]:
    """The `liftft eval` flags that load what `liftft train` wrote for ``method``."""
    out = Path(train_args.output)
    if method in SPARSE_SELECTORS:
        return ["--model", train_args.model, "--delta", str(out)]
    if method in PEFT_METHODS:
        return ["--model", train_args.model, "--adapter", str(out / ADAPTER_DIR)]
    return ["--model", str(out / MERGED_DIR), "--tokenizer", train_args.model]


def _eval_flags(argv: list[str]) -> argparse.Namespace:
    """`liftft eval`'s parsed flags, its defaults filled in as on the command line."""
    parser = argparse.ArgumentParser(prog="liftft")
    eval_command.register(parser.add_subparsers())
    return parser.parse_args(["eval", *argv])


def register(subparsers) -> None:
    """Add the `reproduce` subcommand."""
    p = subparsers.add_parser(
        "reproduce",
        formatter_class=DefaultsShown,
        help="rerun a table of the paper (math or commonsense) by the authors' protocol",
        description="Train each method by the authors' protocol (3 epochs, effective batch 16, max length 2048, "
        "linear schedule with 3% warmup, bf16 on a GPU, seed 43, the authors' hyperparameters for the model's row of "
        "the table), evaluate it (4 beams, 256 new tokens), and write DIR/results.md, DIR/results.json and "
        "DIR/results.png with the paper's numbers beside the run's. Rerunning continues: finished trainings and "
        "evaluated tasks are kept, an interrupted training resumes.",
    )
    p.add_argument("table", choices=table_names(), help="the paper's table: math (Table 1) or commonsense (Table 2)")
    p.add_argument("--model", required=True, help="base model: a hub id or a local directory; its name picks the "
                   "paper's row (Llama-2-7B, Llama-3-8B, Llama-3.2-1B, Llama-3.2-3B), else Llama-2-7B's settings")
    p.add_argument("--data", nargs="+", default=None,
                   help="training data, as `liftft train --data` reads it (default: LLM-Adapters/ft-training_set/"
                   "math_10k.json or commonsense_170k.json, from a clone of AGI-Edgerunners/LLM-Adapters)")
    p.add_argument("--output", required=True, help="output directory DIR")
    p.add_argument("--data-dir", default=DEFAULT_TEST_DIR,
                   help="folder holding <task>/test.json for every task (LLM-Adapters' dataset/)")
    p.add_argument("--methods", type=comma_list, default=list(DEFAULT_METHODS),
                   help="comma-separated methods of `liftft train --method` (default: lift,full,lora,dora,pissa,s2ft)")
    p.add_argument("--tasks", help="comma-separated task names, math or commonsense (default: the table's tasks)")
    p.add_argument("--row", help="use this row's hyperparameters and paper numbers, whatever --model is called")
    p.add_argument("--limit", type=int, help="evaluate only the first N records of each task (smoke runs)")
    p.add_argument("--max-steps", type=int, help="optimizer steps per method instead of 3 epochs (smoke runs)")
    p.add_argument("--batch-size", type=int,
                   help="examples per micro-batch (default: 1); alone, it divides the accumulation so that the "
                   "effective batch stays 16")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default: 16)")
    p.add_argument("--max-seq-len", type=int, help="longest training example in tokens (default: 2048)")
    p.add_argument("--val-size", type=int,
                   help="training records held out, as the authors' script does (default: 100; a smoke run, with "
                   "--max-steps or --limit, on 100 records or fewer holds out a tenth of them)")
    p.add_argument("--seed", type=int, help="seed of every run (default: 43)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations to save memory (default: on, as the authors ran)")
    p.add_argument("--lr", type=float, help="peak learning rate of every method (default: the row's, per method)")
    p.add_argument("--rank", type=int, help="budget rank of every method (default: the row's, per method)")
    p.add_argument("--filter-rank", type=int, help="LIFT's SVD rank (default: the row's)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 training and evaluation (default: on with a CUDA GPU that supports it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--eval-batch-size", type=int, default=16, help="prompts per generation batch")
    p.add_argument("--max-new-tokens", type=int, help="longest generated answer (default: 256)")
    p.add_argument("--num-beams", type=int, help="beam width of generation (default: 4)")
    p.add_argument("--extractor", choices=EXTRACTORS,
                   help="answer extraction (default: reference, the authors' rules; strict is recorded beside it)")
    p.set_defaults(func=run)


@lift_fields_as_flags()
def run(args) -> int:
    reproduce(ReproduceArgs(
        table=args.table, model=args.model, output=args.output, data=args.data, data_dir=args.data_dir,
        methods=args.methods, tasks=args.tasks, row=args.row, limit=args.limit, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_seq_len=args.max_seq_len, val_size=args.val_size,
        seed=args.seed, gradient_checkpointing=args.gradient_checkpointing, lr=args.lr, rank=args.rank,
        filter_rank=args.filter_rank, bf16=args.bf16, device=args.device, eval_batch_size=args.eval_batch_size,
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, extractor=args.extractor,
        progress=args.progress,
    ))
    return 0
