"""The compressed layout of selected entries (liftft.engine.layout) against a brute-force reference."""

import pytest
import torch

from liftft.engine.layout import compress, expand


def sorted_sample(m, n, k, seed=0):
    return torch.randperm(m * n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


@pytest.mark.parametrize("shape,k", [((7, 5), 12), ((1, 9), 9), ((9, 1), 3), ((64, 40), 1), ((6, 4), 24)])
def test_round_trip_and_offsets_match_brute_force(shape, k):
    m, n = shape
    flat = sorted_sample(m, n, k).to(torch.int32)
    row_offsets, columns = compress(flat, shape)
    assert columns.dtype == torch.int16 and row_offsets.dtype == torch.int32
    want_offsets = [sum(1 for i in flat.tolist() if i // n < r) for r in range(m + 1)]
    assert row_offsets.tolist() == want_offsets
    assert columns.tolist() == [i % n for i in flat.tolist()]
    assert torch.equal(expand(row_offsets, columns, n), flat.long())


def test_empty_rows_and_an_empty_selection():
    flat = torch.tensor([3, 4, 17])  # rows 0 and 3 of a 5x5 matrix; rows 1, 2 and 4 empty
    row_offsets, columns = compress(flat, (5, 5))
    assert row_offsets.tolist() == [0, 2, 2, 2, 3, 3] and columns.tolist() == [3, 4, 2]
    assert torch.equal(expand(row_offsets, columns, 5), flat)
    empty_offsets, empty_columns = compress(torch.zeros(0, dtype=torch.int64), (3, 4))
    assert empty_offsets.tolist() == [0, 0, 0, 0] and expand(empty_offsets, empty_columns, 4).numel() == 0


def test_columns_widen_past_int16():
    n = 2**15 + 1
    flat = torch.tensor([n - 1, n + 2**15])  # column 32768 does not fit int16
    row_offsets, columns = compress(flat, (2, n))
    assert columns.dtype == torch.int32 and columns.tolist() == [n - 1, 2**15]
    assert torch.equal(expand(row_offsets, columns, n), flat)
    assert compress(torch.tensor([2**15 - 1]), (1, 2**15))[1].dtype == torch.int16


SETS = [([], []), ([], [1, 4]), ([2, 5], []), ([1, 3, 5], [0, 3, 4, 5, 9]), ([7], [7]), ([0, 2], [1, 3])]


@pytest.mark.parametrize("old,new", SETS)
def test_sorted_set_operations_against_python_sets_including_empty_sides(old, new):
    from liftft.engine.layout import carry_over, difference, find_sorted, merge_sorted

    a, b = torch.tensor(old, dtype=torch.int64), torch.tensor(new, dtype=torch.int64)
    position, found = find_sorted(a, b)
    assert found.tolist() == [x in old for x in new]
    assert [old[i] for i, f in zip(position.tolist(), found.tolist()) if f] == [x for x in new if x in old]

    old_values = torch.tensor([10.0 * x for x in old])
    carried = carry_over(a, old_values, b, torch.full((len(new),), -1.0))
    assert carried.tolist() == [10.0 * x if x in old else -1.0 for x in new]

    added = difference(b, a)
    assert added.tolist() == sorted(set(new) - set(old))
    merged, values = merge_sorted(a, old_values, added, 10.0 * added.float())
    assert merged.tolist() == sorted(set(old) | set(new)) and values.tolist() == [10.0 * x for x in merged.tolist()]
