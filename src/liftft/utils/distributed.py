"""Multi-process LIFT on torch.distributed: which rank does what, and the few collectives LIFT needs.

LIFT's selection is a function of the weights, which every data-parallel rank
holds identically, so only the k selected gradient values per matrix must be
averaged across ranks. :class:`liftft.engine.optim.LiftAdamW` and its gradient hooks
(:mod:`liftft.engine.gradients`) call into this module, which imports nothing of
liftft's but its error types: it does collectives and the arithmetic of
shards, nothing else.

- unwrapped model (what ``liftft train`` uses): the optimizer averages the
  gathered length-k buffers and the dense params' gradients with
  :func:`average_across_ranks`, once per optimizer step;
- model wrapped in DistributedDataParallel: DDP averages the dense gradients
  and the optimizer gathers the k entries of the averaged gradient at step;
- FSDP2 (``fully_shard``): targets are DTensors sharded on dim 0; a refresh
  gathers one full matrix at a time, rank 0's selection is broadcast, and each
  rank keeps the indices of its own rows (:func:`shard_rows`, :func:`local_indices`).

Every selection is made on rank 0 and broadcast (:func:`broadcast_from_rank0`),
so floating-point differences between ranks cannot split it. DeepSpeed ZeRO
flattens parameters into partitions, which LIFT's per-matrix indices cannot
follow: :func:`reject_deepspeed` says so before any work.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from liftft.utils.errors import CollectiveTimeout


# Gradients are averaged in fp32 buckets of at most this many values (128 MiB),
# so the temporary flat copy stays small next to the optimizer state.
BUCKET_NUMEL = 2**25
SUPPORTED = ("torchrun or accelerate launch with plain data parallelism (`liftft train`, or LiftAdamW on an "
             "unwrapped or DistributedDataParallel model), or FSDP2 (torch.distributed.fsdp.fully_shard)")


def world_size() -> int:
    """Number of processes in the default group, 1 when torch.distributed is not initialized."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group, 0 when torch.distributed is not initialized."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files."""
    return rank() == 0


def launched_distributed() -> bool:
    """True when a launcher (torchrun, accelerate launch) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_launcher(device_type: str, timeout_s: float | None = None) -> bool:
    """Join the process group a launcher set up (env RANK, WORLD_SIZE, MASTER_ADDR...); True if this call did.

    NCCL on CUDA, gloo on CPU; every collective waits at most ``timeout_s``
    seconds (torch's default when None). Does nothing when not launched as
    several processes or when a group already exists.
    """
    if not launched_distributed() or dist.is_initialized():
        return False
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    return True


def init_alone(device_type: str) -> bool:
    """Start a process group of this process alone, which FSDP2 needs outside a launcher; True if this call did."""
    if dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    return True


@contextmanager
def named_timeouts(timeout_s: float):
    """Turn a collective's timeout inside the block into :class:`CollectiveTimeout`, naming this rank and the limit."""
    try:
        yield
    except RuntimeError as err:
        if world_size() == 1 or not re.search(r"timed out|timeout", str(err), re.IGNORECASE):
            raise
        raise CollectiveTimeout(f"rank {rank()} of {world_size()} waited more than {timeout_s:g} s (--dist-timeout) "
                                f"for the other processes, one of which stopped or hung; stopped "
                                f"({str(err).splitlines()[0][-160:]})") from err


def requested_processes(launcher_cmdline: list[str]) -> int | None:
    """The process count a launcher's command line asked for (torchrun's --nproc-per-node times --nnodes,
    or accelerate's --num_processes), or None when it names none."""
    values = {}
    for i, word in enumerate(launcher_cmdline):
        name, _, inline = word.partition("=")
        if name.replace("_", "-") in ("--nproc-per-node", "--nnodes", "--num-processes"):
            value = inline or (launcher_cmdline[i + 1] if i + 1 < len(launcher_cmdline) else "")
            if value.isdigit():
                values[name.replace("_", "-")] = int(value)
    if "--num-processes" in values:
        return values["--num-processes"]
    if "--nproc-per-node" in values:
        return values["--nproc-per-node"] * values.get("--nnodes", 1)
    return None


def launcher_cmdline() -> list[str]:
    """The command line of this process's parent (the launcher, if any), or [] where /proc cannot tell."""
    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if world_size() > 1:
        dist.barrier()


def comm_device() -> torch.device:
    """The device collectives of the default group take their tensors on (CUDA for NCCL)."""
    if world_size() > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (fp64), for counts and loss totals."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return t.tolist()


def broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank 0's copy and return it; unchanged in a single process."""
    if world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def average_across_ranks(tensors: list[torch.Tensor], bucket_numel: int = BUCKET_NUMEL) -> None:
    """Replace each tensor in place by its mean over ranks, reduced in fp32 buckets.

    Every rank must pass tensors of the same shapes in the same order. The
    all-reduce gives every rank the same bits, so ranks stay identical.
    """
    world = world_size()
    if world == 1:
        return
    for bucket in _buckets(tensors, bucket_numel):
        flat = torch.cat([t.detach().reshape(-1).float() for t in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(part.view_as(t))


def root_sum_of_squares_across_ranks(local_norm: torch.Tensor) -> torch.Tensor:
    """The 2-norm of a vector whose pieces live on different ranks, from each rank's local 2-norm."""
    if world_size() == 1:
        return local_norm
    squared = local_norm.float().square()
    dist.all_reduce(squared)
    return squared.sqrt()


def _buckets(tensors: list[torch.Tensor], bucket_numel: int):
    bucket, size = [], 0
    for t in tensors:
        if bucket and size + t.numel() > bucket_numel:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


# ----- FSDP2: DTensor parameters sharded on dim 0 -----


def is_dtensor(t) -> bool:
    """True for a torch.distributed DTensor (what FSDP2's fully_shard makes of parameters)."""
    if "torch.distributed.tensor" not in sys.modules:  # nothing can have made one
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_shards(params: dict) -> dict[str, torch.Tensor]:
    """{name: this rank's local shard} of the DTensor parameters in ``params``, their layout checked.

    Empty when none is a DTensor; ValueError when only some are. The shard
    shares the parameter's storage, so writing into it updates the model.
    """
    sharded = [name for name, p in params.items() if is_dtensor(p)]
    if sharded and len(sharded) != len(params):
        plain = next(name for name in params if name not in sharded)
        raise ValueError(f"{sharded[0]} is sharded (FSDP2) but {plain} is not; shard every target or none")
    shards = {}
    for name in sharded:
        shard_rows(params[name])
        with torch.no_grad():
            shards[name] = params[name].to_local()
    return shards


def shard_rows(param) -> tuple[int, int]:
    """[start, stop) of the global rows that this rank holds of a DTensor sharded on dim 0.

    Raises ValueError for layouts LIFT does not handle: anything but a 2-D
    parameter with placement Shard(0) on a 1-D mesh spanning every rank.
    """
    from torch.distributed.tensor import Shard

    if param.dim() != 2 or tuple(param.placements) != (Shard(0),) or param.device_mesh.ndim != 1:
        raise ValueError(f"LIFT supports FSDP2 parameters sharded on dim 0 of a 1-D mesh; got shape "
                         f"{tuple(param.shape)} with placements {tuple(param.placements)} on a "
                         f"{param.device_mesh.ndim}-D mesh")
    if param.device_mesh.size() != world_size():
        raise ValueError(f"the FSDP2 mesh has {param.device_mesh.size()} ranks but the default group has "
                         f"{world_size()}; LIFT shards over all ranks")
    rows, shards = param.shape[0], param.device_mesh.size()
    # torch.chunk's split, as FSDP2 pads it: ceil(rows / shards) per rank, the last ones short or empty.
    chunk = -(-rows // shards)
    start = min(param.device_mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    if stop - start != param.to_local().shape[0]:
        raise ValueError(f"unexpected FSDP2 shard: rows [{start}, {stop}) expected, "
                         f"{param.to_local().shape[0]} held locally")
    return start, stop


def shard_span(indices: torch.Tensor, rows: tuple[int, int], columns: int) -> tuple[int, int]:
    """[first, last): the positions among the sorted flat ``indices`` of a full matrix of the entries in ``rows``."""
    first, last = (int(torch.searchsorted(indices, row * columns)) for row in rows)
    return first, last


def local_indices(indices: torch.Tensor, rows: tuple[int, int], columns: int) -> torch.Tensor:
    """The sorted flat ``indices`` of a full matrix that fall in ``rows``, as flat indices of that shard."""
    first, last = shard_span(indices, rows, columns)
    return (indices[first:last] - rows[0] * columns).to(indices.dtype)


def full_matrix(local: torch.Tensor, like) -> torch.Tensor:
    """The whole matrix, on every rank, whose dim-0 shard on this rank is ``local`` (laid out as DTensor ``like``)."""
    from torch.distributed.tensor import DTensor

    sharded = DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    return sharded.full_tensor()


def whole_matrix(local: torch.Tensor, sharded) -> torch.Tensor:
    """The matrix to select from: ``local`` itself, or, for the DTensor ``sharded``, every rank's shard gathered."""
    return local if sharded is None else full_matrix(local, sharded)


def agreed_indices(idx: torch.Tensor, sharded) -> torch.Tensor:
    """Rank 0's selection ``idx`` on every rank; for the DTensor ``sharded``, only its part in this rank's rows."""
    idx = broadcast_from_rank0(idx)
    if sharded is None:
        return idx
    return local_indices(idx, shard_rows(sharded), sharded.shape[1])


def gather_to_rank0(value) -> list | None:
    """Every rank's picklable ``value``, in rank order, on rank 0; None on the others (a collective). For small
    things and CPU tensors: the value is pickled."""
    if world_size() == 1:
        return [value]
    gathered = [None] * world_size() if is_main_process() else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def cat_from_ranks(t: torch.Tensor) -> torch.Tensor:
    """The 1-D tensors ``t`` of every rank, concatenated in rank order, on every rank (on ``t``'s device)."""
    if world_size() == 1:
        return t
    device = comm_device()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([t.numel()], device=device))
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=t.dtype, device=device)
    padded[: t.numel()] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(s)] for part, s in zip(parts, sizes)]).to(t.device)


# ----- DeepSpeed -----


def reject_wrapped(model) -> None:
    """Raise ValueError, naming the fix, for a model already wrapped in DistributedDataParallel or DeepSpeed."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise ValueError("build LiftAdamW on the bare model (ddp.module) and wrap it in DistributedDataParallel "
                         "afterwards, so that DDP only reduces the parameters LIFT trains")
    reject_deepspeed(model)


def reject_deepspeed(model=None) -> None:
    """Raise ValueError, naming what works instead, when DeepSpeed is (or is about to be) in charge.

    Checks ``model`` for a DeepSpeed engine, accelerate's DeepSpeed switch
    (ACCELERATE_USE_DEEPSPEED, set by ``accelerate launch`` with a DeepSpeed
    config) and an initialized accelerate state using DeepSpeed.
    """
    reason = None
    if model is not None and type(model).__name__ == "DeepSpeedEngine":
        reason = "the model is a DeepSpeedEngine"
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        reason = "ACCELERATE_USE_DEEPSPEED is set (accelerate launch with a DeepSpeed config)"
    elif _accelerate_uses_deepspeed():
        reason = "accelerate's state uses DeepSpeed"
    if reason:
        raise ValueError(f"liftft does not support DeepSpeed ZeRO ({reason}): ZeRO flattens and partitions "
                         f"parameters, so LIFT's per-matrix indices would silently stop matching. Use {SUPPORTED}.")


def _accelerate_uses_deepspeed() -> bool:
    state_module = sys.modules.get("accelerate.state")  # only an imported accelerate can hold a state
    if state_module is None:
        return False
    shared = state_module.PartialState._shared_state
    return bool(shared) and str(shared.get("distributed_type", "")).endswith("DEEPSPEED")


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` (its root) is FSDP2-sharded."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
