"""Kill `liftft train` at random moments, resume it, and count the runs that end bit-identical to an uninterrupted one.

    python bench/kill_trials.py [--trials 8] [--methods lift,full,lora] [--seed 0] [--workdir DIR]

A tiny Llama and generated arithmetic data are written to the work dir. Each
method first runs once uninterrupted. Then each trial starts the same run,
SIGKILLs it at a random moment (anywhere from start-up to the final writes,
checkpoint writes included), and resumes it with --resume until it finishes,
killing the first resumption too in half the trials. The final outputs (the
delta, the merged model or the adapter) are compared with the reference's,
tensor by tensor. Prints one line per method and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

OUTPUT_FILES = {"lift": "delta.safetensors", "full": "merged/model.safetensors",
                "lora": "adapter/adapter_model.safetensors"}
TRAIN_FLAGS = ["--rank", "2", "--filter-rank", "4", "--update-interval", "3", "--max-steps", "12", "--batch-size", "2",
               "--grad-accum", "2", "--max-seq-len", "64", "--warmup-ratio", "0", "--save-steps", "2", "--lr", "1e-2",
               "--no-progress", "--seed", "7"]


def make_inputs(workdir: Path) -> tuple[Path, Path]:
    """A tiny Llama with its tokenizer, and 64 arithmetic records."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from liftft.demo.base import build_tokenizer

    records = [{"instruction": f"What is {a} plus {b}?", "output": str(a + b)} for a in range(8) for b in range(8)]
    data = workdir / "data.json"
    data.write_text(json.dumps(records))
    tokenizer = build_tokenizer([r["instruction"] + " " + r["output"] for r in records], vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base = workdir / "base"
    LlamaForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base, data


def command(base: Path, data: Path, out: Path, method: str, resume: bool) -> list[str]:
    return [sys.executable, "-m", "liftft", "train", "--model", str(base), "--data", str(data), "--output", str(out),
            "--method", method, *TRAIN_FLAGS, *(["--resume"] if resume else [])]


def run(argv: list[str], kill_after: float | None) -> str:
    """Run ``argv``; SIGKILL it after ``kill_after`` seconds unless it ended first. "done", "killed" or "failed"."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        code = process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return "killed"
    return "done" if code == 0 else "failed"


def identical(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def trial(base: Path, data: Path, out: Path, method: str, duration: float, rng: random.Random) -> dict:
    kills = 0
    outcome = run(command(base, data, out, method, resume=False), kill_after=rng.uniform(0.2, 1.1) * duration)
    kills += outcome == "killed"
    resumptions = 0
    while outcome != "done" and resumptions < 5:
        resumptions += 1
        again = resumptions == 1 and rng.random() < 0.5
        outcome = run(command(base, data, out, method, resume=True),
                      kill_after=rng.uniform(0.3, 1.0) * duration if again else None)
        kills += outcome == "killed"
    return {"kills": kills, "finished": outcome == "done"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="killed runs per method")
    parser.add_argument("--methods", default="lift,full,lora", help="comma-separated methods")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--workdir", default=None, help="where to write (default: a new temporary dir)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="liftft-kill-"))
    workdir.mkdir(parents=True, exist_ok=True)
    base, data = make_inputs(workdir)
    rng = random.Random(args.seed)
    summary = {}
    for method in args.methods.split(","):
        reference = workdir / f"{method}-reference"
        start = time.perf_counter()
        assert run(command(base, data, reference, method, resume=False), kill_after=None) == "done", method
        duration = time.perf_counter() - start
        results = []
        for i in range(args.trials):
            out = workdir / f"{method}-{i}"
            result = trial(base, data, out, method, duration, rng)
            result["identical"] = result["finished"] and identical(out / OUTPUT_FILES[method],
                                                                   reference / OUTPUT_FILES[method])
            results.append(result)
        summary[method] = {
            "trials": len(results),
            "killed_at_least_once": sum(r["kills"] > 0 for r in results),
            "kills": sum(r["kills"] for r in results),
            "finished": sum(r["finished"] for r in results),
            "bit_identical": sum(r["identical"] for r in results),
            "reference_seconds": round(duration, 1),
        }
        s = summary[method]
        print(f"{method}: {s['trials']} trials, {s['kills']} kills ({s['killed_at_least_once']} trials killed), "
              f"{s['finished']} finished, {s['bit_identical']} bit-identical to the uninterrupted run")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
