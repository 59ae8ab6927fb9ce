"""Sampled weight gradients (LiftConfig(sampled_grad=True)) against the dense gradient and dense training."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_llama
from liftft import LiftAdamW
from liftft import LiftConfig
from liftft.engine.sampled import SampledLinearFunction, sample_weight_gradients, sampled_weight_grad

BATCH = torch.randint(3, 512, (4, 12), generator=torch.Generator().manual_seed(0))


def random_indices(m, n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(m * n, generator=gen)[:k].sort().values.to(torch.int32)


def dense_weight_grad_fp64(grad_output, inputs, m, n):
    """Σ_t dY[t, i]·X[t, j] for every (i, j), in float64: the independent reference."""
    return torch.einsum("ti,tj->ij", grad_output.reshape(-1, m).double(), inputs.reshape(-1, n).double())


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (1, 7)])
def test_equals_dense_gradient_at_selected_entries_fp32(shape):
    m, n = shape
    gen = torch.Generator().manual_seed(1)
    dy, x = torch.randn(3, 9, m, generator=gen), torch.randn(3, 9, n, generator=gen)
    idx = random_indices(m, n, max(1, m * n // 5))
    want = dense_weight_grad_fp64(dy, x, m, n).view(-1)[idx.long()]
    got = sampled_weight_grad(dy, x, idx, (m, n))
    assert got.dtype == torch.float32 and got.shape == idx.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_match_the_dense_bf16_gradient_within_bf16_tolerance():
    m, n = 64, 48
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 50, n, generator=gen).bfloat16()
    weight = torch.randn(m, n, generator=gen).bfloat16().requires_grad_()
    dy = torch.randn(2, 50, m, generator=gen).bfloat16()
    F.linear(x, weight).backward(dy)
    idx = random_indices(m, n, 700)
    got = sampled_weight_grad(dy, x, idx, (m, n))
    # Widened exactly and summed in fp32: close to the float64 truth, and to bf16 autograd within bf16 rounding.
    torch.testing.assert_close(got.double(), dense_weight_grad_fp64(dy, x, m, n).view(-1)[idx.long()], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.bfloat16(), weight.grad.view(-1)[idx.long()], rtol=1.6e-2, atol=2e-2)


def test_function_passes_input_and_bias_gradients_and_hands_dy_and_x_over():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, generator=gen, requires_grad=True)
    weight = torch.randn(4, 6, generator=gen, requires_grad=True)
    bias = torch.randn(4, generator=gen, requires_grad=True)
    received = []
    out = SampledLinearFunction.apply(x, weight, bias, lambda dy, inp: received.append((dy, inp)))
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=0, atol=0)
    dy = torch.randn(2, 5, 4, generator=gen)
    out.backward(dy)
    x_ref, w_ref, b_ref = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    F.linear(x_ref, w_ref, b_ref).backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bias.grad, b_ref.grad)
    assert weight.grad is None
    (dy_seen, x_seen), = received
    assert torch.equal(dy_seen, dy) and torch.equal(x_seen, x.detach())
    idx = random_indices(4, 6, 10)
    torch.testing.assert_close(sampled_weight_grad(dy_seen, x_seen, idx, (4, 6)), w_ref.grad.view(-1)[idx.long()])


def test_under_bf16_autocast_gradients_match_the_dense_path():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 8, 16, generator=gen, requires_grad=True)
    weight = torch.randn(12, 16, generator=gen, requires_grad=True)
    dy = torch.randn(3, 8, 12, generator=gen)
    sink = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = SampledLinearFunction.apply(x, weight, None, lambda g, inp: sink.append((g, inp)))
    out.float().backward(dy)
    x_ref, w_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(x_ref, w_ref)
    ref.float().backward(dy)
    assert out.dtype == ref.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1.6e-2, atol=2e-2)
    idx = random_indices(12, 16, 40)
    got = sampled_weight_grad(*sink[0], idx, (12, 16))
    torch.testing.assert_close(got, w_ref.grad.view(-1)[idx.long()], rtol=1.6e-2, atol=5e-2)


def train(model, cfg, steps, micro_batches=1, checkpointing=False):
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    opt = LiftAdamW(model, cfg, lr=1e-2, max_grad_norm=1.0)
    for _ in range(steps):
        opt.zero_grad()
        for ids in BATCH.chunk(micro_batches):
            model(input_ids=ids, labels=ids).loss.backward()
        assert all(model.get_parameter(n).grad is None for n in opt.target_names)
        opt.step()
    return opt


@pytest.mark.parametrize("micro_batches,checkpointing", [(1, False), (2, True)])
def test_training_with_sampled_grad_gives_the_same_weights(micro_batches, checkpointing):
    dense_model = tiny_llama()
    sampled_model = copy.deepcopy(dense_model)
    cfg = dict(rank=2, filter_rank=4, update_interval=2)
    dense = train(dense_model, LiftConfig(**cfg), 4, micro_batches, checkpointing)
    sampled = train(sampled_model, LiftConfig(sampled_grad=True, **cfg), 4, micro_batches, checkpointing)
    for name in dense.target_names:
        assert torch.equal(dense.indices(name), sampled.indices(name))
    reference = dict(dense_model.named_parameters())
    for name, p in sampled_model.named_parameters():
        torch.testing.assert_close(p, reference[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(sampled_model.parameters(), tiny_llama().parameters()))


def test_remove_hooks_gives_linears_their_own_forward_back():
    model = tiny_llama()
    opt = LiftAdamW(model, LiftConfig(rank=2, filter_rank=4, sampled_grad=True))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert "forward" in q_proj.__dict__
    opt.close()
    assert "forward" not in q_proj.__dict__
    model(input_ids=BATCH, labels=BATCH).loss.backward()
    assert q_proj.weight.grad is not None and q_proj.weight.grad.shape == q_proj.weight.shape


def test_only_plain_linear_targets_are_routed_and_nothing_changes_on_error():
    class Conv1DLike(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Conv1DLike(4, 4))
    targets = {"0.weight": model[0].weight, "1.weight": model[1].weight}
    with pytest.raises(ValueError, match="1.weight belongs to a Conv1DLike"):
        sample_weight_gradients(model, targets, lambda *a: None)
    assert "forward" not in model[0].__dict__
    model[0].forward = model[0].forward
    with pytest.raises(ValueError, match="0 already has a replaced forward"):
        sample_weight_gradients(model, {"0.weight": model[0].weight}, lambda *a: None)


def test_config_rejects_a_non_bool():
    with pytest.raises(TypeError, match="sampled_grad must be True or False"):
        LiftConfig(sampled_grad="yes")
    assert LiftConfig.from_dict(LiftConfig(sampled_grad=True).to_dict()).sampled_grad is True
