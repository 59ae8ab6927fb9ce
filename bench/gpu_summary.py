"""Write OUT/summary.md for a bench/gpu_check.sh run: device, versions, each step, and the issue's targets.

Reads what the script left in OUT: steps.tsv (one line per step: name, status, seconds, command), tests.xml
(pytest's JUnit report) and each step's <step>.json. The script deletes a step's files before the step runs,
so whatever is here is this run's. A target whose figures are missing (a step that failed, timed out or did
not run) reads "not measured"; the summary is written whatever happened.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
# JUnit's tag for each outcome other than passed.
OUTCOMES = {"failure": "failed", "error": "error", "skipped": "skipped"}
NO_SYNC_TEST = "test_backward_and_step_never_wait_for_the_gpu"
UNITS = {
    "tokens_per_s": lambda v: f"{v:,.0f} tokens/s",
    "peak_memory_bytes": lambda v: f"{v / GIB:.3f} GiB",
    "selection_init_s": lambda v: f"{v:.3f} s",
}


@dataclass(frozen=True)
class Figure:
    """One number of one method in one step's bench JSON."""

    step: str
    method: str
    key: str

    def read(self, out: Path) -> float | None:
        report = read_json(out / f"{self.step}.json")
        value = (report or {}).get("methods", {}).get(self.method, {}).get(self.key)
        return None if value is None else float(value)


@dataclass(frozen=True)
class Target:
    """``value`` (divided by ``peer`` when given) against ``bound``: at least it when ``at_least``, else at most."""

    label: str
    value: Figure
    peer: Figure | None
    bound: float
    at_least: bool


TARGETS = (
    Target("lift tokens/s ≥ 1.0× full's, llama-1b 4×1024", Figure("bench-1b-4x1024", "lift", "tokens_per_s"),
           Figure("bench-1b-4x1024", "full", "tokens_per_s"), 1.0, True),
    Target("lift peak ≤ LoRA's, llama-1b 1×256", Figure("bench-1b-1x256", "lift", "peak_memory_bytes"),
           Figure("bench-1b-1x256", "lora", "peak_memory_bytes"), 1.0, False),
    Target("lift-in-backward peak ≤ LoRA's, llama-1b 1×256",
           Figure("bench-1b-1x256", "lift-in-backward", "peak_memory_bytes"),
           Figure("bench-1b-1x256", "lora", "peak_memory_bytes"), 1.0, False),
    Target("selection of all targets (112 matrices at llama-1b) ≤ 1 s",
           Figure("bench-1b-1x256", "lift", "selection_init_s"), None, 1.0, False),
    Target("lift tokens/s ≥ 0.95× the floor's, 8B shape 1×2048", Figure("bench-8b-1x2048", "lift", "tokens_per_s"),
           Figure("bench-8b-1x2048", "floor", "tokens_per_s"), 0.95, True),
    Target("lift peak ≤ LoRA's, 8B shape 1×2048", Figure("bench-8b-1x2048", "lift", "peak_memory_bytes"),
           Figure("bench-8b-1x2048", "lora", "peak_memory_bytes"), 1.0, False),
    Target("QLIFT tokens/s ≥ 0.8× QLoRA's, 8B shape 4-bit 1×2048",
           Figure("bench-8b-4bit-1x2048", "lift", "tokens_per_s"), Figure("bench-8b-4bit-1x2048", "lora", "tokens_per_s"),
           0.8, True),
    Target("QLIFT peak ≤ 1.15× QLoRA's, 8B shape 4-bit 1×2048",
           Figure("bench-8b-4bit-1x2048", "lift", "peak_memory_bytes"),
           Figure("bench-8b-4bit-1x2048", "lora", "peak_memory_bytes"), 1.15, False),
)
# Not a target: how much the Triton kernel gains over LiftAdamW's torch step.
KERNEL_GAIN = (Figure("bench-1b-4x1024", "lift", "tokens_per_s"), Figure("bench-torch-step", "lift", "tokens_per_s"))


def read_json(path: Path) -> dict | None:
    """The file's JSON, or None when the file is missing or unreadable (a step killed while writing it)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def describe(figure: Figure, value: float) -> str:
    return f"{figure.method} {UNITS[figure.key](value)}"


def target_row(target: Target, out: Path) -> str:
    value = target.value.read(out)
    peer = target.peer.read(out) if target.peer else None
    if value is None or (target.peer and not peer):
        return f"| {target.label} | not measured | | not measured |"
    measured = describe(target.value, value) + (f" / {describe(target.peer, peer)}" if target.peer else "")
    ratio = value / peer if target.peer else value
    met = ratio >= target.bound if target.at_least else ratio <= target.bound
    return f"| {target.label} | {measured} | {f'{ratio:.3f}×' if target.peer else ''} | {'pass' if met else 'miss'} |"


def kernel_gain_line(out: Path) -> str:
    kernel, torch_step = (figure.read(out) for figure in KERNEL_GAIN)
    if not (kernel and torch_step):
        return "- Triton kernel against the torch step (lift tokens/s at 4×1024): not measured"
    return (f"- Triton kernel against the torch step (lift tokens/s at 4×1024): {kernel:,.0f} / {torch_step:,.0f} "
            f"= {kernel / torch_step:.3f}×")


def steps_table(out: Path) -> list[str]:
    try:
        lines = (out / "steps.tsv").read_text().splitlines()
    except OSError:
        return ["No steps were recorded (steps.tsv is missing)."]
    rows = ["| step | status | seconds | command |", "| --- | --- | ---: | --- |"]
    for line in lines:
        name, status, seconds, command = line.split("\t", 3)
        rows.append(f"| {name} | {status} | {seconds} | `{command}` |")
    return rows


def tests_lines(out: Path) -> list[str]:
    try:
        cases = ET.parse(out / "tests.xml").getroot().iter("testcase")
    except (OSError, ET.ParseError):
        return ["- not measured (no readable tests.xml)"]
    outcomes = {f"{case.get('classname')}::{case.get('name')}": _outcome(case) for case in cases}
    counts = {o: sum(1 for v in outcomes.values() if v == o) for o in ("passed", *OUTCOMES.values())}
    lines = ["- " + ", ".join(f"{n} {o}" for o, n in counts.items())]
    lines += [f"- {name}: {o}" for name, o in outcomes.items() if NO_SYNC_TEST in name or o in ("failed", "error")]
    if not any(NO_SYNC_TEST in name for name in outcomes):
        lines.append(f"- {NO_SYNC_TEST}: did not run")
    return lines


def _outcome(case) -> str:
    return next((outcome for tag, outcome in OUTCOMES.items() if case.find(tag) is not None), "passed")


def train_line(out: Path) -> str:
    run = read_json(out / "train.json")
    if not run or run.get("status") != "done":
        return "- not measured"
    m = run["metrics"]
    return (f"- {m['steps']} optimizer steps, final train loss {m['train_loss']:.4f}, {m['tokens']:,} tokens in "
            f"{m['train_seconds']:.1f} s, {m['trainable']:,} trainable values; bf16 {run['args']['bf16']}, "
            f"refresh every {run['args']['update_interval']} steps")


def fsdp_line(out: Path) -> str:
    result = read_json(out / "fsdp-compare.json")
    if not result:
        return "- not measured"
    return (f"- one process with --fsdp against one without, {result['weights']} weights: same entries "
            f"{result['same_entries']}, max relative difference {result['max_relative_difference']:.2e} "
            f"(tolerance {result['tolerance']:g}): {'pass' if result['pass'] else 'fail'}")


def render(out: Path, env: dict, invocation: str) -> str:
    """The summary's markdown, from the files in ``out`` and the environment ``env``."""
    lines = [f"# GPU check: `{invocation}`", "", "## Device and versions", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    if "--dry-run" in invocation:
        lines += ["", "A dry run: tiny shapes, so the figures test the script, not the targets."]
    lines += ["", "## Steps", "", *steps_table(out), "", "## Targets", "",
              "| target | measured | ratio | result |", "| --- | --- | ---: | --- |"]
    lines += [target_row(target, out) for target in TARGETS]
    lines += ["", "## Other figures", "", kernel_gain_line(out), "", "## CUDA tests", "", *tests_lines(out),
              "", "## Train step", "", train_line(out), "", "## FSDP2", "", fsdp_line(out), ""]
    return "\n".join(lines)


def environment(device: str) -> dict:
    """liftft bench's environment record of this machine, plus the CUDA version torch was built with."""
    import torch

    from liftft.planning.bench import environment as bench_environment

    # Only a CUDA device that is there can be named; a run asked for one that is not records the CPU.
    measured = torch.device(device) if torch.cuda.is_available() else torch.device("cpu")
    return {**bench_environment(measured), "cuda": torch.version.cuda}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the directory gpu_check.sh wrote into")
    parser.add_argument("--device", default="cuda", help="the device the steps ran on (default: cuda)")
    parser.add_argument("--invocation", default="bash bench/gpu_check.sh", help="the command line, for the title")
    args = parser.parse_args()
    (args.out / "summary.md").write_text(render(args.out, environment(args.device), args.invocation))


if __name__ == "__main__":
    main()
