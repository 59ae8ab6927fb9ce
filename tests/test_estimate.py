"""`liftft estimate`: its exact parts against real optimizers, `liftft bench` and the collectives; its estimated
parts against hand computations."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from liftft.utils import distributed
from liftft.planning.activations import activation_bytes, logits_bytes
from liftft.planning.bench import build_model
from liftft.cli import main
from liftft.engine.config import LiftConfig
from liftft.planning.estimate import GIB, estimate
from liftft.engine.methods import METHODS, SPARSE_SELECTORS, setup_method
from liftft.planning.shapes import MODEL_CONFIGS, model_config
from liftft.engine.target_state import HOST_STATE
from liftft.engine.targets import find_targets

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank", "ignore::FutureWarning")

ESTIMATE_DOC = Path(__file__).resolve().parents[1] / "docs" / "estimate.md"


def llama_parameters(shape: dict) -> int:
    """A Llama's parameter count from its shape: attention, MLP and two norms per layer, embeddings, head, norm."""
    h, f, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    layers = shape["num_hidden_layers"]
    d = shape.get("head_dim", h // shape["num_attention_heads"])
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    layer = 2 * h * q + 2 * h * kv + 3 * h * f + 2 * h
    return layers * layer + vocab * h * (1 if shape.get("tie_word_embeddings") else 2) + h


def state_bytes(optimizer, host: bool | None = None) -> int:
    """Bytes of every tensor in ``optimizer``'s state; with ``host``, only LiftAdamW's host (or device) part."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for key, t in state.items()
               if torch.is_tensor(t) and (host is None or (key in HOST_STATE) == host))


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def backward_on_random_tokens(model, vocab: int) -> None:
    ids = torch.randint(vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()


# ----------------------------------------------------------------- presets


@pytest.mark.parametrize("name,published", [("llama-1b", 1_235_814_400), ("llama-8b", 8_030_261_248),
                                            ("llama-70b", 70_553_706_496)])
def test_presets_have_their_models_parameter_counts(name, published):
    e = estimate(model_config(name), "lift", gradient_checkpointing=True)
    assert e.parameters == published == llama_parameters(MODEL_CONFIGS[name])
    assert e.memory["weights"] == 2 * published  # bf16


def test_llama_8b_lift_rank_128_trains_lora_parity():
    config = model_config("llama-8b")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_key_value_heads,
            config.head_dim, config.vocab_size, config.tie_word_embeddings) == (4096, 14336, 32, 8, 128, 128256, False)
    # Per layer: q, o (4096x4096), k, v (1024x4096), gate, up (14336x4096), down (4096x14336).
    per_layer = 2 * (4096 + 4096) + 2 * (1024 + 4096) + 3 * (14336 + 4096)
    assert estimate(config, "lift").trainable == 32 * 128 * per_layer == 335_544_320
    assert estimate(config, "lora").trainable == 32 * 128 * per_layer


# ----------------------------------------------------------------- exact parts against real optimizers


@pytest.mark.parametrize("method,name,dtype,budget,bias_correction", [
    ("lift", "tiny", "float32", dict(rank=2), "matrix"),
    ("lift", "tiny", "bfloat16", dict(density=0.1), "entry"),
    ("lift", "h256", "float32", dict(rank=16), "entry"),
    ("lift", "h256", "bfloat16", dict(rank=128), "matrix"),
    ("random", "h256", "bfloat16", dict(rank=8), "matrix"),
    ("s2ft", "tiny", "float32", dict(rank=4), "matrix"),  # whole channels, at least one: not the budget
    ("s2ft", "h256", "bfloat16", dict(density=0.05), "matrix"),
    ("gradient", "tiny", "bfloat16", dict(rank=2), "entry"),
    ("gradient", "h256", "float32", dict(density=0.1), "matrix"),
])
def test_sparse_state_weights_and_host_record_equal_a_real_lift_adamw(method, name, dtype, budget, bias_correction):
    model = build_model(model_config(name), getattr(torch, dtype), torch.device("cpu"))
    cfg = LiftConfig(**{"rank": None, **budget}, filter_rank=4, update_interval=None, bias_correction=bias_correction)
    scores = {target: torch.rand(weight.shape, generator=torch.Generator().manual_seed(i))
              for i, (target, weight) in enumerate(find_targets(model, "all-linear").items())}
    optimizer = setup_method(model, method, cfg, scores=scores if method == "gradient" else None).optimizer
    e = estimate(model_config(name), method, dtype=dtype, bias_correction=bias_correction, **budget)
    assert e.trainable == optimizer.num_selected
    assert e.memory["optimizer_state"] == state_bytes(optimizer, host=False)
    assert e.host_bytes == state_bytes(optimizer, host=True)
    assert e.memory["weights"] == param_bytes(model)
    assert e.bytes_per_trained_entry == pytest.approx(state_bytes(optimizer, host=False) / optimizer.num_selected)
    assert e.memory["gradients"] == 4 * optimizer.num_selected  # the gathered fp32 buffers
    assert estimate(model_config(name), "lift", dtype=dtype, step_in_backward=True, **budget).memory["gradients"] == 0


@pytest.mark.parametrize("method", ["full", "lora", "dora", "pissa"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_and_peft_weights_gradients_and_adamw_state_equal_real_ones(method, dtype):
    # liftft train keeps full fine-tuning's weights in fp32 under bf16 autocast, the others' in bf16.
    weights = torch.float32 if method == "full" else getattr(torch, dtype)
    setup = setup_method(build_model(model_config("tiny"), weights, torch.device("cpu")), method, LiftConfig(rank=2))
    backward_on_random_tokens(setup.model, 1024)
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in setup.model.parameters() if p.grad is not None)
    setup.optimizer.step()
    e = estimate(model_config("tiny"), method, rank=2, dtype=dtype)
    assert e.trainable == setup.trainable
    assert e.memory["weights"] == param_bytes(setup.model)
    assert e.memory["gradients"] == gradients
    assert e.memory["optimizer_state"] == state_bytes(setup.optimizer)


def test_the_trained_counts_and_state_equal_what_liftft_bench_reports(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model-config", "tiny", "--methods", "full,lora,lift", "--batch-size", "1", "--seq-len",
                 "8", "--steps", "1", "--warmup", "0", "--rank", "2", "--filter-rank", "4", "--device", "cpu",
                 "--no-selection-timings", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for method, figures in report["methods"].items():
        e = estimate(model_config("tiny"), method, rank=2, dtype="float32")
        assert e.trainable == figures["trainable"], method
        assert e.parameters == report["model"]["parameters"]
    lift = estimate(model_config("tiny"), "lift", rank=2, dtype="float32")
    assert lift.bytes_per_trained_entry == pytest.approx(report["methods"]["lift"]["state_bytes_per_entry"], rel=1e-12)


# ----------------------------------------------------------------- communication


@pytest.fixture
def two_ranks_pretended(monkeypatch):
    """A real one-process gloo group in which liftft believes it is one of two ranks; yields the bytes each
    all-reduce was handed."""
    sent = []
    real_all_reduce = dist.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return real_all_reduce(tensor, *args, **kwargs)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    try:
        yield sent
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["lift", "full", "lora"])
def test_bytes_communicated_per_step_are_what_the_training_loop_all_reduces(method, two_ranks_pretended, tmp_path,
                                                                             monkeypatch):
    from liftft.training.loop import TrainingLoop
    from liftft.training.train import TrainArgs

    args = TrainArgs(model="unused", data=["unused"], output=str(tmp_path), method=method, epochs=None, max_steps=1,
                     batch_size=2, grad_accum=1, lift=LiftConfig(rank=2, filter_rank=4, update_interval=None))
    model = build_model(model_config("tiny"), torch.float32, torch.device("cpu"))
    setup = setup_method(model, method, args.lift_config(), max_grad_norm=args.max_grad_norm)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    examples = [{"input_ids": list(range(5, 15)), "labels": list(range(5, 15))}] * 2
    loop = TrainingLoop(args, setup.model, setup, examples, 0, torch.device("cpu"), bf16=False)
    loop.train_step([examples])
    e = estimate(model_config("tiny"), method, gpus=2, rank=2, dtype="float32")
    assert sum(e.communication.values()) == sum(two_ranks_pretended) > 0
    assert e.link_bytes == sum(two_ranks_pretended)  # a ring all-reduce over 2 GPUs moves 2 * 1/2 of the tensor


def test_one_gpu_communicates_nothing():
    e = estimate(model_config("tiny"), "lift", rank=2)
    assert (e.communication, e.link_bytes, e.refresh_bytes) == ({}, 0, 0)


# Tiny preset, per layer: q, o 64x64; k, v 32x64; gate, up 176x64; down 64x176; two norms of 64.
TINY_TARGETS = [(64, 64), (32, 64), (32, 64), (64, 64), (176, 64), (176, 64), (64, 176)]
TINY_LAYER = sum(m * n for m, n in TINY_TARGETS) + 2 * 64
TINY_ROOT = 2 * 1024 * 64 + 64  # embeddings, head, final norm


def test_fsdp2_shards_weights_and_state_and_communicates_by_hand():
    config = model_config("tiny")
    whole = estimate(config, "lift", rank=2)
    e = estimate(config, "lift", gpus=4, fsdp=True, rank=2)
    assert e.memory["weights"] * 4 == whole.memory["weights"]  # every row count of tiny divides by 4
    # Rank 0 holds a quarter of each matrix's rows and of its k = (m + n) * 2 entries: an int16 column and two fp32
    # moments and an fp32 master (bf16 weights) per entry, int32 row offsets.
    per_layer = sum((m // 4 + 1) * 4 + (m + n) * 2 // 4 * (2 + 4 + 4 + 4) for m, n in TINY_TARGETS)
    assert e.memory["optimizer_state"] == 2 * per_layer
    assert e.memory["gradients"] * 4 == whole.memory["gradients"]
    assert e.communication == {
        "all-gather parameters (bf16)": 2 * (2 * 2 * TINY_LAYER + TINY_ROOT),  # layers twice, the root once
        "reduce-scatter gradients (fp32)": 4 * 2 * sum(m * n for m, n in TINY_TARGETS),  # the targets' dense grads
        "all-reduce loop totals (fp64)": 24,
    }
    assert e.link_bytes == round(3 / 4 * (e.communication["all-gather parameters (bf16)"]
                                          + e.communication["reduce-scatter gradients (fp32)"]) + 2 * 3 / 4 * 24)


def test_fsdp2_full_fine_tuning_shards_fp32_weights_gradients_and_adamw_state():
    config = model_config("tiny")
    whole, e = estimate(config, "full"), estimate(config, "full", gpus=4, fsdp=True)
    n = whole.parameters
    assert (whole.memory["weights"], e.memory["weights"]) == (4 * n, n)
    tensors = 2 * 9 + 3  # per layer 7 linears and 2 norms; embeddings, head, final norm
    assert e.memory["optimizer_state"] == 8 * n // 4 + 4 * tensors
    assert e.memory["gradients"] == n


# ----------------------------------------------------------------- estimated parts, by hand


def test_activations_of_a_llama_8b_layer_by_hand():
    config = model_config("llama-8b")
    norm = 4 * 4096 + 2 * 4096 * 2  # fp32 input copy; output before and after the weight, bf16
    layer = (2 * norm + 3 * 32 * 128 * 2 + 3 * 8 * 128 * 2 + 8 * 128 * 2  # q, k (3 copies each), v
             + 32 * 128 * 2 + 4 * 32 + 4 * 14336 * 2)  # attention output, log-sum-exp, MLP
    assert layer == 221_312
    assert activation_bytes(config, 2048, False, 2) == 2048 * (32 * layer + norm)
    assert activation_bytes(config, 2048, True, 2) == 2048 * (32 * 4096 * 2 + layer + norm)


def test_logits_by_hand():
    assert logits_bytes(128256, 2048, "chunked", 2) == 256 * 128256 * (4 + 2)
    assert logits_bytes(128256, 100, "chunked", 4) == 100 * 128256 * 4
    assert logits_bytes(128256, 2048, "full", 2) == 3 * 4 * 2048 * 128256


def test_the_total_is_the_sum_of_the_parts_and_fits_compares_it_with_80_gb():
    e = estimate(model_config("llama-8b"), "full", gradient_checkpointing=True)
    assert e.total == sum(e.memory.values()) and not e.fits() and e.fits(e.total)
    assert estimate(model_config("llama-8b"), "lift", gradient_checkpointing=True).fits()


# ----------------------------------------------------------------- CLI


def test_cli_prints_the_table_and_writes_the_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["estimate", "--model-config", "tiny", "--rank", "2", "--gpus", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    e = estimate(model_config("tiny"), "lift", gpus=2, rank=2)
    assert figures == json.loads(json.dumps({"model": "tiny", **e.to_dict()}))
    assert f"{e.total / GIB:9.2f}  fits an 80 GB GPU" in printed
    assert f"{e.bytes_per_trained_entry:.2f} bytes per trained entry" in printed
    assert "all-reduce gradients (fp32)" in printed
    assert main(["estimate", "--model-config", "tiny", "--rank", "2", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable"] == estimate(model_config("tiny"), rank=2).trainable


@pytest.mark.parametrize("method", METHODS)
def test_cli_plans_every_method_liftft_train_offers(method, capsys):
    assert main(["estimate", "--model-config", "tiny", "--method", method, "--rank", "2", "--gpus", "2",
                 "--json", "-"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["trainable"] == estimate(model_config("tiny"), method, gpus=2, rank=2).trainable
    # Only the refreshing sparse methods broadcast a new selection; gradient selects once.
    refreshes = method in SPARSE_SELECTORS and method != "gradient"
    assert (figures["refresh_bytes"] > 0) == refreshes


def test_cli_reads_a_local_model_directory_offline(base_dir, capsys):
    from liftft.utils.hf import load_config

    assert main(["estimate", "--model", str(base_dir), "--method", "lora", "--rank", "2", "--seq-len", "128",
                 "--json", "-"]) == 0
    expected = estimate(load_config(str(base_dir)), "lora", rank=2, seq_len=128)
    assert json.loads(capsys.readouterr().out)["total"] == expected.total


@pytest.mark.parametrize("flags,match", [
    (["--model-config", "llama-9b"], "neither a preset"),
    (["--model-config", "tiny", "--gpus", "0"], "--gpus must be an integer >= 1"),
    (["--model-config", "tiny", "--method", "lora", "--density", "0.1"], "density has no meaning for lora"),
    (["--model-config", "tiny", "--gpus", "2", "--step-in-backward"], "--step-in-backward runs in one process"),
    (["--model-config", "tiny", "--method", "full", "--step-in-backward"], "for the sparse methods"),
    (["--model-config", "tiny", "--seq-len", "5000"], "--seq-len 5000 exceeds the model's 4096 positions"),
    (["--model-config", "tiny", "--json", "/nonexistent/dir/plan.json"], "does not exist"),
])
def test_bad_input_is_named(flags, match, capsys):
    assert main(["estimate", *flags]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("flags,match", [
    ([], "one of the arguments --model --model-config is required"),
    (["--model", "m", "--model-config", "tiny"], "not allowed with argument"),
    (["--model-config", "tiny", "--rank", "2", "--density", "0.1"], "not allowed with argument"),
    (["--model-config", "tiny", "--method", "adam"], "invalid choice: 'adam'"),
])
def test_contradicting_flags_are_refused_by_the_parser(flags, match, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["estimate", *flags])
    assert exit_.value.code == 2 and match in capsys.readouterr().err


def test_a_config_that_is_not_a_causal_lm_is_named(tmp_path, capsys):
    from transformers import ViTConfig

    ViTConfig().save_pretrained(tmp_path)
    assert main(["estimate", "--model-config", str(tmp_path / "config.json")]) == 2
    assert "model type 'vit' is not a causal LM" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["estimate", "--model-config", str(tmp_path)]) == 2
    assert "is not a transformers model config" in capsys.readouterr().err


def test_readme_holds_the_planning_table_as_the_code_computes_it():
    from liftft.commands.estimate import planning_table

    assert planning_table() in ESTIMATE_DOC.read_text()
