"""Damaged deltas are named (file, weight, defect) before any model is loaded or changed; reruns remove litter."""

import json
import os
import re
import shutil
import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file

import liftft.utils.hf
from conftest import tiny_llama, train_and_save
from liftft import apply_delta
from liftft import load_delta
from liftft.utils.atomic import remove_leftovers
from liftft.cli import main
from liftft.deltas.delta import DELTA_FILE, META_FILE

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")

SPARSE = "model.layers.1.mlp.down_proj.weight"  # 32 x 64, and not the first weight checked
DENSE = "model.norm.weight"  # 32 entries, the last weight


@pytest.fixture(scope="module")
def intact(tmp_path_factory, tokenizer):
    """A base with its tokenizer (intact/base) and an undamaged delta trained from it (intact/delta)."""
    root = tmp_path_factory.mktemp("intact")
    train_and_save(root, tokenizer)
    return root


def stored_tensors(delta):
    # Copies: the loaded tensors may map the file, which is about to be overwritten.
    return {key: tensor.clone() for key, tensor in load_file(delta / DELTA_FILE).items()}


def edit_tensors(delta, change):
    tensors = stored_tensors(delta)
    change(tensors)
    save_file(tensors, delta / DELTA_FILE)
    return tensors


def edit_meta(delta, change):
    meta = json.loads((delta / META_FILE).read_text())
    change(meta)
    (delta / META_FILE).write_text(json.dumps(meta))


def damage_busy_row(delta, change) -> tuple[int, int]:
    """Call ``change(columns, start, end)`` on the stored entries of SPARSE's first row that has two or more of
    them, save, and return (that row, its first entry)."""
    tensors = stored_tensors(delta)
    offsets = tensors[f"{SPARSE}.row_offsets"].tolist()
    row = next(r for r in range(len(offsets) - 1) if offsets[r + 1] - offsets[r] >= 2)
    change(tensors[f"{SPARSE}.columns"], offsets[row], offsets[row + 1])
    save_file(tensors, delta / DELTA_FILE)
    return row, offsets[row]


def as_format_1(tensors):
    """Rewrite SPARSE as format 1 (flat ``.indices``), as liftft before compressed indices wrote it."""
    offsets, columns = tensors.pop(f"{SPARSE}.row_offsets").long(), tensors.pop(f"{SPARSE}.columns").long()
    rows = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff())
    tensors[f"{SPARSE}.indices"] = (rows * 64 + columns).to(torch.int32)
    return tensors[f"{SPARSE}.indices"]


# Each damages a copy of the intact delta and returns (the file the message must begin with, a pattern of the
# weight and the defect it must name).


def truncated(delta):
    data = (delta / DELTA_FILE).read_bytes()
    (delta / DELTA_FILE).write_bytes(data[:-100])
    return DELTA_FILE, r": safetensors cannot read it \(.*incomplete metadata.*\): it is truncated or overwritten"


def pickled(delta):
    torch.save(stored_tensors(delta), delta / DELTA_FILE)
    return DELTA_FILE, r" is a pickle \(as torch.save writes\), not safetensors; .* a pickle is never loaded"


def meta_not_json(delta):
    (delta / META_FILE).write_text('{"format_version": 2, "weights": {')
    return META_FILE, r": it is not JSON \(Expecting property name"


def meta_without_weights(delta):
    edit_meta(delta, lambda meta: meta.pop("weights"))
    return META_FILE, r': it has no "weights" object'


def weights_not_a_table(delta):
    edit_meta(delta, lambda meta: meta.update(weights=list(meta["weights"])))
    return META_FILE, r': it has no "weights" object'


def weight_record_without_dtype(delta):
    edit_meta(delta, lambda meta: meta["weights"][SPARSE].pop("dtype"))
    return META_FILE, rf": weight {SPARSE} has dtype None, not a torch dtype"


def column_past_the_last(delta):
    row, _ = damage_busy_row(delta, lambda columns, start, end: columns.index_fill_(0, torch.tensor([end - 1]), 64))
    return DELTA_FILE, rf": {SPARSE}\.columns hold 64 in row {row}, outside \[0, 64\)"


def negative_column(delta):
    row, _ = damage_busy_row(delta, lambda columns, start, end: columns.index_fill_(0, torch.tensor([start]), -1))
    return DELTA_FILE, rf": {SPARSE}\.columns hold -1 in row {row}, outside \[0, 64\)"


def repeated_column(delta):
    def repeat_first(columns, start, end):
        columns[start + 1] = columns[start]

    row, start = damage_busy_row(delta, repeat_first)
    column = int(stored_tensors(delta)[f"{SPARSE}.columns"][start])
    return DELTA_FILE, rf": {SPARSE}\.columns are not strictly increasing in row {row}: {column} follows {column}"


def row_offsets_falling(delta):
    tensors = stored_tensors(delta)
    offsets = tensors[f"{SPARSE}.row_offsets"]
    row = next(r for r in range(1, offsets.numel() - 2) if offsets[r] < offsets[r + 1])
    low, high = int(offsets[row]), int(offsets[row + 1])
    offsets[row], offsets[row + 1] = high, low
    save_file(tensors, delta / DELTA_FILE)
    return DELTA_FILE, rf": {SPARSE}\.row_offsets fall from {high} to {low} after row {row}"


def row_offsets_not_from_zero(delta):
    edit_tensors(delta, lambda tensors: tensors[f"{SPARSE}.row_offsets"].index_fill_(0, torch.tensor([0]), 1))
    return DELTA_FILE, rf": {SPARSE}\.row_offsets start at 1, not 0"


def row_offsets_miscounted(delta):
    tensors = edit_tensors(delta, lambda tensors: tensors[f"{SPARSE}.row_offsets"][-1:].add_(1))
    count = tensors[f"{SPARSE}.columns"].numel()
    return DELTA_FILE, rf": {SPARSE} has 33 row offsets, {count} columns and {count} values for shape \[32, 64\]"


def float_columns(delta):
    edit_tensors(delta, lambda tensors: tensors.update({f"{SPARSE}.columns": tensors[f"{SPARSE}.columns"].float()}))
    return DELTA_FILE, rf": {SPARSE}\.columns are float32, not int16, int32 or int64"


def flat_index_past_the_end(delta):
    tensors = edit_tensors(delta, lambda tensors: as_format_1(tensors).index_fill_(0, torch.tensor([-1]), 32 * 64))
    last = tensors[f"{SPARSE}.indices"].numel() - 1
    return DELTA_FILE, rf": {SPARSE}\.indices hold 2048 at position {last}, outside \[0, 2048\)"


def negative_flat_index(delta):
    edit_tensors(delta, lambda tensors: as_format_1(tensors).index_fill_(0, torch.tensor([0]), -1))
    return DELTA_FILE, rf": {SPARSE}\.indices hold -1 at position 0, outside \[0, 2048\)"


def repeated_flat_index(delta):
    def repeat_first(tensors):
        indices = as_format_1(tensors)
        indices[1] = indices[0]

    tensors = edit_tensors(delta, repeat_first)
    index = int(tensors[f"{SPARSE}.indices"][0])
    return DELTA_FILE, rf": {SPARSE}\.indices are not strictly increasing: {index} follows {index} at position 1"


def nan_value(delta):
    edit_tensors(delta, lambda tensors: tensors[f"{SPARSE}.values"].index_fill_(0, torch.tensor([2]), float("nan")))
    return DELTA_FILE, rf": {SPARSE}\.values hold 1 NaN or infinite entries, the first at position 2"


def infinite_dense_value(delta):
    edit_tensors(delta, lambda tensors: tensors[f"{DENSE}.values"].index_fill_(0, torch.tensor([5]), float("inf")))
    return DELTA_FILE, rf": {DENSE}\.values hold 1 NaN or infinite entries, the first at position 5"


def nan_exact_value(delta):
    def change(tensors):
        tensors[f"{SPARSE}.exact_positions"] = torch.tensor([0, 3])
        tensors[f"{SPARSE}.exact_values"] = torch.tensor([0.5, float("nan")], dtype=torch.float64)
    edit_tensors(delta, change)
    return DELTA_FILE, rf": {SPARSE}\.exact_values hold 1 NaN or infinite entries, the first at position 1"


def bfloat16_values(delta):
    edit_tensors(delta, lambda tensors: tensors.update({f"{SPARSE}.values": tensors[f"{SPARSE}.values"].bfloat16()}))
    return DELTA_FILE, rf": {SPARSE}\.values are bfloat16, not float32 or float64"


def float16_dense_values(delta):
    edit_tensors(delta, lambda tensors: tensors.update({f"{DENSE}.values": tensors[f"{DENSE}.values"].half()}))
    return DELTA_FILE, rf": {DENSE}\.values are float16, not float32 or float64"


def tensor_of_no_weight(delta):
    edit_tensors(delta, lambda tensors: tensors.update({"lm_head.weight.values": torch.zeros(3, dtype=torch.float64)}))
    return DELTA_FILE, rf": it holds lm_head\.weight\.values, but .*{META_FILE} lists no such weight"


def weight_missing_from_meta(delta):
    edit_meta(delta, lambda meta: meta["weights"].pop(SPARSE))
    return DELTA_FILE, rf": it holds {SPARSE}\.columns and 2 more tensors, but .*{META_FILE} lists no such weight"


def weight_missing_from_tensors(delta):
    edit_tensors(delta, lambda tensors: [tensors.pop(f"{SPARSE}.{part}") for part in ("row_offsets", "columns", "values")])
    return DELTA_FILE, rf" lacks {SPARSE}\.values listed in .*{META_FILE}"


def exact_values_without_positions(delta):
    edit_tensors(delta, lambda tensors: tensors.update({f"{SPARSE}.exact_values": torch.zeros(1, dtype=torch.float64)}))
    return DELTA_FILE, rf" holds only one of {SPARSE}\.exact_positions and {SPARSE}\.exact_values"


def dense_values_of_another_shape(delta):
    edit_tensors(delta, lambda tensors: tensors.update({f"{DENSE}.values": tensors[f"{DENSE}.values"][:-1]}))
    return DELTA_FILE, rf": dense {DENSE}\.values have shape \[31\], but .*{META_FILE} records \[32\]"


DAMAGE = [truncated, pickled, meta_not_json, meta_without_weights, weights_not_a_table, weight_record_without_dtype,
          column_past_the_last, negative_column, repeated_column, row_offsets_falling, row_offsets_not_from_zero,
          row_offsets_miscounted, float_columns, flat_index_past_the_end, negative_flat_index, repeated_flat_index,
          nan_value, infinite_dense_value, nan_exact_value, bfloat16_values, float16_dense_values,
          tensor_of_no_weight, weight_missing_from_meta, weight_missing_from_tensors, exact_values_without_positions,
          dense_values_of_another_shape]


def damaged_copy(intact, tmp_path, damage):
    """A copy of the intact delta damaged by ``damage``, and the pattern the start of its message must match."""
    delta = tmp_path / "delta"
    shutil.copytree(intact / "delta", delta)
    file, defect = damage(delta)
    return delta, re.escape(str(delta / file)) + defect


def contents(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.fixture
def no_model_loads(monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded for a damaged delta")

    monkeypatch.setattr(liftft.utils.hf, "load_model", load_model)


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda damage: damage.__name__)
def test_load_and_apply_name_the_damage_and_change_nothing(intact, tmp_path, damage):
    delta, message = damaged_copy(intact, tmp_path, damage)
    stored = contents(delta)
    with pytest.raises(ValueError) as loaded:
        load_delta(delta)
    assert re.match(message, str(loaded.value)), str(loaded.value)

    model = tiny_llama()  # the base the delta was trained from
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ValueError) as applied:
        apply_delta(model, delta)
    assert str(applied.value) == str(loaded.value)
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    assert contents(delta) == stored


def command_line(command, intact, delta, output):
    if command == "merge":
        return ["merge", "--base", str(intact / "base"), "--delta", str(delta), "--output", str(output)]
    return ["export-shira", "--delta", str(delta), "--output", str(output)]


@pytest.mark.parametrize("command", ["merge", "export-shira"])
@pytest.mark.parametrize("damage", DAMAGE, ids=lambda damage: damage.__name__)
def test_merge_and_export_refuse_before_loading_the_model(intact, tmp_path, damage, command, capsys, no_model_loads):
    delta, message = damaged_copy(intact, tmp_path, damage)
    assert main(command_line(command, intact, delta, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert re.match(f"liftft {command}: error: {message}", err) and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta"]  # no output, no temporary beside it


@pytest.mark.parametrize("command", ["merge", "export-shira"])
def test_the_intact_delta_does_reach_the_model(intact, tmp_path, command, no_model_loads):
    # Without this, the tests above could pass with a spy that merge and export never call.
    with pytest.raises(AssertionError, match="a model was loaded"):
        main(command_line(command, intact, intact / "delta", tmp_path / "out"))


@pytest.mark.parametrize("command", ["merge", "export-shira"])
def test_a_rerun_removes_what_a_killed_run_left_and_nothing_else(intact, tmp_path, command):
    leftovers = [".out.tmp-0123abcd", ".out.old-89abcdef"]
    unrelated = [".out.tmp-keep", ".other.tmp-01234567", ".out.tmp-0123ABCD", ".out.old-0123abcd0", "out.tmp-0123abcd"]
    for name in leftovers + unrelated:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half a model")
    assert main(command_line(command, intact, intact / "delta", tmp_path / "out")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *unrelated])


def test_remove_leftovers_takes_atomic_writes_temporaries_and_keeps_the_rest(tmp_path):
    target = tmp_path / "delta.safetensors"
    target.write_bytes(b"the real one")
    fd, temporary = tempfile.mkstemp(dir=tmp_path, prefix=f".{target.name}.")  # what atomic_write makes
    os.close(fd)
    (tmp_path / f".{target.name}.tmp-89abcdef").mkdir()
    kept = [f".{target.name}.abc", f".{target.name}.abcdefghi", f"{target.name}.abcdefgh", ".delta.abcdefgh"]
    for name in kept:
        (tmp_path / name).write_bytes(b"not ours")
    (tmp_path / f".{target.name}.abcdefgh").mkdir()  # atomic_write makes files, never directories
    assert remove_leftovers(target) == sorted([tmp_path / temporary, tmp_path / f".{target.name}.tmp-89abcdef"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, f".{target.name}.abcdefgh", *kept])
    assert target.read_bytes() == b"the real one"
    assert remove_leftovers(tmp_path / "no-such-dir" / "out") == []
