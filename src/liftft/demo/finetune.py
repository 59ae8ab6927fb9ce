"""One fine-tuning run of the demo, scored at several steps along the way: the points of a method's frontier."""

from __future__ import annotations

import copy
import os
import threading
import time
from contextlib import contextmanager

import torch

from liftft.utils.errors import TrainingDiverged
from liftft.eval import custom_task, evaluate_task
from liftft.training.loop import TrainingLoop
from liftft.engine.methods import setup_method


class Evaluator:
    """Source and target accuracy with the `liftft eval` code: what a model kept and what it learned."""

    def __init__(self, tokenizer, source_test: list[dict], target_test: list[dict]):
        self.tokenizer = tokenizer
        self.source = (custom_task("demo-source", "number", source_test), source_test)
        self.target = (custom_task("demo-target", "number", target_test), target_test)

    def __call__(self, model) -> dict:
        """``{"target_acc", "source_acc"}`` of ``model``, greedy; leaves it in eval mode."""
        model.eval()
        scores = {}
        for key, (task, records) in (("target_acc", self.target), ("source_acc", self.source)):
            summary, _ = evaluate_task(model, self.tokenizer, task, records, batch_size=32, max_new_tokens=96)
            scores[key] = summary["accuracy"]
        return scores


class _ScoredLoop(TrainingLoop):
    """The `liftft train` loop, scoring the model after each step of ``score_at``; scoring stops no clock here,
    so its seconds are kept apart to be taken off the training time."""

    def __init__(self, *args, score, score_at, **kwargs):
        super().__init__(*args, **kwargs)
        self.score, self.score_at = score, set(score_at)
        self.points: list[dict] = []
        self.score_seconds = 0.0

    def train_step(self, micro_batches):
        result = super().train_step(micro_batches)
        step = self.step + 1  # the loop counts the step once this returns
        if step in self.score_at:
            began = time.perf_counter()
            self.points.append({"step": step, **self.score(self.model)})
            self.model.train()
            self.score_seconds += time.perf_counter() - began
        return result


def scored_run(args, base_model, examples: list[dict], pad_token_id: int, device: torch.device, score,
               score_at) -> dict:
    """Fine-tune a copy of ``base_model`` as ``args`` (a :class:`liftft.training.train.TrainArgs`) says, on the encoded
    ``examples``, with the loop of `liftft train`, scoring it with ``score`` after each step of ``score_at``.

    Returns ``{"lr", "points": [{"step", "lr", "target_acc", "source_acc"}...], "train_seconds", "peak_mem_mb",
    "trainable", "diverged"}``: a run that diverges keeps the points scored before, and says so.
    """
    torch.manual_seed(args.seed)  # as `liftft train` seeds the random selection and the adapters' init
    setup = setup_method(copy.deepcopy(base_model), args.method, args.lift_config(), lr=args.lr,
                         weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm)
    os.makedirs(args.output, exist_ok=True)  # the loop logs to DIR/train_log.jsonl
    loop = _ScoredLoop(args, setup.model, setup, examples, pad_token_id, device, False, score=score,
                       score_at=score_at)
    diverged = False
    began = time.perf_counter()
    with peak_memory(device) as peak:
        try:
            loop.run()
        except TrainingDiverged:
            diverged = True
    seconds = time.perf_counter() - began - loop.score_seconds
    points = [{**point, "lr": args.lr} for point in loop.points]
    return {"lr": args.lr, "points": points, "train_seconds": round(seconds, 1), "peak_mem_mb": round(peak.mb, 1),
            "trainable": setup.trainable, "diverged": diverged}


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
