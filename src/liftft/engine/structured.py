"""S2FT's structured selection on liftft's engine: random whole channels and attention heads, fixed for the run.

S2FT (Yang et al. 2024) trains a random share of each layer's coupled
structures: intermediate channels of the MLP and heads of attention. Here
each target keeps LIFT's budget k and trains the largest number of whole
channels whose entries fit in k (at least one channel):

- MLP first projections (up, gate): whole rows, one per intermediate
  channel; last projections (down): whole columns. A layer's MLP matrices
  share one random order of the intermediate channels and take its first
  channels, so with equal budgets (as LoRA-parity and density budgets give)
  up, gate and down train the same channels, as in S2FT.
- v_proj: head_dim-wide blocks of rows, one per KV head; o_proj: head_dim-wide
  blocks of columns, one per query head. A layer's query heads are put in one
  random order: o takes its first heads, v its first KV heads in the order
  the query heads of that order first use them (under GQA several query heads
  share a KV head; no weight is reordered, so GQA needs nothing more). Each
  matrix takes as many as its own budget fits, so v trains the KV heads of o's
  heads only as far as the budgets agree: with a rank budget under GQA, v can
  also take KV heads that none of o's heads use.
- q, k and every other target: random whole rows (output channels), drawn
  for that matrix alone. S2FT leaves q and k frozen; training rows keeps each
  matrix's count at LIFT's (leave them out with ``target_modules``).

Conv1D (GPT-2) weights are stored transposed, so their rows and columns
swap. The draw depends on the seed and the layer alone, not on the weights
or the refresh count: a refresh selects the same entries again and carries
all their state (S2FT never re-selects).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from liftft.engine.selection import selection_seed
from liftft.engine.targets import ATTN_PARENTS, MLP_PARENTS

MLP_FIRST = {"gate_proj", "up_proj", "w1", "w3", "fc1", "c_fc", "dense_h_to_4h", "fc_in"}
MLP_LAST = {"down_proj", "w2", "fc2", "dense_4h_to_h", "fc_out"}
VALUE = {"v_proj", "value"}
ATTN_OUT = {"o_proj", "out_proj"}
# Leaves whose role their parent decides: GPT-2's c_proj ends both its MLP and its attention.
AMBIGUOUS_LAST = {"c_proj", "dense"}


@dataclass(frozen=True)
class Channels:
    """How one target's entries group into channels, and which random order ranks them.

    ``axis``: 0 when a channel is whole rows, 1 when whole columns; ``width``:
    rows or columns per channel (head_dim for heads, else 1); ``draw``: the
    ordinal of the first target sharing the order (its seed); ``size``: the
    number of items the order ranks; ``share``: items per channel of this
    matrix (query heads per KV head for v under GQA, else 1).
    """

    axis: int
    width: int
    draw: int
    size: int
    share: int = 1


def s2ft_channels(model: nn.Module, targets: dict[str, torch.Tensor]) -> dict[str, Channels]:
    """The channel structure of every target of ``model`` ({parameter name: weight}), in S2FT's roles.

    Raises ValueError, naming the target, when an attention weight's shape does
    not match the heads that ``model.config`` declares.
    """
    plan, draws = {}, {}
    for ordinal, (name, weight) in enumerate(targets.items()):
        module_name = name.rpartition(".")[0]
        transposed = type(model.get_submodule(module_name)).__name__ == "Conv1D"
        out_dim, in_dim = tuple(weight.shape)[::-1] if transposed else tuple(weight.shape)
        axis, width, draw_key, size, share = _structure(model, name, module_name, out_dim, in_dim)
        draw = draws.setdefault(draw_key, ordinal)
        plan[name] = Channels(1 - axis if transposed else axis, width, draw, size, share)
    return plan


def entries_per_channel(spec: Channels, shape: tuple[int, int]) -> int:
    """Entries of one channel of a target of ``shape``: ``spec.width`` whole rows or columns."""
    m, n = shape
    return spec.width * (n if spec.axis == 0 else m)


def channel_count(spec: Channels, shape: tuple[int, int], k: int) -> int:
    """Whole channels a target of ``shape`` trains with budget ``k``: max(1, k // entries per channel), at most
    every channel of the matrix."""
    return min(max(1, k // entries_per_channel(spec, shape)), spec.size // spec.share)


def channel_indices(spec: Channels, shape: tuple[int, int], k: int, seed: int) -> torch.Tensor:
    """Sorted int64 flat indices (on the CPU) of the whole channels a target of ``shape`` trains with budget ``k``.

    The channels are the first :func:`channel_count` of the order drawn from
    ``selection_seed(seed, spec.draw)``.
    """
    m, n = shape
    order = _channel_order(spec, selection_seed(seed, spec.draw))
    chosen = order[: channel_count(spec, shape, k)].sort().values
    lines = (chosen.unsqueeze(1) * spec.width + torch.arange(spec.width)).flatten()
    if spec.axis == 0:
        return (lines.unsqueeze(1) * n + torch.arange(n)).flatten()
    return (torch.arange(m).unsqueeze(1) * n + lines).flatten()


def _channel_order(spec: Channels, seed: int) -> torch.Tensor:
    order = torch.randperm(spec.size, generator=torch.Generator().manual_seed(seed))
    if spec.share == 1:
        return order
    # A channel (KV head) ranks where the first of the items (query heads) it serves appears.
    served = order // spec.share
    first = torch.full((spec.size // spec.share,), spec.size).scatter_reduce(0, served, torch.arange(spec.size), "amin")
    return first.argsort()


def _structure(model, name: str, module_name: str, out_dim: int, in_dim: int):
    """(axis, width, draw key, size, share) of a target by its role, in (out, in) orientation."""
    parent, _, leaf = module_name.rpartition(".")
    family = set(parent.split("."))
    if leaf in MLP_FIRST:
        return 0, 1, (parent, "mlp", out_dim), out_dim, 1
    if leaf in MLP_LAST or (leaf in AMBIGUOUS_LAST and family & MLP_PARENTS):
        return 1, 1, (parent, "mlp", in_dim), in_dim, 1
    if leaf in VALUE or leaf in ATTN_OUT or (leaf in AMBIGUOUS_LAST and family & ATTN_PARENTS):
        heads, kv_heads, head_dim = _attention_heads(model, name)
        if leaf in VALUE:
            _check_heads(name, "rows", out_dim, kv_heads, head_dim)
            return 0, head_dim, (parent, "heads"), heads, heads // kv_heads
        _check_heads(name, "columns", in_dim, heads, head_dim)
        return 1, head_dim, (parent, "heads"), heads, 1
    return 0, 1, (name,), out_dim, 1


def _attention_heads(model, name: str) -> tuple[int, int, int]:
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        raise ValueError(f"s2ft trains whole attention heads of {name}, which needs the model's "
                         "config.num_attention_heads; this model has none (leave the attention out of the targets)")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv_heads:
        raise ValueError(f"config.num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    return heads, kv_heads, head_dim


def _check_heads(name: str, what: str, dim: int, heads: int, head_dim: int) -> None:
    if dim != heads * head_dim:
        raise ValueError(f"s2ft: {name} has {dim} {what}, not {heads} heads x head_dim {head_dim} as the model's "
                         "config says; cannot split it into whole heads")
