"""Refusing a damaged delta: every check its two files pass before anything touches a model.

:func:`liftft.deltas.delta.load_delta` reads a delta whole and checks it whole, so a
truncated file, a stray tensor or an index out of range is named as the
delta's defect (the file, the weight, what is wrong) before a model is even
loaded. Unchecked, such a defect surfaced later as a base fingerprint mismatch
that blamed the model, as an IndexError, or not at all, as a wrong merge.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from liftft.engine.layout import expand, index_dtype

# What the values of a delta may be: exact_difference's dtypes. A narrower difference cannot rebuild the
# trained weights exactly, so a bf16 or fp16 one is refused rather than applied a little wrong.
VALUE_DTYPES = (torch.float32, torch.float64)
INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)
# The tensors a weight may have in delta.safetensors; any other tensor belongs to no weight.
WEIGHT_PARTS = ("values", "indices", "row_offsets", "columns", "exact_positions", "exact_values")
# How a pickle begins: torch.save's zip archive, or a bare pickle's protocol opcode.
PICKLE_STARTS = (b"PK\x03\x04", b"\x80")
WEIGHT_RECORD = {
    "shape": (lambda v: isinstance(v, list) and all(type(n) is int and n >= 0 for n in v), "a list of sizes"),
    "dtype": (lambda v: isinstance(v, str) and isinstance(getattr(torch, v, None), torch.dtype), "a torch dtype"),
    "base_sha256": (lambda v: isinstance(v, str), "a fingerprint string"),
}


def read_meta(meta_file: Path, newest_format: int) -> dict:
    """The contents of liftft.json, refused unless it is a JSON object of a format no newer than
    ``newest_format`` whose ``weights`` maps each weight name to its {shape, dtype, base_sha256}."""
    try:
        meta = json.loads(meta_file.read_bytes())
    except ValueError as err:  # not JSON, or not text at all
        raise _damaged(meta_file, f"it is not JSON ({err})") from err
    if not isinstance(meta, dict):
        raise _damaged(meta_file, f"it holds a JSON {type(meta).__name__}, not an object")
    version = meta.get("format_version", 1)
    if type(version) is not int:
        raise _damaged(meta_file, f"its format_version is {version!r}, not a whole number")
    if version > newest_format:
        raise ValueError(f"{meta_file} has delta format {version}, newer than this liftft reads ({newest_format}); "
                         "upgrade liftft")
    if not isinstance(meta.get("weights"), dict):
        raise _damaged(meta_file, 'it has no "weights" object naming each weight\'s shape, dtype and base_sha256')
    for name, record in meta["weights"].items():
        _check_weight_record(meta_file, name, record)
    return meta


def _check_weight_record(meta_file: Path, name: str, record) -> None:
    if not isinstance(record, dict):
        raise _damaged(meta_file, f"weight {name} is recorded as {record!r}, not as its shape, dtype and base_sha256")
    for field, (valid, expected) in WEIGHT_RECORD.items():
        if not valid(record.get(field)):
            raise _damaged(meta_file, f"weight {name} has {field} {record.get(field)!r}, not {expected}")


def read_tensors(tensor_file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of delta.safetensors, refusing, by the file's name, one that safetensors cannot read.

    A pickle is refused before anything unpickles it: deltas are safetensors only.
    """
    try:
        return load_file(tensor_file)
    except SafetensorError as err:
        with open(tensor_file, "rb") as f:
            if f.read(4).startswith(PICKLE_STARTS):
                raise ValueError(f"{tensor_file} is a pickle (as torch.save writes), not safetensors; liftft deltas "
                                 "are safetensors only, and a pickle is never loaded") from err
        raise _damaged(tensor_file, f"safetensors cannot read it ({err}): it is truncated or overwritten") from err


def checked_entries(tensors: dict, meta: dict, tensor_file: Path, meta_file: Path) -> tuple[dict, dict]:
    """(entries, exact) of a delta whose files held ``tensors`` and ``meta`` (from :func:`read_meta`).

    ``entries`` maps each weight to (sorted flat indices, or None for a dense
    weight, and its values); ``exact`` maps a weight to (positions among its
    values, trained values). Raises ValueError naming the file, the weight and
    the defect for the first damage found.
    """
    entries, exact = {}, {}
    for name, record in meta["weights"].items():
        entries[name] = _weight_entries(tensors, name, record["shape"], tensor_file, meta_file)
        stored_exact = _pair(tensors, name, "exact_positions", "exact_values", tensor_file)
        if stored_exact:
            exact[name] = _checked_exact(*stored_exact, name, entries[name][1].numel(), tensor_file)
    _refuse_strays(tensors, meta["weights"], tensor_file, meta_file)
    return entries, exact


def _weight_entries(tensors: dict, name: str, shape: list[int], tensor_file: Path, meta_file: Path):
    values = tensors.get(f"{name}.values")
    if values is None:
        raise ValueError(f"{tensor_file} lacks {name}.values listed in {meta_file}")
    _check_values(values, f"{name}.values", tensor_file)
    indices = _stored_indices(tensors, name, shape, values, tensor_file)
    if indices is None and list(values.shape) != shape:
        raise _damaged(tensor_file, f"dense {name}.values have shape {list(values.shape)}, but {meta_file} records "
                                    f"{shape}")
    if indices is not None and values.shape != indices.shape:
        raise _damaged(tensor_file, f"{name} has {indices.numel()} entries, but its values have shape "
                                    f"{list(values.shape)}")
    return indices, values


def _check_values(values: torch.Tensor, key: str, tensor_file: Path) -> None:
    if values.dtype not in VALUE_DTYPES:
        raise _damaged(tensor_file, f"{key} are {_dtype_name(values)}, not float32 or float64, too narrow to rebuild "
                                    "the trained weights exactly")
    bad = (~values.isfinite()).flatten().nonzero().flatten()
    if bad.numel():
        raise ValueError(f"{tensor_file}: {key} hold {bad.numel()} NaN or infinite entries, the first at position "
                         f"{int(bad[0])}; the file is damaged or the run diverged, and applying it would break "
                         "the model")


def _stored_indices(tensors: dict, name: str, shape: list[int], values: torch.Tensor,
                    tensor_file: Path) -> torch.Tensor | None:
    """The checked, sorted flat indices of weight ``name`` in either format, or None for a dense delta."""
    flat = tensors.get(f"{name}.indices")  # format 1
    compressed = _pair(tensors, name, "row_offsets", "columns", tensor_file)
    if flat is not None and compressed:
        raise _damaged(tensor_file, f"{name} is stored both as {name}.indices and as {name}.row_offsets and columns")
    if flat is not None:
        _check_flat(flat, f"{name}.indices", math.prod(shape), tensor_file)
        return flat
    if compressed:
        return _checked_compressed(*compressed, values, name, shape, tensor_file)
    return None


def _check_flat(flat: torch.Tensor, key: str, stop: int, tensor_file: Path) -> None:
    """Refuse ``flat`` unless it is 1-D integers in [0, stop), strictly increasing (sorted and unique)."""
    _check_integers(flat, key, tensor_file)
    if flat.dim() != 1:
        raise _damaged(tensor_file, f"{key} have shape {list(flat.shape)}, not one dimension")
    outside = _first_outside(flat, stop)
    if outside is not None:
        raise _damaged(tensor_file, f"{key} hold {int(flat[outside])} at position {outside}, outside [0, {stop})")
    repeat = _first_not_increasing(flat)
    if repeat is not None:
        raise _damaged(tensor_file, f"{key} are not strictly increasing: {int(flat[repeat])} follows "
                                    f"{int(flat[repeat - 1])} at position {repeat}, though they are sorted and unique")


def _checked_compressed(row_offsets: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, name: str,
                        shape: list[int], tensor_file: Path) -> torch.Tensor:
    """The sorted flat indices that ``row_offsets`` and ``columns`` (format 2) hold, after checking them."""
    if len(shape) != 2:
        raise _damaged(tensor_file, f"{name} has row offsets and columns, but its shape {shape} is not a matrix")
    for key, tensor in ((f"{name}.row_offsets", row_offsets), (f"{name}.columns", columns)):
        _check_integers(tensor, key, tensor_file)
    if row_offsets.numel() != shape[0] + 1 or not int(row_offsets[-1]) == columns.numel() == values.numel():
        raise _damaged(tensor_file, f"{name} has {row_offsets.numel()} row offsets, {columns.numel()} columns and "
                                    f"{values.numel()} values for shape {shape}")
    if int(row_offsets[0]) != 0:
        raise _damaged(tensor_file, f"{name}.row_offsets start at {int(row_offsets[0])}, not 0")
    falls = (row_offsets.diff() < 0).nonzero().flatten()
    if falls.numel():
        row = int(falls[0])
        raise _damaged(tensor_file, f"{name}.row_offsets fall from {int(row_offsets[row])} to "
                                    f"{int(row_offsets[row + 1])} after row {row}")
    outside = _first_outside(columns, shape[1])
    if outside is not None:
        raise _damaged(tensor_file, f"{name}.columns hold {int(columns[outside])} in row "
                                    f"{_row_of(row_offsets, outside)}, outside [0, {shape[1]})")
    flat = expand(row_offsets, columns, shape[1])
    # With every column in range, the flat indices rise from row to row, so a fall is within one row.
    repeat = _first_not_increasing(flat)
    if repeat is not None:
        raise _damaged(tensor_file, f"{name}.columns are not strictly increasing in row {_row_of(row_offsets, repeat)}:"
                                    f" {int(columns[repeat])} follows {int(columns[repeat - 1])}, though a row's "
                                    "columns are sorted and unique")
    return flat.to(index_dtype(shape[0] * shape[1]))


def _checked_exact(positions: torch.Tensor, values: torch.Tensor, name: str, count: int,
                   tensor_file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    _check_integers(positions, f"{name}.exact_positions", tensor_file)
    if values.shape != positions.shape or _first_outside(positions, count) is not None:
        raise _damaged(tensor_file, f"{name}'s exact values do not match its {count} entries")
    _check_flat(positions, f"{name}.exact_positions", count, tensor_file)
    _check_values(values, f"{name}.exact_values", tensor_file)
    return positions, values


def _refuse_strays(tensors: dict, weights: dict, tensor_file: Path, meta_file: Path) -> None:
    known = {f"{name}.{part}" for name in weights for part in WEIGHT_PARTS}
    strays = sorted(set(tensors) - known)
    if strays:
        more = f" and {len(strays) - 1} more tensors" if len(strays) > 1 else ""
        raise _damaged(tensor_file, f"it holds {strays[0]}{more}, but {meta_file} lists no such weight")


def _pair(tensors: dict, name: str, first: str, second: str, tensor_file: Path):
    """Weight ``name``'s tensors ``first`` and ``second``, stored together or not at all: the pair, or None."""
    a, b = tensors.get(f"{name}.{first}"), tensors.get(f"{name}.{second}")
    if (a is None) != (b is None):
        raise ValueError(f"{tensor_file} holds only one of {name}.{first} and {name}.{second}")
    return None if a is None else (a, b)


def _check_integers(tensor: torch.Tensor, key: str, tensor_file: Path) -> None:
    if tensor.dtype not in INDEX_DTYPES:
        raise _damaged(tensor_file, f"{key} are {_dtype_name(tensor)}, not int16, int32 or int64")


def _first_outside(tensor: torch.Tensor, stop: int) -> int | None:
    """The position of the first entry of ``tensor`` outside [0, stop), or None."""
    wide = tensor.long()
    bad = ((wide < 0) | (wide >= stop)).flatten().nonzero().flatten()
    return int(bad[0]) if bad.numel() else None


def _first_not_increasing(flat: torch.Tensor) -> int | None:
    """The first position of 1-D ``flat`` whose entry is not above the one before it, or None."""
    bad = (flat[1:] <= flat[:-1]).nonzero().flatten()
    return int(bad[0]) + 1 if bad.numel() else None


def _row_of(row_offsets: torch.Tensor, position: int) -> int:
    """The row that entry ``position`` of a compressed matrix lies in."""
    return int(torch.searchsorted(row_offsets.long(), torch.tensor(position), right=True)) - 1


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _damaged(file: Path, defect: str) -> ValueError:
    return ValueError(f"{file}: {defect}; the file is damaged")
