"""bench/gpu_check.sh, the script a GPU session runs first: its CPU dry run end to end, and its summary's arithmetic."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("install", "tests", "bench-1b-4x1024", "bench-1b-1x256", "bench-torch-step", "fixture", "train",
         "fsdp-plain", "fsdp", "fsdp-compare", "bench-8b-4bit-1x2048", "bench-8b-1x2048")
BENCH_STEPS = [step for step in STEPS if step.startswith("bench-")]
GIB = 2**30


def load_summary_module():
    spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "bench" / "gpu_summary.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_summary = load_summary_module()


def target_row(summary: str, label: str) -> str:
    [row] = [line for line in summary.splitlines() if line.startswith(f"| {label} |")]
    return row


def test_the_cpu_dry_run_runs_every_step_and_summarises_the_numbers_it_wrote(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    # About a minute on two busy shared cores; a hang must fail the test, not stall the suite.
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=300)
    log = (tmp_path / "gpu_check.log").read_text()
    assert done.returncode == 0, log[-4000:]
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {*(f"{s}.json" for s in BENCH_STEPS), "train.json", "fsdp-compare.json", "tests.xml",
                       "steps.tsv", "gpu_check.log", "summary.md"}
    reports = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert reports["train"]["status"] == "done"
    assert reports["fsdp-compare"]["pass"] and reports["fsdp-compare"]["weights"] > 0
    summary = (tmp_path / "summary.md").read_text()
    assert f"max relative difference {reports['fsdp-compare']['max_relative_difference']:.2e}" in summary
    for step in STEPS:
        assert f"| {step} | ok |" in summary
    assert "test_backward_and_step_never_wait_for_the_gpu[True]: skipped" in summary
    methods = reports["bench-1b-1x256"]["methods"]
    ratio = methods["lift"]["peak_memory_bytes"] / methods["lora"]["peak_memory_bytes"]
    assert f"| {ratio:.3f}× |" in target_row(summary, gpu_summary.TARGETS[1].label)
    methods = reports["bench-8b-1x2048"]["methods"]
    ratio = methods["lift"]["tokens_per_s"] / methods["floor"]["tokens_per_s"]
    assert f"| {ratio:.3f}× |" in target_row(summary, gpu_summary.TARGETS[4].label)


def test_the_offline_path_makes_datasets_and_trl_absent():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bench" / "offline")}
    for name in ("datasets", "trl"):
        done = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr


def write_bench(out: Path, step: str, methods: dict) -> None:
    (out / f"{step}.json").write_text(json.dumps({"methods": methods}))


def figures(tokens_per_s=1000.0, peak_gib=4.0, selection_init_s=None) -> dict:
    return {"tokens_per_s": tokens_per_s, "peak_memory_bytes": peak_gib * GIB, "selection_init_s": selection_init_s}


def render(out: Path) -> str:
    return gpu_summary.render(out, {"device": "test GPU", "torch": "0"}, "bash bench/gpu_check.sh")


# Every target met, lift-in-backward's peak and the 8B tokens/s exactly at their bounds.
MET = {
    "bench-1b-4x1024": {"lift": figures(2000.0), "full": figures(1000.0)},
    "bench-1b-1x256": {"lift": figures(peak_gib=3.0, selection_init_s=0.5), "lift-in-backward": figures(peak_gib=4.0),
                       "lora": figures(peak_gib=4.0)},
    "bench-8b-1x2048": {"lift": figures(950.0, 20.0), "floor": figures(1000.0, 19.0), "lora": figures(500.0, 22.0)},
    "bench-8b-4bit-1x2048": {"lift": figures(400.0, 11.0), "lora": figures(500.0, 10.0)},
}
MISSED = {
    "bench-1b-4x1024": {"lift": figures(900.0), "full": figures(1000.0)},
    "bench-1b-1x256": {"lift": figures(peak_gib=4.4, selection_init_s=1.2), "lift-in-backward": figures(peak_gib=4.1),
                       "lora": figures(peak_gib=4.0)},
    "bench-8b-1x2048": {"lift": figures(940.0, 23.0), "floor": figures(1000.0, 19.0), "lora": figures(500.0, 22.0)},
    "bench-8b-4bit-1x2048": {"lift": figures(390.0, 11.6), "lora": figures(500.0, 10.0)},
}


@pytest.mark.parametrize("benches, expected, result", [
    (MET, ["2.000×", "0.750×", "1.000×", "0.500 s", "0.950×", "0.909×", "0.800×", "1.100×"], "pass"),
    (MISSED, ["0.900×", "1.100×", "1.025×", "1.200 s", "0.940×", "1.045×", "0.780×", "1.160×"], "miss"),
], ids=["met", "missed"])
def test_each_target_reads_pass_or_miss_from_its_figures(tmp_path, benches, expected, result):
    for step, methods in benches.items():
        write_bench(tmp_path, step, methods)
    summary = render(tmp_path)
    for target, figure in zip(gpu_summary.TARGETS, expected, strict=True):
        row = target_row(summary, target.label)
        assert figure in row and row.endswith(f"| {result} |"), row


def test_missing_steps_and_files_read_not_measured(tmp_path):
    write_bench(tmp_path, "bench-1b-4x1024", MET["bench-1b-4x1024"])
    # A run killed while writing leaves a file cut short; the torch-step comparison needs this file.
    (tmp_path / "bench-torch-step.json").write_text('{"methods": {"lift": {"tokens_')
    (tmp_path / "steps.tsv").write_text("install\tok\t3\tpip install\ntests\ttimed out after 150s\t150\tpytest\n"
                                        "bench-8b-1x2048\tnot run (out of time)\t0\tliftft bench\n")
    summary = render(tmp_path)
    assert target_row(summary, gpu_summary.TARGETS[0].label).endswith("| pass |")
    for target in gpu_summary.TARGETS[1:]:
        assert target_row(summary, target.label).endswith("| not measured |")
    assert "| tests | timed out after 150s | 150 | `pytest` |" in summary
    assert "| bench-8b-1x2048 | not run (out of time) | 0 | `liftft bench` |" in summary
    assert "torch step (lift tokens/s at 4×1024): not measured" in summary
    assert "not measured (no readable tests.xml)" in summary
    assert "## Train step\n\n- not measured" in summary


def test_no_steps_recorded_is_said(tmp_path):
    assert "No steps were recorded" in render(tmp_path)


def test_failed_tests_and_the_no_sync_test_are_named(tmp_path):
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_kernels" name="test_a"/>'
        '<testcase classname="tests.test_kernels" name="test_b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_kernels" name="test_backward_and_step_never_wait_for_the_gpu[True]"/>'
        '</testsuite></testsuites>')
    summary = render(tmp_path)
    assert "- 2 passed, 1 failed, 0 error, 0 skipped" in summary
    assert "- tests.test_kernels::test_b: failed" in summary
    assert "- tests.test_kernels::test_backward_and_step_never_wait_for_the_gpu[True]: passed" in summary
    assert "test_a" not in summary


def test_a_run_without_the_no_sync_test_says_so(tmp_path):
    (tmp_path / "tests.xml").write_text('<testsuites><testsuite><testcase classname="t" name="test_a"/>'
                                        '</testsuite></testsuites>')
    assert "- test_backward_and_step_never_wait_for_the_gpu: did not run" in render(tmp_path)


@pytest.mark.parametrize("status, expected", [("done", "- 4 optimizer steps, final train loss 2.5000"),
                                              ("running", "- not measured")])
def test_the_train_step_is_read_only_when_it_finished(tmp_path, status, expected):
    run = {"status": status, "args": {"bf16": True, "update_interval": 2},
           "metrics": {"steps": 4, "train_loss": 2.5, "tokens": 900, "train_seconds": 1.5, "trainable": 10}}
    (tmp_path / "train.json").write_text(json.dumps(run))
    assert f"## Train step\n\n{expected}" in render(tmp_path)


def load_compare_module():
    spec = importlib.util.spec_from_file_location("compare_deltas", ROOT / "bench" / "compare_deltas.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_deltas_reads_entries_and_the_relative_difference(tmp_path):
    import torch

    from liftft.deltas.delta import Delta, write_delta

    def delta(idx, values):
        weights = {"w": {"shape": [2, 4], "dtype": "float32", "base_sha256": "0" * 32}}
        return Delta({"w": (torch.tensor(idx, dtype=torch.int32), torch.tensor(values, dtype=torch.float64))},
                     {"format_version": 2, "config": {}, "weights": weights})

    write_delta(delta([1, 5], [3.0, 4.0]), tmp_path / "a")
    write_delta(delta([1, 5], [3.0, 4.1]), tmp_path / "b")
    write_delta(delta([1, 6], [3.0, 4.0]), tmp_path / "c")
    compare = load_compare_module()
    close = compare.compare(tmp_path / "a", tmp_path / "b")
    assert close["same_entries"] and close["max_relative_difference"] == pytest.approx(0.1 / 5)
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--tolerance", "0.019"]) == 1
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--tolerance", "0.021"]) == 0
    assert not compare.compare(tmp_path / "a", tmp_path / "c")["same_entries"]
