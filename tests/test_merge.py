"""Merging: the merged directory reloads with from_pretrained as the trained model; bad inputs are refused."""

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import sample_ids, tiny_llama, train_and_save
from liftft.cli import main
from liftft.deltas.merge import MERGE_FILE, merge_delta

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")


def test_merged_directory_reloads_as_the_trained_model(tmp_path, tokenizer):
    trained = train_and_save(tmp_path, tokenizer)
    out = merge_delta(str(tmp_path / "base"), str(tmp_path / "delta"), str(tmp_path / "merged"))

    assert (out / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), b in zip(reloaded.named_parameters(), trained.parameters()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=sample_ids()).logits, trained(input_ids=sample_ids()).logits)
    text = "Below is an instruction. ### Response:\n42"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == tokenizer(text).input_ids
    record = json.loads((out / MERGE_FILE).read_text())
    assert record["base_model"] == str(tmp_path / "base") and record["dtype"] == "float32"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temporary left behind


def test_bf16_merge_keeps_the_trained_dtype_unless_asked(tmp_path, tokenizer):
    trained = train_and_save(tmp_path, tokenizer, dtype=torch.bfloat16)
    base, delta = str(tmp_path / "base"), str(tmp_path / "delta")
    kept = AutoModelForCausalLM.from_pretrained(merge_delta(base, delta, str(tmp_path / "kept")), dtype="auto")
    wide = AutoModelForCausalLM.from_pretrained(
        merge_delta(base, delta, str(tmp_path / "wide"), dtype="float32"), dtype="auto"
    )
    for (name, a), b, c in zip(kept.named_parameters(), wide.parameters(), trained.parameters()):
        assert a.dtype == torch.bfloat16 and b.dtype == torch.float32, name
        assert torch.equal(a, c) and torch.equal(b, c.float()), name


def test_previous_merge_is_replaced_but_other_directories_are_refused(tmp_path, tokenizer):
    train_and_save(tmp_path, tokenizer)
    base, delta = str(tmp_path / "base"), str(tmp_path / "delta")
    merge_delta(base, delta, str(tmp_path / "merged"))
    merge_delta(base, delta, str(tmp_path / "merged"))
    assert (tmp_path / "merged" / MERGE_FILE).is_file()

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"output directory {other} is not empty and is not a previous liftft merge"):
        merge_delta(base, delta, str(other))
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


def test_failed_write_leaves_the_previous_merge_intact(tmp_path, tokenizer, monkeypatch):
    train_and_save(tmp_path, tokenizer)
    base, delta, out = str(tmp_path / "base"), str(tmp_path / "delta"), tmp_path / "merged"
    merge_delta(base, delta, str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def killed_mid_save(self, directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", killed_mid_save)
    with pytest.raises(KeyboardInterrupt):
        merge_delta(base, delta, str(out), dtype="bfloat16")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_bad_inputs_are_named(tmp_path, tokenizer):
    train_and_save(tmp_path, tokenizer)
    base, delta, out = str(tmp_path / "base"), str(tmp_path / "delta"), str(tmp_path / "merged")
    with pytest.raises(FileNotFoundError, match="no-such-base"):
        merge_delta(str(tmp_path / "no-such-base"), delta, out)
    with pytest.raises(FileNotFoundError, match="no-such-delta"):
        merge_delta(base, str(tmp_path / "no-such-delta"), out)
    with pytest.raises(ValueError, match="dtype must be auto or one of float32, bfloat16, float16, got 'int8'"):
        merge_delta(base, delta, out, dtype="int8")

    other_base = tmp_path / "other"
    tiny_llama(seed=1).save_pretrained(other_base)
    tokenizer.save_pretrained(other_base)
    # Deltas list their matrices in model order, so the first one checked is layer 0's q_proj.
    with pytest.raises(ValueError, match="base fingerprint mismatch at model.layers.0.self_attn.q_proj.weight"):
        merge_delta(str(other_base), delta, out)

    no_tokenizer = tmp_path / "bare"
    tiny_llama().save_pretrained(no_tokenizer)
    with pytest.raises(FileNotFoundError, match="cannot load the tokenizer of base model"):
        merge_delta(str(no_tokenizer), delta, out)
    assert not (tmp_path / "merged").exists()


def test_cli_merge(tmp_path, tokenizer, capsys):
    train_and_save(tmp_path, tokenizer)
    args = ["merge", "--base", str(tmp_path / "base"), "--delta", str(tmp_path / "delta")]
    assert main(args + ["--output", str(tmp_path / "merged"), "--dtype", "bfloat16"]) == 0
    assert f"wrote merged model to {tmp_path / 'merged'}" in capsys.readouterr().out
    assert json.loads((tmp_path / "merged" / MERGE_FILE).read_text())["dtype"] == "bfloat16"

    assert main(["merge", "--base", str(tmp_path / "base"), "--delta", str(tmp_path / "nope"), "--output", "o"]) == 2
    assert f"liftft merge: error: {tmp_path / 'nope' / 'delta.safetensors'} not found" in capsys.readouterr().err
