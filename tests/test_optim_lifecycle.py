"""LiftAdamW in the ordinary uses around training: dropped or closed optimizers, tied weights, refreshes and loads
mid-step, models over several devices, failed constructions. Each test fails on the liftft before Engine v2."""

import copy
import gc
import math
import weakref

import pytest
import torch

from conftest import tiny_llama
from liftft import LiftAdamW
from liftft import LiftConfig
from liftft.engine.targets import find_targets

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")

BATCH = torch.randint(3, 512, (4, 12), generator=torch.Generator().manual_seed(0))


def loss_of(model):
    return model(input_ids=BATCH, labels=BATCH).loss


def cfg(**kw):
    return LiftConfig(rank=2, filter_rank=4, update_interval=None, **kw)


def assert_dense_gradients_intact(model, reference):
    """Every parameter of ``model``, trainable again, gets exactly the gradient it gets in an untouched copy."""
    for m in (model, reference):
        for p in m.parameters():
            p.requires_grad_(True)
        loss_of(m).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("sampled_grad", [False, True])
def test_a_dropped_optimizer_leaves_the_model_to_the_next_one(sampled_grad):
    model = tiny_llama()
    reference = copy.deepcopy(model)
    opt = LiftAdamW(model, cfg(sampled_grad=sampled_grad), lr=1e-2)
    alive = weakref.ref(opt)
    del opt
    gc.collect()
    assert alive() is None, "the model's hooks kept the optimizer alive"
    assert_dense_gradients_intact(model, reference)
    # And the next optimizer, torch's own, trains it like the untouched copy.
    steps = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, reference)]
    for step in steps:
        step.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("sampled_grad", [False, True])
def test_close_and_with_remove_every_hook_once_and_for_all(sampled_grad):
    model = tiny_llama()
    with LiftAdamW(model, cfg(sampled_grad=sampled_grad), lr=1e-2) as opt:
        loss_of(model).backward()
        opt.step()
        opt.zero_grad()
        assert not opt.closed
    assert opt.closed
    opt.close()  # idempotent
    reference = copy.deepcopy(model)
    assert_dense_gradients_intact(model, reference)
    with pytest.raises(RuntimeError, match="was closed and receives no gradients"):
        opt.step()


def test_tied_weights_are_one_target_stepped_once():
    model = tiny_llama(tie_word_embeddings=True)
    reference = copy.deepcopy(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    dense = LiftConfig(rank=None, density=1.0, update_interval=None, target_modules=["lm_head", "embed_tokens"])
    opt = LiftAdamW(model, dense, lr=1e-3)
    assert opt.target_names == ["model.embed_tokens.weight"]  # the first name, as named_parameters() gives it
    assert list(find_targets(model, ["lm_head"])) == ["model.embed_tokens.weight"]
    for n, p in reference.named_parameters():
        p.requires_grad_(n == "model.embed_tokens.weight")
    ref_opt = torch.optim.AdamW([reference.model.embed_tokens.weight], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            loss_of(m).backward()
            o.step()
    torch.testing.assert_close(model.lm_head.weight, reference.lm_head.weight, rtol=1e-6, atol=0)


def test_refresh_and_load_state_dict_refuse_pending_gradients():
    model = tiny_llama()
    opt = LiftAdamW(model, cfg(), lr=1e-2)
    saved = copy.deepcopy(opt.state_dict())
    before = {n: opt.indices(n) for n in opt.target_names}
    loss_of(model).backward()
    assert opt.gradients_pending
    for call in (opt.refresh, lambda: opt.load_state_dict(saved)):
        with pytest.raises(RuntimeError, match=r"gathered gradients pending .* call step\(\) or zero_grad\(\) first"):
            call()
    assert all(torch.equal(opt.indices(n), idx) for n, idx in before.items())
    opt.zero_grad()
    opt.refresh()
    opt.load_state_dict(saved)


@pytest.mark.parametrize("max_grad_norm", [0, 0.0])
def test_max_grad_norm_zero_means_no_clipping(max_grad_norm):
    runs = []
    for norm in (max_grad_norm, None):
        model = tiny_llama()
        opt = LiftAdamW(model, cfg(), lr=1e-2, max_grad_norm=norm)
        assert opt.max_grad_norm is None
        for _ in range(2):
            loss_of(model).backward()
            opt.step()
            opt.zero_grad()
        runs.append(model)
    for (name, p), q in zip(runs[0].named_parameters(), runs[1].parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("sampled_grad", [False, True])
def test_a_failed_construction_leaves_the_model_as_it_was(sampled_grad):
    model = tiny_llama()
    last = list(find_targets(model))[-1]
    with torch.no_grad():
        model.get_parameter(last)[0, 0] = math.nan
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=f"target {last} holds non-finite values"):
        LiftAdamW(model, cfg(sampled_grad=sampled_grad), lr=1e-2)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        model.get_parameter(last)[0, 0] = 0.0
    assert_dense_gradients_intact(model, copy.deepcopy(model))


def test_parameters_on_several_devices_are_refused_at_construction():
    model = tiny_llama()
    model.model.layers[1].mlp.down_proj.to("meta")  # a second device, as a device_map over two GPUs would give
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="trains parameters on one device, but model.layers.0.self_attn.q_proj.weight "
                                         "is on cpu and model.layers.1.mlp.down_proj.weight on meta"):
        LiftAdamW(model, cfg(), lr=1e-2)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
