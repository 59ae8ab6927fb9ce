"""Every bad setting is refused before any work, with a message naming it."""

import re

import pytest
from torch import nn

from conftest import tiny_llama
from liftft import LiftAdamW
from liftft import LiftConfig
from liftft.engine.config import clip_norm


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(rank=8, density=0.1), ValueError, "exactly one of rank and density.*rank=8, density=0.1"),
        (dict(rank=None, density=None), ValueError, "exactly one of rank and density"),
        (dict(rank=None, density=0.0), ValueError, r"density must be in \(0, 1\], got 0.0"),
        (dict(rank=None, density=1.5), ValueError, r"density must be in \(0, 1\], got 1.5"),
        (dict(rank=None, density="0.1"), TypeError, "density must be a number"),
        (dict(rank=0), ValueError, "rank must be >= 1, got 0"),
        (dict(rank=2.5), TypeError, "rank must be an integer"),
        (dict(filter_rank=0), ValueError, "filter_rank must be >= 1, got 0"),
        (dict(update_interval=0), ValueError, "update_interval must be >= 1, got 0"),
        (dict(selector="largest"), ValueError, "unknown selector 'largest'; allowed: principal, principal-smallest"),
        (dict(svd="lanczos"), ValueError, "unknown svd 'lanczos'; allowed: exact, randomized"),
        (dict(target_modules="(unclosed"), ValueError, "target_modules '\\(unclosed' is neither a preset"),
        (dict(target_modules=[]), TypeError, "target_modules must be one of"),
    ],
)
def test_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        LiftConfig(**kwargs)


def test_config_round_trips_through_dict():
    cfg = LiftConfig(rank=None, density=0.05, target_modules=("q_proj", "v_proj"), update_interval=None)
    again = LiftConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert (again.density, again.rank, again.update_interval) == (0.05, None, None)
    assert again.target_modules == ["q_proj", "v_proj"]


def test_target_modules_matching_nothing_lists_modules():
    model = tiny_llama()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"matched no module; linear modules in this model: model.layers.0.self_attn.q_proj"):
        LiftAdamW(model, LiftConfig(rank=1, target_modules=["query_proj"]))
    assert before == {n: p.requires_grad for n, p in model.named_parameters()}


def test_exclusions_that_remove_everything():
    with pytest.raises(ValueError, match="matched no module"):
        LiftAdamW(tiny_llama(), LiftConfig(rank=1, target_modules="mlp", exclude_modules=r".*mlp.*"))


def test_non_2d_target_rejected():
    with pytest.raises(ValueError, match=r"target model.layers.0.input_layernorm.weight is not 2-D \(shape \(32,\)\)"):
        LiftAdamW(tiny_llama(), LiftConfig(rank=1, target_modules=["input_layernorm"]))


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(lr=-1.0), "lr must be"), (dict(betas=(0.9, 1.0)), "betas"), (dict(max_grad_norm=-1.0), "max_grad_norm")],
)
def test_bad_optimizer_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LiftAdamW(tiny_llama(), LiftConfig(rank=1), **kwargs)


def test_cfg_must_be_a_config():
    with pytest.raises(TypeError, match="cfg must be a LiftConfig, got dict"):
        LiftAdamW(nn.Linear(2, 2), {"rank": 1})


def test_dense_param_that_is_also_a_target():
    model = tiny_llama()
    with pytest.raises(ValueError, match="both a LIFT target and in dense_params"):
        LiftAdamW(model, LiftConfig(rank=1), dense_params=[model.model.layers[0].mlp.up_proj.weight])


@pytest.mark.parametrize("value,want", [(None, None), (0, None), (0.0, None), (2, 2.0), (0.5, 0.5)])
def test_clip_norm_reads_off_and_thresholds(value, want):
    got = clip_norm(value)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize(
    "value,error",
    [(-1.0, ValueError), (-0.5, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
     (float("-inf"), ValueError), (True, TypeError), (False, TypeError), ("1.0", TypeError), ([1.0], TypeError)],
)
def test_clip_norm_refuses_naming_the_value(value, error):
    with pytest.raises(error, match=f"max_grad_norm .*got {re.escape(repr(value))}$"):
        clip_norm(value)
