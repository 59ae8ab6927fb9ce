"""The selected entries of a matrix, stored compactly: row offsets and narrow column indices.

LiftAdamW keeps, per target, the sorted flat indices of its selected entries.
Stored flat they cost 4 bytes per entry (int32); stored as CSR without values,
``row_offsets`` (m + 1 int32 or int64: entry e lies in row r when
row_offsets[r] <= e < row_offsets[r + 1]) and ``columns`` (int16 when the
matrix has at most 32,768 columns, as every hidden size in use does), they cost
2 bytes per entry plus a few per row. Flat indices are rebuilt from them on
demand, one matrix at a time.
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
