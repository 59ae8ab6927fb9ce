"""`liftft analyze filter-rank` on the tiny model: the JSON against each run's own outputs and an independent
re-evaluation of each run's delta, the rank list's validation, and `--model demo` on a tiny demo base."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import data_path
from liftft import apply_delta
from liftft import load_delta
from liftft.analysis import filter_rank
from liftft.analysis.filter_rank import FilterRankSettings, check_filter_ranks
from liftft.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")

SIZE = ["--rank", "2", "--max-steps", "1", "--batch-size", "2", "--max-seq-len", "128", "--limit", "2",
        "--max-new-tokens", "4", "--no-progress"]


def fingerprint(model, task, records) -> float:
    """A stand-in accuracy that names the model (its weights), the task and the records it was given."""
    weights = sum(p.detach().double().sum() for p in model.parameters()).item()
    return weights + 1000 * len(records) + (0.5 if task.name == "source" else 0.0)


@pytest.fixture
def fingerprinting(monkeypatch):
    """Score with :func:`fingerprint` instead of generating, so every accuracy in the JSON says what was scored."""
    import liftft.eval

    monkeypatch.setattr(liftft.eval, "evaluate_task",
                        lambda model, tokenizer, task, records, **kw: ({"accuracy": fingerprint(model, task, records)},
                                                                         []))


def test_json_agrees_with_each_runs_outputs(base_dir, data_file, tmp_path, fingerprinting, capsys):
    test = data_path("test", "AddSub", "test.json")
    source = tmp_path / "source.json"
    source.write_text(data_path("test", "SingleEq", "test.json").read_text())
    out = tmp_path / "sweep"
    assert main(["analyze", "filter-rank", "--model", str(base_dir), "--data", str(data_file), "--test", str(test),
                 "--source", str(source), "--output", str(out), "--ranks", "2,100", *SIZE]) == 0
    printed = capsys.readouterr().out
    # tiny_llama's largest min(m, n) is 32 (q, o: 32 x 32; gate, up: 64 x 32).
    assert "filter rank 100 exceeds the largest min(m, n) of the targets (32)" in printed
    result = json.loads((out / "filter_rank.json").read_text())
    assert [r["filter_rank"] for r in result["runs"]] == result["settings"]["ranks"] == [2, 32]
    assert result["lora_equivalent_rank"] == 2 and (out / "filter_rank.png").read_bytes()[:4] == b"\x89PNG"

    scored = {"target_acc": ("test", 2), "source_acc": ("source", 2)}
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert result["base"] == {key: fingerprint(base, _Named(name), [None] * n)
                              for key, (name, n) in scored.items()}
    selections = []
    for run in result["runs"]:
        recorded = json.loads((out / "runs" / f"filter-rank-{run['filter_rank']}" / "run.json").read_text())
        assert run["output"] == str(out / "runs" / f"filter-rank-{run['filter_rank']}")
        assert recorded["status"] == "done" and recorded["args"]["filter_rank"] == run["filter_rank"]
        assert recorded["args"]["rank"] == 2 and recorded["args"]["update_interval"] is None
        assert run["train_loss"] == recorded["metrics"]["train_loss"] and run["trainable"] == recorded["trainable"]
        tuned = AutoModelForCausalLM.from_pretrained(base_dir)
        apply_delta(tuned, run["output"])
        for key, (name, n) in scored.items():
            assert run[key] == pytest.approx(fingerprint(tuned, _Named(name), [None] * n), abs=1e-9), key
        selections.append({k: v[0] for k, v in load_delta(run["output"]).entries.items()})
    # The filter rank is what differs between the runs: it changes what is selected.
    assert any(not torch.equal(selections[0][k], selections[1][k]) for k in selections[0])
    best = max(result["runs"], key=lambda r: r["target_acc"])["filter_rank"]
    assert result["best_filter_rank"] == best


def test_the_base_is_scored_in_the_dtype_the_runs_train_in(base_dir, data_file, tmp_path, fingerprinting,
                                                            monkeypatch):
    import liftft.training.train

    real = liftft.training.train.run_training

    def bf16_run(args):  # as liftft train runs on a GPU with bf16: the trained model's weights in bf16
        model, metrics = real(args)
        return model.to(torch.bfloat16), metrics

    monkeypatch.setattr(liftft.training.train, "run_training", bf16_run)
    test = data_path("test", "AddSub", "test.json")
    out = tmp_path / "sweep"
    assert main(["analyze", "filter-rank", "--model", str(base_dir), "--data", str(data_file), "--test", str(test),
                 "--output", str(out), "--ranks", "2", *SIZE]) == 0
    result = json.loads((out / "filter_rank.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    assert result["base"] == {"target_acc": fingerprint(base, _Named("test"), [None] * 2)}


def test_a_failed_plot_leaves_the_previous_one(base_dir, data_file, tmp_path, fingerprinting, monkeypatch):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "filter_rank.png").write_bytes(b"previous plot")

    def broken_plot(result, path):
        with open(path, "wb") as f:
            f.write(b"half a plot")
        raise OSError("disk full")

    monkeypatch.setattr(filter_rank, "plot_filter_rank", broken_plot)
    test = data_path("test", "AddSub", "test.json")
    assert main(["analyze", "filter-rank", "--model", str(base_dir), "--data", str(data_file), "--test", str(test),
                 "--output", str(out), "--ranks", "2", *SIZE]) == 2
    assert (out / "filter_rank.png").read_bytes() == b"previous plot"
    assert not [p for p in out.iterdir() if p.name.startswith(".filter_rank.png")]


class _Named:
    def __init__(self, name):
        self.name = name


def test_rank_list(base_dir):
    assert check_filter_ranks(None, str(base_dir)) == ([1, 2, 4, 8, 16, 32], None)
    ranks, note = check_filter_ranks([64, 2, 500, 2, 32], str(base_dir))
    assert ranks == [2, 32]
    assert note == ("filter ranks 64, 500 exceed the largest min(m, n) of the targets (32), where W_r = W already: "
                    "one run at 32 stands for them")
    assert check_filter_ranks([4, 8], str(base_dir), target_modules="mlp") == ([4, 8], None)
    with pytest.raises(ValueError, match="filter ranks must be integers >= 1, got 0"):
        check_filter_ranks([0, 4], str(base_dir))
    with pytest.raises(ValueError, match="names no filter rank"):
        check_filter_ranks([], str(base_dir))


@pytest.mark.parametrize("flags, message", [
    (["--ranks", "0,4"], "'0' must be >= 1"),
    (["--rank", "2", "--density", "0.1"], "not allowed with argument --rank"),
    (["--quick"], "--quick chooses the quick demo's base, for --model demo only"),
])
def test_bad_flags(flags, message, base_dir, data_file, tmp_path, capsys):
    try:
        code = main(["analyze", "filter-rank", "--model", str(base_dir), "--data", str(data_file), "--test",
                     str(data_file), "--output", str(tmp_path / "o"), *flags])
    except SystemExit as stop:  # argparse's own refusals
        code = stop.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_model_needs_data_and_test(base_dir, data_file, tmp_path, capsys):
    assert main(["analyze", "filter-rank", "--model", str(base_dir), "--data", str(data_file),
                 "--output", str(tmp_path / "o")]) == 2
    assert "give --data (training records) and --test (target test records), or --model demo" in capsys.readouterr().err


def test_demo_model_takes_the_demos_base_tasks_and_settings(tmp_path, monkeypatch, fingerprinting):
    from liftft.demo.base import BaseSettings, DemoSettings, base_path
    from liftft.demo.run import LEARNING_RATES, RANK

    tiny = DemoSettings(base=BaseSettings(n_people=3, fact_repeats=1, arithmetic_repeats=0, n_stories=2,
                                          max_value=6, vocab_size=300, hidden_size=32, intermediate_size=64,
                                          num_layers=1, num_heads=2, pretrain_steps=1, batch_size=4),
                        n_target_train=6, n_target_test=3, finetune_steps=1, finetune_batch_size=2)
    monkeypatch.setenv("LIFTFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(DemoSettings, "quick", classmethod(lambda cls: tiny))
    out = tmp_path / "sweep"
    assert main(["analyze", "filter-rank", "--model", "demo", "--quick", "--output", str(out), "--ranks", "1,8",
                 "--no-progress"]) == 0
    result = json.loads((out / "filter_rank.json").read_text())
    settings = result["settings"]
    assert settings["model"] == str(base_path(tiny.base)) and settings["quick"] is True
    assert settings["rank"] == RANK == result["lora_equivalent_rank"] and settings["lr"] == LEARNING_RATES["lift"]
    assert settings["max_steps"] == tiny.finetune_steps and settings["batch_size"] == tiny.finetune_batch_size
    train, test = tiny.target_split(0)
    written = {name: json.loads((out / "data" / f"{name}.json").read_text())
               for name in ("target_train", "target_test", "source_test")}
    assert written == {"target_train": train, "target_test": test, "source_test": tiny.source_test()}
    assert settings["data"] == [str(out / "data" / "target_train.json")]
    assert [r["filter_rank"] for r in result["runs"]] == [1, 8]
    assert set(result["base"]) == {"target_acc", "source_acc"}


def test_settings_defaults():
    filled = FilterRankSettings(model="m", output="o", data=["d"], test="t", density=0.1).filled()
    assert filled.rank is None and filled.max_steps == filter_rank.DEFAULTS["max_steps"]
    assert FilterRankSettings(model="m", output="o", data=["d"], test="t").filled().rank == 128
