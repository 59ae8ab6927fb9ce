"""Deltas: every trained entry, exact re-application, and refusal to apply to the wrong base."""

import json

import pytest
import torch

from conftest import tiny_llama
from liftft import LiftAdamW
from liftft import LiftConfig
from liftft import apply_delta
from liftft import load_delta
from liftft import save_delta
from liftft.deltas.delta import exact_difference

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")


def train_with_refreshes(model, steps=6, lr=1e-2):
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    opt = LiftAdamW(model, LiftConfig(rank=1, filter_rank=2, update_interval=2), lr=lr, dense_params=norms)
    seen = {n: set() for n in opt.target_names}
    for s in range(steps):
        for n in opt.target_names:
            seen[n] |= set(opt.indices(n).tolist())
        ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(s))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for n in opt.target_names:  # the refresh after the last step selects entries too
        seen[n] |= set(opt.indices(n).tolist())
    return opt, seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_reproduces_trained_weights_exactly(tmp_path, dtype):
    trained = tiny_llama(dtype=dtype)
    opt, seen = train_with_refreshes(trained)
    save_delta(opt, tmp_path, base_model="tiny", metrics={"loss": 1.0})

    delta = load_delta(tmp_path)
    base = tiny_llama(dtype=dtype)
    for name, p in base.named_parameters():
        changed = (p.detach() != dict(trained.named_parameters())[name].detach()).flatten().nonzero().flatten()
        if name in opt.target_names:
            idx, values = delta.entries[name]
            assert idx.tolist() == sorted(seen[name])  # every entry ever selected, sorted
            assert len(seen[name]) > opt.indices(name).numel()  # refreshes widened the union
            assert set(changed.tolist()) <= set(idx.tolist())
            assert values.dtype == (torch.float64 if dtype == torch.float32 else torch.float32)
    apply_delta(base, tmp_path)
    for (name, a), b in zip(base.named_parameters(), trained.parameters()):
        assert torch.equal(a, b), name
    meta = json.loads((tmp_path / "liftft.json").read_text())
    assert meta["base_model"] == "tiny" and meta["metrics"] == {"loss": 1.0}
    assert meta["config"]["update_interval"] == 2
    assert "model.norm.weight" in meta["weights"]


def test_scale_zero_and_half(tmp_path):
    trained = tiny_llama()
    opt, _ = train_with_refreshes(trained, steps=2)
    save_delta(opt, tmp_path)
    base = tiny_llama()
    original = {n: p.clone() for n, p in base.named_parameters()}
    apply_delta(base, tmp_path, scale=0.5)
    name = opt.target_names[0]
    idx, values = load_delta(tmp_path).entries[name]
    got = dict(base.named_parameters())[name].detach().flatten()[idx.long()]
    torch.testing.assert_close(got, (original[name].flatten()[idx.long()] + 0.5 * values).float())


def test_wrong_shape_names_first_mismatching_weight(tmp_path):
    opt, _ = train_with_refreshes(tiny_llama(), steps=1)
    save_delta(opt, tmp_path)
    other = tiny_llama(intermediate_size=48)
    with pytest.raises(ValueError, match=r"shape mismatch at model.layers.0.mlp.gate_proj.weight: model has \[48, 32\]"):
        apply_delta(other, tmp_path)


def test_wrong_base_and_double_application_refused(tmp_path):
    opt, _ = train_with_refreshes(tiny_llama(), steps=1)
    save_delta(opt, tmp_path)
    other = tiny_llama(seed=1)
    before = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="base fingerprint mismatch at model.layers.0.self_attn.q_proj.weight"):
        apply_delta(other, tmp_path)
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())  # nothing half-applied
    base = apply_delta(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="already applied"):
        apply_delta(base, tmp_path)


def test_fp32_load_of_bf16_base_matches_fingerprint(tmp_path):
    opt, _ = train_with_refreshes(tiny_llama(dtype=torch.bfloat16), steps=1)
    save_delta(opt, tmp_path)
    apply_delta(tiny_llama(dtype=torch.bfloat16).float(), tmp_path)


def test_differences_are_wide_enough_to_be_exact():
    # fp32 - fp32 rounded to fp32 loses entries that moved far relative to their size.
    base = torch.tensor([-0.0031480216421186924, 1.0])
    final = torch.tensor([-0.0005104174488224089, 1e-6])
    assert not torch.equal(base + (final - base), final)
    d = exact_difference(final, base)
    assert d.dtype == torch.float64 and torch.equal((base.double() + d).float(), final)
    assert exact_difference(final.bfloat16(), base.bfloat16()).dtype == torch.float32


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a liftft delta directory"):
        load_delta(tmp_path / "nope")


def test_indices_are_stored_compressed_and_format_1_still_applies(tmp_path):
    from safetensors.torch import load_file, save_file

    from liftft.deltas.delta import DELTA_FILE

    trained = tiny_llama(dtype=torch.bfloat16)
    opt, seen = train_with_refreshes(trained)
    save_delta(opt, tmp_path / "v2")
    stored = load_file(tmp_path / "v2" / DELTA_FILE)
    name = opt.target_names[0]
    assert f"{name}.indices" not in stored and stored[f"{name}.columns"].dtype == torch.int16
    rows, cols = tiny_llama().get_parameter(name).shape
    assert stored[f"{name}.row_offsets"].numel() == rows + 1
    assert [int(stored[f"{name}.columns"][i]) for i in range(3)] == [i % cols for i in sorted(seen[name])[:3]]

    # The same delta as session-1 liftft wrote it: flat int32 indices under <name>.indices.
    old = tmp_path / "v1"
    old.mkdir()
    flat = {}
    for key, tensor in stored.items():
        weight, _, part = key.rpartition(".")
        if part == "row_offsets":
            flat[f"{weight}.indices"] = torch.tensor(sorted(seen[weight]), dtype=torch.int32)
        elif part != "columns":
            flat[key] = tensor
    save_file(flat, old / DELTA_FILE)
    (old / "liftft.json").write_text((tmp_path / "v2" / "liftft.json").read_text())
    for path in (tmp_path / "v2", old):
        base = apply_delta(tiny_llama(dtype=torch.bfloat16), path)
        for (weight, a), b in zip(base.named_parameters(), trained.parameters()):
            assert torch.equal(a, b), (path.name, weight)


def test_damaged_compressed_indices_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from liftft.deltas.delta import DELTA_FILE

    opt, _ = train_with_refreshes(tiny_llama(), steps=2)
    save_delta(opt, tmp_path)
    tensors = load_file(tmp_path / DELTA_FILE)
    name = opt.target_names[1]
    tensors[f"{name}.columns"] = tensors[f"{name}.columns"][:-1]
    save_file(tensors, tmp_path / DELTA_FILE)
    with pytest.raises(ValueError, match=f"{name} has .* columns .* the file is damaged"):
        load_delta(tmp_path)
    del tensors[f"{name}.columns"]
    save_file(tensors, tmp_path / DELTA_FILE)
    with pytest.raises(ValueError, match=f"holds only one of {name}.row_offsets and {name}.columns"):
        load_delta(tmp_path)


def test_a_newer_format_is_refused_by_name(tmp_path):
    opt, _ = train_with_refreshes(tiny_llama(), steps=1)
    save_delta(opt, tmp_path)
    meta = json.loads((tmp_path / "liftft.json").read_text())
    assert meta["format_version"] == 2  # no entry needs exact values: readable by liftft before format 3
    meta["format_version"] = 4
    (tmp_path / "liftft.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has delta format 4, newer than this liftft reads \\(3\\)"):
        load_delta(tmp_path)


@pytest.mark.parametrize("dtype,tiny", [(torch.bfloat16, 2.0**-30), (torch.float32, 2.0**-60)])
def test_entries_that_shrank_far_below_their_base_are_stored_exactly(tmp_path, dtype, tiny):
    """base + (final - base) rounds such an entry to 0 in any width liftft stores differences in."""
    def base_model():
        model = tiny_llama(dtype=dtype)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0, :3] = 1.0
            model.model.norm.weight[:2] = 1.0
        return model

    trained = base_model()
    target = trained.model.layers[0].mlp.down_proj.weight
    dense_cfg = LiftConfig(rank=None, density=1.0, update_interval=None, target_modules=["down_proj"])
    opt = LiftAdamW(trained, dense_cfg, dense_params=[trained.model.norm.weight])
    trained(input_ids=torch.arange(3, 13)[None], labels=torch.arange(3, 13)[None]).loss.backward()
    opt.step()  # the dense param gets its state, base included
    with torch.no_grad():  # as if training had moved them there
        target[0, :3] = torch.tensor([tiny, -tiny, 3 * tiny])
        trained.model.norm.weight[:2] = torch.tensor([tiny, -tiny])
    save_delta(opt, tmp_path)
    meta = json.loads((tmp_path / "liftft.json").read_text())
    assert meta["format_version"] == 3
    delta = load_delta(tmp_path)
    assert delta.exact["model.layers.0.mlp.down_proj.weight"][0].tolist() == [0, 1, 2]
    assert delta.exact["model.norm.weight"][0].tolist() == [0, 1]
    rebuilt = apply_delta(base_model(), tmp_path)
    for (name, a), b in zip(rebuilt.named_parameters(), trained.parameters()):
        assert torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                           b.view(torch.int16 if b.element_size() == 2 else torch.int32)), name


def test_damaged_exact_values_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from liftft.deltas.delta import DELTA_FILE

    test_entries_that_shrank_far_below_their_base_are_stored_exactly(tmp_path, torch.bfloat16, 2.0**-30)
    tensors = load_file(tmp_path / DELTA_FILE)
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[f"{name}.exact_positions"] = torch.tensor([0, 1, 10**6])
    save_file(tensors, tmp_path / DELTA_FILE)
    with pytest.raises(ValueError, match=f"{name}'s exact values do not match its .* entries; the file is damaged"):
        load_delta(tmp_path)
