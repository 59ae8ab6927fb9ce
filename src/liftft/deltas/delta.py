"""Compact deltas: the trained entries of a LIFT run as (indices, final - base), saved with safetensors.

Format 2 stores each sparse weight's indices compressed (``<name>.row_offsets``
and ``<name>.columns``, see :mod:`liftft.engine.layout`): 2 bytes per entry instead of
the 4 of format 1's flat ``<name>.indices``, which still loads. Format 3 adds,
for the rare entries whose base + difference does not round back to the trained
value (an entry that shrank far below its base), ``<name>.exact_positions`` and
``<name>.exact_values``: their positions among the weight's values and their
trained values. A delta is written in the oldest format that reproduces it
exactly, so deltas without such entries stay readable by older liftft.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from liftft.utils import distributed
from liftft.utils.atomic import atomic_write, write_json_atomic
from liftft.deltas.checks import checked_entries, read_meta, read_tensors
from liftft.engine.layout import compress, index_dtype
from liftft.engine.quantized import load_hint, quantized_targets
from liftft.utils.quantization import load_settings

DELTA_FILE = "delta.safetensors"
META_FILE = "liftft.json"
FORMAT_VERSION = 3
EXACT_FORMAT = 3  # the first format with exact values


@dataclass
class Delta:
    """Per weight name, (sorted flat indices or None for a dense delta, fp32 values), plus metadata.

    ``exact`` maps a weight name to (positions among its values, trained values)
    for entries whose trained value base + difference does not reproduce.
    """

    entries: dict[str, tuple[torch.Tensor | None, torch.Tensor]]
    meta: dict
    exact: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_entries(self) -> int:
        return sum(values.numel() for _, values in self.entries.values())


def fingerprint(values: torch.Tensor) -> str:
    """sha256 of values as fp32, so a bf16 and an fp32 load of the same checkpoint agree."""
    data = values.detach().float().contiguous().cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


def delta_from_optimizer(opt) -> Delta:
    """Every entry ``opt`` ever trained, as final minus base in fp32, with per-weight base fingerprints.

    Under FSDP2 this is :func:`sharded_delta`, a collective that every rank must call.
    """
    return sharded_delta(opt) if opt.sharded else _local_delta(opt)


def _local_delta(opt) -> Delta:
    """The delta of the tensors ``opt`` steps: under FSDP2, this rank's rows in shard coordinates."""
    entries, weights, exact = {}, {}, {}
    for name, p, _ in opt.trained_parameters():
        trained = opt.trained_entries(name)
        if trained is None:  # a dense param that never received a gradient
            continue
        idx, base = trained
        target = opt.quantized_target(name)
        if target is not None:  # a 4-bit target: the delta is relative to dequant(W₄)
            final = target.trained_values(idx).cpu()
        else:
            final = p.detach().cpu() if idx is None else p.detach().view(-1)[idx.to(p.device)].cpu()
        values = exact_difference(final, base)
        entries[name] = (idx, values)
        positions = irreproducible(final, base, values)
        if positions.numel():
            exact[name] = (positions, final.reshape(-1)[positions].to(values.dtype))
        weights[name] = {"shape": list(p.shape), "dtype": str(base.dtype).removeprefix("torch."),
                         "base_sha256": fingerprint(base)}
        if target is not None:
            weights[name]["quantization"] = target.settings()
    meta = {"format_version": EXACT_FORMAT if exact else 2, "config": opt.cfg.to_dict(), "weights": weights}
    quantized = [info["quantization"] for info in weights.values() if "quantization" in info]
    if quantized:
        meta["quantization"] = load_settings(quantized[0]["quant_type"], quantized[0]["nested"])
    return Delta(entries, meta, exact)


def sharded_delta(opt) -> Delta:
    """The :class:`Delta` of a LiftAdamW over FSDP2-sharded targets, as one process would make it.

    A collective: every rank must call it; every rank gets the whole delta
    (global flat indices, shapes and base fingerprints of the full matrices).
    Write it from rank 0 with :func:`write_delta`.
    """
    delta = _local_delta(opt)
    for name, view, _ in opt.trained_parameters():
        param = opt.sharded_parameter(view)
        rows, columns = distributed.shard_rows(param), param.shape[1]
        (idx, values), (_, base) = delta.entries[name], opt.trained_entries(name)
        global_idx = distributed.cat_from_ranks(idx.long() + rows[0] * columns).to(index_dtype(param.numel()))
        delta.entries[name] = (global_idx, distributed.cat_from_ranks(values))
        delta.meta["weights"][name].update(shape=list(param.shape),
                                           base_sha256=fingerprint(distributed.cat_from_ranks(base)))
        _gather_exact(delta, name, idx.numel())
    return delta


def _gather_exact(delta: Delta, name: str, local_count: int) -> None:
    """Turn this rank's exact entries of ``name`` into the whole matrix's, positions offset by the ranks before."""
    positions, values = delta.exact.get(name, (torch.zeros(0, dtype=torch.int64),
                                               torch.zeros(0, dtype=delta.entries[name][1].dtype)))
    before = sum(distributed.cat_from_ranks(torch.tensor([local_count]))[: distributed.rank()].tolist())
    positions, values = distributed.cat_from_ranks(positions + before), distributed.cat_from_ranks(values)
    if positions.numel():
        delta.exact[name] = (positions, values)
        delta.meta["format_version"] = EXACT_FORMAT


def exact_difference(final: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """final - base, in a dtype wide enough that base + difference rounds back to exactly ``final``.

    That is fp32 for 16-bit weights and fp64 for fp32 weights: an fp32
    difference of fp32 weights is off by an ulp for entries that moved far
    relative to their size (about 2% of entries in a short fp32 run at lr 1e-3).
    """
    wide = torch.float64 if final.dtype in (torch.float32, torch.float64) else torch.float32
    return final.to(wide) - base.to(wide)


def irreproducible(final: torch.Tensor, base: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Flat positions where base + ``values``, rounded to final's dtype, is not bit for bit ``final``."""
    rebuilt = (base.to(values.dtype) + values).to(final.dtype)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[final.element_size()]
    return (rebuilt.reshape(-1).view(bits) != final.reshape(-1).view(bits)).nonzero().flatten()


def save_delta(opt, path, *, base_model: str | None = None, training_args: dict | None = None,
               metrics: dict | None = None) -> Path:
    """Write ``path``/delta.safetensors and ``path``/liftft.json for the run trained by ``opt``.

    The delta holds, per target weight, every entry the run ever changed, as
    ``<name>.row_offsets`` and ``<name>.columns`` (sorted; :mod:`liftft.engine.layout`),
    and ``<name>.values`` (final minus base, in fp32, or fp64 for fp32 weights so
    that re-application stays exact); dense params are saved whole as
    ``<name>.values``. The JSON holds the LIFT config,
    the base model, shapes and base fingerprints, training arguments and metrics.
    Both files are written atomically. Under FSDP2 every rank must call it (the
    delta is gathered from every rank's rows, see :func:`sharded_delta`) and
    rank 0 alone writes; the files are those of an unsharded run.
    """
    delta = delta_from_optimizer(opt)
    delta.meta.update(base_model=base_model, training_args=training_args or {}, metrics=metrics or {})
    if not opt.sharded or distributed.is_main_process():
        write_delta(delta, path)
    return Path(path)


def write_delta(delta: Delta, path) -> None:
    """Atomically write a :class:`Delta` to directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (idx, values) in delta.entries.items():
        if idx is not None:
            shape = tuple(delta.meta["weights"][name]["shape"])
            tensors[f"{name}.row_offsets"], tensors[f"{name}.columns"] = compress(idx, shape)
        tensors[f"{name}.values"] = values.contiguous()
    for name, (positions, values) in delta.exact.items():
        tensors[f"{name}.exact_positions"], tensors[f"{name}.exact_values"] = positions, values.contiguous()
    atomic_write(path / DELTA_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "liftft-delta"}))
    write_json_atomic(path / META_FILE, delta.meta)


def load_delta(path) -> Delta:
    """Read a delta directory (or its delta.safetensors file) written by :func:`save_delta`.

    The delta is checked whole first (:mod:`liftft.deltas.checks`): a missing
    file raises FileNotFoundError, and a damaged one ValueError naming the
    file, the weight and the defect, so that nothing done with the result meets
    damage the files hold.
    """
    path = Path(path)
    directory = path.parent if path.name == DELTA_FILE else path
    tensor_file, meta_file = directory / DELTA_FILE, directory / META_FILE
    for f in (tensor_file, meta_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: {directory} is not a liftft delta directory")
    meta = read_meta(meta_file, FORMAT_VERSION)
    entries, exact = checked_entries(read_tensors(tensor_file), meta, tensor_file, meta_file)
    return Delta(entries, meta, exact)


def check_shapes(params: dict[str, torch.Tensor], delta: Delta) -> None:
    """Raise ValueError naming the first weight of ``delta`` missing from ``params`` (by name) or shaped otherwise."""
    for name, info in delta.meta["weights"].items():
        if name not in params:
            raise ValueError(f"delta weight {name} is not in the model")
        if list(params[name].shape) != info["shape"]:
            raise ValueError(f"shape mismatch at {name}: model has {list(params[name].shape)}, delta expects {info['shape']}")


def check_compatible(model: nn.Module, delta: Delta, original_weights: bool = False) -> None:
    """Raise ValueError naming the first weight whose shape, quantization or base fingerprint differs from the
    delta's base; for a delta trained on a 4-bit base, the message says how to load the base. With
    ``original_weights``, such a delta's weights must be 16-bit here, and their fingerprints are not checked."""
    params = dict(model.named_parameters())
    quantized = quantized_targets(model, [name for name in delta.meta["weights"] if name in params])
    check_shapes({**params, **{name: target.key for name, target in quantized.items()}}, delta)
    for name, info in delta.meta["weights"].items():
        recorded, target = info.get("quantization"), quantized.get(name)
        if original_weights and recorded is not None:
            if target is not None:
                raise ValueError(f"original_weights adds the delta to 16-bit weights, but {name} is a 4-bit layer "
                                 "here: load the base without a quantization_config")
            continue
        _check_quantization(name, recorded, target)
        idx, _ = delta.entries[name]
        p = params[name].detach() if target is None else target.dense()
        current = p.reshape(-1)[idx.to(p.device).long()] if idx is not None else p
        if fingerprint(current) != info["base_sha256"]:
            hint = f"; load the base with {load_hint(recorded)}" if recorded else ""
            raise ValueError(f"base fingerprint mismatch at {name}: this model is not the base the delta was trained "
                             f"from (or the delta was already applied){hint}")


def _check_quantization(name: str, recorded: dict | None, target) -> None:
    """Raise ValueError, saying how to load the base, when weight ``name`` is quantized otherwise than the delta's
    base was (``recorded``: its quantization settings, None for a 16-bit base; ``target``: the model's 4-bit target)."""
    if recorded is None and target is None:
        return
    if recorded is None:
        raise ValueError(f"{name} is a 4-bit layer in this model, but the delta was trained on 16-bit weights: load "
                         "the base without a quantization_config")
    if target is None:
        raise ValueError(f"the delta was trained on a 4-bit base, but {name} is not a 4-bit layer here: load the base "
                         f"with {load_hint(recorded)} (liftft merge writes the 16-bit model the run trained)")
    here = target.settings()  # hashes the packed weight: once
    if here["packed_sha256"] != recorded["packed_sha256"]:
        raise ValueError(f"{name}'s 4-bit weights differ from those the delta was trained on ({here['quant_type']}, "
                         f"nested {here['nested']} here): load the base with {load_hint(recorded)}")


@torch.no_grad()
def apply_delta(model: nn.Module, path, scale: float = 1.0, *, original_weights: bool = False) -> nn.Module:
    """Add ``scale`` times the delta at ``path`` to ``model`` in place and return it.

    With scale 1 on the base model this reproduces the trained weights exactly,
    bit for bit, every entry (those stored with exact values included).
    Raises ValueError, before changing anything, for a damaged delta (see
    :func:`load_delta`) and naming the first weight whose shape or base
    fingerprint does not match. A delta trained on a bitsandbytes 4-bit base
    applies to that base loaded the same way: its layers then compute with
    dequant(W₄) + Δ (:mod:`liftft.engine.quantized`), the packed weights unchanged.
    Only when asked with ``original_weights`` is such a delta added to the
    16-bit weights the base was quantized from, which are not those it was
    trained on (their fingerprints are not checked, and no value is exact).
    """
    delta = path if isinstance(path, Delta) else load_delta(path)
    params = dict(model.named_parameters())
    sharded = [name for name in delta.entries if name in params and distributed.is_dtensor(params[name])]
    if sharded:
        raise ValueError(f"{sharded[0]} is sharded by FSDP2: apply the delta before fully_shard, or on every rank "
                         "with liftft.training.fsdp.apply_delta_to_shards")
    check_compatible(model, delta, original_weights)
    quantized = quantized_targets(model, delta.entries)
    for name, (idx, values) in delta.entries.items():
        relative_to_dequantized = original_weights and "quantization" in delta.meta["weights"][name]
        exact = delta.exact.get(name) if scale == 1 and not relative_to_dequantized else None
        if name in quantized:
            _add_to_4bit(quantized[name], idx.long(), scale * values, exact)
        else:
            add_entries(params[name].view(-1), None if idx is None else idx.long(), scale * values, exact)
    return model


def _add_to_4bit(target, idx: torch.Tensor, values: torch.Tensor, exact) -> None:
    """Add ``values`` to a 4-bit target's entries ``idx`` (dequant(W₄) where not trained yet), as :func:`add_entries`
    does, and route its layer so that it computes with them."""
    target.include(idx)
    positions = target.positions(idx)
    entries = target.values.index_select(0, positions)
    add_entries(entries, None, values, exact)
    target.values.index_copy_(0, positions, entries)
    target.attach()


def add_entries(flat: torch.Tensor, idx: torch.Tensor | None, values: torch.Tensor, exact=None) -> None:
    """Add ``values`` (wide dtype) to ``flat`` at ``idx`` (all of it when None), rounding once to flat's dtype;
    then write ``exact`` (positions among the entries, values), the entries that rounding would miss."""
    values = values.to(flat.device)
    if idx is None:
        flat.copy_((flat.to(values.dtype) + values).to(flat.dtype))
    else:
        idx = idx.to(flat.device)
        flat[idx] = (flat[idx].to(values.dtype) + values).to(flat.dtype)
    if exact is not None:
        positions, exact_values = (t.to(flat.device) for t in exact)
        flat[positions if idx is None else idx[positions]] = exact_values.to(flat.dtype)
