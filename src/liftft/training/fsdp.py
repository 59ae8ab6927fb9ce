"""FSDP2 in `liftft train --fsdp`: sharding the model, and what each rank contributes to and takes from a checkpoint.

torch.distributed's own FSDP2 (``fully_shard``) shards every decoder layer and
the root on dim 0 of a 1-D mesh over all ranks. No full matrix is ever
gathered on one rank to save or resume:

- sparse methods: :class:`liftft.engine.optim.LiftAdamW` selects from each whole
  matrix on rank 0 and each rank keeps the state of the entries in its own
  rows (:mod:`liftft.utils.distributed`). A checkpoint holds the delta gathered from
  every rank's rows (the file an unsharded run writes) and each rank's
  optimizer state, which holds only its selected entries;
- full fine-tuning: each rank writes its shard of every weight and of its
  AdamW state to a file of its own in the checkpoint (:func:`stage_rank_file`,
  :func:`take_rank_files`), and reads it back on resume.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from liftft.utils import distributed
from liftft.deltas.delta import Delta, add_entries, check_shapes, fingerprint
from liftft.utils.hf import DTYPE_KEYWORD, decoder_layers, load_config, load_model, set_activation_checkpointing


def shard_model(model: nn.Module, device_type: str, bf16: bool) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` to every decoder layer and to the root, over all ranks; returns ``model``.

    With ``bf16``, FSDP2 computes in bf16 and reduces gradients in fp32
    (``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (distributed.world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def load_sharded(path_or_id: str, dtype: torch.dtype, device: torch.device, bf16: bool, *,
                 checkpointing: bool = False) -> nn.Module:
    """The model at ``path_or_id``, in ``dtype``, sharded over all ranks by :func:`shard_model` as it loads.

    A collective. Every rank builds the model on the meta device and shards
    it, then rank 0 alone reads the weights, on the CPU, and each tensor is
    broadcast to the ranks, which keep their own rows. So no process holds the
    whole model on its device, and only rank 0 holds it in host memory.
    ``checkpointing`` turns on activation checkpointing.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    config = load_config(path_or_id)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **{DTYPE_KEYWORD: dtype})
    if checkpointing:
        set_activation_checkpointing(model, True)
    shard_model(model, device.type, bf16)
    model.to_empty(device=device)
    whole = load_model(path_or_id, dtype=dtype) if distributed.is_main_process() else None
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, whole.state_dict() if whole is not None else {}, options=options)
    # Buffers outside the state dict (rotary frequencies) were left uninitialized by to_empty.
    buffers = dict(whole.named_buffers()) if whole is not None else {}
    for name, buffer in model.named_buffers():
        if whole is not None:
            buffer.copy_(buffers[name])
        distributed.broadcast_from_rank0(buffer)
    return model


def gathered_model(model: nn.Module) -> nn.Module | None:
    """The whole of FSDP2-sharded ``model``, on rank 0's CPU, as an unsharded model of its class (for
    ``save_pretrained``; buffers outside the state dict stay on the meta device); None on the other ranks.
    A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not distributed.is_main_process():
        return None
    with torch.device("meta"):
        whole = AutoModelForCausalLM.from_config(model.config, **{DTYPE_KEYWORD: next(iter(state.values())).dtype})
    whole.load_state_dict(state, assign=True)
    whole.tie_weights()
    return whole


@torch.no_grad()
def apply_delta_to_shards(model: nn.Module, delta: Delta) -> nn.Module:
    """:func:`liftft.deltas.delta.apply_delta` for an FSDP2-sharded ``model``: each rank adds the entries in its own rows.

    A collective: every rank must call it, with the same delta. Shapes and
    base fingerprints are checked against the whole matrices (each rank's
    part of the selected values is gathered, never a whole matrix) before
    anything changes; a mismatch raises ValueError naming the weight.
    """
    params = dict(model.named_parameters())
    check_shapes(params, delta)
    parts = {}
    for name, (idx, _) in delta.entries.items():
        param = params[name]
        if idx is None:
            raise ValueError(f"{name} is stored whole in the delta; --fsdp trains sparse targets only")
        rows = distributed.shard_rows(param)
        first, last = distributed.shard_span(idx, rows, param.shape[1])
        local = param.to_local().view(-1)
        own = distributed.local_indices(idx, rows, param.shape[1]).long().to(local.device)
        if fingerprint(distributed.cat_from_ranks(local[own])) != delta.meta["weights"][name]["base_sha256"]:
            raise ValueError(f"base fingerprint mismatch at {name}: this model is not the base the delta was "
                             "trained from (or the delta was already applied)")
        parts[name] = (local, own, first, last)
    for name, (local, own, first, last) in parts.items():
        values = delta.entries[name][1][first:last]
        add_entries(local, own, values, _exact_part(delta.exact.get(name), first, last))
    return model


def _exact_part(exact, first: int, last: int):
    """The exact entries among positions [first, last) of a weight's entries, renumbered from ``first``."""
    if exact is None:
        return None
    positions, values = exact
    mine = (positions >= first) & (positions < last)
    return positions[mine] - first, values[mine]


def gathered_state_dicts(optimizer: torch.optim.Optimizer) -> list[dict] | None:
    """Every rank's ``optimizer.state_dict()``, its tensors on the CPU, in rank order on rank 0; None on the others.

    A collective. Under FSDP2 a LiftAdamW state holds the selected entries of
    this rank's rows alone, so rank 0 receives the state of the k selected
    entries per matrix, not the matrices.
    """
    return distributed.gather_to_rank0(_on_cpu(optimizer.state_dict()))


def _on_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


RANK_FILE = "rank-{:05d}.safetensors"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if distributed.is_dtensor(t) else t


def local_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's shard of every parameter (``param.NAME``) and of each of its optimizer state tensors
    (``KEY.NAME``, e.g. ``exp_avg.NAME``), as plain CPU tensors."""
    names = {p: name for name, p in model.named_parameters()}
    tensors = {f"param.{name}": _local(p).detach() for p, name in names.items()}
    tensors |= {f"{key}.{names[p]}": _local(value) for p, state in optimizer.state.items()
                for key, value in state.items()}
    return {key: value.detach().cpu().contiguous() for key, value in tensors.items()}


@torch.no_grad()
def load_local_state(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                     param_groups: list[dict]) -> None:
    """Put :func:`local_state`'s ``tensors`` back into this rank's shards of ``model`` and into ``optimizer``, whose
    hyperparameters become ``param_groups`` (its ``state_dict()["param_groups"]`` when they were saved)."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - {key.partition(".")[2] for key in tensors if key.startswith("param.")})
    if missing:
        raise ValueError(f"the checkpoint holds no shard of {missing[0]}: it is not this run's")
    index = {p: i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        kind, _, name = key.partition(".")
        param = params[name]
        if kind == "param":
            _local(param).copy_(value)
        else:
            state.setdefault(index[param], {})[kind] = _as_shard_of(value, param)
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _as_shard_of(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``local`` on param's device, as the DTensor laid out like ``param``, when it is this rank's shard of a tensor
    of param's shape (AdamW's moments); a scalar (its step count) stays as it is, for the optimizer to place."""
    if not distributed.is_dtensor(param) or local.shape != param.to_local().shape:
        return local
    from torch.distributed.tensor import DTensor

    local = local.to(param.to_local().device)
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def stage_rank_file(checkpoints: Path, name: str, tensors: dict[str, torch.Tensor]) -> str:
    """Write this rank's ``tensors`` to a temporary file in ``checkpoints`` named as an interrupted write of
    checkpoint ``name`` (``.NAME.XXXXXXXX``, which :func:`liftft.utils.atomic.remove_leftovers` removes); returns its
    path, which rank 0 gathers (:func:`liftft.utils.distributed.gather_to_rank0`) for :func:`take_rank_files`."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=checkpoints, prefix=f".{name}.")
    os.close(fd)
    save_file(tensors, path)
    return path


def take_rank_files(staged: list[str], directory: Path) -> None:
    """Move each rank's staged file into checkpoint ``directory`` as :data:`RANK_FILE`."""
    for rank, path in enumerate(staged):
        os.replace(path, Path(directory) / RANK_FILE.format(rank))
