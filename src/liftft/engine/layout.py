"""The selected entries of a matrix, stored compactly: row offsets and narrow column indices.

LiftAdamW keeps, per target, the sorted flat indices of its selected entries.
Stored flat they cost 4 bytes per entry (int32); stored as CSR without values,
``row_offsets`` (m + 1 int32 or int64: entry e lies in row r when
row_offsets[r] <= e < row_offsets[r + 1]) and ``columns`` (int16 when the
matrix has at most 32,768 columns, as every hidden size in use does), they cost
2 bytes per entry plus a few per row. Flat indices are rebuilt from them on
demand, one matrix at a time.

The sorted-set operations at the end (membership, carry over, difference,
merge) are what a refresh does with two selections of one matrix.
"""

from __future__ import annotations

import torch

INT16_COLUMNS = 2**15


def column_dtype(columns: int) -> torch.dtype:
    """int16 when every column index of a matrix with ``columns`` columns fits, else int32."""
    return torch.int16 if columns <= INT16_COLUMNS else torch.int32


def compress(flat: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_offsets, columns) of the sorted, unique flat indices ``flat`` into an (m, n) matrix, on flat's device."""
    m, n = shape
    flat = flat.long()
    rows = torch.div(flat, n, rounding_mode="floor")
    row_offsets = torch.zeros(m + 1, dtype=torch.int64, device=flat.device)
    row_offsets[1:] = torch.bincount(rows, minlength=m).cumsum(0)
    offset_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    return row_offsets.to(offset_dtype), (flat - rows * n).to(column_dtype(n))


def expand(row_offsets: torch.Tensor, columns: torch.Tensor, n: int) -> torch.Tensor:
    """The sorted int64 flat indices that :func:`compress` compressed, for a matrix with ``n`` columns."""
    m = row_offsets.numel() - 1
    counts = row_offsets.diff()
    # output_size keeps repeat_interleave from reading the total back from the device.
    rows = torch.repeat_interleave(torch.arange(m, device=columns.device), counts, output_size=columns.numel())
    return rows * n + columns.long()


def index_dtype(numel: int) -> torch.dtype:
    """The dtype of flat indices into a matrix of ``numel`` entries: int32 when every one fits, else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


# ----- sorted index sets: what a refresh keeps, adds and records -----
#
# Each function takes sorted, unique 1-D index tensors of one dtype on one device, and any side may be empty
# (an FSDP2 rank can hold no selected entry of a matrix before a refresh and some after it).


def find_sorted(haystack: torch.Tensor, needles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position, found) for each of ``needles`` in ``haystack``: found[i] iff needles[i] == haystack[position[i]]."""
    if haystack.numel() == 0:
        return torch.zeros_like(needles, dtype=torch.int64), torch.zeros_like(needles, dtype=torch.bool)
    position = torch.searchsorted(haystack, needles).clamp_(max=haystack.numel() - 1)
    return position, haystack[position] == needles


def carry_over(old: torch.Tensor, old_values: torch.Tensor, new: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """Values for indices ``new``: ``old_values`` where the index is in ``old``, ``fresh`` (same length as new) elsewhere."""
    if old.numel() == 0:
        return fresh.clone()
    position, found = find_sorted(old, new)
    return torch.where(found, old_values[position], fresh)


def difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The indices of ``a`` that are not in ``b``, sorted."""
    return a[~find_sorted(b, a)[1]]


def merge_sorted(a: torch.Tensor, a_values: torch.Tensor, b: torch.Tensor, b_values: torch.Tensor):
    """(sorted union, values) of two disjoint index sets and their values, in O(n log m) without a full sort, on a's device."""
    merged = torch.empty(a.numel() + b.numel(), dtype=a.dtype, device=a.device)
    values = torch.empty(merged.numel(), dtype=a_values.dtype, device=a.device)
    a_at = torch.arange(a.numel(), device=a.device) + torch.searchsorted(b, a)
    b_at = torch.arange(b.numel(), device=a.device) + torch.searchsorted(a, b)
    merged[a_at], values[a_at] = a, a_values
    merged[b_at], values[b_at] = b, b_values
    return merged, values
