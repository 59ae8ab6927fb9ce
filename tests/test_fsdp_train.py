"""`liftft train --fsdp`: FSDP2 from the CLI on CPU with gloo, against unsharded runs of the same global batch.

The 2-rank run starts as two torchrun agents meeting at a c10d rendezvous, the way two nodes would; its resumption
starts under `accelerate launch` with two processes. Under FSDP2 the loss is computed from the full logits, so
the references use --loss full too.
"""

import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import math_records, tiny_llama
from liftft import apply_delta
from liftft import load_delta
from liftft.cli import main
from liftft.training.checkpoint import latest_checkpoint, load_checkpoint
from liftft.training.train import TrainArgs, run_training

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")

WORLD = 2
TIMEOUT = 240  # seconds for one launch; a hang fails the test instead of blocking the suite
# No refresh within the 2-rank run: a refresh compares scores of weights that differ from the reference's by float
# reassociation, which may flip an entry at the top-k boundary (the engine's refresh under FSDP2 is compared from
# equal weights in tests/test_distributed.py).
SETTINGS = dict(rank=2, filter_rank=4, update_interval=10, lr=2e-2, max_steps=4, warmup_ratio=0.0, save_steps=2,
                seed=7, max_seq_len=192, loss="full", device="cpu")
RELATIVE_TOLERANCE = 1e-4
# Layer 0's o_proj (32 x 32) has its rows 0-15, rank 0's shard, scaled up: every selected entry lies there, so rank 1
# holds none of that matrix's entries, in its state, its checkpoints and its part of the delta.
EMPTY_ON_RANK_1 = "model.layers.0.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory):
    """11 records: each epoch's last micro-batch has one example, so rank 1 has none and runs a placeholder."""
    path = tmp_path_factory.mktemp("odd") / "math.json"
    path.write_text(json.dumps(math_records(11)))
    return path


@pytest.fixture(scope="module")
def skewed_base(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("skewed")
    model = tiny_llama()
    with torch.no_grad():
        model.get_parameter(EMPTY_ON_RANK_1)[:16] *= 100
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@contextmanager
def single_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def train_here(base, data, out, **settings):
    args = TrainArgs.from_flat(model=str(base), data=[str(data)], output=str(out), epochs=None, progress=False,
                               **{**SETTINGS, **settings})
    run_training(args)
    return load_delta(out) if args.method != "full" else merged_weights(out)


def merged_weights(out) -> dict[str, torch.Tensor]:
    return load_file(Path(out) / "merged" / "model.safetensors")


def assert_close_updates(weights, reference, base):
    """Full fine-tuning's weights, compared by how far each moved from the base."""
    base = load_file(Path(base) / "model.safetensors")
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        moved = value - base[name]
        assert moved.norm() > 0, name
        assert (weights[name] - value).norm() <= RELATIVE_TOLERANCE * moved.norm(), name


def assert_close_deltas(delta, reference, tolerance=RELATIVE_TOLERANCE):
    assert delta.entries.keys() == reference.entries.keys()
    assert delta.meta["weights"] == reference.meta["weights"]  # shapes, dtypes and base fingerprints
    for name, (idx, values) in reference.entries.items():
        assert torch.equal(delta.entries[name][0], idx), name
        assert (delta.entries[name][1] - values).norm() <= tolerance * values.norm(), name


def test_one_process_fsdp_equals_the_unsharded_run(base_dir, data_file, tmp_path):
    reference = train_here(base_dir, data_file, tmp_path / "plain", batch_size=2, grad_accum=2)
    sharded = train_here(base_dir, data_file, tmp_path / "fsdp", batch_size=2, grad_accum=2, fsdp=True, merge=True)
    assert_close_deltas(sharded, reference)
    assert json.loads((tmp_path / "fsdp" / "run.json").read_text())["args"]["fsdp"] is True
    # --merge writes the base plus the run's delta.
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "merged")
    expected = apply_delta(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "fsdp")
    assert all(torch.equal(p, expected.get_parameter(n)) for n, p in merged.named_parameters())


FULL = dict(method="full", lr=1e-3)


def test_one_process_fsdp_full_fine_tuning_equals_the_unsharded_run(base_dir, data_file, tmp_path):
    reference = train_here(base_dir, data_file, tmp_path / "plain", batch_size=2, grad_accum=2, **FULL)
    sharded = train_here(base_dir, data_file, tmp_path / "fsdp", batch_size=2, grad_accum=2, fsdp=True, **FULL)
    assert_close_updates(sharded, reference, base_dir)
    assert (latest_checkpoint(tmp_path / "fsdp") / "rank-00000.safetensors").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--method", "lora"], "--fsdp trains the sparse methods"),
    (["--method", "dora"], "--fsdp trains the sparse methods"),
    (["--step-in-backward", "--grad-accum", "1", "--max-grad-norm", "0"], "--step-in-backward runs in one process"),
])
def test_fsdp_refuses_what_it_cannot_run(base_dir, data_file, tmp_path, capsys, flags, message):
    code = main(["train", "--model", str(base_dir), "--data", str(data_file), "--output", str(tmp_path / "o"),
                 "--fsdp", "--max-steps", "1", *flags])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_apply_delta_refuses_a_sharded_model_and_names_the_way(base_dir, data_file, tmp_path):
    from torch.distributed.fsdp import fully_shard

    train_here(base_dir, data_file, tmp_path / "run", batch_size=2, grad_accum=1, max_steps=1)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with single_process_group():
        fully_shard(model)
        with pytest.raises(ValueError, match="sharded by FSDP2: apply the delta before fully_shard"):
            apply_delta(model, tmp_path / "run")


def test_one_process_fsdp_with_tied_embeddings(tokenizer, data_file, tmp_path):
    base = tmp_path / "tied"
    tiny_llama(tie_word_embeddings=True).save_pretrained(base)
    tokenizer.save_pretrained(base)
    settings = dict(batch_size=2, grad_accum=1, max_steps=2, target_modules=["o_proj", "lm_head"])
    reference = train_here(base, data_file, tmp_path / "plain", **settings)
    sharded = train_here(base, data_file, tmp_path / "fsdp", fsdp=True, **settings)
    assert {"lm_head.weight", "model.embed_tokens.weight"} & reference.entries.keys()  # one tied weight, trained once
    assert_close_deltas(sharded, reference)


def test_one_process_fsdp_with_bf16_and_gradient_checkpointing(base_dir, data_file, tmp_path):
    settings = dict(batch_size=2, grad_accum=1, max_steps=2, bf16=True, gradient_checkpointing=True)
    reference = train_here(base_dir, data_file, tmp_path / "plain", **settings)
    sharded = train_here(base_dir, data_file, tmp_path / "fsdp", fsdp=True, **settings)
    assert_close_deltas(sharded, reference, tolerance=2e-2)  # bf16 compute: the reassociation shows at 2**-8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def liftft_train(base, data, out, *extra):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    return ["-m", "liftft", "train", "--model", str(base), "--data", str(data), "--output", str(out), "--fsdp",
            "--batch-size=1", "--grad-accum=2", "--no-progress", *flags, *extra]


def run_all(commands):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for cmd in commands]
    try:
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-4000:]
    return outputs


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={WORLD}",
              "--num_machines=1", "--main_process_port=0", "--mixed_precision=no", "--dynamo_backend=no"]


def two_nodes(base, data, out):
    """Two torchrun agents of one process each, meeting at a c10d rendezvous as two nodes would."""
    endpoint = f"127.0.0.1:{free_port()}"
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
             "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=liftft-test"]
    return run_all([[*agent, *liftft_train(base, data, out)] for _ in range(WORLD)])


def test_two_rank_fsdp_equals_one_process_and_resumes_bit_identically(skewed_base, odd_data, tmp_path):
    out = tmp_path / "fsdp"
    outputs = two_nodes(skewed_base, odd_data, out)
    assert any(f"{WORLD} processes, FSDP2-sharded" in o for o in outputs)
    first = load_delta(out)

    # The same examples per step in one process: micro-batches of 1, 4 of them per step instead of 2 on each rank
    # (3 in step 3, the epoch's last, where rank 1's second micro-batch is empty).
    reference = train_here(skewed_base, odd_data, tmp_path / "plain", batch_size=1, grad_accum=2 * WORLD)
    assert_close_deltas(first, reference)
    rows = first.entries[EMPTY_ON_RANK_1][0].long() // 32
    assert rows.numel() and bool((rows < 16).all()), "rank 1 was meant to hold none of this matrix's entries"

    # The step-2 checkpoint holds each rank's optimizer state, rank 1's without a single entry of that matrix.
    _, state = load_checkpoint(latest_checkpoint(out))
    shards = state["optimizer_shards"]
    assert len(shards) == WORLD
    counts = [sum(s["columns"].numel() for s in shard["state"].values()) for shard in shards]
    trained = sum(idx.numel() for idx, _ in reference.entries.values())
    assert sum(counts) == trained and any(f"trainable={trained:,}" in o for o in outputs)  # the count of all ranks
    empty = [shard["state"][group["params"][group["names"].index(EMPTY_ON_RANK_1)]]["columns"].numel()
             for shard in shards for group in shard["param_groups"][:1]]
    assert empty[0] > 0 and empty[1] == 0

    # Resuming from it under accelerate launch replays steps 3 and 4 to the same bits.
    (stdout,) = run_all([[*ACCELERATE, *liftft_train(skewed_base, odd_data, out, "--resume")]])
    assert "resumed from" in stdout
    resumed = load_delta(out)
    assert all(torch.equal(resumed.entries[n][1], first.entries[n][1]) for n in first.entries)


def test_two_rank_fsdp_full_fine_tuning_equals_one_process_and_resumes_bit_identically(skewed_base, odd_data,
                                                                                       tmp_path):
    out = tmp_path / "fsdp"
    full = ["--method=full", "--lr=1e-3"]
    endpoint = f"127.0.0.1:{free_port()}"
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
             "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=liftft-full"]
    run_all([[*agent, *liftft_train(skewed_base, odd_data, out, *full)] for _ in range(WORLD)])
    first = merged_weights(out)
    reference = train_here(skewed_base, odd_data, tmp_path / "plain", batch_size=1, grad_accum=2 * WORLD, **FULL)
    assert_close_updates(first, reference, skewed_base)
    # Each rank wrote its own shards of the weights and of AdamW's state into the checkpoint.
    checkpoint = latest_checkpoint(out)
    shards = [load_file(checkpoint / f"rank-{r:05d}.safetensors") for r in range(WORLD)]
    name = "model.layers.0.mlp.down_proj.weight"
    assert sum(shard[f"param.{name}"].shape[0] for shard in shards) == reference[name].shape[0]
    assert all(shard[f"exp_avg.{name}"].shape == shard[f"param.{name}"].shape for shard in shards)

    (stdout,) = run_all([[*ACCELERATE, *liftft_train(skewed_base, odd_data, out, *full, "--resume")]])
    assert "resumed from" in stdout
    resumed = merged_weights(out)
    assert all(torch.equal(resumed[n], first[n]) for n in first)
