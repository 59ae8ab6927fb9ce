"""Finding the weight matrices LIFT trains in a model."""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn

MLP_LEAVES = {"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3",
              "dense_h_to_4h", "dense_4h_to_h", "fc_in", "fc_out"}
MLP_PARENTS = {"mlp", "feed_forward", "ffn"}
ATTN_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query_key_value",
               "Wqkv", "out_proj", "query", "key", "value"}
ATTN_PARENTS = {"attn", "self_attn", "attention", "self_attention"}


def _is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) stores its weight transposed; it is still a 2-D matrix.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _matches(name: str, pattern: str | Sequence[str]) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == s or name.endswith("." + s) for s in pattern)


def _in_family(name: str, leaves: set[str], parents: set[str]) -> bool:
    parts = name.split(".")
    return parts[-1] in leaves or any(p in parents for p in parts[:-1])


def _embedding_modules(model: nn.Module) -> set[int]:
    found = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            found.add(id(module))
    return found


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    exclude_modules: str | Sequence[str] | None = None,
) -> dict[str, nn.Parameter]:
    """Target weights as {parameter name: parameter}, in model order.

    Presets pick nn.Linear / Conv1D layers other than the input and output
    embeddings: ``"all-linear"`` all of them, ``"mlp"`` the feed-forward
    projections, ``"attn"`` the attention projections. A list of suffixes or a
    regex (matched against whole module names) may pick any module with a
    ``weight``; that weight must be 2-D. A weight shared by several modules
    (tied embeddings) is one target, named as ``model.named_parameters()``
    names it: by its first name.
    """
    embeddings = _embedding_modules(model)
    first_names = {id(p): name for name, p in model.named_parameters()}  # each Parameter once, by its first name
    chosen: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if not name or not _selected(name, module, target_modules, embeddings):
            continue
        if exclude_modules is not None and _matches(name, exclude_modules):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"target module {name!r} ({type(module).__name__}) has no weight tensor")
        if weight.dim() != 2:
            raise ValueError(f"target {name}.weight is not 2-D (shape {tuple(weight.shape)}); LIFT trains matrices only")
        chosen.setdefault(first_names.get(id(weight), f"{name}.weight"), weight)
    if not chosen:
        linear = [n for n, m in model.named_modules() if _is_linear(m)]
        raise ValueError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no module; "
            f"linear modules in this model: {', '.join(linear) or 'none'}"
        )
    return chosen


def _selected(name, module, target_modules, embeddings) -> bool:
    if isinstance(target_modules, str) and target_modules in ("all-linear", "mlp", "attn"):
        if not _is_linear(module) or id(module) in embeddings:
            return False
        if target_modules == "mlp":
            return _in_family(name, MLP_LEAVES, MLP_PARENTS)
        if target_modules == "attn":
            return _in_family(name, ATTN_LEAVES, ATTN_PARENTS)
        return True
    return _matches(name, target_modules)


def named_dense(model: nn.Module, dense_params, targets: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """``dense_params`` as {name: parameter}, each checked to be a parameter of ``model`` and not a target."""
    if dense_params is None:
        return {}
    names = {id(p): n for n, p in model.named_parameters()}
    target_ids = {id(p) for p in targets.values()}
    dense = {}
    for p in dense_params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"dense_params must hold tensors, got {type(p).__name__}")
        if id(p) not in names:
            raise ValueError(f"a dense param of shape {tuple(p.shape)} is not a parameter of the model")
        if id(p) in target_ids:
            raise ValueError(f"{names[id(p)]} is both a LIFT target and in dense_params")
        dense[names[id(p)]] = p
    return dense


def check_trainable(trained: dict[str, nn.Parameter], quantized: set[str] = frozenset()) -> None:
    """Raise ValueError, naming the parameter, unless every one is contiguous and all share one device.

    LIFT indexes a target's flat storage (but for the ``quantized`` targets',
    whose trained values live beside it); clipping and rank averaging combine
    every trained tensor in one place.
    """
    first, where = next(iter(trained)), next(iter(trained.values())).device
    for name, p in trained.items():
        if name not in quantized and not p.is_contiguous():
            raise ValueError(f"{name} is not contiguous; LIFT indexes its flat storage")
        if p.device != where:
            raise ValueError(f"LiftAdamW trains parameters on one device, but {first} is on {where} and {name} on "
                             f"{p.device} (a device_map over several devices?); load the model on one device, or "
                             "shard it over several with FSDP2 (torch.distributed.fsdp.fully_shard)")


def freeze_all_but(model: nn.Module, trained: list[nn.Parameter]) -> None:
    """Set requires_grad on the ``trained`` parameters of ``model`` and clear it on every other."""
    trained_ids = {id(p) for p in trained}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained_ids)
