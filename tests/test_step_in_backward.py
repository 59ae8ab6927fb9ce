"""LiftAdamW(step_in_backward=True) against the ordinary gather-then-step path."""

import copy

import pytest
import torch

from conftest import tiny_llama
from liftft import LiftAdamW
from liftft import LiftConfig
from liftft.utils import distributed

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")


def batch(step):
    return torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(step))


def train(model, opt, steps=5):
    for step in range(steps):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sampled_grad", [False, True])
def test_equals_the_ordinary_path_bit_for_bit(dtype, sampled_grad):
    """Same weights and state after steps with a refresh, weight decay, 16-bit masters and dense params."""
    cfg = LiftConfig(rank=2, filter_rank=4, update_interval=2, sampled_grad=sampled_grad)
    base = tiny_llama(dtype=dtype)
    models = {mode: copy.deepcopy(base) for mode in (False, True)}
    opts = {
        mode: LiftAdamW(model, cfg, lr=1e-2, weight_decay=0.1, step_in_backward=mode,
                        dense_params=[p for n, p in model.named_parameters() if "norm" in n])
        for mode, model in models.items()
    }
    for mode in (False, True):
        train(models[mode], opts[mode])
    for (name, got), want in zip(models[True].named_parameters(), models[False].parameters()):
        assert torch.equal(got, want), name
    assert not torch.equal(models[True].model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    for got, want in zip(opts[True].state.values(), opts[False].state.values()):
        assert got.keys() == want.keys()
        for key in got:
            assert torch.equal(got[key], want[key]), key
    assert opts[True].param_groups[0]["refreshes"] == 2


def test_targets_are_updated_during_backward_and_only_dense_params_wait_for_step():
    model = tiny_llama()
    opt = LiftAdamW(model, LiftConfig(rank=2, filter_rank=4, update_interval=None), lr=1e-2, step_in_backward=True,
                    dense_params=[model.model.norm.weight])
    target = model.get_parameter(opt.target_names[0])
    before_target, before_norm = target.detach().clone(), model.model.norm.weight.detach().clone()
    ids = batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    assert not torch.equal(target, before_target)
    assert torch.equal(model.model.norm.weight, before_norm)
    assert not opt.gradients_pending  # the 4 bytes per entry this mode exists to save
    opt.step()
    assert not torch.equal(model.model.norm.weight, before_norm)


def test_a_second_backward_before_step_raises_without_a_second_update():
    model = tiny_llama()
    opt = LiftAdamW(model, LiftConfig(rank=2, filter_rank=4, update_interval=None), lr=1e-2, step_in_backward=True)
    ids = batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    after_first = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="second backward pass before step"):
        model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert torch.equal(p, after_first[name]), name
    opt.step()
    model(input_ids=ids, labels=ids).loss.backward()  # fine again after step()


def test_refuses_clipping_several_processes_and_non_bool(monkeypatch):
    cfg = LiftConfig(rank=2, filter_rank=4)
    with pytest.raises(ValueError, match=r"cannot clip \(max_grad_norm=1.0\)"):
        LiftAdamW(tiny_llama(), cfg, max_grad_norm=1.0, step_in_backward=True)
    with pytest.raises(TypeError, match="step_in_backward must be True or False, got 'yes'"):
        LiftAdamW(tiny_llama(), cfg, step_in_backward="yes")
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match=r"one process only \(world size 2\)"):
        LiftAdamW(tiny_llama(), cfg, step_in_backward=True)


def test_a_clip_set_after_construction_is_refused_as_at_construction_before_any_update():
    model = tiny_llama()
    opt = LiftAdamW(model, LiftConfig(rank=2, filter_rank=4), lr=1e-2, step_in_backward=True)
    with pytest.raises(ValueError, match=r"cannot clip \(max_grad_norm=1.0\)"):
        opt.max_grad_norm = 1.0
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        opt.max_grad_norm = -1.0
    assert opt.max_grad_norm is None


def test_step_takes_a_zero_clip_set_after_construction_as_no_clipping():
    """0 means no clipping everywhere (liftft.engine.config.clip_norm), also when set on the attribute, as the Trainer does."""
    model = tiny_llama()
    opt = LiftAdamW(model, LiftConfig(rank=2, filter_rank=4), lr=1e-2, step_in_backward=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.max_grad_norm = 0.0
    ids = batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert opt.state_of(opt.target_names[0])["exp_avg"].abs().sum() > 0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
