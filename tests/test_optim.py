"""LiftAdamW against torch.optim.AdamW and hand-computed cases."""

import copy
import io

import pytest
import torch
from torch import nn

from conftest import Square, tiny_llama
from liftft import LiftAdamW
from liftft import LiftConfig

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")

BATCH = torch.randint(3, 512, (4, 12), generator=torch.Generator().manual_seed(0))


def loss_of(model, ids=BATCH):
    return model(input_ids=ids, labels=ids).loss


def dense_cfg(**kw):
    return LiftConfig(rank=None, density=1.0, update_interval=None, **kw)


def reference_adamw(model, names, **hp):
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return torch.optim.AdamW([p for n, p in model.named_parameters() if n in names], **hp)


def max_relative_error(a: nn.Module, b: nn.Module) -> float:
    pb = dict(b.named_parameters())
    return max(((p - pb[n]).abs().max() / pb[n].abs().max()).item() for n, p in a.named_parameters())


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_full_density_equals_torch_adamw(weight_decay, max_grad_norm):
    model = tiny_llama()
    ref = copy.deepcopy(model)
    hp = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    opt = LiftAdamW(model, dense_cfg(), max_grad_norm=max_grad_norm, **hp)
    ref_opt = reference_adamw(ref, set(opt.target_names), **hp)
    for _ in range(6):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
        ref_opt.zero_grad()
        loss_of(ref).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), max_grad_norm)
        ref_opt.step()
    assert max_relative_error(model, ref) < 1e-6


def test_dense_params_follow_torch_adamw():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    opt = LiftAdamW(model, dense_cfg(), lr=1e-3, dense_params=norms, max_grad_norm=0.1)
    trained = set(opt.target_names) | {n for n, p in model.named_parameters() if "norm" in n}
    ref_opt = reference_adamw(ref, trained, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(5):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
        ref_opt.zero_grad()
        loss_of(ref).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        ref_opt.step()
    assert max_relative_error(model, ref) < 1e-6
    assert model.model.norm.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad


def test_unselected_entries_bitwise_unchanged_and_no_dense_grads():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = LiftAdamW(model, LiftConfig(rank=2, filter_rank=4, update_interval=None), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss_of(model).backward()
        assert all(p.grad is None for p in model.parameters())
        opt.step()
    for n, p in model.named_parameters():
        if n in opt.target_names:
            idx = opt.indices(n).long()
            untouched = torch.ones(p.numel(), dtype=torch.bool)
            untouched[idx] = False
            assert torch.equal(p.detach().flatten()[untouched], before[n].flatten()[untouched])
            assert not torch.equal(p.detach().flatten()[idx], before[n].flatten()[idx])
        else:
            assert torch.equal(p, before[n]), n
    assert opt.num_selected == sum(opt.indices(n).numel() for n in opt.target_names)


def test_gradient_accumulation_matches_big_batch():
    cfg = LiftConfig(rank=2, filter_rank=4, update_interval=None)
    small, big = tiny_llama(), tiny_llama()
    opt_small = LiftAdamW(small, cfg, lr=1e-2)
    opt_big = LiftAdamW(big, cfg, lr=1e-2)
    for _ in range(3):
        opt_small.zero_grad()
        for row in BATCH:
            (loss_of(small, row[None]) / len(BATCH)).backward()
        opt_small.step()
        opt_big.zero_grad()
        loss_of(big).backward()
        opt_big.step()
    assert max_relative_error(small, big) < 1e-5


def test_refresh_carries_state_hand_computed():
    w = torch.tensor([[9.0, 1.0, 8.0], [2.0, 7.0, 3.0], [4.0, 5.0, 6.0]])
    model = Square(w)
    cfg = LiftConfig(rank=None, density=4 / 9, selector="magnitude", update_interval=None)
    opt = LiftAdamW(model, cfg, lr=0.5, betas=(0.5, 0.5), eps=0.0)
    assert opt.indices("proj.weight").tolist() == [0, 2, 4, 8]  # 9, 8, 7, 6
    model.proj(torch.ones(1, 3)).sum().backward()  # dL/dW = 1 everywhere
    opt.step()
    # Adam's first step moves every selected entry by exactly lr against the gradient sign.
    assert model.proj.weight.flatten().tolist() == [8.5, 1.0, 7.5, 2.0, 6.5, 3.0, 4.0, 5.0, 5.5]
    state = opt.state[model.proj.weight]
    assert state["exp_avg"].tolist() == [0.5] * 4 and state["exp_avg_sq"].tolist() == [0.5] * 4
    with torch.no_grad():
        model.proj.weight[0, 0] = 0.0  # entry 0 drops out; entry 7 (5.0) comes in
    opt.refresh()
    assert opt.indices("proj.weight").tolist() == [2, 4, 7, 8]
    state = opt.state[model.proj.weight]
    assert state["exp_avg"].tolist() == [0.5, 0.5, 0.0, 0.5]
    assert state["exp_avg_sq"].tolist() == [0.5, 0.5, 0.0, 0.5]
    assert state["step"].item() == 1
    # The dropped entry keeps its value; the next step moves kept and new entries.
    model.proj(torch.ones(1, 3)).sum().backward()
    opt.step()
    weight = model.proj.weight.flatten()
    assert weight[0].item() == 0.0
    # Kept entry: m = 0.5*0.5 + 0.5 = 0.75, v = 0.75; m̂ = 1, v̂ = 1 -> moves by lr.
    # New entry: m = 0.5, v = 0.5; m̂ = 0.5/0.75, v̂ = 0.5/0.75 -> moves by lr*sqrt(2/3).
    assert weight[2].item() == pytest.approx(7.0)
    assert weight[7].item() == pytest.approx(5.0 - 0.5 * (2 / 3) ** 0.5)


def test_refresh_happens_every_interval_of_optimizer_steps():
    model = tiny_llama()
    opt = LiftAdamW(model, LiftConfig(rank=1, filter_rank=2, update_interval=3), lr=5e-2)
    refreshes = []
    for _ in range(7):
        for _ in range(2):  # micro-batches do not count
            loss_of(model).backward()
        opt.step()
        opt.zero_grad()
        refreshes.append(opt.param_groups[0]["refreshes"])
    assert refreshes == [0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_selection_batches_same_shaped_targets_and_equals_selecting_one_by_one(svd, monkeypatch):
    from liftft.engine import selection
    from liftft.engine.selection import selection_seed

    stacks = []
    low_rank = selection.low_rank_approximation
    monkeypatch.setattr(selection, "low_rank_approximation", lambda w, *a: stacks.append(tuple(w.shape)) or low_rank(w, *a))
    model = tiny_llama()
    cfg = LiftConfig(rank=2, filter_rank=4, svd=svd, update_interval=1, seed=5)
    opt = LiftAdamW(model, cfg, lr=5e-2)
    targets = dict(model.named_parameters())

    def assert_one_by_one(refreshes):
        for ordinal, name in enumerate(opt.target_names):
            weight = targets[name].detach()
            k = selection.budget(tuple(weight.shape), rank=2)
            want = selection.select_indices(weight, k, "principal", 4, svd, selection_seed(5, ordinal, refreshes))
            assert torch.equal(opt.indices(name), want), name

    # 14 targets in 4 shapes: q/o 32x32, k/v 16x32, gate/up 64x32, down 32x64, each shape one stacked SVD.
    assert sorted(stacks) == [(2, 32, 64), (4, 16, 32), (4, 32, 32), (4, 64, 32)]
    assert_one_by_one(refreshes=0)
    loss_of(model).backward()
    opt.step()  # refreshes from the updated weights
    assert_one_by_one(refreshes=1)


def test_refresh_selects_from_master_values():
    torch.manual_seed(0)
    model = Square(torch.randn(3, 3)).to(torch.bfloat16)
    opt = LiftAdamW(model, LiftConfig(rank=None, density=1 / 3, selector="magnitude", update_interval=None))
    state = opt.state[model.proj.weight]
    old = opt.indices("proj.weight").tolist()
    # The master values are the true weights: zeroing them must drop these entries
    # even though the bf16 weight still holds their old, large values.
    state["master"] = torch.zeros(3)
    opt.refresh()
    assert not set(opt.indices("proj.weight").tolist()) & set(old)


@pytest.mark.parametrize("master", [True, False])
def test_bf16_master_weights_accumulate_sub_ulp_updates(master):
    model = Square(torch.ones(3, 3)).to(torch.bfloat16)
    cfg = LiftConfig(rank=None, density=1.0, selector="magnitude", update_interval=None, master_weights=master)
    lr = 1e-3  # Adam moves by ~lr per step: below half a bf16 ulp at 1.0 (2**-8 = 0.0039)
    opt = LiftAdamW(model, cfg, lr=lr)
    for _ in range(100):
        model.proj(torch.ones(1, 3, dtype=torch.bfloat16)).sum().backward()
        opt.step()
        opt.zero_grad()
    weight = model.proj.weight.detach().float()
    if master:
        state = opt.state[model.proj.weight]
        assert state["master"].dtype == torch.float32
        assert torch.allclose(state["master"], torch.full((9,), 1 - 100 * lr), atol=1e-5)
        assert torch.all((weight - 0.9).abs() < 2**-8)
    else:
        assert torch.equal(weight, torch.ones(3, 3))


def _round_trip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_round_trip_keeps_dtypes():
    model = tiny_llama(dtype=torch.bfloat16)
    opt = LiftAdamW(model, LiftConfig(rank=2, filter_rank=4, update_interval=2))
    for _ in range(3):
        loss_of(model).backward()
        opt.step()
        opt.zero_grad()
    fresh_opt = LiftAdamW(copy.deepcopy(model), LiftConfig(rank=2, filter_rank=4, update_interval=2))
    fresh_opt.load_state_dict(_round_trip(opt.state_dict()))
    for name in opt.target_names:
        old = opt.state[dict(model.named_parameters())[name]]
        new = fresh_opt.state_of(name)
        assert (new["columns"].dtype, new["row_offsets"].dtype) == (torch.int16, torch.int32)
        for key in ("exp_avg", "exp_avg_sq", "master"):
            assert new[key].dtype == torch.float32
            assert torch.equal(new[key], old[key])
        for key in ("columns", "row_offsets"):
            assert torch.equal(new[key], old[key])
        assert torch.equal(fresh_opt.indices(name), opt.indices(name))
    assert fresh_opt.param_groups[0]["steps"] == 3 and fresh_opt.param_groups[0]["refreshes"] == 1


def test_loads_a_state_dict_saved_with_flat_indices():
    """Checkpoints written before the indices were compressed held them flat under "indices"."""
    model = tiny_llama(dtype=torch.bfloat16)
    opt = LiftAdamW(model, LiftConfig(rank=2, filter_rank=4, update_interval=None))
    loss_of(model).backward()
    opt.step()
    saved = _round_trip(opt.state_dict())  # a copy: state_dict() shares the live state dicts
    for i, name in enumerate(opt.target_names):
        state = saved["state"][i]
        del state["columns"], state["row_offsets"]
        state["indices"] = opt.indices(name)
    fresh_opt = LiftAdamW(copy.deepcopy(model), LiftConfig(rank=2, filter_rank=4, update_interval=None))
    fresh_opt.load_state_dict(saved)
    for name in opt.target_names:
        assert torch.equal(fresh_opt.indices(name), opt.indices(name))
        old, new = opt.state[model.get_parameter(name)], fresh_opt.state_of(name)
        assert old.keys() == new.keys()
        assert all(torch.equal(old[key], new[key]) for key in old)


def test_kill_and_resume_is_bit_identical():
    cfg = LiftConfig(rank=2, filter_rank=4, update_interval=2, svd="randomized")

    def train(model, opt, steps, offset):
        for s in range(offset, offset + steps):
            ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(s))
            loss_of(model, ids).backward()
            opt.step()
            opt.zero_grad()

    straight = tiny_llama()
    opt = LiftAdamW(straight, cfg, lr=1e-2, weight_decay=0.01)
    train(straight, opt, 7, 0)

    first = tiny_llama()
    opt1 = LiftAdamW(first, cfg, lr=1e-2, weight_decay=0.01)
    train(first, opt1, 3, 0)
    saved_model = _round_trip(first.state_dict())
    saved_opt = _round_trip(opt1.state_dict())
    del first, opt1

    resumed = tiny_llama(seed=5)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    opt2 = LiftAdamW(resumed, cfg, lr=1e-2, weight_decay=0.01)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, 4, 3)
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


def test_freezes_everything_else():
    model = tiny_llama()
    opt = LiftAdamW(model, LiftConfig(rank=1, target_modules="mlp"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(opt.target_names)
    assert all(".mlp." in n for n in trainable) and len(trainable) == 6


def test_gpt2_conv1d_targets():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
    opt = LiftAdamW(model, LiftConfig(rank=1, filter_rank=4), lr=1e-2)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert opt.target_names == [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.weight",
    ]
    assert opt.indices("transformer.h.0.mlp.c_fc.weight").numel() == (32 + 128) * 1
