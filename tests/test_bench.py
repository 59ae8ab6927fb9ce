"""`liftft bench` smoke test (no timings asserted) and the batched selection it measures."""

import json

import pytest
import torch

from liftft.cli import main
from liftft.engine.selection import budget, select_indices, select_many, shape_groups

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank", "ignore::FutureWarning")

FIGURES = ("trainable", "step_time_s", "step_times_s", "tokens_per_s", "peak_memory_bytes", "setup_peak_memory_bytes",
           "step_cpu_time_s")


# The tiny preset's 7 linears per layer, 2 layers: hidden 64, kv 32, intermediate 176.
TINY_SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (176, 64), (176, 64), (64, 176)] * 2


def tiny_lora_parity(rank):
    """Σ (m+n)·rank over the tiny preset's targets."""
    return sum((m + n) * rank for m, n in TINY_SHAPES)


def tiny_state_bytes_per_entry(rank):
    """fp32 weights: an int16 column and fp32 exp_avg and exp_avg_sq per entry, m + 1 int32 row offsets per matrix."""
    return (10 * tiny_lora_parity(rank) + sum(4 * (m + 1) for m, _ in TINY_SHAPES)) / tiny_lora_parity(rank)


def test_bench_tiny_runs_and_writes_every_key(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model-config", "tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "2",
                 "--warmup", "1", "--rank", "2", "--filter-rank", "4", "--device", "cpu", "--output", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report) == {"settings", "environment", "model", "methods", "ratios"}
    assert report["settings"]["device"] == "cpu" and report["settings"]["dtype"] == "float32"
    assert report["settings"]["loss"] == "chunked"
    assert {"device", "torch", "transformers", "peft"} <= set(report["environment"])
    methods = report["methods"]
    assert list(methods) == ["floor", "full", "lora", "lift"]
    for name, figures in methods.items():
        assert set(FIGURES) <= set(figures), name
        assert len(figures["step_times_s"]) == 2
        assert figures["tokens_per_s"] == pytest.approx(2 * 16 / figures["step_time_s"])
        assert figures["peak_memory_bytes"] >= figures["baseline_rss_bytes"] > 0
        assert figures["loss_path"] == "chunked", name
    assert methods["floor"]["trainable"] == 0
    assert methods["full"]["trainable"] == report["model"]["parameters"]
    assert methods["lift"]["trainable"] == methods["lora"]["trainable"] == tiny_lora_parity(2)
    lift = methods["lift"]
    assert {"selection_init_s", "selection_refresh_s", "state_bytes_per_entry"} <= set(lift)
    # fp32 weights keep no master copy.
    assert lift["state_bytes_per_entry"] == pytest.approx(tiny_state_bytes_per_entry(2), rel=1e-12)
    assert lift["selection"]["matrices"] == 14
    assert {"randomized_batched_s", "randomized_unbatched_s", "exact_batched_s", "exact_unbatched_s"} <= set(lift["selection"])
    assert set(report["ratios"]) == {"lift/full", "lift/lora", "lift/floor"}
    assert report["ratios"]["lift/full"]["tokens_per_s"] == pytest.approx(lift["tokens_per_s"] / methods["full"]["tokens_per_s"])
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "lift/lora" in printed


def test_a_rank_that_trains_matrices_whole_is_named_under_the_table(capsys):
    assert main(["bench", "--methods", "lora,lift", "--batch-size", "1", "--seq-len", "8", "--timed-steps", "1",
                 "--warmup", "0", "--rank", "40", "--filter-rank", "4", "--device", "cpu",
                 "--no-selection-timings"]) == 0
    printed = capsys.readouterr().out
    lift = sum(min((m + n) * 40, m * n) for m, n in TINY_SHAPES)
    assert f"lift trains {lift:,} values against LoRA's {tiny_lora_parity(40):,}" in printed
    assert "matrices: randomized" not in printed  # --no-selection-timings


def test_bench_runs_the_lift_variants(tmp_path):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model-config", "tiny", "--batch-size", "1", "--seq-len", "8", "--steps", "1",
                 "--warmup", "1", "--rank", "2", "--filter-rank", "4", "--device", "cpu", "--output", str(out),
                 "--methods", "lift-sampled,lift-in-backward", "--loss", "full"])
    assert code == 0
    methods = json.loads(out.read_text())["methods"]
    assert list(methods) == ["lift-sampled", "lift-in-backward"]
    for name, figures in methods.items():
        assert figures["loss_path"] == "full", name
        assert figures["trainable"] == tiny_lora_parity(2), name
        assert figures["state_bytes_per_entry"] == pytest.approx(tiny_state_bytes_per_entry(2), rel=1e-12), name


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--methods", "floor,adam"], "unknown method 'adam'"),
        (["--steps", "0"], "--steps must be an integer >= 1"),
        (["--model-config", "/nonexistent/config.json"], "neither a preset"),
        (["--output", "/nonexistent/dir/out.json"], "does not exist"),
        (["--seq-len", "5000"], "--seq-len 5000 exceeds the model's 4096 positions"),
        (["--device", "cuda:x"], "--device 'cuda:x' is not a device"),
    ],
)
def test_bad_flags_fail_before_any_work(flags, match, capsys):
    args = ["bench", "--model-config", "tiny", "--device", "cpu"]
    args += flags
    assert main(args) == 2
    assert match in capsys.readouterr().err


def test_model_config_reads_a_config_file(tmp_path):
    from transformers import LlamaConfig

    from liftft.planning.bench import model_config

    LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path)
    for path in (tmp_path, tmp_path / "config.json"):
        config = model_config(str(path))
        assert (config.hidden_size, config.num_hidden_layers) == (48, 1)
    assert model_config("llama-1b").num_hidden_layers == 16 and model_config("llama-3b").hidden_size == 3072


# ----------------------------------------------------- batched selection


def mixed_weights():
    gen = torch.Generator().manual_seed(0)
    shapes = [(48, 32)] * 5 + [(32, 48)] * 3 + [(48, 32)]
    weights = [torch.randn(*shape, generator=gen) for shape in shapes]
    weights[-1] = weights[-1].bfloat16()
    return weights


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("selector", ["principal", "principal-smallest", "magnitude"])
@pytest.mark.parametrize("max_group_numel", [2**26, 2 * 48 * 32, 1])
def test_select_many_equals_select_indices_one_by_one(svd, selector, max_group_numel):
    weights = mixed_weights()
    ks = [budget(tuple(w.shape), rank=3) for w in weights]
    seeds = [11 * i + 1 for i in range(len(weights))]
    got = select_many(weights, ks, selector, filter_rank=6, svd=svd, seeds=seeds, max_group_numel=max_group_numel)
    for w, k, seed, idx in zip(weights, ks, seeds, got):
        assert torch.equal(idx, select_indices(w, k, selector, filter_rank=6, svd=svd, seed=seed))


def test_select_many_scores_prepared_weights():
    weights = mixed_weights()[:3]
    doubled_then_negated = select_many(weights, 40, prepare=lambda w: -2 * w, filter_rank=4)
    plain = select_many(weights, 40, filter_rank=4)
    assert all(torch.equal(a, b) for a, b in zip(doubled_then_negated, plain))
    flipped = select_many(weights, 40, prepare=lambda w: w.flip(0), filter_rank=4)
    assert not torch.equal(flipped[0], plain[0])
    assert torch.equal(flipped[0], select_indices(weights[0].flip(0), 40, filter_rank=4))


def test_groups_share_a_shape_and_stay_within_the_bound():
    weights = [torch.zeros(4, 8)] * 5 + [torch.zeros(8, 4)] * 2 + [torch.zeros(4, 8)]
    assert shape_groups(weights, 2 * 32) == [[0, 1], [2, 3], [4, 7], [5, 6]]
    assert shape_groups(weights, 1) == [[i] for i in (0, 1, 2, 3, 4, 7, 5, 6)]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(ks=[5, 5]), "ks has 2 values for 3 matrices"),
        (dict(seeds=[1]), "seeds has 1 values for 3 matrices"),
        (dict(ks=10**6), "k must be an integer in"),
        (dict(max_group_numel=0), "max_group_numel must be"),
        (dict(selector="largest"), "unknown selector"),
    ],
)
def test_select_many_rejects_bad_arguments(kwargs, match):
    args = dict(weights=mixed_weights()[:3], ks=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        select_many(**args)
