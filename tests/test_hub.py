"""Loading and sharing deltas (liftft.deltas.hub), their model cards (liftft.deltas.card), removing them (liftft.deltas.unmerge) and the
trained-parameter count (liftft.engine.trainable). Nothing here reaches a hub: hub ids resolve from a local cache laid out
as huggingface_hub lays it out, offline, and uploads are recorded by stand-ins for HfApi's methods."""

import json
import re
import shutil

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants

import liftft
from conftest import Square, tiny_llama, train_and_save
from liftft import LiftAdamW
from liftft import LiftConfig
from liftft import apply_delta
from liftft import budget
from liftft import load_delta
from liftft import remove_delta
from liftft.deltas.card import model_card
from liftft.cli import main
from liftft.deltas.delta import Delta, exact_difference, fingerprint
from liftft.engine.targets import find_targets

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")

HUB_ID = "someone/tiny-lift-delta"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def assert_same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.dtype == q.dtype and torch.equal(p, q), name


@pytest.fixture
def trained(tmp_path):
    """(trained model, delta dir, base dir) of a short fp32 run whose delta records its base dir."""
    return train_and_save(tmp_path), tmp_path / "delta", tmp_path / "base"


# ----- from_pretrained -----

def test_from_pretrained_local_dir_uses_the_recorded_base(trained):
    model, delta_dir, _ = trained
    assert_same_weights(liftft.from_pretrained(delta_dir), model)


def test_from_pretrained_casts_after_applying_exactly(trained):
    model, delta_dir, base_dir = trained
    loaded = liftft.from_pretrained(str(delta_dir), base=str(base_dir), dtype="bfloat16", device="cpu")
    assert_same_weights(loaded, model.to(torch.bfloat16))


def offline_cache(tmp_path, monkeypatch, delta_dir) -> None:
    """A huggingface_hub cache holding ``delta_dir`` as the main revision of HUB_ID, and offline mode on."""
    repo = tmp_path / "hub-cache" / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in ("delta.safetensors", "liftft.json"):
        shutil.copy(delta_dir / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_from_pretrained_hub_id_from_the_offline_cache(trained, tmp_path, monkeypatch):
    model, delta_dir, _ = trained
    offline_cache(tmp_path, monkeypatch, delta_dir)
    shutil.rmtree(delta_dir)  # nothing local by that name: the cache alone can answer
    assert_same_weights(liftft.from_pretrained(HUB_ID), model)


def test_from_pretrained_names_what_it_cannot_find(trained, tmp_path, monkeypatch):
    offline_cache(tmp_path, monkeypatch, trained[1])
    with pytest.raises(FileNotFoundError, match="'someone/not-cached'"):
        liftft.from_pretrained("someone/not-cached")
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        liftft.from_pretrained(str(tmp_path / "missing-dir"))


def test_from_pretrained_without_a_recorded_base_asks_for_one(trained, tmp_path):
    _, delta_dir, base_dir = trained
    meta = json.loads((delta_dir / "liftft.json").read_text())
    (delta_dir / "liftft.json").write_text(json.dumps({**meta, "base_model": None}))
    with pytest.raises(ValueError, match="records no base model; pass base="):
        liftft.from_pretrained(delta_dir)
    assert_same_weights(liftft.from_pretrained(delta_dir, base=str(base_dir)), trained[0])


# ----- push_to_hub and the model card -----

@pytest.fixture
def recorded_hub(monkeypatch):
    """Stand-ins for HfApi.create_repo and upload_folder that record what would reach the hub."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, allow_patterns, **kwargs):
        files = sorted(p.name for p in folder_path.iterdir() if p.name in allow_patterns)
        calls.append(("upload_folder", repo_id, {"files": files, "card": (folder_path / "README.md").read_text()}))
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_delta_and_its_card_only(trained, recorded_hub):
    _, delta_dir, _ = trained
    (delta_dir / "model.safetensors").write_bytes(b"a full model a Trainer checkpoint would hold")
    assert liftft.push_to_hub(delta_dir, HUB_ID, private=True) == "commit-info"
    (create, repo, options), (upload, repo2, uploaded) = recorded_hub
    assert (create, repo, options["private"], upload, repo2) == ("create_repo", HUB_ID, True, "upload_folder", HUB_ID)
    assert uploaded["files"] == ["README.md", "delta.safetensors", "liftft.json"]
    card = ModelCard(uploaded["card"])
    assert card.data.library_name == "liftft" and "liftft" in card.data.tags
    assert "rank 1 per matrix" in card.text and "filter rank: 2" in card.text


def test_push_to_hub_refuses_a_damaged_delta_before_reaching_the_hub(trained, recorded_hub):
    _, delta_dir, _ = trained
    (delta_dir / "liftft.json").write_text("{not json")
    with pytest.raises(ValueError, match="liftft.json: it is not JSON"):
        liftft.push_to_hub(delta_dir, HUB_ID)
    assert recorded_hub == []


def test_card_front_matter_names_a_hub_base_and_the_facts():
    meta = {"base_model": "meta-llama/Llama-3.2-1B",
            "config": {"rank": 128, "filter_rank": 64, "update_interval": 400, "target_modules": "all-linear"},
            "training_args": {"method": "lift", "data": ["math_10k.json"]},
            "metrics": {"train_loss": 0.5, "trainable": 90177536, "data": {"examples": 10000}}}
    card = ModelCard(model_card(meta))
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.tags == ["liftft", "lift", "sparse-fine-tuning"]
    for fact in ("rank 128 per matrix", "filter rank: 64", "selection refreshed every 400 steps", "math_10k.json",
                 "examples: 10000", "train_loss: 0.5", "trained values per step: 90,177,536",
                 "liftft.from_pretrained"):
        assert fact in card.text, fact


@pytest.mark.parametrize("method, selector, interval, present, absent", [
    ("full", "principal", 400, ["every parameter trained"], ["per matrix", "filter rank", "refreshed", "target modules"]),
    ("lora", "principal", 400, ["adapter: rank 8, alpha 16", "target modules"], ["per matrix", "filter rank", "refresh"]),
    ("gradient", "gradient", None, ["rank 8 per matrix", "selection never refreshed"], ["filter rank", "None"]),
    ("magnitude", "magnitude", 100, ["rank 8 per matrix", "refreshed every 100 steps"], ["filter rank"]),
])
def test_card_states_only_what_the_method_has(method, selector, interval, present, absent):
    meta = {"config": {"rank": 8, "filter_rank": 64, "update_interval": interval, "selector": selector,
                       "target_modules": "all-linear"}, "training_args": {"method": method}}
    card = ModelCard(model_card(meta))
    sparse = method not in ("full", "lora")
    assert card.data.tags == ["liftft", *(["lift", "sparse-fine-tuning"] if sparse else []), method]
    facts = card.text.split("## Method and budget")[1].split("## Data")[0]
    assert all(fact in facts for fact in present), facts
    assert not any(fact in facts for fact in absent), facts


def test_card_of_a_local_base_keeps_the_path_out_of_the_front_matter(trained):
    _, delta_dir, base_dir = trained
    card = ModelCard(model_card(load_delta(delta_dir).meta, merged=True))
    assert card.data.base_model is None and str(base_dir) in card.text and "AutoModelForCausalLM" in card.text


def test_liftft_train_and_merge_write_cards(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(base_dir), "--data", str(data_file), "--output", str(out), "--rank", "2",
                 "--filter-rank", "4", "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1",
                 "--max-seq-len", "64", "--no-progress", "--merge"]) == 0
    # The CLI reports the entries trained, the LoRA-parity budget summed over the targets, not the matrices' size.
    expected = sum(budget(tuple(p.shape), rank=2) for p in find_targets(tiny_llama(), "all-linear").values())
    assert f"trainable={expected:,}" in capsys.readouterr().out
    delta_card, merged_card = ModelCard.load(out / "README.md"), ModelCard.load(out / "merged" / "README.md")
    assert "liftft.from_pretrained" in delta_card.text and "AutoModelForCausalLM" in merged_card.text
    assert f"trained values per step: {expected:,}" in delta_card.text and str(data_file) in delta_card.text
    assert main(["merge", "--model", str(base_dir), "--delta", str(out), "--output", str(tmp_path / "merged")]) == 0
    merged = ModelCard.load(tmp_path / "merged" / "README.md")
    assert merged.data.library_name == "liftft" and "rank 2 per matrix" in merged.text


# ----- remove_delta -----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_remove_delta_restores_the_base_bit_for_bit(tmp_path, dtype):
    model = train_and_save(tmp_path, dtype=dtype)
    assert remove_delta(model, tmp_path / "delta") is model
    assert_same_weights(model, tiny_llama(dtype=dtype))
    apply_delta(model, tmp_path / "delta")  # and the delta applies again: the base fingerprints match
    assert_same_weights(model, liftft.from_pretrained(tmp_path / "delta"))


def test_remove_delta_refuses_a_model_without_the_trained_values_and_changes_nothing(tmp_path):
    train_and_save(tmp_path)
    base = tiny_llama()
    with pytest.raises(ValueError, match="already holds the base weights: the delta is not applied"):
        remove_delta(base, tmp_path / "delta")
    assert_same_weights(base, tiny_llama())
    applied = apply_delta(tiny_llama(), tmp_path / "delta")
    name, (idx, _) = next(iter(load_delta(tmp_path / "delta").entries.items()))
    with torch.no_grad():
        dict(applied.named_parameters())[name].view(-1)[idx[0]] += 0.25  # one trained value is not the delta's
    before = [p.clone() for p in applied.parameters()]
    with pytest.raises(ValueError, match=f"{re.escape(name)} does not hold this delta's trained values"):
        remove_delta(applied, tmp_path / "delta")
    assert all(torch.equal(p, q) for p, q in zip(applied.parameters(), before))


def hand_made_delta(base: torch.Tensor, final: torch.Tensor) -> Delta:
    """The delta of a Square model whose every entry went from ``base`` to ``final``, as delta_from_optimizer makes it."""
    idx = torch.arange(base.numel(), dtype=torch.int32)
    values = exact_difference(final.flatten(), base.flatten())
    weights = {"proj.weight": {"shape": list(base.shape), "dtype": "bfloat16", "base_sha256": fingerprint(base.flatten())}}
    return Delta({"proj.weight": (idx, values)}, {"format_version": 2, "weights": weights})


def test_remove_delta_pins_down_bases_the_difference_rounded_away():
    # Entries that grew to over 2**16 times their base in bf16: final - difference, rounded, is not the base,
    # and several bf16 values are consistent with the stored difference. The fingerprint picks the right ones.
    base = torch.tensor([[3e-7, -0.0, 0.5], [-2e-6, 0.25, 0.0]], dtype=torch.bfloat16)
    final = torch.tensor([[0.75, 0.125, 0.5], [-1.0, -0.25, 0.0]], dtype=torch.bfloat16)
    delta = hand_made_delta(base, final)
    first_guess = (final.flatten().float() - delta.entries["proj.weight"][1]).to(torch.bfloat16)
    assert not torch.equal(first_guess.view(torch.int16), base.flatten().view(torch.int16))
    model = apply_delta(Square(base.float()).to(torch.bfloat16), delta)
    assert torch.equal(model.proj.weight, final)
    remove_delta(model, delta)
    assert torch.equal(model.proj.weight.view(torch.int16), base.view(torch.int16))  # -0.0 included


# ----- the trained-parameter count -----

def test_trainable_count_is_the_optimizers_not_the_matrices(capsys):
    model = tiny_llama()
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    opt = LiftAdamW(model, LiftConfig(rank=2, filter_rank=4), dense_params=norms)
    targets = find_targets(model, "all-linear")
    expected = sum(budget(tuple(p.shape), rank=2) for p in targets.values()) + sum(p.numel() for p in norms)
    total = sum(p.numel() for p in model.parameters())
    naive = sum(p.numel() for p in model.parameters() if p.requires_grad)  # what transformers and PEFT count
    assert liftft.trainable_parameters(model, opt) == (expected, total) and naive > 2 * expected
    liftft.print_trainable_parameters(model, opt)
    assert capsys.readouterr().out == (f"trainable params: {expected:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * expected / total:.4f}\n")


def test_without_an_optimizer_the_count_and_line_are_peft_s(capsys):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    peft_line = capsys.readouterr().out
    liftft.print_trainable_parameters(model)
    assert capsys.readouterr().out == peft_line


def test_trainable_count_refuses_another_optimizer():
    model = tiny_llama()
    with pytest.raises(TypeError, match="expected a LiftAdamW"):
        liftft.trainable_parameters(model, torch.optim.SGD(model.parameters(), lr=0.1))

