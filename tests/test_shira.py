"""SHiRA export: stock PEFT loads the adapter and reproduces the merged model; r grows to fit the trained entries."""

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from conftest import sample_ids, train_and_save
from liftft import LiftAdamW
from liftft import LiftConfig
from liftft import apply_delta
from liftft import load_delta
from liftft import save_delta
from liftft.cli import main
from liftft.deltas.shira import SHIRA_FILE, export_shira

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")


def fresh_base(tmp_path, dtype):
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stock_peft_reproduces_the_merged_model_with_grown_r(tmp_path, dtype, capsys):
    train_and_save(tmp_path, dtype=dtype)
    delta = load_delta(tmp_path / "delta")
    out = export_shira(str(tmp_path / "delta"), str(tmp_path / "shira"))

    # Refreshes widened every matrix's trained entries past the run's LoRA-parity budget 1·(m+n).
    shapes = {n: delta.meta["weights"][n]["shape"] for n, (idx, _) in delta.entries.items() if idx is not None}
    needed = {n: math.ceil(delta.entries[n][0].numel() / sum(s)) for n, s in shapes.items()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA" and config["r"] == max(needed.values()) > 1
    assert sorted(config["target_modules"]) == sorted(n.removesuffix(".weight") for n in shapes)
    assert sorted(config["modules_to_save"]) == sorted(
        n.removesuffix(".weight") for n, (idx, _) in delta.entries.items() if idx is None
    )
    record = json.loads((out / SHIRA_FILE).read_text())
    assert record["r"] == config["r"] and record["r_exceeds_run_rank"] and record["run_rank"] == 1
    assert f"SHiRA r={config['r']}" in capsys.readouterr().out

    # Each matrix holds exactly r(m+n) entries: every trained one with its value, the rest zero.
    saved = load_file(out / "adapter_model.safetensors")
    for name, (rows, cols) in shapes.items():
        prefix = f"base_model.model.{name.removesuffix('.weight')}"
        rc, values = saved[f"{prefix}.shira_indices"], saved[f"{prefix}.shira_weight"]
        assert values.numel() == config["r"] * (rows + cols)
        dense = torch.zeros(rows, cols, dtype=torch.float64)
        dense[rc[0].long(), rc[1].long()] = values.double()
        idx, expected = delta.entries[name]
        reference = torch.zeros(rows * cols, dtype=torch.float64)
        reference[idx.long()] = expected.double()
        torch.testing.assert_close(dense.flatten(), reference, rtol=1e-6, atol=0)

    adapted = PeftModel.from_pretrained(fresh_base(tmp_path, dtype), out)
    merged = apply_delta(fresh_base(tmp_path, dtype), tmp_path / "delta")
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=sample_ids()).logits, merged(input_ids=sample_ids()).logits)


def test_without_refreshes_r_is_the_run_rank_and_nothing_is_padded(tmp_path):
    train_and_save(tmp_path, update_interval=None, steps=2)
    out = export_shira(str(tmp_path / "delta"), str(tmp_path / "shira"), base=str(tmp_path / "base"))
    record = json.loads((out / SHIRA_FILE).read_text())
    assert record["r"] == 1 and not record["r_exceeds_run_rank"] and record["padding_entries"] == 0
    adapted = PeftModel.from_pretrained(fresh_base(tmp_path, torch.float32), out)
    merged = apply_delta(fresh_base(tmp_path, torch.float32), tmp_path / "delta")
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=sample_ids()).logits, merged(input_ids=sample_ids()).logits)


def test_matrix_too_small_for_the_shared_r_is_named(tmp_path):
    # At rank 64 every entry of every matrix is trained. One r must hold gate_proj's 64x32 = 2048 entries:
    # r = ceil(2048 / 96) = 22, and 22 * (32 + 32) = 1408 exceeds q_proj's 32x32 = 1024.
    train_and_save(tmp_path, rank=64, update_interval=None, steps=1)
    with pytest.raises(ValueError, match=r"SHiRA cannot hold model\.layers\.0\.self_attn\.q_proj\.weight \(32x32\).*"
                       r"r=22 \(needed for model\.layers\.0\.mlp\.gate_proj\.weight\) gives r\(m\+n\)=1408"):
        export_shira(str(tmp_path / "delta"), str(tmp_path / "shira"))
    assert not (tmp_path / "shira").exists()


def test_gpt2_conv1d_is_refused_by_name(tmp_path):
    # PEFT's SHiRA wraps only torch.nn.Linear, so GPT-2's Conv1D matrices cannot be exported.
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    opt = LiftAdamW(model, LiftConfig(rank=1, filter_rank=2, update_interval=None), lr=1e-2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    save_delta(opt, tmp_path / "delta", base_model=str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn is a Conv1D, and PEFT's SHiRA adapts only"):
        export_shira(str(tmp_path / "delta"), str(tmp_path / "shira"))


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-delta"):
        export_shira(str(tmp_path / "no-such-delta"), str(tmp_path / "shira"))

    train_and_save(tmp_path, steps=1)
    meta_file = tmp_path / "delta" / "liftft.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "base_model": None}))
    with pytest.raises(ValueError, match="records no base model; pass the base model"):
        export_shira(str(tmp_path / "delta"), str(tmp_path / "shira"))

    with pytest.raises(ValueError, match=f"output directory {tmp_path / 'base'} is not empty and is not a previous"):
        export_shira(str(tmp_path / "delta"), str(tmp_path / "base"), base=str(tmp_path / "base"))


def test_cli_export_shira(tmp_path, capsys):
    train_and_save(tmp_path)
    assert main(["export-shira", "--delta", str(tmp_path / "delta"), "--output", str(tmp_path / "shira")]) == 0
    printed = capsys.readouterr().out
    assert "r exceeds the run's rank 1" in printed and f"wrote SHiRA adapter to {tmp_path / 'shira'}" in printed

    assert main(["export-shira", "--delta", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "liftft export-shira: error:" in capsys.readouterr().err
