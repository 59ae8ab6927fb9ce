"""`liftft estimate --load-in-4bit` against what a real bitsandbytes 4-bit model holds, byte for byte."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama

pytest.importorskip("bitsandbytes", reason="QLIFT needs bitsandbytes (pip install 'liftft[bnb]')")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from liftft.cli import main  # noqa: E402
from liftft.planning.estimate import estimate  # noqa: E402


def held_bytes(model) -> int:
    """Every byte of the model's weights: its parameters and each 4-bit layer's quantization state, each storage
    counted once (as tests/test_estimate.py counts a 16-bit model's: parameters, not the rotary buffers)."""
    tensors = list(model.parameters())
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code, torch.as_tensor(state.offset)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype, method", [("float32", "lift"), ("bfloat16", "lift"), ("float32", "lora"),
                                           ("bfloat16", "dora")])
def test_the_weights_part_equals_the_bytes_of_a_real_4bit_model(tmp_path, nested, dtype, method):
    # 72 x 150 and 36 x 72 matrices: not multiples of the 64-value blocks, so the rounding up is checked too.
    tiny_llama(vocab_size=96, hidden_size=72, intermediate_size=150, num_attention_heads=4,
               num_key_value_heads=2).save_pretrained(tmp_path)
    torch_dtype = getattr(torch, dtype)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=nested,
                                bnb_4bit_compute_dtype=torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=torch_dtype)
    planned = estimate(model.config, method, load_in_4bit=True, nested=nested, dtype=dtype, rank=2, seq_len=64)
    if method != "lift":  # QLoRA as liftft trains it: PEFT's k-bit preparation, then the adapters
        from liftft.engine.methods import setup_method
        from liftft.engine.config import LiftConfig

        model = setup_method(model, method, LiftConfig(rank=2)).model
    assert planned.memory["weights"] == held_bytes(model)


@pytest.mark.parametrize("flags, message", [
    (["--method", "full", "--load-in-4bit"], "--method full cannot run with --load-in-4bit"),
    (["--method", "pissa", "--load-in-4bit"], "--method pissa cannot run with --load-in-4bit"),
    (["--fsdp", "--gpus", "2", "--load-in-4bit"], "--fsdp cannot shard a 4-bit base"),
    (["--use-bnb-nested-quant"], "--use-bnb-nested-quant sets how a 4-bit base is quantized: it needs --load-in-4bit"),
    (["--bnb-4bit-quant-type", "fp4"], "--bnb-4bit-quant-type sets how a 4-bit base is quantized"),
])
def test_settings_liftft_cannot_run_are_refused_in_one_line(capsys, flags, message):
    assert main(["estimate", "--model-config", "tiny", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("nested", [False, True])
def test_bench_quantizes_a_model_as_transformers_loads_it_in_4bit(tmp_path, nested):
    from liftft.planning.quantized import quantize_4bit

    model = tiny_llama(vocab_size=96, hidden_size=64, intermediate_size=128)
    model.save_pretrained(tmp_path)
    quantize_4bit(model, "nf4", nested, torch.device("cpu"))
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=nested,
                                bnb_4bit_compute_dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=torch.float32)
    ours, theirs = dict(model.named_modules()), dict(loaded.named_modules())
    quantized = [name for name, module in theirs.items() if type(module).__name__ == "Linear4bit"]
    assert quantized and [n for n, m in ours.items() if type(m).__name__ == "Linear4bit"] == quantized
    for name in quantized:
        a, b = ours[name].weight, theirs[name].weight
        assert torch.equal(a.data, b.data) and torch.equal(a.quant_state.absmax, b.quant_state.absmax), name
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
