"""QLIFT: LIFT on a real bitsandbytes 4-bit base, against dense references built from the dequantized weights."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama

bnb = pytest.importorskip("bitsandbytes", reason="QLIFT needs bitsandbytes (pip install 'liftft[bnb]')")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import liftft  # noqa: E402
from liftft.engine.quantized import QuantizedLinearFunction, QuantizedTarget, dequantize, is_4bit  # noqa: E402

SETTINGS = [("nf4", False), ("nf4", True), ("fp4", False)]


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("qlift") / "base"
    tiny_llama(seed=3, vocab_size=128, hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


def load_4bit(path, quant_type="nf4", nested=False):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=nested, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)


def dequantized_copy(model_4bit, path):
    """The same model in fp32 with every 4-bit weight replaced by dequant(W₄): the dense reference."""
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    modules = dict(model_4bit.named_modules())
    with torch.no_grad():
        for name, module in dense.named_modules():
            if is_4bit(modules.get(name, torch.nn.Identity())):
                module.weight.copy_(dequantize(modules[name]).float())
    return dense


def packed_state(model):
    """Every byte of the 4-bit base: packed weights and quantization constants (nested ones too)."""
    out = {}
    for name, module in model.named_modules():
        if is_4bit(module):
            qs = module.weight.quant_state
            out[name] = [module.weight.data.clone(), qs.absmax.clone()]
            if qs.nested:
                out[name] += [qs.state2.absmax.clone(), qs.offset.clone()]
    return out


def batches(n, seed=0, vocab=128):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (2, 12), generator=gen) for _ in range(n)]


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("quant_type, nested", SETTINGS)
def test_one_layer_matches_the_dense_reference_and_its_autograd(base_path, quant_type, nested):
    model = load_4bit(base_path, quant_type, nested)
    module = model.model.layers[0].mlp.down_proj
    target = QuantizedTarget("down_proj.weight", module)
    m, n = target.shape
    gen = torch.Generator().manual_seed(1)
    index = torch.randperm(m * n, generator=gen)[:300].sort().values
    target.include(index)
    target.values += torch.randn(300, generator=gen) * 0.05
    reference = dequantize(module).float()
    reference.view(-1)[index] = target.values
    reference.requires_grad_(True)

    x = torch.randn(3, 5, n, generator=gen, requires_grad=True)
    received = {}
    target.sink = lambda key, dy, inputs: received.update(dy=dy, x=inputs)
    y = QuantizedLinearFunction.apply(x, target, None, torch.zeros(0, requires_grad=True))
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ reference.t()
    assert torch.equal(y, y_ref)
    dy = torch.randn(y.shape, generator=gen)
    y.backward(dy)
    y_ref.backward(dy)
    assert torch.equal(x.grad, x_ref.grad)
    from liftft.engine.sampled import sampled_weight_grad

    selected = index[::3]
    sampled = sampled_weight_grad(received["dy"], received["x"], selected, (m, n))
    torch.testing.assert_close(sampled, reference.grad.view(-1)[selected], rtol=1e-5, atol=1e-6)


def train(model, opt, steps, seed=0):
    """``steps`` optimizer steps on one fixed batch, so that the loss must fall; returns the losses."""
    losses = []
    for ids in batches(1, seed) * steps:
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def trained_matrix(opt, name):
    return opt.quantized_target(name).dense(torch.float32)


@pytest.mark.parametrize("quant_type, nested", SETTINGS)
@pytest.mark.parametrize("selector", ["principal", "magnitude", "random", "s2ft", "blocks", "gradient"])
def test_training_equals_lift_on_the_dequantized_weights(base_path, quant_type, nested, selector):
    """QLIFT trains bit for bit as LIFT does on an fp32 model holding dequant(W₄), with the same sampled weight
    gradient (sampled_grad=True): same selections and refreshes, same values, and the packed base untouched."""
    model = load_4bit(base_path, quant_type, nested)
    reference = dequantized_copy(model, base_path)
    packed = packed_state(model)
    settings = dict(rank=2, filter_rank=4, update_interval=3, svd="exact", seed=1)
    settings.update({"blocks": dict(block_size=4), "s2ft": dict(selector="s2ft")}.get(selector, {}))
    scores = ref_scores = None
    if selector in ("magnitude", "random", "gradient"):
        settings["selector"] = selector
    if selector == "gradient":
        settings["update_interval"] = None
        calibration = [{"input_ids": ids, "labels": ids} for ids in batches(2, seed=5)]
        scores = liftft.gradient_scores(model, calibration)
        ref_scores = liftft.gradient_scores(reference, calibration)
        assert scores.keys() == ref_scores.keys()
        for name in scores:  # the 4-bit layer forms dYᵀX itself, autograd the reference's: same sums, other order
            torch.testing.assert_close(scores[name], ref_scores[name], rtol=1e-4, atol=1e-7)
            ref_scores[name] = scores[name]  # so that a near-tie cannot pick other entries
    opt = liftft.LiftAdamW(model, liftft.LiftConfig(**settings), lr=1e-2, weight_decay=0.1, max_grad_norm=1.0,
                           scores=scores)
    ref_opt = liftft.LiftAdamW(reference, liftft.LiftConfig(**settings, sampled_grad=True), lr=1e-2, weight_decay=0.1,
                               max_grad_norm=1.0, scores=ref_scores)
    assert opt.target_names == ref_opt.target_names and len(opt.target_names) == 14
    # counted as PEFT counts a 4-bit model: each packed weight as the matrix it stands for
    assert liftft.trainable_parameters(model, opt) == liftft.trainable_parameters(reference, ref_opt)

    losses = train(model, opt, 7)
    train(reference, ref_opt, 7)

    assert losses[-1] < losses[0]
    weights = dict(reference.named_parameters())
    for name in opt.target_names:
        assert torch.equal(opt.indices(name), ref_opt.indices(name)), name
        assert torch.equal(trained_matrix(opt, name), weights[name].detach()), name
        touched, base = opt.trained_entries(name)
        moved = (trained_matrix(opt, name) != dequantize(opt.quantized_target(name).module).float()).view(-1)
        assert set(moved.nonzero().flatten().tolist()) <= set(touched.tolist())
        assert torch.equal(opt.state_of(name)["exp_avg_sq"] > 0, ref_opt.state_of(name)["exp_avg_sq"] > 0)
    after = packed_state(model)
    assert after.keys() == packed.keys()
    for name in packed:
        assert all(torch.equal(a, b) for a, b in zip(after[name], packed[name])), name


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained_4bit(base_path, quant_type="nf4", nested=True, steps=4, **settings):
    model = load_4bit(base_path, quant_type, nested)
    cfg = liftft.LiftConfig(**{**dict(rank=2, filter_rank=4, update_interval=2, seed=1), **settings})
    opt = liftft.LiftAdamW(model, cfg, lr=1e-2)
    train(model, opt, steps)
    return model, opt


@pytest.mark.parametrize("quant_type, nested", SETTINGS)
def test_the_delta_reproduces_the_trained_logits_on_a_fresh_4bit_base(base_path, tmp_path, quant_type, nested):
    model, opt = trained_4bit(base_path, quant_type, nested)
    liftft.save_delta(opt, tmp_path, base_model=str(base_path))
    ids = batches(1, seed=9)[0]
    fresh = load_4bit(base_path, quant_type, nested)
    assert not torch.equal(logits(fresh, ids), logits(model, ids))
    liftft.apply_delta(fresh, tmp_path)
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    meta = liftft.load_delta(tmp_path).meta
    assert meta["quantization"] == {"load_in_4bit": True, "bnb_4bit_quant_type": quant_type,
                                    "bnb_4bit_use_double_quant": nested}
    record = meta["weights"]["model.layers.0.mlp.down_proj.weight"]
    assert record["shape"] == [64, 128] and record["quantization"]["quant_type"] == quant_type


def test_a_4bit_delta_refuses_a_base_loaded_otherwise_saying_how_to_load_it(base_path, tmp_path):
    _, opt = trained_4bit(base_path, "nf4", True)
    liftft.save_delta(opt, tmp_path)
    hint = "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True)"
    for other in (load_4bit(base_path, "fp4", True), load_4bit(base_path, "nf4", False)):
        with pytest.raises(ValueError, match=r"4-bit weights differ.*" + __import__("re").escape(hint)):
            liftft.apply_delta(other, tmp_path)
    sixteen = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"not a 4-bit layer here: load the base with .*nf4"):
        liftft.apply_delta(sixteen, tmp_path)


def test_resuming_from_the_delta_and_optimizer_state_is_bit_identical(base_path, tmp_path):
    """A checkpoint of a 4-bit run is its delta and its optimizer state; a fresh base with both continues exactly
    as the run did, through a refresh."""
    model, opt = trained_4bit(base_path, steps=3, update_interval=2)
    liftft.save_delta(opt, tmp_path)
    state = __import__("copy").deepcopy(opt.state_dict())
    train(model, opt, 4, seed=1)

    resumed = load_4bit(base_path, "nf4", True)
    liftft.apply_delta(resumed, tmp_path)
    again = liftft.LiftAdamW(resumed, opt.cfg, lr=1e-2)
    again.load_state_dict(state)
    train(resumed, again, 4, seed=1)
    for name in opt.target_names:
        assert torch.equal(again.indices(name), opt.indices(name))
        assert torch.equal(trained_matrix(again, name), trained_matrix(opt, name)), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(again.state_of(name)[key], opt.state_of(name)[key])
