"""`liftft train --load-in-4bit`: QLIFT and QLoRA runs, their outputs, resume, and the inputs they refuse."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_interrupted

pytest.importorskip("bitsandbytes", reason="QLIFT needs bitsandbytes (pip install 'liftft[bnb]')")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import liftft  # noqa: E402
from liftft.cli import main  # noqa: E402
from liftft.training.checkpoint import latest_checkpoint  # noqa: E402


def train_cli(base_dir, data_file, out, *flags):
    return main(["train", "--model", str(base_dir), "--data", str(data_file), "--output", str(out),
                 "--max-steps", "4", "--rank", "2", "--filter-rank", "4", "--update-interval", "2", "--batch-size", "2",
                 "--grad-accum", "1", "--lr", "1e-2", "--device", "cpu", "--no-progress", "--load-in-4bit", *flags])


def load_4bit(path, quant_type="nf4", nested=False):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=nested, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 30, 2]])


def test_a_qlift_run_writes_a_delta_and_the_16bit_model_it_trained(base_dir, data_file, tmp_path):
    out = tmp_path / "run"
    assert train_cli(base_dir, data_file, out, "--use-bnb-nested-quant", "--merge") == 0
    meta = json.loads((out / "liftft.json").read_text())
    assert meta["quantization"] == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                    "bnb_4bit_use_double_quant": True}
    run = json.loads((out / "run.json").read_text())
    assert run["args"]["load_in_4bit"] is True and run["args"]["use_bnb_nested_quant"] is True
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]

    applied = liftft.apply_delta(load_4bit(base_dir, nested=True), out)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    assert "quantization_config" not in merged.config.to_dict()
    assert torch.equal(logits(merged, IDS), logits(applied, IDS))
    assert torch.equal(logits(liftft.from_pretrained(out), IDS), logits(applied, IDS))
    assert "trained on a 4-bit base (bitsandbytes nf4, nested quantization)" in (out / "README.md").read_text()
    assert not torch.equal(logits(merged, IDS), logits(load_4bit(base_dir, nested=True), IDS))


def test_eval_of_a_qlift_delta_equals_eval_of_the_merged_16bit_model(base_dir, data_file, tmp_path):
    from conftest import data_path

    out = tmp_path / "run"
    assert train_cli(base_dir, data_file, out, "--merge") == 0
    common = ["eval", "--data-dir", str(data_path("test")), "--tasks", "AddSub,gsm8k", "--limit", "3",
              "--max-new-tokens", "8", "--num-beams", "1", "--device", "cpu", "--no-progress"]
    assert main([*common, "--model", str(base_dir), "--delta", str(out), "--output", str(tmp_path / "e4")]) == 0
    assert main([*common, "--model", str(out / "merged"), "--tokenizer", str(base_dir),
                 "--output", str(tmp_path / "e16")]) == 0
    for task in ("AddSub", "gsm8k"):
        four, sixteen = ((tmp_path / name / "predictions" / f"{task}.jsonl").read_text().splitlines()
                         for name in ("e4", "e16"))
        assert [json.loads(line)["generation"] for line in four] == [json.loads(line)["generation"] for line in sixteen]


def test_merging_onto_the_original_weights_is_explicit_and_adds_the_same_differences(base_dir, data_file, tmp_path):
    out = tmp_path / "run"
    assert train_cli(base_dir, data_file, out) == 0
    assert main(["merge", "--model", str(base_dir), "--delta", str(out), "--output", str(tmp_path / "o"),
                 "--original-weights"]) == 0
    original = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    onto = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32)
    delta = liftft.load_delta(out)
    weights, merged = dict(original.named_parameters()), dict(onto.named_parameters())
    for name, (idx, values) in delta.entries.items():
        expected = weights[name].detach().clone().view(-1)
        expected[idx.long()] = (expected[idx.long()].double() + values).float()
        assert torch.equal(merged[name].detach().view(-1), expected), name


def test_export_shira_refuses_a_4bit_delta_saying_why(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(base_dir, data_file, out) == 0
    capsys.readouterr()
    assert main(["export-shira", "--delta", str(out), "--output", str(tmp_path / "shira")]) == 2
    err = capsys.readouterr().err
    assert "trained on a 4-bit base" in err and "would not reproduce the trained model" in err
    assert not (tmp_path / "shira").exists()


def test_resume_is_bit_identical_and_needs_the_same_quantization(base_dir, data_file, tmp_path, monkeypatch,
                                                                 capsys):
    straight = tmp_path / "straight"
    assert train_cli(base_dir, data_file, straight, "--save-steps", "1") == 0
    interrupted = tmp_path / "interrupted"
    run_interrupted(monkeypatch, 3, lambda: train_cli(base_dir, data_file, interrupted, "--save-steps", "1"))
    assert latest_checkpoint(interrupted).name == "step-00000003"
    capsys.readouterr()
    assert train_cli(base_dir, data_file, interrupted, "--save-steps", "1", "--resume",
                     "--bnb-4bit-quant-type", "fp4") == 2
    assert "holds a different run (differs in: bnb_4bit_quant_type)" in capsys.readouterr().err
    assert train_cli(base_dir, data_file, interrupted, "--save-steps", "1", "--resume") == 0
    a, b = liftft.load_delta(straight), liftft.load_delta(interrupted)
    assert a.entries.keys() == b.entries.keys()
    for name in a.entries:
        assert all(torch.equal(x, y) for x, y in zip(a.entries[name], b.entries[name])), name


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_and_dora_on_a_4bit_base_are_peft_qlora_and_qdora(base_dir, data_file, tmp_path, method):
    from peft import PeftModel

    out = tmp_path / method
    assert train_cli(base_dir, data_file, out, "--method", method) == 0
    run = json.loads((out / "run.json").read_text())
    # r=2 on every linear target: (in + out) * 2 per matrix, plus DoRA's magnitude vector per output row
    base = load_4bit(base_dir)
    expected = sum((m.in_features + m.out_features) * 2 + (method == "dora") * m.out_features
                   for name, m in base.named_modules() if type(m).__name__ == "Linear4bit")
    assert run["trainable"] == expected
    adapted = PeftModel.from_pretrained(base, out / "adapter")
    assert adapted.peft_config["default"].use_dora == (method == "dora")
    assert not torch.equal(logits(adapted, IDS), logits(load_4bit(base_dir), IDS))


@pytest.mark.parametrize("flags, message", [
    (["--method", "full"], "--method full cannot run with --load-in-4bit: full fine-tuning updates every weight"),
    (["--method", "pissa"], "--method pissa cannot run with --load-in-4bit"),
    (["--fsdp"], "--fsdp cannot shard a 4-bit base"),
])
def test_settings_that_cannot_run_are_refused_before_any_weight_loads(tmp_path, capsys, flags, message):
    # The model path does not exist: a refusal that names the 4-bit settings came before any loading.
    assert train_cli(tmp_path / "no-model", tmp_path / "no-data.json", tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_bitsandbytes_names_the_extra_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        find_spec(name, *a))
    assert train_cli(tmp_path / "no-model", tmp_path / "no-data.json", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert "--load-in-4bit needs bitsandbytes, which is not installed: pip install 'liftft[bnb]'" in err
    assert len(err.splitlines()) == 1


def test_two_gloo_ranks_on_a_4bit_base_equal_one_process(base_dir, data_file, tmp_path):
    """torchrun with 2 ranks on a 4-bit base trains as one process does on the same global batch: the sampled
    gradients of each rank's examples are averaged once per step."""
    from test_distributed import CLI_SETTINGS, RELATIVE_TOLERANCE, WORLD, launch_train

    from liftft.training.train import TrainArgs, run_training

    out = tmp_path / "ranks"
    launch_train("torchrun", base_dir, data_file, out, "--load-in-4bit")
    assert json.loads((out / "run.json").read_text())["world_size"] == WORLD
    single = tmp_path / "single"
    run_training(TrainArgs.from_flat(model=str(base_dir), data=[str(data_file)], output=str(single), epochs=None,
                                     batch_size=WORLD, progress=False, load_in_4bit=True, **CLI_SETTINGS))
    ranks, reference = liftft.load_delta(out), liftft.load_delta(single)
    assert ranks.meta["quantization"] == reference.meta["quantization"]
    for name, (idx, values) in reference.entries.items():
        assert torch.equal(ranks.entries[name][0], idx)
        assert (ranks.entries[name][1] - values).norm() / values.norm() < RELATIVE_TOLERANCE, name
