"""Multi-process LIFT on CPU with gloo: 2 ranks spawned by the tests, compared with one process.

One spawned group runs four scenarios in turn (unwrapped model, DDP-wrapped
model, broadcast selection, FSDP2); the parent process trains the 1-process
references itself, so they cannot depend on torch.distributed. The CLI test
launches `torchrun -m liftft train` as a subprocess.
"""

import json
import os
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from conftest import tiny_llama
from liftft import LiftAdamW
from liftft import LiftConfig
from liftft import load_delta
from liftft import select_indices
from liftft.cli import main
from liftft.deltas.delta import fingerprint
from liftft.utils.distributed import local_indices
from liftft.training.train import TrainArgs, run_training

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")

WORLD = 2
SPAWN_TIMEOUT = 150  # seconds for a spawned group; a hang fails the test instead of blocking the suite
STEPS, REFRESH_AT, ACCUM, ROWS, TOKENS = 4, 2, 2, 4, 12
BATCHES = torch.randint(3, 512, (STEPS, ACCUM, ROWS, TOKENS), generator=torch.Generator().manual_seed(0))
SHAPE = dict(intermediate_size=65)  # odd, so FSDP2 splits the MLP matrices unevenly (33 / 32 rows)
HP = dict(lr=1e-2, max_grad_norm=0.1)  # below the gradient norm (about 0.2-0.3), so clipping acts at every step
# fp32 tolerance after REFRESH_AT AdamW steps at lr 1e-2 (measured differences are ~1e-7): ranks sum
# gradients in another order than one process. Only weights up to the first refresh are compared with one
# process: past it, such differences may legitimately flip an entry at the top-k boundary. Each refresh is
# instead checked against a 1-process selection from the very weights the ranks held.
ATOL = 1e-5


def lift_config(**kw) -> LiftConfig:
    return LiftConfig(**{"rank": 2, "filter_rank": 4, "update_interval": REFRESH_AT, "svd": "exact", **kw})


def norms_of(model):
    return [p for n, p in model.named_parameters() if "norm" in n]


def train(model, opt, rows=slice(None), accumulate=nullcontext, after_step=lambda step: None):
    """STEPS optimizer steps of ACCUM micro-batches; ``rows`` picks this rank's part of each global micro-batch."""
    for step in range(1, STEPS + 1):
        for micro in range(ACCUM):
            ids = BATCHES[step - 1, micro, rows]
            with accumulate() if micro < ACCUM - 1 else nullcontext():
                (model(input_ids=ids, labels=ids).loss / ACCUM).backward()
        opt.step()
        opt.zero_grad()
        after_step(step)


def whole(t):
    """A parameter as one full tensor (gathered from every rank when it is an FSDP2 DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def global_indices(model, opt, name):
    """A target's selected flat indices in the full matrix; under FSDP2 gathered through a DTensor mask."""
    idx, param = opt.indices(name), model.get_parameter(name)
    if not hasattr(param, "full_tensor"):
        return idx
    from torch.distributed.tensor import DTensor

    mask = torch.zeros(param.to_local().shape)
    mask.view(-1)[idx.long()] = 1
    full = DTensor.from_local(mask, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
    return full.full_tensor().view(-1).nonzero().view(-1).to(idx.dtype)


def snapshot(model, opt, stage):
    """{stage.param.NAME: weights, stage.indices.TARGET: selected indices} of the whole model."""
    tensors = {f"{stage}.param.{n}": whole(p.detach()).clone() for n, p in model.named_parameters()}
    tensors.update({f"{stage}.indices.{n}": global_indices(model, opt, n).clone() for n in opt.target_names})
    return tensors


def run_and_record(model, opt, rows=slice(None), accumulate=nullcontext, train_model=None):
    """Train, recording the initial state, the state after the first refresh, and the end."""
    record = snapshot(model, opt, "initial")
    train(train_model or model, opt, rows, accumulate,
          after_step=lambda step: record.update(snapshot(model, opt, "mid")) if step == REFRESH_AT else None)
    record.update(snapshot(model, opt, "end"))
    return record


def tied_model(perturb: bool):
    """A model whose first q_proj has an exact tie at the magnitude top-k boundary; ``perturb`` breaks it by 1 ulp."""
    model = tiny_llama(seed=0, **SHAPE)
    w = model.get_parameter(TIED_NAME).data.view(-1)
    order = w.abs().argsort(descending=True)
    kth, next_ = order[TIED_K - 1], order[TIED_K]
    w[next_] = w[kth].abs() * w[next_].sign()
    loser = max(kth, next_)  # ties go to the lower flat index
    if perturb:
        w[loser] = torch.nextafter(w[loser], w[loser].sign() * torch.tensor(float("inf")))
    return model


TIED_NAME = "model.layers.0.self_attn.q_proj.weight"
TIED_K = (32 + 32) * 2


# ----- the spawned ranks -----


def _rank_main(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        mine = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
        _unwrapped(rank, mine, out)
        _ddp_wrapped(rank, mine, out)
        _broadcast(rank, out)
        _fsdp2(rank, mine, out)
        _fsdp2_shard_without_entries(rank, mine, out)
        dist.barrier()  # no rank tears the group down while another still uses it
    except BaseException:
        # Printed now: tearing the group down under a rank that failed mid-collective can abort the process
        # before Python would print the traceback.
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        dist.destroy_process_group()


def _unwrapped(rank, rows, out):
    model = tiny_llama(seed=0, **SHAPE)
    opt = LiftAdamW(model, lift_config(), dense_params=norms_of(model), **HP)
    save_file(run_and_record(model, opt, rows), f"{out}/unwrapped-{rank}.safetensors")


def _ddp_wrapped(rank, rows, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    with pytest.raises(ValueError, match="bare model"):
        LiftAdamW(DDP(tiny_llama(seed=0, **SHAPE)), lift_config())
    model = tiny_llama(seed=0, **SHAPE)
    opt = LiftAdamW(model, lift_config(), dense_params=norms_of(model), **HP)
    ddp = DDP(model)
    record = run_and_record(model, opt, rows, accumulate=ddp.no_sync, train_model=ddp)
    # Under DDP the dense target gradients stay until step() (DDP averages them after LIFT's hook would run).
    ids = BATCHES[0, 0, rows]
    ddp(input_ids=ids, labels=ids).loss.backward()
    record["grad_before_step"] = model.get_parameter(TIED_NAME).grad.clone()
    opt.step()
    record["grad_freed_at_step"] = torch.tensor(model.get_parameter(TIED_NAME).grad is None)
    save_file(record, f"{out}/ddp-{rank}.safetensors")


def _broadcast(rank, out):
    model = tied_model(perturb=rank == 1)
    weight = model.get_parameter(TIED_NAME).detach().clone()
    opt = LiftAdamW(model, lift_config(rank=2, selector="magnitude", update_interval=None))
    chosen = opt.indices(TIED_NAME).clone()
    opt.refresh()
    save_file({"chosen": chosen, "refreshed": opt.indices(TIED_NAME),
               "local": select_indices(weight, TIED_K, "magnitude")}, f"{out}/broadcast-{rank}.safetensors")


def _fsdp2(rank, rows, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from liftft.deltas.delta import sharded_delta

    model = tiny_llama(seed=0, **SHAPE)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = LiftAdamW(model, lift_config(), **HP)
    record = run_and_record(model, opt, rows)
    delta = sharded_delta(opt)
    record.update({f"count.{n}": torch.tensor(opt.state[p]["exp_avg"].numel()) for n, p, _ in opt.trained_parameters()})
    record.update({f"delta.indices.{n}": idx for n, (idx, _) in delta.entries.items()})
    record.update({f"delta.values.{n}": values for n, (_, values) in delta.entries.items()})
    save_file(record, f"{out}/fsdp2-{rank}.safetensors")
    Path(f"{out}/fsdp2-meta-{rank}.json").write_text(json.dumps(delta.meta["weights"]))


EMPTY_SHARD_TARGET = "model.layers.0.self_attn.o_proj.weight"  # 32 x 32: rows 0-15 on rank 0, 16-31 on rank 1


def _fsdp2_shard_without_entries(rank, rows, out):
    """Rank 1 holds no selected entry of a matrix at first and most of them after a refresh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama(seed=0, **SHAPE)
    with torch.no_grad():
        model.get_parameter(EMPTY_SHARD_TARGET)[:16] *= 100  # the magnitude top-k lies in rank 0's rows
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = LiftAdamW(model, lift_config(selector="magnitude", target_modules=["o_proj"], update_interval=None), **HP)
    record = {"initial_count": torch.tensor(opt.state_of(EMPTY_SHARD_TARGET)["exp_avg"].numel())}
    train(model, opt, rows)
    if rank == 1:
        with torch.no_grad():
            model.get_parameter(EMPTY_SHARD_TARGET).to_local().mul_(1e4)  # now the top-k lies in rank 1's rows
    opt.refresh()
    record["refreshed_count"] = torch.tensor(opt.state_of(EMPTY_SHARD_TARGET)["exp_avg"].numel())
    record["refreshed"] = global_indices(model, opt, EMPTY_SHARD_TARGET)
    record["refreshed_weight"] = whole(model.get_parameter(EMPTY_SHARD_TARGET).detach())
    train(model, opt, rows)
    save_file(record, f"{out}/empty-shard-{rank}.safetensors")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the 2-rank scenarios once; returns the directory of their results."""
    out = tmp_path_factory.mktemp("ranks")
    context = mp.start_processes(_rank_main, args=(str(out / "store"), str(out)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} spawned ranks did not finish within {SPAWN_TIMEOUT} s")
    return out


@pytest.fixture
def one_thread():
    """Selections in this process run like the ranks' (1 thread), so equal inputs give equal bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_process_record(dense: bool):
    """The same training in this (non-distributed) process, over the whole global batch."""
    model = tiny_llama(seed=0, **SHAPE)
    opt = LiftAdamW(model, lift_config(), dense_params=norms_of(model) if dense else None, **HP)
    return run_and_record(model, opt)


def refreshed_in_one_process(record, stage):
    """The indices one process selects at the first refresh from the weights recorded at ``stage``."""
    model = tiny_llama(seed=0, **SHAPE)
    model.load_state_dict({n.removeprefix(f"{stage}.param."): t for n, t in record.items()
                           if n.startswith(f"{stage}.param.")})
    opt = LiftAdamW(model, lift_config())
    opt.refresh()
    return {n: opt.indices(n) for n in opt.target_names}


def check_against_one_process(record, dense: bool):
    reference = one_process_record(dense)
    for key, value in reference.items():
        if key.startswith(("initial.", "mid.param.")):
            torch.testing.assert_close(record[key], value, rtol=0, atol=ATOL, msg=key)
    for name, idx in refreshed_in_one_process(record, "mid").items():
        assert torch.equal(record[f"mid.indices.{name}"], idx), name
    base = dict(tiny_llama(seed=0, **SHAPE).named_parameters())
    targets = [k.removeprefix("initial.indices.") for k in record if k.startswith("initial.indices.")]
    assert all(not torch.equal(record[f"end.param.{n}"], base[n]) for n in targets), "a target never trained"


def load_ranks(out, scenario):
    return [load_file(out / f"{scenario}-{r}.safetensors") for r in range(WORLD)]


def assert_identical(records):
    r0 = records[0]
    for other in records[1:]:
        assert other.keys() == r0.keys()
        differing = [k for k in r0 if not torch.equal(r0[k], other[k])]
        assert not differing, f"ranks differ in {differing[:3]}"


def test_unwrapped_ranks_identical_and_equal_to_one_process(ranks, one_thread):
    records = load_ranks(ranks, "unwrapped")
    assert_identical(records)
    check_against_one_process(records[0], dense=True)


def test_ddp_wrapped_ranks_identical_and_equal_to_one_process(ranks, one_thread):
    records = load_ranks(ranks, "ddp")
    assert_identical(records)
    check_against_one_process(records[0], dense=True)
    assert records[0]["grad_before_step"].abs().sum() > 0 and records[0]["grad_freed_at_step"]


def test_selection_is_rank_zeros_even_when_a_rank_differs_by_one_ulp(ranks):
    r0, r1 = load_ranks(ranks, "broadcast")
    # Rank 1's own weights would select differently: the tie is broken the other way there.
    assert not torch.equal(r1["local"], r0["local"])
    unperturbed = tied_model(perturb=False).get_parameter(TIED_NAME).detach()
    assert torch.equal(r0["local"], select_indices(unperturbed, TIED_K, "magnitude"))
    for key in ("chosen", "refreshed"):
        assert torch.equal(r0[key], r0["local"]) and torch.equal(r1[key], r0["local"])


def test_fsdp2_shards_train_like_one_process(ranks, one_thread):
    records = load_ranks(ranks, "fsdp2")
    gathered = [{k: v for k, v in r.items() if not k.startswith("count.")} for r in records]
    assert_identical(gathered)  # every rank gathered the same full weights and the same delta
    record = records[0]
    check_against_one_process(record, dense=False)
    # The delta of the shards is the one of the full matrices: every entry ever selected, final minus base.
    base = dict(tiny_llama(seed=0, **SHAPE).named_parameters())
    metas = [json.loads((ranks / f"fsdp2-meta-{r}.json").read_text()) for r in range(WORLD)]
    for name in metas[0]:
        touched = torch.cat([record[f"{stage}.indices.{name}"] for stage in ("initial", "mid", "end")]).unique()
        assert torch.equal(record[f"delta.indices.{name}"].long(), touched.long())
        final = record[f"end.param.{name}"].view(-1)[touched.long()].double()
        initial = base[name].detach().view(-1)[touched.long()]
        assert torch.equal(record[f"delta.values.{name}"], final - initial.double())
        assert metas[0][name] == metas[1][name]
        assert metas[0][name]["shape"] == list(base[name].shape)
        assert metas[0][name]["base_sha256"] == fingerprint(initial)
        # Each rank keeps optimizer state only for the selected entries of its own rows.
        rows, columns = base[name].shape
        chunk = -(-rows // WORLD)
        selected = record[f"end.indices.{name}"]
        counts = [int(r[f"count.{name}"]) for r in records]
        assert counts == [((selected >= min(r * chunk, rows) * columns) & (selected < min((r + 1) * chunk, rows) * columns)).sum().item()
                          for r in range(WORLD)]
        assert sum(counts) == selected.numel()


def test_fsdp2_refresh_of_a_rank_whose_shard_held_no_entries(ranks):
    records = load_ranks(ranks, "empty-shard")
    k = (32 + 32) * 2
    assert [int(r["initial_count"]) for r in records] == [k, 0]
    assert torch.equal(records[0]["refreshed"], records[1]["refreshed"])
    refreshed = records[0]["refreshed"]
    assert torch.equal(refreshed.long(), select_indices(records[0]["refreshed_weight"], k, "magnitude").long())
    assert [int(r["refreshed_count"]) for r in records] == [int((refreshed < 16 * 32).sum()), int((refreshed >= 16 * 32).sum())]
    assert int(records[1]["refreshed_count"]) > 0


def test_local_indices_of_a_simulated_shard():
    # A 5x4 matrix split 3 / 2 rows: the second shard holds global rows 3 and 4, flat 12..19.
    selected = torch.tensor([0, 5, 9, 14, 19], dtype=torch.int32)
    assert local_indices(selected, (3, 5), 4).tolist() == [2, 7]
    assert local_indices(selected, (0, 3), 4).tolist() == [0, 5, 9]
    assert local_indices(selected, (0, 3), 4).dtype == torch.int32


# ----- DeepSpeed is refused, never silently wrong -----


def test_deepspeed_switch_is_refused_at_start(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="DeepSpeed ZeRO.*FSDP2"):
        LiftAdamW(tiny_llama(), lift_config())
    code = main(["train", "--model", str(tmp_path), "--data", "x.json", "--output", str(tmp_path / "o")])
    assert code == 2 and "DeepSpeed" in capsys.readouterr().err


def test_accelerate_state_using_deepspeed_is_refused(monkeypatch):
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    monkeypatch.setattr(PartialState, "_shared_state", {"distributed_type": DistributedType.DEEPSPEED})
    with pytest.raises(ValueError, match="accelerate's state uses DeepSpeed"):
        LiftAdamW(tiny_llama(), lift_config())


def test_replaced_parameter_groups_are_refused_at_step():
    model = tiny_llama()
    opt = LiftAdamW(model, lift_config())
    flat = torch.cat([p.detach().view(-1) for p in opt.param_groups[0]["params"]]).requires_grad_()
    opt.param_groups[0]["params"] = [flat]  # what DeepSpeed ZeRO does to the optimizer it wraps
    with pytest.raises(RuntimeError, match="DeepSpeed"):
        opt.step()


# ----- the CLI under torchrun -----


# No refresh within the run: a padded 2-example batch and two unpadded ones differ by float noise,
# which may flip an entry at a refresh's top-k boundary (refreshes are compared above, from equal weights).
CLI_SETTINGS = dict(rank=2, filter_rank=4, update_interval=10, lr=2e-2, max_steps=4, grad_accum=2, max_seq_len=192,
                    warmup_ratio=0.0, save_steps=2, seed=7, device="cpu")
# Adam divides by the gradient's own scale, so an entry with a near-zero gradient amplifies float noise;
# compare whole matrices instead. A wrong data split (ranks on the same examples) is off by O(1).
RELATIVE_TOLERANCE = 1e-3


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}"],
    # --multi_gpu is accelerate's torch.distributed launcher; on a machine without GPUs the ranks use gloo.
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={WORLD}",
                   "--num_machines=1", "--main_process_port=0", "--mixed_precision=no", "--dynamo_backend=no"],
}


def launch_train(launcher, base_dir, data_file, out, *extra):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in CLI_SETTINGS.items()]
    cmd = [*LAUNCHERS[launcher], "-m", "liftft", "train", "--model", str(base_dir), "--data", str(data_file),
           "--output", str(out), "--batch-size=1", "--no-progress", *flags, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=SPAWN_TIMEOUT, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_cli_under_torchrun_trains_writes_once_and_resumes_under_accelerate(base_dir, data_file, tmp_path):
    out = tmp_path / "run"
    launch_train("torchrun", base_dir, data_file, out)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["world_size"] == WORLD
    assert len((out / "train_log.jsonl").read_text().splitlines()) == CLI_SETTINGS["max_steps"]  # rank 0 alone logs
    first = load_delta(out)

    # The same global batch in one process: 2 examples per micro-batch instead of 1 on each of 2 ranks.
    single = tmp_path / "single"
    run_training(TrainArgs.from_flat(model=str(base_dir), data=[str(data_file)], output=str(single), epochs=None,
                                     batch_size=WORLD, progress=False, **CLI_SETTINGS))
    reference = load_delta(single)
    for name, (idx, values) in reference.entries.items():
        assert torch.equal(first.entries[name][0], idx)
        assert (first.entries[name][1] - values).norm() / values.norm() < RELATIVE_TOLERANCE, name

    # Resuming from the step-2 checkpoint, under the other launcher, replays steps 3 and 4 to the same bits.
    stdout = launch_train("accelerate", base_dir, data_file, out, "--resume")
    assert "resumed from" in stdout and stdout.count("resumed from") == 1
    resumed = load_delta(out)
    assert all(torch.equal(resumed.entries[n][1], first.entries[n][1]) for n in first.entries)
    with pytest.raises(ValueError, match=f"on {WORLD} processes"):
        run_training(TrainArgs.from_flat(model=str(base_dir), data=[str(data_file)], output=str(out), epochs=None,
                                         batch_size=1, progress=False, resume=True, **CLI_SETTINGS))
