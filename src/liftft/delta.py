"""Compact deltas: the trained entries of a LIFT run as (indices, final - base), saved with safetensors.

Format 2 stores each sparse weight's indices compressed (``<name>.row_offsets``
and ``<name>.columns``, see :mod:`liftft.layout`): 2 bytes per entry instead of
the 4 of format 1's flat ``<name>.indices``, which still loads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from liftft.atomic import atomic_write, write_json_atomic
from liftft.layout import compress, expand
from liftft.selection import index_dtype

DELTA_FILE = "delta.safetensors"
META_FILE = "liftft.json"
FORMAT_VERSION = 2


@dataclass
class Delta:
    """Per weight name, (sorted flat indices or None for a dense delta, fp32 values), plus metadata."""

    entries: dict[str, tuple[torch.Tensor | None, torch.Tensor]]
    meta: dict

    @property
    def num_entries(self) -> int:
        return sum(values.numel() for _, values in self.entries.values())


def fingerprint(values: torch.Tensor) -> str:
    """sha256 of values as fp32, so a bf16 and an fp32 load of the same checkpoint agree."""
    data = values.detach().float().contiguous().cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


def delta_from_optimizer(opt) -> Delta:
    """Every entry ``opt`` ever trained, as final minus base in fp32, with per-weight base fingerprints."""
    entries, weights = {}, {}
    for name, p, kind in opt.trained_parameters():
        state = opt.state[p]
        if "base" not in state:  # a dense param that never received a gradient
            continue
        base = state["base"]
        if kind == "lift":
            idx = state["touched"]
            final = p.detach().view(-1)[idx.to(p.device)].cpu()
        else:
            idx, final = None, p.detach().cpu()
        values = exact_difference(final, base)
        entries[name] = (idx, values)
        weights[name] = {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
                         "base_sha256": fingerprint(base)}
    meta = {"format_version": FORMAT_VERSION, "config": opt.cfg.to_dict(), "weights": weights}
    return Delta(entries, meta)


def exact_difference(final: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """final - base, in a dtype wide enough that base + difference rounds back to exactly ``final``.

    That is fp32 for 16-bit weights and fp64 for fp32 weights: an fp32
    difference of fp32 weights is off by an ulp for entries that moved far
    relative to their size (about 2% of entries in a short fp32 run at lr 1e-3).
    """
    wide = torch.float64 if final.dtype in (torch.float32, torch.float64) else torch.float32
    return final.to(wide) - base.to(wide)


def save_delta(opt, path, *, base_model: str | None = None, training_args: dict | None = None,
               metrics: dict | None = None) -> Path:
    """Write ``path``/delta.safetensors and ``path``/liftft.json for the run trained by ``opt``.

    The delta holds, per target weight, every entry the run ever changed, as
    ``<name>.row_offsets`` and ``<name>.columns`` (sorted; :mod:`liftft.layout`),
    and ``<name>.values`` (final minus base, in fp32, or fp64 for fp32 weights so
    that re-application stays exact); dense params are saved whole as
    ``<name>.values``. The JSON holds the LIFT config,
    the base model, shapes and base fingerprints, training arguments and metrics.
    Both files are written atomically.
    """
    delta = delta_from_optimizer(opt)
    delta.meta.update(base_model=base_model, training_args=training_args or {}, metrics=metrics or {})
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
    atomic_write(path / DELTA_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "liftft-delta"}))
    write_json_atomic(path / META_FILE, delta.meta)


def load_delta(path) -> Delta:
    """Read a delta directory (or its delta.safetensors file) written by :func:`save_delta`."""
    path = Path(path)
    directory = path.parent if path.name == DELTA_FILE else path
    tensor_file, meta_file = directory / DELTA_FILE, directory / META_FILE
    for f in (tensor_file, meta_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: {directory} is not a liftft delta directory")
    meta = json.loads(meta_file.read_text())
    version = meta.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise ValueError(f"{meta_file} has delta format {version}, newer than this liftft reads ({FORMAT_VERSION}); "
                         "upgrade liftft")
    tensors = load_file(tensor_file)
    entries = {}
    for name, info in meta["weights"].items():
        if f"{name}.values" not in tensors:
            raise ValueError(f"{tensor_file} lacks {name}.values listed in {meta_file}")
        entries[name] = (_stored_indices(tensors, name, info["shape"], tensor_file), tensors[f"{name}.values"])
    return Delta(entries, meta)


def _stored_indices(tensors: dict, name: str, shape: list[int], tensor_file: Path) -> torch.Tensor | None:
    """The sorted flat indices of weight ``name`` in either format, or None for a dense delta."""
    if f"{name}.indices" in tensors:  # format 1
        return tensors[f"{name}.indices"]
    parts = [f"{name}.row_offsets" in tensors, f"{name}.columns" in tensors]
    if not any(parts):
        return None
    if not all(parts):
        raise ValueError(f"{tensor_file} holds only one of {name}.row_offsets and {name}.columns")
    row_offsets, columns, values = tensors[f"{name}.row_offsets"], tensors[f"{name}.columns"], tensors[f"{name}.values"]
    if row_offsets.numel() != shape[0] + 1 or not int(row_offsets[-1]) == columns.numel() == values.numel():
        raise ValueError(f"{tensor_file}: {name} has {row_offsets.numel()} row offsets, {columns.numel()} columns and "
                         f"{values.numel()} values for shape {shape}; the file is damaged")
    return expand(row_offsets, columns, shape[1]).to(index_dtype(shape[0] * shape[1]))


def check_compatible(model: nn.Module, delta: Delta) -> None:
    """Raise ValueError naming the first weight whose shape or base fingerprint differs from the delta's base."""
    params = dict(model.named_parameters())
    for name, info in delta.meta["weights"].items():
        if name not in params:
            raise ValueError(f"delta weight {name} is not in the model")
        if list(params[name].shape) != info["shape"]:
            raise ValueError(f"shape mismatch at {name}: model has {list(params[name].shape)}, delta expects {info['shape']}")
    for name, info in delta.meta["weights"].items():
        idx, _ = delta.entries[name]
        p = params[name].detach()
        current = p.view(-1)[idx.to(p.device).long()] if idx is not None else p
        if fingerprint(current) != info["base_sha256"]:
            raise ValueError(
                f"base fingerprint mismatch at {name}: this model is not the base the delta was trained from"
                " (or the delta was already applied)"
            )


@torch.no_grad()
def apply_delta(model: nn.Module, path, scale: float = 1.0) -> nn.Module:
    """Add ``scale`` times the delta at ``path`` to ``model`` in place and return it.

    With scale 1 on the base model this reproduces the trained weights exactly.
    Raises ValueError naming the first weight whose shape or base fingerprint
    does not match, before changing anything.
    """
    delta = path if isinstance(path, Delta) else load_delta(path)
    check_compatible(model, delta)
    params = dict(model.named_parameters())
    for name, (idx, values) in delta.entries.items():
        p = params[name]
        values = values.to(p.device)
        if idx is None:
            p.copy_((p.to(values.dtype) + scale * values).to(p.dtype))
        else:
            flat = p.view(-1)
            idx = idx.to(p.device).long()
            flat[idx] = (flat[idx].to(values.dtype) + scale * values).to(p.dtype)
    return model
