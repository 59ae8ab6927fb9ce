"""`liftft demo`: pretrain a small base offline, fine-tune it with LIFT and baselines over a small grid of
learning rates, score each run at several steps, and compare the methods along their learning-forgetting frontiers."""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

from liftft.utils.atomic import write_json_atomic
from liftft.engine.config import LiftConfig
from liftft.data.batches import encode_dataset
from liftft.demo.base import DemoSettings, base_path, get_base
from liftft.demo.finetune import Evaluator, scored_run
from liftft.demo.frontier import frontier, matched_levels
from liftft.demo.report import DEMO_METHODS, LABELS, plot, table
from liftft.demo.threads import demo_threads, torch_threads
from liftft.utils.outputs import check_writable_dir
from liftft.utils.progress import progress_shown
from liftft.training.train import TrainArgs, resolve_device

# Each method's best target accuracy on seed 0 after 400 steps, over the grid in docs/demo.md (full: 1e-3, 3e-3;
# the others: 3e-3, 1e-2, 3e-2, 1e-1; LoRA diverged at 3e-2). `liftft analyze filter-rank --model demo` trains at
# LIFT's.
LEARNING_RATES = {"lift": 3e-2, "full": 3e-3, "lora": 1e-2, "magnitude": 3e-2, "random": 1e-1}
# Each method's grid, lowest first: its best rate and a third of it. Principal-smallest, outside the default
# methods, takes LIFT's.
LR_GRIDS = {"lift": (1e-2, 3e-2), "full": (1e-3, 3e-3), "lora": (3e-3, 1e-2), "magnitude": (1e-2, 3e-2),
            "random": (3e-2, 1e-1), "principal-smallest": (1e-2, 3e-2)}
RANK = 4
FILTER_RANK = 8
UPDATE_INTERVAL = 100


def parse_methods(text: str) -> list[str]:
    """Comma-separated demo methods, validated."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in LABELS]
    if unknown or not methods:
        raise ValueError(f"unknown demo method(s) {', '.join(unknown) or repr(text)}; allowed: {', '.join(LABELS)}")
    return methods


def run_demo(output="demo_out", *, quick: bool = False, methods=DEMO_METHODS, device: str = "auto", seed: int = 0,
             progress: bool = True) -> dict:
    """Run the whole demo and write DIR/demo_results.json and DIR/demo.png; returns the results.

    On the CPU it runs with :func:`liftft.demo.threads.demo_threads` torch threads, restored after. Without
    ``progress`` no progress bar shows, the evaluations' included.
    """
    output = Path(output)
    methods = parse_methods(",".join(methods))
    check_writable_dir(output, "--output")
    output.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    threads = demo_threads() if device.type == "cpu" else None
    settings = DemoSettings.quick() if quick else DemoSettings()
    with torch_threads(threads) if threads else nullcontext(), progress_shown(progress):
        results = _run(output, settings, methods, device, seed, progress)
    results["settings"].update(quick=quick, threads=threads)
    _stage(f"writing {output / 'demo_results.json'} and {output / 'demo.png'}")
    write_json_atomic(output / "demo_results.json", results)
    plot(results, output / "demo.png")
    print(table(results))
    return results


def _run(output: Path, settings: DemoSettings, methods: list[str], device, seed: int, progress: bool) -> dict:
    cache = base_path(settings.base)
    _stage(f"base model: {'cached' if cache.exists() else 'pretraining it once'} at {cache} (LIFTFT_CACHE moves it)")
    base = get_base(settings.base, device=device, progress=progress)
    target_train, target_test = settings.target_split(seed)
    score = Evaluator(base.tokenizer, settings.source_test(), target_test[: settings.n_scored_target])
    examples, _ = encode_dataset(target_train, base.tokenizer, max_seq_len=256)

    _stage("scoring the base on the source facts and the target problems")
    start = {"step": 0, "lr": None, **score(base.model)}
    results = {"base": {k: start[k] for k in ("target_acc", "source_acc")}, "methods": {},
               "settings": _settings_record(settings, methods, seed, device, base)}
    for i, method in enumerate(methods, 1):
        rates = _rates(method, settings)
        _stage(f"method {i} of {len(methods)}: {method}: fine-tuning at lr {', '.join(map(str, rates))}, scoring at "
               f"steps {', '.join(map(str, settings.score_steps()))}")
        runs = [_scored(method, lr, settings, output, device, seed, base, examples, score, progress) for lr in rates]
        results["methods"][method] = _method_record([start], runs)
    matched = matched_levels({m: r["points"] for m, r in results["methods"].items()})
    return {**results, "matched": matched}


def _rates(method: str, settings: DemoSettings) -> tuple[float, ...]:
    """The rates ``method`` runs at: the highest ``settings.rates_per_method`` of its grid."""
    return LR_GRIDS[method][-settings.rates_per_method:]


def _scored(method, lr, settings, output, device, seed, base, examples, score, progress) -> dict:
    run_dir = output / "runs" / f"{method}-lr{lr:g}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun's log starts afresh
    args = TrainArgs(
        model=str(base_path(settings.base)), data=[], output=str(run_dir),
        method=method, lift=LiftConfig(rank=RANK, filter_rank=FILTER_RANK, update_interval=UPDATE_INTERVAL, svd="exact"),
        lr=lr, epochs=None, max_steps=settings.finetune_steps, batch_size=settings.finetune_batch_size, grad_accum=1,
        max_seq_len=256, warmup_ratio=0.05, scheduler="linear", max_grad_norm=1.0, bf16=False, seed=seed,
        save_steps=None, device=str(device), progress=progress,
    )  # fmt: skip
    return scored_run(args, base.model, examples, base.tokenizer.pad_token_id, device, score, settings.score_steps())


def _method_record(start: list[dict], runs: list[dict]) -> dict:
    """One method's points over all its runs (the base's first), their frontier, and the totals of its runs."""
    points = start + [p for run in runs for p in run["points"]]
    best = max(points, key=lambda p: (p["target_acc"], p["source_acc"]))
    return {"points": points, "frontier": frontier(points), "best_target_acc": best["target_acc"],
            "source_acc_at_best_target": best["source_acc"], "trainable": runs[0]["trainable"],
            "train_seconds": round(sum(r["train_seconds"] for r in runs), 1),
            "peak_mem_mb": max(r["peak_mem_mb"] for r in runs), "diverged_lrs": [r["lr"] for r in runs if r["diverged"]]}


def _stage(text: str) -> None:
    print(f"liftft demo: {text}", flush=True)


def _settings_record(settings, methods, seed, device, base) -> dict:
    return {"seed": seed, "device": str(device), "rank": RANK, "filter_rank": FILTER_RANK,
            "update_interval": UPDATE_INTERVAL, "learning_rates": {m: _rates(m, settings) for m in methods},
            "score_steps": settings.score_steps(), "base_cached": base.cached, "pretrain_seconds": base.pretrain_seconds, **asdict(settings)}
