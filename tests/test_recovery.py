"""Recovering from what stops a run (issue 24, parts 1, 2 and 4): a diverged run continues at a lower --lr from the
checkpoint its message names; --resume may change --lr and the length, and run.json records it; a smoke run holds out
what its data can spare, and every refusal names the flag; `analyze filter-rank` keeps finished runs and resumes an
interrupted one; TensorBoard and W&B continue a resumed run without showing a step twice."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import liftft.commands.reproduce as reproduce_run
import liftft.training.train
from conftest import data_path, math_records, run_interrupted
from liftft.cli import main
from liftft.training.checkpoint import checkpoints, latest_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore")

SMALL = ["--rank", "2", "--filter-rank", "4", "--update-interval", "3", "--batch-size", "2", "--grad-accum", "1",
         "--max-seq-len", "128", "--no-progress", "--seed", "7"]
# lr 0 at step 1 (the warmup starts at 0), then up to 1e10 over steps 2-4: step 1's checkpoint is the base's weights
# and AdamW's first moments, the same for every --lr, and a run at 1e10 diverges within a few steps.
DIVERGING = [*SMALL, "--warmup-ratio", "0.5", "--max-steps", "8", "--save-steps", "1"]
OUTPUT_FILES = {"lift": "delta.safetensors", "full": "merged/model.safetensors",
                "lora": "adapter/adapter_model.safetensors"}


def train(base_dir, data_file, out, *extra):
    return main(["train", "--model", str(base_dir), "--data", str(data_file), "--output", str(out), *map(str, extra)])


def liftft_lines(stream: str) -> list[str]:
    return [line for line in stream.splitlines() if line.startswith("liftft ")]


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def trained_values(out: Path, method: str) -> dict[str, torch.Tensor]:
    return load_file(out / OUTPUT_FILES[method])


# ---------------------------------------------------------------- part 1: divergence


@pytest.mark.parametrize("method", ["lift", "full", "lora"])
def test_a_diverged_run_continues_at_a_lower_lr_from_the_checkpoint_it_names(method, base_dir, data_file, tmp_path,
                                                                             capsys):
    out = tmp_path / "run"
    assert train(base_dir, data_file, out, *DIVERGING, "--method", method, "--lr", "1e10") == 1
    (error,) = liftft_lines(capsys.readouterr().err)
    named = re.search(r"Last good checkpoint: (\S+)", error).group(1)
    stopped = int(re.search(r"at step (\d+)|after step (\d+)", error).group(0).split()[-1])
    # The checkpoint of the weights that led to the non-finite step is out of --resume's way, and named.
    bad = f"step-{stopped - 1:08d}"
    assert bad not in [c.name for c in checkpoints(out)]
    assert (out / "checkpoints" / f"diverged-{bad}").is_dir() and f"moved to {out / 'checkpoints'}/diverged-{bad}" in error
    assert named == str(latest_checkpoint(out) or "none")
    assert named in (str(out / "checkpoints" / "step-00000001"), "none")
    # A different --lr without --resume is refused, naming --resume.
    assert train(base_dir, data_file, out, *DIVERGING, "--method", method, "--lr", "1e-3") == 2
    assert "pass --resume to continue it with --lr 0.001" in capsys.readouterr().err

    assert train(base_dir, data_file, out, *DIVERGING, "--method", method, "--lr", "1e-3", "--resume") == 0
    printed = capsys.readouterr().out
    first = 2 if named != "none" else 1
    where = f"resumed from {named} at step 1" if named != "none" else "starting from step 0"
    assert f"{where}; lr 1e+10 -> 0.001 from step {first} on" in printed
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["args"]["lr"] == 1e-3
    assert run["changes"] == [{"first_step": first, "lr": {"from": 1e10, "to": 1e-3}}]
    # Step 1 ran at lr 0 either way, so the continued run is the run at 1e-3 from the start, bit for bit.
    fresh = tmp_path / "fresh"
    assert train(base_dir, data_file, fresh, *DIVERGING, "--method", method, "--lr", "1e-3") == 0
    resumed, reference = trained_values(out, method), trained_values(fresh, method)
    assert resumed.keys() == reference.keys()
    assert all(torch.isfinite(t).all() and torch.equal(t, reference[k]) for k, t in resumed.items())
    assert [r["lr"] for r in read_log(out)] == [r["lr"] for r in read_log(fresh)]


def test_the_issues_run_continues_from_what_its_message_names(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    flags = [*SMALL, "--max-steps", "8", "--save-steps", "1"]  # the default warmup: the first step already at 1e10
    assert train(base_dir, data_file, out, *flags, "--lr", "1e10") == 1
    named = re.search(r"Last good checkpoint: (\S+)", capsys.readouterr().err).group(1)
    assert train(base_dir, data_file, out, *flags, "--lr", "1e-3", "--resume") == 0
    printed = capsys.readouterr().out
    assert (f"resumed from {named} at step" if named != "none" else "starting from step 0") in printed
    assert all(torch.isfinite(t).all() for t in trained_values(out, "lift").values())
    assert [r["step"] for r in read_log(out)] == list(range(1, 9))  # each step logged once


def test_a_run_with_no_good_checkpoint_starts_over_at_the_new_lr_and_logs_each_step_once(base_dir, data_file,
                                                                                          tmp_path, capsys):
    out = tmp_path / "run"
    flags = [*SMALL, "--method", "full", "--warmup-ratio", "0", "--max-steps", "4", "--save-steps", "1"]
    assert train(base_dir, data_file, out, *flags, "--lr", "1e10") == 1
    assert "Last good checkpoint: none (--resume with a lower --lr starts over from step 0)" in capsys.readouterr().err
    assert train(base_dir, data_file, out, *flags, "--lr", "1e-3", "--resume") == 0
    assert "no checkpoint in" in capsys.readouterr().out
    fresh = tmp_path / "fresh"
    assert train(base_dir, data_file, fresh, *flags, "--lr", "1e-3") == 0
    logged = [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in read_log(out)]
    expected = [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in read_log(fresh)]
    assert logged == expected  # the diverged attempt's records are gone, not logged twice
    assert json.loads((out / "run.json").read_text())["changes"] == [{"first_step": 1, "lr": {"from": 1e10, "to": 1e-3}}]


def test_the_checkpoint_before_the_newest_is_kept_until_the_next_step_proves_the_newest(base_dir, data_file,
                                                                                          tmp_path, capsys):
    out = tmp_path / "run"
    # Without it, --save-total-limit 1 would have removed step 1 when step 2 was written, leaving no good checkpoint.
    assert train(base_dir, data_file, out, *DIVERGING, "--method", "full", "--lr", "1e10",
                 "--save-total-limit", "1") == 1
    assert f"Last good checkpoint: {out / 'checkpoints' / 'step-00000001'} " in capsys.readouterr().err
    done = tmp_path / "done"
    assert train(base_dir, data_file, done, *DIVERGING, "--method", "full", "--lr", "1e-3",
                 "--save-total-limit", "1") == 0
    assert [c.name for c in checkpoints(done)] == ["step-00000007"]


def test_a_resumption_may_change_the_length_and_run_json_records_it(base_dir, data_file, tmp_path, monkeypatch,
                                                                     capsys):
    flags = [*SMALL, "--method", "lift", "--lr", "2e-2", "--scheduler", "constant", "--warmup-ratio", "0",
             "--save-steps", "2"]
    out = tmp_path / "run"
    run_interrupted(monkeypatch, 3, lambda: train(base_dir, data_file, out, *flags, "--max-steps", "4"))
    assert train(base_dir, data_file, out, *flags, "--max-steps", "6", "--resume") == 0
    assert "resumed from" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert run["changes"] == [{"first_step": 3, "max_steps": {"from": 4, "to": 6}}] and run["metrics"]["steps"] == 6
    reference = tmp_path / "six"
    assert train(base_dir, data_file, reference, *flags, "--max-steps", "6") == 0
    resumed, fresh = trained_values(out, "lift"), trained_values(reference, "lift")
    assert all(torch.equal(t, fresh[k]) for k, t in resumed.items())
    # A finished run is not trained again with other settings: that would replace its outputs.
    assert train(base_dir, data_file, out, *flags, "--max-steps", "6", "--lr", "1e-2", "--resume") == 2
    assert "holds a different run (differs in: lr)" in capsys.readouterr().err


# ---------------------------------------------------------------- part 2: smoke runs, flags named


def reproduce_command(base_dir, data, out, *extra):
    return ["reproduce", "math", "--model", str(base_dir), "--data", str(data), "--output", str(out),
            "--data-dir", str(data_path("test")), "--methods", "lift", "--rank", "2", "--filter-rank", "4",
            "--no-progress", *map(str, extra)]


@pytest.fixture
def thirty_two(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps(math_records(32)))
    return path


class Trained(Exception):
    pass


def test_a_smoke_run_holds_out_what_its_data_can_spare_and_says_so(base_dir, thirty_two, tmp_path, monkeypatch,
                                                                    capsys):
    seen = []

    def spy(args):
        seen.append(args)
        raise Trained

    monkeypatch.setattr(reproduce_run, "train", spy)
    for smoke in (["--limit", "4"], ["--max-steps", "2"]):
        with pytest.raises(Trained):
            main(reproduce_command(base_dir, thirty_two, tmp_path / "out", *smoke))
        assert seen.pop().val_size == 3  # a tenth of 32
        assert ("--val-size unset: holding out 3 of the 32 training records (a tenth, as the data cannot spare the "
                "protocol's 100); --val-size N chooses") in capsys.readouterr().out
    with pytest.raises(Trained):
        main(reproduce_command(base_dir, thirty_two, tmp_path / "out", "--max-steps", "2", "--val-size", "5"))
    assert seen.pop().val_size == 5
    # Data that can spare the protocol's 100 keeps them, as before, so that earlier smoke runs' dirs still continue.
    larger = tmp_path / "larger.json"
    larger.write_text(json.dumps(math_records(50) * 3))
    capsys.readouterr()
    with pytest.raises(Trained):
        main(reproduce_command(base_dir, larger, tmp_path / "out", "--max-steps", "2"))
    assert seen.pop().val_size == 100 and "holding out" not in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    ([], "the protocol holds out 100 records for the held-out loss, but --data holds 32; pass --val-size N "
         "(below 32; 0 holds out none)"),
    (["--max-steps", "2", "--val-size", "32"], "--val-size 32 leaves no record to train on: --data holds 32; pass "
                                               "--val-size below 32"),
    (["--max-steps", "2", "--val-size", "-1"], "--val-size must be >= 0"),
    (["--max-steps", "2", "--val-size", "2", "--filter-rank", "0"], "--filter-rank must be >= 1, got 0"),
])
def test_a_held_out_count_the_data_cannot_spare_is_refused_naming_the_flag(extra, message, base_dir, thirty_two,
                                                                          tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reproduce_run, "train", lambda args: pytest.fail("trained"))
    assert main(reproduce_command(base_dir, thirty_two, tmp_path / "out", *extra)) == 2
    (line,) = liftft_lines(capsys.readouterr().err)
    assert message in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--val-size", "12"], "--val-size 12 leaves no record to train on: the data holds 12 records, so pass "
                           "--val-size below 12"),
    (["--filter-rank", "0"], "--filter-rank must be >= 1, got 0"),
    (["--update-interval", "-1"], "--update-interval must be >= 1"),
])
def test_train_names_the_flag_before_anything_loads(flags, message, base_dir, data_file, tmp_path, monkeypatch,
                                                    capsys):
    monkeypatch.setattr(liftft.training.train, "load_model", lambda *a, **k: pytest.fail("the weights loaded"))
    monkeypatch.setattr(liftft.training.train, "load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer loaded"))
    assert train(base_dir, data_file, tmp_path / "out", *SMALL, "--max-steps", "1", *flags) == 2
    (line,) = liftft_lines(capsys.readouterr().err)
    assert message in line
    assert not (tmp_path / "out").exists()


def test_estimate_names_the_flag(capsys):
    assert main(["estimate", "--model-config", "tiny", "--rank", "0"]) == 2
    assert "--rank must be >= 1, got 0" in capsys.readouterr().err


def test_a_first_run_that_fails_before_run_json_leaves_no_directory_behind(base_dir, data_file, tmp_path):
    broken = tmp_path / "no-tokenizer"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((base_dir / name).read_bytes())
    out = tmp_path / "out"
    assert train(broken, data_file, out, *SMALL, "--max-steps", "1") != 0
    assert not out.exists()  # a train.log alone would make the next run refuse the directory as foreign
    assert train(base_dir, data_file, out, *SMALL, "--max-steps", "1") == 0


# ---------------------------------------------------------------- part 4: sweeps and reporters resume


RESUMABLE = [*SMALL, "--method", "lift", "--lr", "2e-2", "--scheduler", "constant", "--warmup-ratio", "0",
             "--save-steps", "2", "--max-steps", "5"]


def test_tensorboard_shows_each_step_once_after_a_resumption(base_dir, data_file, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    flags = [*RESUMABLE, "--report-to", "tensorboard"]
    # Steps 1-3 are logged, the checkpoint is step 2's: the resumed run logs step 3 again.
    run_interrupted(monkeypatch, 3, lambda: train(base_dir, data_file, out, *flags))
    assert train(base_dir, data_file, out, *flags, "--resume") == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4, 5]
    assert {e.step: e.value for e in losses} == pytest.approx({r["step"]: r["loss"] for r in read_log(out)}, rel=1e-6)


def test_a_resumed_wandb_run_continues_the_same_run(base_dir, data_file, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    calls = []

    class Run:
        id, project = "abc123", "liftft-test"

        def log(self, values, step=None):
            pass

        def finish(self, exit_code=None):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or Run())
    out = tmp_path / "run"
    flags = [*RESUMABLE, "--report-to", "wandb"]
    run_interrupted(monkeypatch, 3, lambda: train(base_dir, data_file, out, *flags))
    assert "id" not in calls[0] and "resume" not in calls[0]
    assert json.loads((out / "wandb_run.json").read_text()) == {"id": "abc123", "project": "liftft-test"}
    assert train(base_dir, data_file, out, *flags, "--resume") == 0
    assert (calls[1]["id"], calls[1]["resume"], calls[1]["project"]) == ("abc123", "allow", "liftft-test")


def test_a_resumed_offline_wandb_run_keeps_its_id(base_dir, data_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb-dir"), "WANDB_SILENT": "true",
                        "WANDB_CONSOLE": "off", "WANDB_PROJECT": "liftft-test"}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    flags = [*RESUMABLE, "--report-to", "wandb"]
    run_interrupted(monkeypatch, 3, lambda: train(base_dir, data_file, out, *flags))
    assert train(base_dir, data_file, out, *flags, "--resume") == 0
    runs = sorted((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))
    kept = json.loads((out / "wandb_run.json").read_text())["id"]
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[1] for r in runs} == {kept}


def fingerprint(model, task, records) -> float:
    """A stand-in accuracy that names the model (its weights), the task and the records it was given."""
    weights = sum(p.detach().double().sum() for p in model.parameters()).item()
    return weights + 1000 * len(records) + (0.5 if task.name == "source" else 0.0)


@pytest.fixture
def scored(monkeypatch):
    """Score with :func:`fingerprint` instead of generating; returns the names of the tasks scored, in order."""
    import liftft.eval

    calls = []

    def evaluate_task(model, tokenizer, task, records, **kw):
        calls.append(task.name)
        return {"accuracy": fingerprint(model, task, records)}, []

    monkeypatch.setattr(liftft.eval, "evaluate_task", evaluate_task)
    return calls


SWEEP = ["--rank", "2", "--max-steps", "4", "--batch-size", "2", "--max-seq-len", "128", "--limit", "2",
         "--max-new-tokens", "4", "--no-progress", "--ranks", "2,32"]


def sweep(base_dir, data_file, out, *extra):
    return main(["analyze", "filter-rank", "--model", str(base_dir), "--data", str(data_file), "--test",
                 str(data_path("test", "AddSub", "test.json")), "--output", str(out), *SWEEP, *map(str, extra)])


def results(out: Path) -> dict:
    result = json.loads((out / "filter_rank.json").read_text())
    for run in result["runs"]:
        run.pop("output")
    result["settings"].pop("output")
    return result


def steps_trained(monkeypatch) -> list[tuple[int, int]]:
    """(filter rank, step) of every optimizer step trained from now on."""
    from liftft.training.loop import TrainingLoop

    trained, original = [], TrainingLoop.train_step

    def spy(self, micro):
        trained.append((self.args.lift.filter_rank, self.step + 1))
        return original(self, micro)

    monkeypatch.setattr(TrainingLoop, "train_step", spy)
    return trained


def test_filter_rank_keeps_finished_runs_and_resumes_an_interrupted_one(base_dir, data_file, tmp_path, monkeypatch,
                                                                         scored, capsys):

    reference = tmp_path / "reference"
    assert sweep(base_dir, data_file, reference) == 0
    out = tmp_path / "sweep"
    # the second run stops where its step 4 would begin
    run_interrupted(monkeypatch, 3, lambda: sweep(base_dir, data_file, out),
                    when=lambda loop: loop.args.lift.filter_rank == 32)
    capsys.readouterr()
    with monkeypatch.context() as patch:
        trained = steps_trained(patch)
        assert sweep(base_dir, data_file, out) == 0
    printed = capsys.readouterr().out
    assert trained == [(32, 4)]
    assert f"filter rank 2: done in {out / 'runs' / 'filter-rank-2'}, kept" in printed
    assert f"resumed from {out / 'runs' / 'filter-rank-32' / 'checkpoints' / 'step-00000003'} at step 3" in printed
    assert results(out) == results(reference)
    # Run again, nothing is trained or scored.
    scored.clear()
    with monkeypatch.context() as patch:
        trained = steps_trained(patch)
        assert sweep(base_dir, data_file, out) == 0
    assert trained == [] and scored == [] and results(out) == results(reference)


def test_filter_rank_scores_kept_runs_again_under_other_evaluation_settings(base_dir, data_file, tmp_path,
                                                                           monkeypatch, scored):
    from transformers import AutoModelForCausalLM

    from liftft import apply_delta

    out = tmp_path / "sweep"
    assert sweep(base_dir, data_file, out) == 0
    with monkeypatch.context() as patch:
        trained = steps_trained(patch)
        assert sweep(base_dir, data_file, out, "--limit", "1") == 0
    assert trained == []
    result = json.loads((out / "filter_rank.json").read_text())
    for run in result["runs"]:
        tuned = AutoModelForCausalLM.from_pretrained(base_dir)
        apply_delta(tuned, run["output"])
        assert run["target_acc"] == pytest.approx(fingerprint(tuned, _Named("test"), [None]), abs=1e-9)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert result["base"]["target_acc"] == pytest.approx(fingerprint(base, _Named("test"), [None]), abs=1e-9)


def test_filter_rank_refuses_other_training_settings_before_any_training(base_dir, data_file, tmp_path,
                                                                          monkeypatch, scored, capsys):

    out = tmp_path / "sweep"
    run_interrupted(monkeypatch, 3, lambda: sweep(base_dir, data_file, out),
                    when=lambda loop: loop.args.lift.filter_rank == 2)
    capsys.readouterr()
    # `liftft train --resume` may change --lr; a sweep's runs may not, interrupted or not.
    with monkeypatch.context() as patch:
        trained = steps_trained(patch)
        assert sweep(base_dir, data_file, out, "--lr", "1e-3") == 2
    assert trained == []
    (line,) = liftft_lines(capsys.readouterr().err)
    assert f"output dir {out / 'runs' / 'filter-rank-2'} holds a different run (differs in: lr)" in line


class _Named:
    def __init__(self, name):
        self.name = name
