"""`liftft reproduce`: a smoke run of the math table on the tiny model, its resumption, its protocol and bad input."""

import json
import re

import pytest

import liftft.commands.eval as eval_command
import liftft.commands.reproduce as reproduce_run
from conftest import data_path
from liftft.cli import main
from liftft.eval import SUITES
from liftft.commands.reproduce import ReproduceArgs
from liftft.reproduce import choose_row
from liftft.reproduce.report import build_results, markdown

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")

SMOKE = ["--methods", "lift,lora", "--max-steps", "1", "--limit", "1", "--max-new-tokens", "4", "--rank", "2",
         "--filter-rank", "4", "--batch-size", "2", "--grad-accum", "1", "--max-seq-len", "128", "--val-size", "2",
         "--row", "Llama-2-7B", "--device", "cpu", "--no-progress"]


def command(base_dir, data_file, output, *extra):
    return ["reproduce", "math", "--model", str(base_dir), "--data", str(data_file), "--output", str(output),
            "--data-dir", str(data_path("test")), *SMOKE, *extra]


@pytest.fixture(scope="module")
def smoke(base_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "out"
    assert main(command(base_dir, data_file, out)) == 0
    return out


def present_tasks() -> list[str]:
    return [t for t in SUITES["math"] if (data_path("test") / t / "test.json").is_file()]


def accuracy_from_predictions(eval_dir, task) -> tuple[float, int]:
    """A task's accuracy in percent and its record count, recounted from its predictions file."""
    lines = (eval_dir / "predictions" / f"{task}.jsonl").read_text().splitlines()
    correct = [json.loads(line)["correct"] for line in lines]
    return 100 * sum(correct) / len(correct), len(correct)


def test_results_agree_with_the_evaluations_and_show_the_paper(smoke):
    results = json.loads((smoke / "results.json").read_text())
    md = (smoke / "results.md").read_text()
    tasks = present_tasks()
    assert results["tasks"] == list(SUITES["math"]) and results["row"] == {"name": "Llama-2-7B", "how": "chosen"}
    for method in ("lift", "lora"):
        run = results["methods"][method]
        expected = {task: accuracy_from_predictions(smoke / method / "eval", task) for task in tasks}
        assert {t: (r["accuracy"], r["count"]) for t, r in run["tasks"].items()} == expected
        assert run["average"] == pytest.approx(sum(a for a, _ in expected.values()) / len(tasks))
    assert "| task | LIFT (run) | LIFT (paper) | LoRA (run) | LoRA (paper) |" in md
    lift, lora = results["methods"]["lift"], results["methods"]["lora"]
    assert (f"| **average** | **{lift['average']:.2f}** ({len(tasks)} tasks) | 73.74 | "
            f"**{lora['average']:.2f}** ({len(tasks)} tasks) | 72.93 |") in md
    accuracy = {m: f"{results['methods'][m]['tasks']['gsm8k']['accuracy']:.2f}" for m in ("lift", "lora")}
    assert f"| gsm8k | {accuracy['lift']} | – | {accuracy['lora']} | – |" in md
    assert "| MultiArith | 98.66 | 98.29 | 98.88 | 98.17 | 97.54 | 97.17 |" in md  # the 4-seed table
    assert (smoke / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_method_trained_by_the_protocol_and_the_row(smoke):
    lift = json.loads((smoke / "lift" / "train" / "run.json").read_text())
    lora = json.loads((smoke / "lora" / "train" / "run.json").read_text())
    assert lift["status"] == lora["status"] == "done"
    # The paper's row Llama-2-7B (the authors' slurm_config_lift_math.txt), with --rank/--filter-rank over it.
    assert {k: lift["args"][k] for k in ("method", "lr", "rank", "filter_rank", "update_interval")} == {
        "method": "lift", "lr": 2e-4, "rank": 2, "filter_rank": 4, "update_interval": 400}
    assert (lora["args"]["method"], lora["args"]["lr"], lora["args"]["rank"]) == ("lora", 2e-4, 2)
    protocol = {"warmup_ratio": 0.03, "scheduler": "linear", "weight_decay": 0.0, "seed": 43, "max_grad_norm": None,
                "gradient_checkpointing": True, "template": "alpaca", "max_steps": 1, "epochs": None, "val_size": 2}
    assert {k: lift["args"][k] for k in protocol} == protocol
    evaluation = json.loads((smoke / "lift" / "eval" / "results.json").read_text())["settings"]
    assert (evaluation["num_beams"], evaluation["extractor"], evaluation["limit"]) == (4, "reference", 1)


def test_a_rerun_trains_nothing_and_evaluates_only_what_is_missing(smoke, base_dir, data_file, monkeypatch):
    before = json.loads((smoke / "results.json").read_text())
    mtimes = {m: (smoke / m / "train" / "run.json").stat().st_mtime_ns for m in ("lift", "lora")}
    calls = []
    monkeypatch.setattr(reproduce_run, "train", lambda args: pytest.fail(f"{args.method} trained again"))
    real = eval_command.evaluate_task
    monkeypatch.setattr(eval_command, "evaluate_task", lambda model, tok, task, *a, **kw: calls.append(task.name)
                        or real(model, tok, task, *a, **kw))
    assert main(command(base_dir, data_file, smoke)) == 0
    assert calls == [] and json.loads((smoke / "results.json").read_text()) == before
    (smoke / "lora" / "eval" / "predictions" / "AddSub.jsonl").unlink()  # as if stopped before AddSub was written
    assert main(command(base_dir, data_file, smoke)) == 0
    assert calls == ["AddSub"] and json.loads((smoke / "results.json").read_text()) == before
    assert mtimes == {m: (smoke / m / "train" / "run.json").stat().st_mtime_ns for m in ("lift", "lora")}


def test_an_interrupted_training_resumes(base_dir, data_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert main([*command(base_dir, data_file, out), "--methods", "lora", "--tasks", "AddSub"]) == 0
    run_file = out / "lora" / "train" / "run.json"
    run_file.write_text(json.dumps({**json.loads(run_file.read_text()), "status": "running"}))  # as if killed
    resumed = []
    monkeypatch.setattr(reproduce_run, "train", lambda args: resumed.append((args.method, args.resume)) or
                        {"trainable": 0})
    assert main([*command(base_dir, data_file, out), "--methods", "lora", "--tasks", "AddSub"]) == 0
    assert resumed == [("lora", True)]


def test_other_settings_on_a_finished_run_are_refused(smoke, base_dir, data_file, capsys):
    before = json.loads((smoke / "results.json").read_text())
    assert main([*command(base_dir, data_file, smoke), "--lr", "1e-3"]) == 2
    assert "differs in: lr" in capsys.readouterr().err
    assert json.loads((smoke / "results.json").read_text()) == before


@pytest.mark.parametrize("extra, message", [
    (["--methods", "lift,bogus"], "unknown method.*'bogus'"),
    (["--tasks", "gsm8k,nosuchtask"], "unknown task 'nosuchtask'"),
    (["--row", "GPT-5"], "unknown --row 'GPT-5'.*Llama-2-7B"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--data-dir", "/nonexistent/dataset"], "--data-dir '/nonexistent/dataset' does not exist"),
    (["--data", "/nonexistent/math_10k.json"], "nonexistent/math_10k.json.*AGI-Edgerunners/LLM-Adapters"),
])
def test_bad_input_is_named_before_any_work(extra, message, base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*command(base_dir, data_file, out), *extra]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_an_unknown_table_is_refused(base_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["reproduce", "vision", "--model", str(base_dir), "--output", str(tmp_path / "out")])
    assert stop.value.code == 2 and "invalid choice: 'vision'" in capsys.readouterr().err


@pytest.mark.parametrize("model, row, how", [
    ("meta-llama/Llama-2-7b-hf", "Llama-2-7B", "matched"),
    ("meta-llama/Meta-Llama-3-8B", "Llama-3-8B", "matched"),
    ("/models/llama3_8b/", "Llama-3-8B", "matched"),
    ("meta-llama/Llama-3.2-1B", "Llama-3.2-1B", "matched"),
    ("meta-llama/Llama-3.1-8B", "Llama-2-7B", "default"),
    ("Qwen/Qwen2.5-7B", "Llama-2-7B", "default"),
])
def test_the_row_is_picked_by_the_model_name(model, row, how):
    chosen = choose_row("math", model)
    assert (chosen.name, chosen.how) == (row, how)


def test_the_authors_hyperparameters():
    """The values the issue quotes from the authors' configs, by hand."""
    def settings(table, model, method):
        return ReproduceArgs(table, model, "unused").method_settings(method)

    assert settings("math", "Llama-2-7b-hf", "lift") == {"lr": 2e-4, "rank": 128, "filter_rank": 64,
                                                         "update_interval": 400}
    assert settings("math", "Meta-Llama-3-8B", "lift") == {"lr": 1e-4, "rank": 128, "filter_rank": 128,
                                                           "update_interval": 400}
    assert settings("commonsense", "Llama-2-7b-hf", "lift") == {"lr": 1e-4, "rank": 128, "filter_rank": 64,
                                                                "update_interval": 2000}
    assert settings("commonsense", "Meta-Llama-3-8B", "lift") == {"lr": 5e-5, "rank": 32, "filter_rank": 16,
                                                                  "update_interval": 2000}
    assert settings("math", "Llama-2-7b-hf", "full") == {"lr": 5e-5}
    assert settings("math", "Llama-2-7b-hf", "lora") == {"lr": 2e-4, "rank": 128}
    assert settings("math", "Llama-2-7b-hf", "dora")["rank"] == 64
    assert settings("math", "Llama-2-7b-hf", "pissa")["rank"] == 128
    assert settings("math", "Llama-2-7b-hf", "magnitude") == settings("math", "Llama-2-7b-hf", "lift")
    args = ReproduceArgs("math", "x", "unused", batch_size=4)
    assert (args.training()["batch_size"], args.training()["grad_accum"], args.training()["epochs"]) == (4, 4, 3)


@pytest.mark.parametrize("batch_size", [3, 5, 12, 32])
def test_a_batch_size_that_does_not_divide_the_effective_batch_is_refused(batch_size):
    with pytest.raises(ValueError, match=f"--batch-size {batch_size} does not divide the protocol's effective batch "
                                         "of 16.*1, 2, 4, 8, 16, or --grad-accum"):
        ReproduceArgs("math", "x", "unused", batch_size=batch_size)
    # With --grad-accum the effective batch is the user's: 3 x 5 = 15.
    given = ReproduceArgs("math", "x", "unused", batch_size=batch_size, grad_accum=5).training()
    assert (given["batch_size"], given["grad_accum"]) == (batch_size, 5)


@pytest.mark.parametrize("batch_size", [1, 2, 8, 16])
def test_a_batch_size_alone_keeps_an_effective_batch_of_16(batch_size):
    training = ReproduceArgs("math", "x", "unused", batch_size=batch_size).training()
    assert training["batch_size"] * training["grad_accum"] == 16


def test_gradient_takes_lifts_settings_without_refreshes():
    args = ReproduceArgs("math", "Llama-2-7b-hf", "unused", methods=["gradient"])
    assert args.method_settings("gradient") == {"lr": 2e-4, "rank": 128, "filter_rank": 64, "update_interval": None}
    train_args = args.train_args("gradient")
    assert (train_args.method, train_args.lift.update_interval, train_args.lift.rank) == ("gradient", None, 128)


def test_gradient_runs_by_the_protocol(base_dir, data_file, tmp_path):
    out = tmp_path / "out"
    assert main([*command(base_dir, data_file, out), "--methods", "gradient", "--tasks", "AddSub"]) == 0
    run = json.loads((out / "gradient" / "train" / "run.json").read_text())
    assert run["status"] == "done"
    assert {k: run["args"][k] for k in ("method", "lr", "rank", "update_interval")} == {
        "method": "gradient", "lr": 2e-4, "rank": 2, "update_interval": None}
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["gradient"]["tasks"]["AddSub"]["accuracy"] == accuracy_from_predictions(
        out / "gradient" / "eval", "AddSub")[0]


def test_a_model_the_paper_did_not_use_gets_no_paper_column():
    args = ReproduceArgs("math", "/models/my-model", "unused", methods=["lift"], tasks="gsm8k,AQuA")
    evaluation = {"tasks": {"gsm8k": {"accuracy": 0.5, "count": 2}, "AQuA": {"accuracy": 0.25, "count": 4}}}
    results = build_results(args, {"lift": evaluation}, {"lift": 7})
    assert results["methods"]["lift"]["average"] == 37.5 and results["reported"] == []
    md = markdown(results)
    assert "| task | LIFT (run) |\n" in md and "| gsm8k | 50.00 |\n| AQuA | 25.00 |\n" in md
    assert "| **average** | **37.50** (2 tasks) |" in md
    assert "(paper)" not in md and "the paper did not fine-tune this model" in md
