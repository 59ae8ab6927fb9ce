"""`liftft analyze filter-rank`: fine-tune with LIFT at one budget k for each filter rank, and measure what each
run learned (target accuracy) and kept (source accuracy).

The paper reports an inverted U: target accuracy peaks near the filter rank of
a LoRA with the same k, and falls towards both ends, where W_r keeps too
little of W or is W itself (magnitude selection). Every run is an ordinary
`liftft train` run, kept under DIR/runs/filter-rank-R. Run again, the sweep
keeps the runs that finished and were scored with the same evaluation
settings (DIR/runs/filter-rank-R/filter_rank_scores.json), scores a finished
one again from its delta when those settings changed, and resumes an
interrupted one from its last checkpoint, as `liftft reproduce` does; a run
dir holding other training settings is refused by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from liftft.utils.atomic import atomic_write, write_json_atomic
from liftft.engine.config import LiftConfig

DEMO_MODEL = "demo"
RESULT_FILE = "filter_rank.json"
PLOT_FILE = "filter_rank.png"
RUNS_DIR = "runs"
DATA_DIR = "data"
# In each run dir: the run's scores and the evaluation settings they were measured with (a sweep run again keeps them).
SCORES_FILE = "filter_rank_scores.json"
# In DIR/runs: the base's scores, likewise.
BASE_SCORES_FILE = "base_scores.json"
# Checkpoints per run, so that an interrupted sweep resumes its run where it stopped.
CHECKPOINTS_PER_RUN = 10
# Settings left unset (None) take these, or with --model demo the demo's own (see demo_defaults).
DEFAULTS = {"rank": LiftConfig.rank, "lr": 2e-4, "max_steps": 100, "batch_size": 8, "max_seq_len": 512,
            "max_new_tokens": 64}


@dataclass
class FilterRankSettings:
    """One sweep: the base ``model`` (or ``"demo"``), its data, the filter ranks and the fixed budget.

    ``data`` trains (as ``liftft train --data``), ``test`` holds the target
    test records and ``source`` optional source-domain test records, both of
    answer ``kind`` and scored by generation. ``ranks`` None means every power
    of two up to the largest min(m, n) of the targets. Exactly one of ``rank``
    and ``density`` sets k (neither: rank 128). The runs train ``max_steps``
    steps of ``batch_size`` at ``lr`` without refreshes. With ``model="demo"``
    the demo's cached base (``quick``: the quick demo's) is used, and unset
    data, test, source and training settings come from the demo.
    """

    model: str
    output: str
    data: list[str] | None = None
    test: str | None = None
    source: str | None = None
    kind: str = "number"
    ranks: list[int] | None = None
    rank: int | None = None
    density: float | None = None
    lr: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    max_seq_len: int | None = None
    svd: str = "exact"
    target_modules: str | list[str] = "all-linear"
    limit: int | None = None
    max_new_tokens: int | None = None
    seed: int = 0
    quick: bool = False
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.rank is not None and self.density is not None:
            raise ValueError("--rank and --density contradict each other: give one")
        if self.model != DEMO_MODEL and (not self.data or not self.test):
            raise ValueError("give --data (training records) and --test (target test records), or --model demo")

    def filled(self) -> "FilterRankSettings":
        """These settings with every unset one given its default (with ``density`` set, ``rank`` stays None)."""
        defaults = {k: v for k, v in DEFAULTS.items() if not (k == "rank" and self.density is not None)}
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


def check_filter_ranks(ranks: list[int] | None, model: str, target_modules="all-linear") -> tuple[list[int], str | None]:
    """The sorted, distinct filter ranks to sweep on ``model``'s targets, and a note on those clamped (or None).

    A filter rank above min(m, n) of a matrix leaves W_r = W. Ranks above the
    largest min(m, n) of the targets are clamped to it (one run stands for all
    of them); ranks below 1 are refused. None gives the powers of two up to
    that largest min(m, n), and the largest itself.
    """
    from liftft.engine.preflight import meta_model
    from liftft.engine.targets import find_targets

    full = max(min(p.shape) for p in find_targets(meta_model(model), target_modules).values())
    if ranks is None:
        powers = [2 ** i for i in range(full.bit_length()) if 2 ** i <= full]
        return sorted({*powers, full}), None
    if not ranks:
        raise ValueError("--ranks names no filter rank")
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or r < 1]
    if bad:
        raise ValueError(f"--ranks: filter ranks must be integers >= 1, got {', '.join(map(repr, bad))}")
    above = sorted({r for r in ranks if r > full})
    note = None
    if above:
        note = (f"filter rank{'s' if len(above) > 1 else ''} {', '.join(map(str, above))} exceed{'' if len(above) > 1 else 's'} "
                f"the largest min(m, n) of the targets ({full}), where W_r = W already: one run at {full} stands "
                f"for {'them' if len(above) > 1 else 'it'}")
    return sorted({min(r, full) for r in ranks}), note


def demo_defaults(settings: FilterRankSettings) -> FilterRankSettings:
    """``settings`` for ``--model demo``: the demo's cached base (pretrained first if missing), its target problems
    and source facts written under DIR/data, and the demo's LIFT training settings where unset."""
    from liftft.demo.base import DemoSettings, get_base
    from liftft.demo.run import LEARNING_RATES, RANK

    demo = DemoSettings.quick() if settings.quick else DemoSettings()
    base = get_base(demo.base, device="cpu", progress=settings.progress)
    data_dir = Path(settings.output) / DATA_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    target_train, target_test = demo.target_split(settings.seed)
    files = {}
    for name, records in (("target_train", target_train), ("target_test", target_test),
                          ("source_test", demo.source_test())):
        files[name] = data_dir / f"{name}.json"
        write_json_atomic(files[name], records)
    own = {"data": [str(files["target_train"])], "test": str(files["target_test"]),
           "source": str(files["source_test"]), "lr": LEARNING_RATES["lift"], "max_steps": demo.finetune_steps,
           "batch_size": demo.finetune_batch_size, "max_seq_len": 256, "max_new_tokens": 96,
           "rank": None if settings.density is not None else RANK}
    unset = {k: v for k, v in own.items() if getattr(settings, k) is None}
    return replace(settings, model=str(base.path), kind="number", **unset)


def filter_rank_sweep(settings: FilterRankSettings) -> dict:
    """Run the sweep and write DIR/filter_rank.json and DIR/filter_rank.png; returns what the JSON holds.

    Every run trains from the same base, data, seed and budget, differing in
    the filter rank only, in DIR/runs/filter-rank-R. A sweep run again keeps
    the finished runs and resumes an interrupted one (see the module's
    docstring). The base's own accuracies are measured too, as the reference
    each run moves from, in the dtype the runs train in (bf16 on a GPU that
    has it, as `liftft train` chooses).
    """
    from liftft.utils.outputs import check_writable_dir

    if settings.quick and settings.model != DEMO_MODEL:
        raise ValueError(f"--quick chooses the quick demo's base, for --model {DEMO_MODEL} only")
    check_writable_dir(settings.output, "--output")
    if settings.model == DEMO_MODEL:
        settings = demo_defaults(settings)
    settings = settings.filled()
    ranks, note = check_filter_ranks(settings.ranks, settings.model, settings.target_modules)
    if note:
        print(f"liftft analyze filter-rank: {note}")
    evaluate = _Scorer(settings)
    for filter_rank in ranks:  # every run dir of other training settings is refused before any work
        _check_run_dir(settings, filter_rank)
    base, runs, dtype = None, [], None
    for i, filter_rank in enumerate(ranks, 1):
        print(f"liftft analyze filter-rank: run {i} of {len(ranks)}: filter rank {filter_rank}", end="", flush=True)
        run, dtype = _scored_run(settings, filter_rank, evaluate)
        runs.append(run)
        if base is None:
            base = _base_scores(settings, evaluate, dtype)
    result = {"settings": {**asdict(settings), "ranks": ranks}, "lora_equivalent_rank": settings.rank,
              "base": base, "runs": runs,
              "best_filter_rank": max(runs, key=lambda r: r["target_acc"])["filter_rank"]}
    output = Path(settings.output)
    write_json_atomic(output / RESULT_FILE, result)
    atomic_write(output / PLOT_FILE, lambda tmp: plot_filter_rank(result, tmp))
    return result


def _run_dir(settings: FilterRankSettings, filter_rank: int) -> Path:
    return Path(settings.output) / RUNS_DIR / f"filter-rank-{filter_rank}"


def _train_args(settings: FilterRankSettings, filter_rank: int):
    """The `liftft train` run of ``filter_rank``, resuming whatever its run dir holds."""
    from liftft.training.train import TrainArgs

    lift = LiftConfig(rank=settings.rank, density=settings.density, filter_rank=filter_rank, update_interval=None,
                      svd=settings.svd, target_modules=settings.target_modules)
    return TrainArgs(model=settings.model, data=settings.data, output=str(_run_dir(settings, filter_rank)),
                     method="lift", lift=lift, lr=settings.lr, epochs=None, max_steps=settings.max_steps,
                     batch_size=settings.batch_size, grad_accum=1, max_seq_len=settings.max_seq_len,
                     seed=settings.seed, save_steps=max(1, math.ceil(settings.max_steps / CHECKPOINTS_PER_RUN)),
                     resume=True, device=settings.device, progress=settings.progress)


def _check_run_dir(settings: FilterRankSettings, filter_rank: int) -> None:
    """Refuse a run dir that holds a run of other training settings (none may change, --lr included)."""
    from liftft.training import run_dir
    from liftft.training.args import record_defaults

    args = _train_args(settings, filter_rank)
    run_dir.check_continues(Path(args.output), args.run_record(), record_defaults(), resume=True)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _scored_run(settings: FilterRankSettings, filter_rank: int, evaluate: "_Scorer"):
    """(this filter rank's entry of the results, the dtype its weights trained in): kept from an earlier sweep,
    scored again from its delta, or trained (resumed) and scored; the entry is kept in the run dir."""
    from liftft.training.train import RUN_FILE

    out = _run_dir(settings, filter_rank)
    run = _read_json(out / RUN_FILE) or {}
    kept = _read_json(out / SCORES_FILE) if run.get("status") == "done" else None
    if kept is not None and kept.get("evaluation") == evaluate.settings_record():
        print(f": done in {out}, kept")
        return kept["run"], _dtype(kept["dtype"])
    if run.get("status") == "done":
        print(f": trained in {out}; scoring it")
        model = _trained_model(settings, out)
        metrics = {**run["metrics"], "trainable": run["trainable"]}
    else:
        print(f": resuming {out}" if run else "")
        from liftft.training.train import run_training

        model, metrics = run_training(_train_args(settings, filter_rank))
    entry = {"filter_rank": filter_rank, **evaluate(model), "train_loss": metrics["train_loss"],
             "trainable": metrics["trainable"], "output": str(out)}
    dtype = next(model.parameters()).dtype
    del model
    write_json_atomic(out / SCORES_FILE, {"evaluation": evaluate.settings_record(), "dtype": str(dtype), "run": entry})
    return entry, dtype


def _base_scores(settings: FilterRankSettings, evaluate: "_Scorer", dtype) -> dict:
    """The base's scores in ``dtype``, kept in DIR/runs for a sweep run again with the same evaluation settings."""
    path = Path(settings.output) / RUNS_DIR / BASE_SCORES_FILE
    record = {"model": settings.model, "dtype": str(dtype), "evaluation": evaluate.settings_record()}
    kept = _read_json(path)
    if kept is not None and {k: kept.get(k) for k in record} == record:
        return kept["scores"]
    scores = evaluate.base(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {**record, "scores": scores})
    return scores


def _dtype(name: str):
    import torch

    return getattr(torch, name.removeprefix("torch."))


def _trained_model(settings: FilterRankSettings, out: Path):
    """The finished run in ``out`` as it trained: its base in the dtype `liftft train` trained it in, and its delta."""
    import torch

    from liftft.deltas.delta import apply_delta
    from liftft.training.train import resolve_device
    from liftft.utils.hf import load_model

    device = resolve_device(settings.device)
    # As `liftft train` chooses for a sparse method without --bf16: bf16 weights on a GPU that supports it.
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    model = load_model(settings.model, torch.bfloat16 if bf16 else torch.float32, device=device)
    apply_delta(model, out)
    return model


class _Scorer:
    """Target (and source) accuracy by generation, with the `liftft eval` code; the test files are read and checked
    before any training."""

    def __init__(self, settings: FilterRankSettings):
        from liftft.eval import check_answers, custom_task, read_records

        self.settings = settings
        self.files = {}
        self.sets = {}
        for key, path in (("target_acc", settings.test), ("source_acc", settings.source)):
            if path is None:
                continue
            records = read_records(path)[: settings.limit]
            task = custom_task(Path(path).stem, settings.kind, records)
            check_answers(task, records, path)
            self.sets[key] = (task, records)
            self.files[key] = Path(path).read_bytes()

    def settings_record(self) -> dict:
        """What the scores depend on besides the model: the test records (a digest of each file) and how they are
        scored; a score kept from an earlier sweep is reused only under the same record."""
        import hashlib

        s = self.settings
        return {"files": {key: hashlib.sha256(data).hexdigest() for key, data in self.files.items()},
                "kind": s.kind, "limit": s.limit, "max_new_tokens": s.max_new_tokens}

    def __call__(self, model) -> dict:
        from liftft.eval import evaluate_task
        from liftft.utils.hf import load_tokenizer

        tokenizer = load_tokenizer(self.settings.model)
        model.eval()
        return {key: evaluate_task(model, tokenizer, task, records, max_new_tokens=self.settings.max_new_tokens)[0]
                ["accuracy"] for key, (task, records) in self.sets.items()}

    def base(self, dtype) -> dict:
        """The base model's accuracies, loaded in ``dtype`` (the runs', so that only the fine-tuning differs)."""
        from liftft.utils.hf import load_model
        from liftft.training.train import resolve_device

        return self(load_model(self.settings.model, dtype, device=resolve_device(self.settings.device)))


def plot_filter_rank(result: dict, path) -> None:
    """Target and source accuracy against the filter rank (log axis), the base's as dotted lines, and the
    LoRA-equivalent rank as a dashed line when the budget is a rank."""
    from matplotlib.figure import Figure

    from liftft.analysis.plots import DPI

    runs = result["runs"]
    ranks = [r["filter_rank"] for r in runs]
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for i, (key, label) in enumerate((("target_acc", "target"), ("source_acc", "source"))):
        if key in runs[0]:
            ax.plot(ranks, [r[key] for r in runs], marker="o", color=f"C{i}", label=f"{label} accuracy")
            ax.axhline(result["base"][key], color=f"C{i}", linestyle=":", label=f"{label}, base")
    if result["lora_equivalent_rank"] is not None:
        ax.axvline(result["lora_equivalent_rank"], color="gray", linestyle="--", label="LoRA rank of the budget")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("filter rank")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("LIFT at a fixed budget, by filter rank")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=DPI, format="png")  # the path may be a temporary name without the .png
