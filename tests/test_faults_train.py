"""`liftft train` under faults: divergence, two runs on one dir, foreign files, killed writes, bad settings, full
disks, moved run dirs, stalled ranks, launchers that start fewer processes than asked. Each fails on the liftft before
issue 13: exit codes, the culprit named, nothing lost or overwritten, early checks before the weights load."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import liftft.training.train
from conftest import tiny_llama
from liftft.training.checkpoint import checkpoints, latest_checkpoint
from liftft.cli import main
from liftft.training.run_dir import LOCK_FILE

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")

SMALL = ["--rank", "2", "--filter-rank", "4", "--update-interval", "3", "--max-steps", "4", "--batch-size", "2",
         "--grad-accum", "1", "--max-seq-len", "128", "--warmup-ratio", "0", "--no-progress", "--seed", "7"]


def train(base_dir, data_file, out, *extra):
    return main(["train", "--model", str(base_dir), "--data", str(data_file), "--output", str(out), *SMALL,
                 *map(str, extra)])


def liftft_lines(stderr: str) -> str:
    """What liftft itself wrote to stderr (transformers draws a weight-loading bar there too)."""
    return "\n".join(line for line in stderr.splitlines() if line.startswith("liftft "))


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.fixture
def weights_never_load(monkeypatch):
    """Fail the test if `liftft train` loads model weights or tokenises data."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the weights were loaded or the data tokenised before the bad setting was refused")

    monkeypatch.setattr(liftft.training.train, "load_model", forbidden)
    monkeypatch.setattr(liftft.training.train, "encode_dataset", forbidden)


def trained_values_finite(checkpoint: Path) -> bool:
    files = [checkpoint / "delta.safetensors", checkpoint / "weights.safetensors"]
    tensors = [t for f in files if f.is_file() for t in load_file(f).values() if t.is_floating_point()]
    return bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors)


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("method,lr", [("lift", "1e10"), ("full", "1e10"), ("lora", "1e10")])
def test_divergence_never_poisons_a_checkpoint_and_names_the_last_good_one(method, lr, base_dir, data_file, tmp_path,
                                                                          capsys):
    out = tmp_path / method
    code = train(base_dir, data_file, out, "--method", method, "--lr", lr, "--save-steps", "1", "--max-steps", "8",
                 "--save-total-limit", "8")
    err = liftft_lines(capsys.readouterr().err)
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("liftft train: error: training diverged: ")
    kept = checkpoints(out)
    assert all(trained_values_finite(c) for c in kept), "a checkpoint holds non-finite trained values"
    last = latest_checkpoint(out)
    assert f"Last good checkpoint: {last or 'none'}" in err


def test_a_non_finite_lr_is_refused_before_anything_loads(base_dir, data_file, tmp_path, weights_never_load, capsys):
    for lr in ("inf", "nan", "-1e-3"):
        assert train(base_dir, data_file, tmp_path / "out", f"--lr={lr}") == 2
        assert "--lr must be a finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_save_total_limit_keeps_the_newest_checkpoints(base_dir, data_file, tmp_path):
    out = tmp_path / "keep"
    assert train(base_dir, data_file, out, "--save-steps", "1", "--max-steps", "5", "--save-total-limit", "3") == 0
    assert [c.name for c in checkpoints(out)] == ["step-00000002", "step-00000003", "step-00000004"]


# ---------------------------------------------------------------- the output directory


def test_a_run_holding_the_lock_keeps_a_second_one_out(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / LOCK_FILE).write_text(f"{os.getpid()} {os.uname().nodename}\n")  # this very process: alive
    before = snapshot(out)
    assert train(base_dir, data_file, out) == 2
    err = capsys.readouterr().err
    assert f"is in use by another liftft train run (pid {os.getpid()}" in err and str(out / LOCK_FILE) in err
    assert snapshot(out) == before


def test_a_stale_lock_is_taken_over(base_dir, data_file, tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "stale"
    out.mkdir()
    (out / LOCK_FILE).write_text(f"{gone.pid} {os.uname().nodename}\n")
    assert train(base_dir, data_file, out) == 0
    assert f"taking over the lock of process {gone.pid}, which is gone" in capsys.readouterr().out
    assert not (out / LOCK_FILE).exists() and (out / "delta.safetensors").is_file()


def test_two_runs_started_together_on_one_dir_one_wins(base_dir, data_file, tmp_path):
    out = tmp_path / "race"
    command = [sys.executable, "-m", "liftft", "train", "--model", str(base_dir), "--data", str(data_file),
               "--output", str(out), *SMALL]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read() + run.stdout.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "is in use by another liftft train run" in loser or "already holds this run" in loser
    log = (out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]


def test_a_foreign_delta_in_the_output_dir_is_left_alone(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "delta.safetensors").write_bytes(b"someone else's delta")
    assert train(base_dir, data_file, out) == 2
    assert "is not a previous liftft train run (no run.json)" in capsys.readouterr().err
    assert snapshot(out) == {"delta.safetensors": b"someone else's delta"}


def test_leftovers_of_killed_writes_are_removed_by_the_next_run(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "litter"
    assert train(base_dir, data_file, out, "--save-steps", "2", "--max-steps", "3") == 0
    leftovers = [out / ".delta.safetensors.k2j4x_9a", out / ".run.json.abcd1234",
                 out / "checkpoints" / ".LATEST.q1w2e3r4"]
    dirs = [out / ".merged.tmp-0123abcd", out / ".merged.old-89abcdef", out / "checkpoints" / ".step-00000004.tmp-00ff00ff"]
    kept = [out / ".merged.tmp-mine", out / "notes.txt"]
    for path in leftovers + kept:
        path.write_text("x")
    for path in dirs:
        (path / "sub").mkdir(parents=True)
    assert train(base_dir, data_file, out, "--save-steps", "2", "--max-steps", "3", "--resume") == 0
    assert f"removed {len(leftovers) + len(dirs)} leftover(s) of interrupted writes" in capsys.readouterr().out
    assert not any(p.exists() for p in leftovers + dirs) and all(p.exists() for p in kept)


def test_a_failed_adapter_write_leaves_no_partial_adapter(base_dir, data_file, tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedTokenizerBase

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", fail)
    out = tmp_path / "adapter"
    assert train(base_dir, data_file, out, "--method", "lora") == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not (out / "adapter").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".adapter.")]


def test_a_full_disk_at_a_checkpoint_is_named_with_the_space_left(base_dir, data_file, tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "full"
    assert train(base_dir, data_file, out, "--save-steps", "2") == 2
    err = liftft_lines(capsys.readouterr().err)
    assert f"cannot write under {out}: " in err and "free on its disk" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- settings checked before any long work


@pytest.mark.parametrize("flags,culprit", [
    (["--target-modules", "nothing_like_this"], "target_modules='nothing_like_this'"),
    (["--target-modules", "(unclosed"], "nor a valid regex"),
    (["--rank", "100"], "--rank 100 would train 100.0% of the target entries"),
    (["--rank", "0"], "rank must be >= 1"),
    (["--density", "1.5", "--rank", "2"], "contradict"),
    (["--density", "1.5"], "density must be in (0, 1]"),
])  # fmt: skip
def test_bad_settings_are_refused_before_the_weights_load(flags, culprit, base_dir, data_file, tmp_path,
                                                          weights_never_load, capsys):
    argv = ["train", "--model", str(base_dir), "--data", str(data_file), "--output", str(tmp_path / "out"),
            "--max-steps", "2", "--no-progress", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert culprit in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_rank_training_a_large_share_is_reported_in_one_line(base_dir, data_file, tmp_path, capsys):
    shapes = [tuple(p.shape) for n, p in tiny_llama().named_parameters() if "layers" in n and "proj" in n]
    share = sum(min((m + n) * 8, m * n) for m, n in shapes) / sum(m * n for m, n in shapes)
    assert 0.25 < share < 0.5  # between the warning and the refusal
    assert train(base_dir, data_file, tmp_path / "o", "--rank", "8") == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warnings == [f"liftft train: warning: --rank 8 trains {share:.1%} of the target entries (0 of 14 matrices "
                        "whole); a smaller --rank or a --density keeps LIFT sparse"]


# ---------------------------------------------------------------- resuming a run dir by another path


def test_a_run_resumes_by_an_absolute_path_and_after_a_move(base_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train(base_dir, data_file, "runs/x", "--save-steps", "2", "--max-steps", "3") == 0
    assert train(base_dir, data_file, tmp_path / "runs" / "x", "--save-steps", "2", "--max-steps", "3",
                 "--resume") == 0
    shutil.move(tmp_path / "runs" / "x", tmp_path / "moved")
    assert train(base_dir, data_file, tmp_path / "moved", "--save-steps", "2", "--max-steps", "3", "--resume") == 0


# ---------------------------------------------------------------- processes


def test_the_world_size_and_global_batch_are_printed(base_dir, data_file, tmp_path, capsys):
    assert train(base_dir, data_file, tmp_path / "w") == 0
    assert "liftft train: 1 process, global batch 2 x 1 x 1 = 2 examples per optimizer step" in capsys.readouterr().out


def test_accelerate_asking_for_two_cpu_processes_but_starting_one_is_reported(base_dir, data_file, tmp_path):
    command = ["accelerate", "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "-m", "liftft", "train", "--model", str(base_dir), "--data",
               str(data_file), "--output", str(tmp_path / "acc"), *SMALL]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "the launcher asked for 2 processes but 1 joined" in run.stdout


def _stalled_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from liftft.utils import distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    # The 2 s limit also bounds joining the group: on a busy machine one spawned rank may take longer than that to
    # import torch, so both first wait until the other is ready.
    Path(f"{out}.ready-{rank}").touch()
    while not Path(f"{out}.ready-{1 - rank}").exists():
        time.sleep(0.01)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=__import__("datetime").timedelta(seconds=2))
    if rank == 1:
        time.sleep(5)  # a stopped rank
        return
    try:
        with distributed.named_timeouts(2):
            distributed.barrier()
    except Exception as err:  # noqa: BLE001 - the test reads what was raised
        Path(out).write_text(f"{type(err).__name__}: {err}")


def test_a_stalled_rank_stops_the_others_with_a_message_naming_the_rank_and_timeout(tmp_path):
    import torch.multiprocessing as mp

    report = tmp_path / "report.txt"
    mp.start_processes(_stalled_rank, args=(str(tmp_path / "store"), str(report)), nprocs=2, start_method="spawn")
    text = report.read_text()
    assert text.startswith("CollectiveTimeout: rank 0 of 2 waited more than 2 s (--dist-timeout)"), text


def test_an_output_dir_that_cannot_be_created_is_named(base_dir, data_file, tmp_path, monkeypatch, weights_never_load,
                                                        capsys):
    # Permission bits do not bind root, who runs the tests in containers, so the refusal is simulated.
    out = tmp_path / "read-only" / "out"
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self == out:
            raise PermissionError(13, "Permission denied")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert train(base_dir, data_file, out) == 2
    assert liftft_lines(capsys.readouterr().err) == f"liftft train: error: --output {out} is not writable: Permission denied"
    assert not out.exists()
