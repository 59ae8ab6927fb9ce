"""`liftft demo`: pretrain a small base offline, fine-tune it with LIFT and baselines, measure learning and forgetting."""

from __future__ import annotations

import json
import os
import shutil
import threading
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from liftft.config import LiftConfig
from liftft.outputs import check_writable_dir
from liftft.demo.base import DemoSettings, base_path, get_base
from liftft.demo.report import DEMO_METHODS, plot, table
from liftft.eval import custom_task, evaluate_task
from liftft.train import TrainArgs, resolve_device, run_training

# Each method's best target accuracy on seed 0 over the grid in docs/demo.md (full: 1e-3, 3e-3; the others:
# 3e-3, 1e-2, 3e-2, 1e-1 — LoRA diverged at 3e-2), fixed here so every run uses the same rates.
LEARNING_RATES = {"lift": 3e-2, "full": 3e-3, "lora": 1e-2, "magnitude": 3e-2, "random": 1e-1}
RANK = 4
FILTER_RANK = 8
UPDATE_INTERVAL = 100


def parse_methods(text: str) -> list[str]:
    """Comma-separated demo methods, validated."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in DEMO_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown demo method(s) {', '.join(unknown) or repr(text)}; allowed: {', '.join(DEMO_METHODS)}")
    return methods


def run_demo(output="demo_out", *, quick: bool = False, methods=DEMO_METHODS, device: str = "auto", seed: int = 0,
             progress: bool = True) -> dict:
    """Run the whole demo and write DIR/demo_results.json and DIR/demo.png; returns the results."""
    output = Path(output)
    methods = parse_methods(",".join(methods))
    check_writable_dir(output, "--output")
    output.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    settings = DemoSettings.quick() if quick else DemoSettings()
    cache = base_path(settings.base)
    _stage(f"base model: {'cached' if cache.exists() else 'pretraining it once'} at {cache} (LIFTFT_CACHE moves it)")
    base = get_base(settings.base, device=device, progress=progress)
    target_train, target_test = settings.target_split(seed)
    source_test = settings.source_test()
    data_file = output / "target_train.json"
    data_file.write_text(json.dumps(target_train))
    evaluate = _Evaluator(base.tokenizer, source_test, target_test)

    _stage("evaluating the base on the source facts and the target problems")
    results = {"base": evaluate(base.model), "methods": {},
               "settings": _settings_record(settings, quick, seed, device, base)}
    del base
    for i, method in enumerate(methods, 1):
        _stage(f"method {i} of {len(methods)}: {method}: fine-tuning, then evaluating")
        results["methods"][method] = _fine_tune(method, settings, data_file, output, device, seed, evaluate, progress)
    _stage(f"writing {output / 'demo_results.json'} and {output / 'demo.png'}")
    (output / "demo_results.json").write_text(json.dumps(results, indent=2))
    plot(results, output / "demo.png")
    print(table(results))
    return results


def _stage(text: str) -> None:
    print(f"liftft demo: {text}", flush=True)


def _fine_tune(method, settings, data_file, output, device, seed, evaluate, progress) -> dict:
    run_dir = output / "runs" / method
    shutil.rmtree(run_dir, ignore_errors=True)
    args = TrainArgs(
        model=str(base_path(settings.base)), data=[str(data_file)], output=str(run_dir), method=method,
        lift=LiftConfig(rank=RANK, filter_rank=FILTER_RANK, update_interval=UPDATE_INTERVAL, svd="exact"),
        lr=LEARNING_RATES[method], epochs=None, max_steps=settings.finetune_steps,
        batch_size=settings.finetune_batch_size, grad_accum=1, max_seq_len=256, warmup_ratio=0.05, scheduler="linear",
        max_grad_norm=1.0, bf16=False, seed=seed, save_steps=None, device=str(device), progress=progress,
    )
    with peak_memory(device) as peak:
        model, metrics = run_training(args)
    scores = evaluate(model)
    return {**scores, "trainable": metrics["trainable"], "train_seconds": metrics["train_seconds"],
            "peak_mem_mb": round(peak.mb, 1), "final_loss": metrics["train_loss"]}


class _Evaluator:
    """Source and target accuracy with the `liftft eval` code."""

    def __init__(self, tokenizer, source_test, target_test):
        self.tokenizer = tokenizer
        self.source = (custom_task("demo-source", "number", source_test), source_test)
        self.target = (custom_task("demo-target", "number", target_test), target_test)

    def __call__(self, model) -> dict:
        model.eval()
        scores = {}
        for key, (task, records) in (("source_acc", self.source), ("target_acc", self.target)):
            summary, _ = evaluate_task(model, self.tokenizer, task, records, batch_size=32, max_new_tokens=96)
            scores[key] = summary["accuracy"]
        return scores


class _Peak:
    mb = 0.0


@contextmanager
def peak_memory(device: torch.device):
    """Peak memory of the block in MB: CUDA max allocated, or on CPU the rise of the process RSS."""
    peak = _Peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield peak
        peak.mb = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return
    start = _rss()
    highest = [start]
    done = threading.Event()

    def sample():
        while not done.wait(0.02):
            highest[0] = max(highest[0], _rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()
        peak.mb = (max(highest[0], _rss()) - start) / 2**20


def _rss() -> int:
    """Resident set size in bytes (Linux); elsewhere the process's peak so far, which only rises."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _settings_record(settings, quick, seed, device, base) -> dict:
    return {"quick": quick, "seed": seed, "device": str(device), "rank": RANK, "filter_rank": FILTER_RANK,
            "update_interval": UPDATE_INTERVAL, "learning_rates": LEARNING_RATES, "base_cached": base.cached,
            "pretrain_seconds": base.pretrain_seconds, **asdict(settings)}
