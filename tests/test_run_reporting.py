"""Running and watching `liftft train`: --logging-steps, tokens/s, --eval-steps, --report-to, --config, HF flag names."""

import importlib.util
import json
import struct
from pathlib import Path

import pytest
import torch

from conftest import math_records, run_interrupted
from liftft import LiftConfig
from liftft.cli import build_parser, main
from liftft.data.batches import IGNORE_INDEX, DataCollator, encode_dataset
from liftft.utils.hf import load_tokenizer
from liftft.engine.loss import causal_lm_loss_sum
from liftft.training.reporting import scalars
from liftft.training.train import TrainArgs, run_training
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")

LIFT = LiftConfig(rank=2, filter_rank=4, update_interval=3)


def args_for(base_dir, data_file, out, **kw):
    # A constant lr without warmup: the first steps of runs of different lengths are the same steps.
    settings = dict(model=str(base_dir), data=[str(data_file)], output=str(out), lift=LIFT, lr=2e-2, max_steps=5,
                    epochs=None, batch_size=2, grad_accum=1, max_seq_len=192, warmup_ratio=0.0, scheduler="constant",
                    progress=False, seed=7)
    return TrainArgs(**{**settings, **kw})


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def train_records(log):
    return [r for r in log if "loss" in r]


def eval_records(log):
    return [r for r in log if "eval_loss" in r]


def test_logging_steps_average_their_steps_and_tokens_per_s_is_tokens_over_seconds(base_dir, data_file, tmp_path):
    run_training(args_for(base_dir, data_file, tmp_path / "each"))
    run_training(args_for(base_dir, data_file, tmp_path / "pairs", logging_steps=2))
    each, pairs = read_log(tmp_path / "each"), read_log(tmp_path / "pairs")
    assert [r["step"] for r in each] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in pairs] == [2, 4, 5]  # every second step, and the last
    losses = [r["loss"] for r in each]
    assert [r["loss"] for r in pairs] == [(losses[0] + losses[1]) / 2, (losses[2] + losses[3]) / 2, losses[4]]
    assert [r["tokens"] for r in pairs] == [each[1]["tokens"], each[3]["tokens"], each[4]["tokens"]]
    assert [r["lr"] for r in pairs] == [2e-2] * 3
    for log in (each, pairs):
        previous = {"tokens": 0, "seconds": 0.0}
        for record in log:
            assert record["tokens"] > previous["tokens"] and record["seconds"] > previous["seconds"]
            assert record["tokens_per_s"] == round((record["tokens"] - previous["tokens"]) /
                                                   (record["seconds"] - previous["seconds"]), 1)
            assert record["cumulative_tokens_per_s"] == round(record["tokens"] / record["seconds"], 1)
            previous = record


def test_tokens_are_the_batches_tokens_and_the_bar_shows_tokens_per_s(base_dir, data_file, tmp_path, capsys):
    run_training(args_for(base_dir, data_file, tmp_path, max_steps=1, batch_size=12, progress=True))
    tokenizer = load_tokenizer(str(base_dir))
    examples, _ = encode_dataset(math_records(12), tokenizer, max_seq_len=192)
    assert read_log(tmp_path)[0]["tokens"] == sum(len(e["input_ids"]) for e in examples)
    assert "tokens_per_s=" in capsys.readouterr().err


def test_grad_norm_is_the_norm_of_the_first_steps_gradient(base_dir, data_file, tmp_path):
    """Full FT on one micro-batch of all 12 records: the logged norm is the full gradient's, computed here."""
    run_training(args_for(base_dir, data_file, tmp_path / "full", method="full", max_steps=1, batch_size=12,
                          loss="full", lr=1e-3))
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    tokenizer = load_tokenizer(str(base_dir))
    examples, _ = encode_dataset(math_records(12), tokenizer, max_seq_len=192)
    batch = DataCollator(tokenizer.pad_token_id)(examples)
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = causal_lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"], mode="full")
    (loss / targets).backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    assert read_log(tmp_path / "full")[0]["grad_norm"] == pytest.approx(expected, rel=1e-4)

    run_training(args_for(base_dir, data_file, tmp_path / "unclipped", max_steps=1, max_grad_norm=0))
    assert read_log(tmp_path / "unclipped")[0]["grad_norm"] is None


def test_eval_steps_log_the_held_out_loss_the_model_has_then(base_dir, data_file, tmp_path):
    _, metrics = run_training(args_for(base_dir, data_file, tmp_path / "every2", val_size=4, eval_steps=2))
    log = read_log(tmp_path / "every2")
    evals = eval_records(log)
    assert [r["step"] for r in evals] == [2, 4, 5]  # every second step, and the end
    assert evals[-1]["eval_loss"] == metrics["eval_loss"]
    assert json.loads((tmp_path / "every2" / "run.json").read_text())["metrics"]["eval_loss"] == metrics["eval_loss"]
    # A run that stops at step 2 or 4 evaluates there at its end: the same model, so the same loss.
    for stop, logged in zip((2, 4), evals):
        _, short = run_training(args_for(base_dir, data_file, tmp_path / f"stop{stop}", val_size=4, max_steps=stop))
        assert short["eval_loss"] == logged["eval_loss"]
    # Evaluating changes nothing in training.
    run_training(args_for(base_dir, data_file, tmp_path / "end", val_size=4))
    untimed = ("step", "loss", "lr", "grad_norm", "tokens")
    assert [{k: r[k] for k in untimed} for r in train_records(read_log(tmp_path / "end"))] == [
        {k: r[k] for k in untimed} for r in train_records(log)]


def cli(base_dir, data_file, out, *extra):
    return main(["train", "--model", str(base_dir), "--data", str(data_file), "--output", str(out), "--max-steps", "2",
                 "--rank", "1", "--filter-rank", "2", "--no-progress", *map(str, extra)])


def test_eval_steps_without_val_size_is_refused(base_dir, data_file, tmp_path, capsys):
    assert cli(base_dir, data_file, tmp_path / "o", "--eval-steps", "2") == 2
    assert "--eval-steps 2 evaluates held-out records: give --val-size N too" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert cli(base_dir, data_file, tmp_path / "o", "--logging-steps", "0") == 2
    assert "--logging-steps must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("report_to", ["tensorboard", "wandb"])
def test_a_missing_reporting_library_is_named_before_any_work(report_to, base_dir, data_file, tmp_path, capsys,
                                                              monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == report_to else find_spec(name, *a))
    assert cli(base_dir, data_file, tmp_path / "o", "--report-to", report_to) == 2
    assert (f"--report-to {report_to} needs the {report_to} package, which is not installed: "
            f"pip install 'liftft[{report_to}]'") in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def reporting_run(base_dir, data_file, out, report_to) -> list[dict]:
    """A run that logs every other step and evaluates every 2 steps, reporting to ``report_to``; its log records."""
    run_training(args_for(base_dir, data_file, out, val_size=4, eval_steps=2, logging_steps=2, report_to=report_to))
    return read_log(out)


def expected_scalars(log) -> dict[str, dict[int, float]]:
    """Reported name -> {step: value} of train_log.jsonl's records, as the reporters must report them."""
    expected = {}
    for record in log:
        for name, value in scalars(record).items():
            expected.setdefault(name, {})[record["step"]] = value
    return expected


def test_tensorboard_event_files_hold_the_logged_values(base_dir, data_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = reporting_run(base_dir, data_file, tmp_path, "tensorboard")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    written = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    expected = expected_scalars(log)
    assert set(written) == set(expected) == {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                                             "train/cumulative_tokens_per_s", "eval/loss"}
    for tag, values in expected.items():
        assert written[tag] == pytest.approx(values, rel=1e-6), tag  # event files hold float32
    assert written["eval/loss"].keys() == {2, 4, 5} and written["train/loss"].keys() == {2, 4, 5}


def wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (.wandb), which is LevelDB's log format: 32 KiB blocks of
    (checksum, length, kind) headed chunks, after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pieces = 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if left < 7 or (kind == 0 and length == 0):  # the zero padding at a block's end
            position += left
            continue
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record
            pieces = b""


def test_wandb_offline_run_holds_the_logged_values_and_settings(base_dir, data_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb-dir"), "WANDB_SILENT": "true",
                        "WANDB_CONSOLE": "off", "WANDB_PROJECT": "liftft-test"}.items():
        monkeypatch.setenv(name, value)
    log = reporting_run(base_dir, data_file, tmp_path / "run", "wandb")
    (path,) = (tmp_path / "wandb-dir").glob("wandb/offline-run-*/run-*.wandb")
    history, config, exit_codes = {}, {}, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "exit":
            exit_codes.append(record.exit.exit_code)
        if kind == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "run":
            assert record.run.project == "liftft-test" and record.run.display_name == "run"
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    written = {}
    for step, row in history.items():
        for name, value in row.items():
            if not name.startswith("_"):
                written.setdefault(name, {})[step] = value
    assert written == expected_scalars(log)
    assert config["method"] == "lift" and config["lr"] == 2e-2 and config["logging_steps"] == 2
    assert config["report_to"] == "wandb" and config["rank"] == 2
    assert exit_codes == [0]


def test_a_run_that_stops_with_an_error_finishes_its_wandb_run_as_failed(monkeypatch, tmp_path):
    wandb = pytest.importorskip("wandb")
    from liftft.training.reporting import WandbReporter

    finished = []

    class Run:
        def finish(self, exit_code=None):
            finished.append(exit_code)

    monkeypatch.setattr(wandb, "init", lambda **kwargs: Run())
    with WandbReporter(tmp_path, {}):
        pass
    with pytest.raises(RuntimeError), WandbReporter(tmp_path, {}):
        raise RuntimeError("diverged")
    assert finished == [0, 1]


def parse(*argv):
    return build_parser().parse_args(["train", *map(str, argv)])


REQUIRED = ("--model", "m", "--data", "d.json", "--output", "o")


def test_trainer_flag_names_are_aliases(capsys):
    ours = parse(*REQUIRED, "--lr", "1e-3", "--grad-accum", "4", "--batch-size", "3", "--epochs", "2")
    theirs = parse(*REQUIRED, "--learning-rate", "1e-3", "--gradient-accumulation-steps", "4",
                   "--per-device-train-batch-size", "3", "--num-train-epochs", "2")
    assert vars(theirs) == vars(ours) and (ours.lr, ours.grad_accum, ours.batch_size, ours.epochs) == (1e-3, 4, 3, 2.0)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    for pair in ("--lr LR, --learning-rate LR", "--grad-accum GRAD_ACCUM, --gradient-accumulation-steps GRAD_ACCUM",
                 "--batch-size BATCH_SIZE, --per-device-train-batch-size BATCH_SIZE",
                 "--epochs EPOCHS, --num-train-epochs EPOCHS"):
        assert pair in " ".join(shown.split())


CONFIG_YAML = """\
model: m
data: [a.json, b.json]
output: o
learning_rate: 1.0e-3
grad-accum: 4
max_steps: 7
target-modules: [q_proj, v_proj]
columns: {instruction: question, output: answer}
bf16: false
merge: true
no_progress: true
report-to: tensorboard
rank: null
"""
# What CONFIG_YAML says, as flags.
CONFIG_FLAGS = ("--model", "m", "--data", "a.json", "b.json", "--output", "o", "--lr", "1e-3", "--grad-accum", "4",
                "--max-steps", "7", "--target-modules", "q_proj,v_proj", "--columns",
                "instruction=question,output=answer", "--no-bf16", "--merge", "--no-progress",
                "--report-to", "tensorboard")


def test_a_config_file_is_its_flags_and_the_command_line_overrides_it(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(CONFIG_YAML)
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"model": "m", "data": ["a.json", "b.json"], "output": "o", "lr": 1e-3,
                                     "gradient_accumulation_steps": 4, "max-steps": 7,
                                     "target_modules": ["q_proj", "v_proj"],
                                     "columns": {"instruction": "question", "output": "answer"}, "bf16": False,
                                     "merge": True, "no-progress": True, "report_to": "tensorboard"}))
    by_flags = vars(parse(*CONFIG_FLAGS))
    for config in (yaml_file, json_file):
        assert {**vars(parse("--config", config)), "config": None} == by_flags
    # Flags given on the command line win, before or after --config, even when they give a default's value.
    overridden = parse("--lr", "2e-4", "--config", yaml_file, "--data", "c.json", "--bf16")
    assert (overridden.lr, overridden.data, overridden.bf16, overridden.grad_accum) == (2e-4, ["c.json"], True, 4)
    # A flag whose alternative the file gives replaces that too: --epochs for the file's max-steps, --density for rank.
    (tmp_path / "budget.yaml").write_text("max-steps: 7\nrank: 8\n")
    replaced = parse(*REQUIRED, "--config", tmp_path / "budget.yaml", "--num-train-epochs", "2", "--density", "0.1")
    assert (replaced.epochs, replaced.max_steps, replaced.density, replaced.rank) == (2.0, None, 0.1, None)
    kept = parse(*REQUIRED, "--config", tmp_path / "budget.yaml")
    assert (kept.epochs, kept.max_steps, kept.density, kept.rank) == (None, 7, None, 8)


@pytest.mark.parametrize("content, message", [
    ("learning_rat: 1.0e-3\n", "--config: unknown setting 'learning_rat'; known: batch-size, bf16, "),
    ("merge: 3\n", "--config: merge is a switch: give true or false, not 3"),
    ("lr: fast\n", "argument --lr/--learning-rate: invalid float value: 'fast'"),
    ("- lr\n", "must hold a mapping of flag names to values, not a list"),
    ("lr: [\n", "is not valid YAML"),
    ("config: other.yaml\n", "--config: unknown setting 'config'"),
])
def test_bad_config_files_are_named(content, message, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit) as stopped:
        parse(*REQUIRED, "--config", path)
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(*REQUIRED, "--config", tmp_path / "missing.yaml")
    assert f"--config {tmp_path / 'missing.yaml'}: no such file" in capsys.readouterr().err


def test_run_json_holds_the_resolved_settings_and_a_resume_may_change_reporting(base_dir, data_file, tmp_path,
                                                                                monkeypatch):
    out = tmp_path / "o"
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {base_dir}\ndata: {data_file}\noutput: {out}\nmax-steps: 4\nrank: 1\nfilter_rank: 2\n"
                      "no-progress: true\nlearning-rate: 1.0e-2\nsave-steps: 2\nlogging-steps: 2\nval-size: 3\n")
    run_interrupted(monkeypatch, 3, lambda: main(["train", "--config", str(config), "--lr", "2e-2"]))
    run = json.loads((out / "run.json").read_text())
    assert (run["args"]["lr"], run["args"]["max_steps"], run["args"]["rank"], run["args"]["val_size"]) == (2e-2, 4, 1, 3)
    assert run["options"]["logging_steps"] == 2 and run["options"]["eval_steps"] is None
    # Logging and evaluation settings may change on resuming; the training settings may not.
    assert main(["train", "--config", str(config), "--lr", "2e-2", "--resume", "--logging-steps", "1",
                 "--eval-steps", "1"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["options"]["logging_steps"] == 1 and run["options"]["eval_steps"] == 1
    log = read_log(out)
    assert [r["step"] for r in train_records(log)] == [2, 3, 4] and [r["step"] for r in eval_records(log)] == [3, 4]
    assert main(["train", "--config", str(config), "--resume"]) == 2  # lr 1e-2 from the file is another run
