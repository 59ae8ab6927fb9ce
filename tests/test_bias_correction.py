"""LiftConfig(bias_correction="entry"): every entry is bias-corrected from its own selection, as a fresh AdamW."""

import io
import math

import pytest
import torch
from conftest import Square
from liftft import LiftAdamW
from liftft import LiftConfig
from liftft.engine.target_state import TRACKED_REFRESHES, carried_state, fresh_state

LR, BETAS = 1e-2, (0.9, 0.999)
GRAD = torch.linspace(-1.0, 1.0, 16).view(4, 4) + 0.05  # a constant gradient, no entry zero


def constant_gradient_steps(model, opt, steps):
    for _ in range(steps):
        (model.proj.weight * GRAD).sum().backward()
        opt.step()
        opt.zero_grad()


def fresh_adamw(start: torch.Tensor, grad: torch.Tensor, steps: int) -> torch.Tensor:
    """What torch.optim.AdamW makes of ``start`` in ``steps`` steps of gradient ``grad``."""
    p = start.clone().requires_grad_(True)
    opt = torch.optim.AdamW([p], lr=LR, betas=BETAS, weight_decay=0.0)
    for _ in range(steps):
        p.grad = grad.clone()
        opt.step()
    return p.detach()


def adam_distance(first_step: int, steps: int) -> float:
    """How far, in units of lr, Adam moves an entry under a constant gradient from zero moments (eps ignored),
    bias-correcting its t-th update with step count first_step + t - 1."""
    b1, b2 = BETAS
    m = v = distance = 0.0
    for t in range(steps):
        m, v = b1 * m + (1 - b1), b2 * v + (1 - b2)
        step = first_step + t
        distance += (m / (1 - b1**step)) / math.sqrt(v / (1 - b2**step))
    return distance


def train_across_a_refresh(bias_correction):
    """5 steps, a refresh that swaps 2 of 4 selected entries, 3 steps; returns (model, weights at the refresh)."""
    w = torch.full((4, 4), 0.1)
    w.view(-1)[[0, 5, 10, 15]] = torch.tensor([9.0, 8.0, 7.0, 6.0])
    model = Square(w)
    cfg = LiftConfig(rank=None, density=0.25, selector="magnitude", update_interval=None, bias_correction=bias_correction)
    opt = LiftAdamW(model, cfg, lr=LR, betas=BETAS)
    constant_gradient_steps(model, opt, 5)
    with torch.no_grad():
        model.proj.weight.view(-1)[[3, 12]] = 9.5  # come in
        model.proj.weight.view(-1)[[10, 15]] = 0.0  # drop out
    at_refresh = model.proj.weight.detach().clone().view(-1)
    opt.refresh()
    assert opt.indices("proj.weight").tolist() == [0, 3, 5, 12]
    constant_gradient_steps(model, opt, 3)
    return model, opt, at_refresh


def test_new_entries_step_like_a_fresh_adamw_and_kept_ones_like_one_from_the_start():
    model, opt, at_refresh = train_across_a_refresh("entry")
    weight, grad = model.proj.weight.detach().view(-1), GRAD.view(-1)
    new, kept = [3, 12], [0, 5]
    torch.testing.assert_close(weight[new], fresh_adamw(at_refresh[new], grad[new], 3), rtol=1e-6, atol=0)
    initial = torch.tensor([9.0, 8.0])
    torch.testing.assert_close(weight[kept], fresh_adamw(initial, grad[kept], 8), rtol=1e-6, atol=0)
    state = opt.state_of("proj.weight")
    assert state["selected_ago"].dtype == torch.uint8 and state["selected_ago"].tolist() == [0, 1, 0, 1]
    assert state["refresh_steps"].tolist() == [5]


def test_the_default_keeps_the_papers_matrix_step_count():
    model, opt, at_refresh = train_across_a_refresh("matrix")
    new, grad = [3, 12], GRAD.view(-1)
    moved = model.proj.weight.detach().view(-1)[new] - at_refresh[new]
    fresh_moved = fresh_adamw(at_refresh[new], grad[new], 3) - at_refresh[new]
    # Under the matrix's step count (6 to 8 for the new entries' steps 1 to 3) they move this much less far.
    expected = adam_distance(first_step=6, steps=3) / adam_distance(first_step=1, steps=3)
    torch.testing.assert_close(moved / fresh_moved, torch.full((2,), expected), rtol=1e-3, atol=0)
    assert "selected_ago" not in opt.state_of("proj.weight")


def test_ages_count_refreshes_and_fall_back_to_the_matrix_count_past_255():
    cfg = LiftConfig(rank=None, density=1.0, bias_correction="entry")
    p = torch.zeros(1, 4)
    old = fresh_state(p, torch.tensor([0, 1, 2]), cfg)
    old["selected_ago"] = torch.tensor([0, TRACKED_REFRESHES - 1, TRACKED_REFRESHES], dtype=torch.uint8)
    old["refresh_steps"] = torch.arange(TRACKED_REFRESHES, dtype=torch.int64)
    old["step"] = torch.tensor(300.0)
    new = carried_state(old, p, torch.tensor([0, 1, 2, 3]), cfg)
    assert new["selected_ago"].tolist() == [0, TRACKED_REFRESHES, 0, 1]
    assert new["refresh_steps"].numel() == TRACKED_REFRESHES and new["refresh_steps"][-1].item() == 300


def test_state_dict_round_trip_keeps_the_ages():
    model, opt, _ = train_across_a_refresh("entry")
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = LiftAdamW(Square(torch.eye(4)), opt.cfg, lr=LR, betas=BETAS)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for key in ("selected_ago", "refresh_steps"):
        got, want = fresh.state_of("proj.weight")[key], opt.state_of("proj.weight")[key]
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_config_refuses_an_unknown_bias_correction():
    with pytest.raises(ValueError, match="unknown bias_correction 'entries'; allowed: matrix, entry"):
        LiftConfig(bias_correction="entries")
