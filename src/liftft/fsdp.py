"""FSDP2 in `liftft train --fsdp`: sharding the model, and what each rank contributes to and takes from a checkpoint.

torch.distributed's own FSDP2 (``fully_shard``) shards every decoder layer and
the root on dim 0 of a 1-D mesh over all ranks. :class:`liftft.optim.LiftAdamW`
selects from each whole matrix on rank 0 and each rank keeps the state of the
entries in its own rows (:mod:`liftft.distributed`). A checkpoint holds the
delta gathered from every rank's rows (the file an unsharded run writes) and
each rank's optimizer state, which holds only its selected entries: no full
matrix is ever gathered on one rank to save or resume.
"""

from __future__ import annotations

import torch
from torch import nn

from liftft import distributed
from liftft.delta import Delta, add_entries, check_shapes, fingerprint
from liftft.hf import DTYPE_KEYWORD, load_config, load_model, set_activation_checkpointing


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` whose class its ``_no_split_modules`` names (a transformers model's decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"--fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules), so "
                         "liftft cannot tell which modules to shard")
    return layers


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


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` (its root) is FSDP2-sharded."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@torch.no_grad()
def apply_delta_to_shards(model: nn.Module, delta: Delta) -> nn.Module:
    """:func:`liftft.delta.apply_delta` for an FSDP2-sharded ``model``: each rank adds the entries in its own rows.

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
        start, stop = (row * param.shape[1] for row in distributed.shard_rows(param))
        first, last = (int(torch.searchsorted(idx.long(), bound)) for bound in (start, stop))
        local = param.to_local().view(-1)
        own = (idx[first:last].long() - start).to(local.device)
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
    import torch.distributed as dist

    state = _on_cpu(optimizer.state_dict())
    if distributed.world_size() == 1:
        return [state]
    gathered = [None] * distributed.world_size() if distributed.is_main_process() else None
    dist.gather_object(state, gathered, dst=0)
    return gathered


def _on_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value
