"""Tests of `liftft.analysis` and `liftft analyze`: perturbation, spectra, selection overlap, plots."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import math_records, tiny_llama
from liftft.analysis import (
    effective_rank,
    jaccard,
    matrix_spectrum,
    overlap,
    pack_records,
    perplexity,
    perturb,
    perturbed,
    spectrum,
    stable_rank,
    subspace_alignment,
)
from liftft.analysis.matrices import select_as_training, target_budgets
from liftft.cli import main
from liftft.engine.config import LiftConfig
from liftft.engine.optim import LiftAdamW
from liftft.engine.targets import find_targets
from liftft.data.template import build_prompt, encode_prompt

ALL_SELECTORS = ("principal", "magnitude", "random", "principal-smallest")
LLAMA_TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def random_ids(vocab: int, batch: int = 3, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------ perturbation


def test_perplexity_matches_transformers_loss():
    model = tiny_llama()
    ids = random_ids(512)
    reference = math.exp(model(input_ids=ids, labels=ids).loss.item())
    assert perplexity(model, ids, batch_size=2) == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_noise_zero_gives_the_unperturbed_perplexity_exactly(mode):
    model = tiny_llama()
    ids = random_ids(512)
    unperturbed = perplexity(model, ids)
    results = perturb(model, ids, selectors=ALL_SELECTORS, rank=1, filter_rank=4, mode=mode, noise=(0, 2))
    assert list(results) == list(ALL_SELECTORS)
    for points in results.values():
        assert [p["noise"] for p in points] == [0, 2]
        assert points[0]["perplexity"] == unperturbed
        assert points[1]["perplexity"] != unperturbed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_are_restored_bitwise(dtype):
    model = tiny_llama(dtype=dtype)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = random_ids(512, batch=2, seq=8)
    for mode in ("relative", "absolute", "zero"):
        perturb(model, ids, selectors=ALL_SELECTORS, density=0.05, filter_rank=4, mode=mode, noise=(4,))
    for name, p in model.named_parameters():
        assert p.dtype == dtype
        assert torch.equal(p, before[name]), name


def test_perturbed_changes_only_the_chosen_entries_and_restores_on_error():
    torch.manual_seed(1)
    weights = {"a": nn.Parameter(torch.randn(4, 5)), "b": nn.Parameter(torch.randn(3, 3))}
    originals = {name: w.detach().clone() for name, w in weights.items()}
    indices = {"a": torch.tensor([0, 7, 19], dtype=torch.int32), "b": torch.tensor([2, 4])}
    scale, seed = 0.7, 3
    generator = torch.Generator().manual_seed(seed)
    z = {name: torch.randn(idx.numel(), generator=generator) for name, idx in indices.items()}
    expected = {
        "relative": lambda w, name: w.flatten()[indices[name].long()] * (1 + scale * z[name]),
        "absolute": lambda w, name: w.flatten()[indices[name].long()] + scale * w.std() * z[name],
        "zero": lambda w, name: torch.zeros(indices[name].numel()),
    }
    for mode, rule in expected.items():
        with pytest.raises(RuntimeError, match="inside"):
            with perturbed(weights, indices, mode, scale, seed):
                for name, w in weights.items():
                    flat, original = w.detach().flatten(), originals[name].flatten()
                    chosen = indices[name].long()
                    torch.testing.assert_close(flat[chosen], rule(originals[name], name))
                    untouched = torch.ones_like(flat, dtype=torch.bool)
                    untouched[chosen] = False
                    assert torch.equal(flat[untouched], original[untouched])
                raise RuntimeError("inside")
        for name, w in weights.items():
            assert torch.equal(w, originals[name])


@pytest.mark.parametrize("selector", ["random", "principal"])
def test_entries_are_chosen_exactly_as_the_optimizer_chooses_them(selector):
    model = tiny_llama()
    targets = find_targets(model)
    chosen = select_as_training(targets, target_budgets(targets, rank=1), selector, 4, "exact", seed=3)
    optimizer = LiftAdamW(model, LiftConfig(rank=1, selector=selector, filter_rank=4, svd="exact", seed=3))
    for name in targets:
        assert torch.equal(chosen[name], optimizer.indices(name)), name


@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_zero_leaves_every_weight_bitwise_unchanged(mode, dtype):
    weight = {"w": nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(4)).to(dtype))}
    original = weight["w"].detach().clone()
    with perturbed(weight, {"w": torch.arange(0, 64, 3)}, mode, 0.0, seed=0):
        assert torch.equal(weight["w"], original)


def test_the_noise_is_the_same_for_every_selector():
    weight = {"w": nn.Parameter(torch.ones(6, 6))}
    drawn = []
    for idx in (torch.tensor([0, 1, 2]), torch.tensor([10, 20, 35])):
        with perturbed(weight, {"w": idx}, "relative", 1.0, seed=5):
            drawn.append(weight["w"].detach().flatten()[idx] - 1)
    assert torch.equal(drawn[0], drawn[1])


class PlantedModel(nn.Module):
    """A one-matrix "LM" whose logits read W only through the block W[rows, cols]."""

    def __init__(self, weight: torch.Tensor, rows, cols, vocab: int = 8):
        super().__init__()
        m, n = weight.shape
        gen = torch.Generator().manual_seed(0)
        embed = torch.zeros(vocab, n)
        embed[:, cols] = torch.randn(vocab, len(cols), generator=gen)
        readout = torch.zeros(m, vocab)
        readout[rows] = torch.randn(len(rows), vocab, generator=gen)
        self.embed = nn.Embedding.from_pretrained(embed)
        self.mixer = nn.Linear(n, m, bias=False)
        self.mixer.weight = nn.Parameter(weight.clone())
        self.register_buffer("readout", readout)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.mixer(self.embed(input_ids)) @ self.readout)


def planted_model():
    """W = a rank-1 part whose largest entries (about 16) are the 2x2 planted block, plus small
    noise and four larger spikes (20, 19, 18, 17) elsewhere that fool magnitude selection but
    not a rank-1 filter, since the rank-1 part's singular value is about 32."""
    gen = torch.Generator().manual_seed(0)
    rows, cols = [2, 9], [5, 12]
    u, v = 0.1 * torch.rand(16, generator=gen), 0.1 * torch.rand(16, generator=gen)
    u[rows], v[cols] = 4.0, 4.0
    weight = torch.outer(u, v) + 0.01 * torch.randn(16, 16, generator=gen)
    spikes = [(0, 1), (4, 3), (7, 14), (13, 8)]
    for height, (r, c) in zip((20.0, 19.0, 18.0, 17.0), spikes):
        weight[r, c] = height
    planted = sorted(r * 16 + c for r in rows for c in cols)
    return PlantedModel(weight, rows, cols), planted, sorted(r * 16 + c for r, c in spikes)


def test_principal_selection_finds_the_planted_entries():
    model, planted, _ = planted_model()
    ids = random_ids(8, batch=4, seq=12)
    unperturbed = perplexity(model, ids)
    hand_zeroed = copy.deepcopy(model)
    with torch.no_grad():
        hand_zeroed.mixer.weight.view(-1)[planted] = 0
    # k = 4 = the planted block; the loss sees W only through that block.
    settings = dict(density=4 / 256, filter_rank=1, selectors=("principal", "magnitude", "principal-smallest"))
    zeroed = perturb(model, ids, mode="zero", **settings)
    assert zeroed["principal"] == [{"noise": None, "perplexity": perplexity(hand_zeroed, ids)}]
    assert zeroed["principal"][0]["perplexity"] != unperturbed
    assert zeroed["magnitude"][0]["perplexity"] == unperturbed
    assert zeroed["principal-smallest"][0]["perplexity"] == unperturbed
    noisy = perturb(model, ids, mode="relative", noise=(1, 4), **settings)
    assert all(p["perplexity"] != unperturbed for p in noisy["principal"])
    assert all(p["perplexity"] == unperturbed for p in noisy["magnitude"])


def test_overlap_of_principal_and_magnitude_is_zero_on_the_planted_matrix():
    model, _, _ = planted_model()
    result = overlap(model, density=4 / 256, filter_ranks=(1, 2))
    row = result["matrices"]["mixer.weight"]
    assert row["k"] == 4
    assert row["principal vs magnitude"] == 0.0
    # Rank 2 also takes in the largest spike (its own singular value, 20), which displaces one planted entry.
    assert row["filter rank 1 vs 2"] == pytest.approx(3 / 5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(selectors=("principal", "best")), ValueError, "'best'"),
        (dict(noise=(0, -1)), ValueError, "-1"),
        (dict(noise=(0, "big")), TypeError, "'big'"),
        (dict(noise=(0, float("nan"))), ValueError, "nan"),
        (dict(mode="scaled"), ValueError, "'scaled'"),
        (dict(rank=0), ValueError, "rank"),
    ],
)
def test_perturb_rejects_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        perturb(tiny_llama(), random_ids(512), **kwargs)


def test_pack_records_cuts_the_encoded_stream_into_rows(tokenizer):
    records = math_records(3)
    encoded = [encode_prompt(tokenizer, build_prompt(r)) + tokenizer(r["output"], add_special_tokens=False)["input_ids"]
               + [tokenizer.eos_token_id] for r in records]
    stream = [t for ids in encoded for t in ids]
    ids = pack_records(records, tokenizer, seq_len=50)
    assert ids.shape == (len(stream) // 50, 50)
    assert ids.flatten().tolist() == stream[: ids.numel()]
    assert pack_records(records[:1], tokenizer, seq_len=10_000).tolist() == [encoded[0]]


@pytest.mark.parametrize("ids", [torch.zeros(0, 8, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)])
def test_perturb_rejects_empty_data(ids):
    with pytest.raises(ValueError, match="empty data"):
        perturb(tiny_llama(), ids, rank=1)


# ----------------------------------------------------------------- spectrum


def test_rank_one_update_has_effective_and_stable_rank_one():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(12, 8, generator=gen)
    tuned = base + torch.outer(torch.randn(12, generator=gen), torch.randn(8, generator=gen))
    metrics = matrix_spectrum(base, tuned, top=3)
    assert metrics["effective_rank"] == pytest.approx(1, abs=1e-4)
    assert metrics["stable_rank"] == pytest.approx(1, abs=1e-6)


def test_diagonal_update_matches_hand_computed_metrics():
    base = torch.diag(torch.tensor([6.0, 2.0, 1.0]))
    tuned = torch.diag(torch.tensor([6.0, 5.0, 5.0]))  # ΔW = diag(0, 3, 4)
    metrics = matrix_spectrum(base, tuned, top=1)
    assert metrics["delta_norm"] == pytest.approx(5)
    assert metrics["relative_delta_norm"] == pytest.approx(5 / math.sqrt(41))
    assert metrics["stable_rank"] == pytest.approx(25 / 16)
    p = torch.tensor([4 / 7, 3 / 7])
    assert metrics["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert metrics["left_alignment"] == pytest.approx(1) and metrics["right_alignment"] == pytest.approx(1)


def test_rotating_the_column_space_lowers_left_alignment_to_the_cosine():
    theta = 0.3
    rotation = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    base = torch.diag(torch.tensor([3.0, 1.0]))
    metrics = matrix_spectrum(base, rotation @ base, top=1)
    assert metrics["left_alignment"] == pytest.approx(math.cos(theta), abs=1e-6)
    assert metrics["right_alignment"] == pytest.approx(1, abs=1e-6)
    assert matrix_spectrum(base, rotation @ base, top=2)["left_alignment"] == pytest.approx(1, abs=1e-6)


def test_identical_matrices_align_perfectly_and_have_no_update():
    base = torch.randn(10, 6, generator=torch.Generator().manual_seed(2))
    metrics = matrix_spectrum(base, base.clone(), top=4)
    assert metrics["left_alignment"] == pytest.approx(1, abs=1e-6)
    assert metrics["right_alignment"] == pytest.approx(1, abs=1e-6)
    assert metrics["delta_norm"] == 0 and metrics["effective_rank"] == 0 and metrics["stable_rank"] == 0


def test_rank_helpers_on_hand_computed_spectra():
    assert effective_rank(torch.ones(4)) == pytest.approx(4)
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert stable_rank(torch.tensor([4.0, 3.0])) == pytest.approx(25 / 16)
    e = torch.eye(3)
    assert subspace_alignment(e[:, :1], e[:, 1:2]) == pytest.approx(0)
    assert subspace_alignment(e[:, [0, 1]], e[:, [0, 2]]) == pytest.approx(0.5)


def test_spectrum_of_a_model_reports_each_matrix_and_aggregates():
    base = tiny_llama()
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(3)
    target = "model.layers.1.self_attn.q_proj.weight"
    with torch.no_grad():
        tuned.get_parameter(target).add_(torch.outer(torch.randn(32, generator=gen), torch.randn(32, generator=gen)))
    result = spectrum(base, tuned, top=4)
    assert set(result) == {"matrices", "by_type", "by_depth"}
    assert len(result["matrices"]) == 14
    assert list(result["by_type"]) == LLAMA_TYPES
    assert list(result["by_depth"]) == ["0", "1"]
    assert result["matrices"][target]["effective_rank"] == pytest.approx(1, abs=1e-3)
    assert result["matrices"][target]["depth"] == 1
    untouched = result["matrices"]["model.layers.0.mlp.down_proj.weight"]
    assert untouched["delta_norm"] == 0 and untouched["left_alignment"] == pytest.approx(1, abs=1e-5)
    assert result["by_type"]["q_proj"]["count"] == 2
    assert result["by_type"]["q_proj"]["effective_rank"] == pytest.approx(0.5, abs=1e-3)
    assert result["by_depth"]["0"]["effective_rank"] == 0


def test_spectrum_rejects_a_tuned_model_of_another_shape():
    with pytest.raises(ValueError, match=r"gate_proj.*\(48, 32\).*\(64, 32\)"):
        spectrum(tiny_llama(), tiny_llama(intermediate_size=48))


# ------------------------------------------------------------------ overlap


def test_jaccard_on_hand_made_sets():
    assert jaccard(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4], dtype=torch.int32)) == 0.5
    assert jaccard(torch.tensor([5, 9]), torch.tensor([5, 9])) == 1.0
    assert jaccard(torch.tensor([0]), torch.tensor([1])) == 0.0


def test_overlap_matches_an_independent_selection():
    model = tiny_llama()
    result = overlap(model, rank=1, filter_ranks=(4, 8))
    assert result["comparisons"] == [
        "principal vs magnitude", "principal vs random", "exact vs randomized SVD", "filter rank 4 vs 8"]
    assert list(result["by_type"]) == LLAMA_TYPES
    name = "model.layers.0.mlp.gate_proj.weight"
    weight = model.get_parameter(name).detach()
    k = sum(weight.shape)  # rank 1
    u, s, vh = torch.linalg.svd(weight)
    principal = set(((u[:, :4] * s[:4]) @ vh[:4]).abs().flatten().topk(k).indices.tolist())
    magnitude = set(weight.abs().flatten().topk(k).indices.tolist())
    expected = len(principal & magnitude) / len(principal | magnitude)
    assert result["matrices"][name]["principal vs magnitude"] == pytest.approx(expected)
    assert result["matrices"][name]["k"] == k
    for row in result["matrices"].values():
        assert all(0 <= row[c] <= 1 for c in result["comparisons"])


# ---------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("base")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "records.json"
    path.write_text(json.dumps(math_records(6)))
    return path


def check_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_cli_perturb_writes_json_and_plot(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "perturb"
    rc = main(["analyze", "perturb", "--model", str(model_dir), "--data", str(data_file), "--output", str(out),
               "--selectors", "principal,random", "--rank", "1", "--filter-rank", "4", "--noise", "0,1",
               "--seq-len", "32", "--limit", "4", "--device", "cpu"])
    assert rc == 0
    report = json.loads((out / "perturb.json").read_text())
    assert set(report) == {"settings", "unperturbed_perplexity", "results"}
    assert list(report["results"]) == ["principal", "random"]
    for points in report["results"].values():
        assert [set(p) for p in points] == [{"noise", "perplexity"}] * 2
        assert points[0]["perplexity"] == report["unperturbed_perplexity"]
    assert report["settings"]["records"] == 4
    check_png(out / "perturb.png")
    assert "principal" in capsys.readouterr().out


def test_cli_perturb_zero_mode(model_dir, data_file, tmp_path):
    out = tmp_path / "zero"
    rc = main(["analyze", "perturb", "--model", str(model_dir), "--data", str(data_file), "--output", str(out),
               "--mode", "zero", "--density", "0.02", "--seq-len", "64", "--device", "cpu"])
    assert rc == 0
    results = json.loads((out / "perturb.json").read_text())["results"]
    assert list(results) == ["principal", "magnitude", "random"]
    assert all(len(points) == 1 and points[0]["noise"] is None for points in results.values())
    check_png(out / "perturb.png")


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--selectors", "principal,best"], "'best'"),
        (["--noise=0,-1"], "-1"),
        (["--mode", "zero", "--noise", "1"], "--noise"),
        (["--mode", "scaled"], "'scaled'"),
    ],
)
def test_cli_perturb_rejects_bad_options_before_loading(flags, match, data_file, tmp_path, capsys):
    # The model path does not exist: the option must be refused before any loading.
    rc = main(["analyze", "perturb", "--model", str(tmp_path / "missing"), "--data", str(data_file),
               "--output", str(tmp_path / "out"), *flags])
    assert rc == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_perturb_rejects_a_non_number_noise(data_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "perturb", "--model", str(tmp_path), "--data", str(data_file), "--output", str(tmp_path),
              "--noise", "0,abc"])
    assert exit_info.value.code == 2
    assert "'abc' is not a number" in capsys.readouterr().err


def test_cli_perturb_rejects_empty_data(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    rc = main(["analyze", "perturb", "--model", str(tmp_path / "missing"), "--data", str(empty),
               "--output", str(tmp_path / "out")])
    assert rc == 2
    assert "empty.json" in capsys.readouterr().err


def test_cli_spectrum_overlays_a_merged_model_and_a_peft_adapter(model_dir, tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    full = tiny_llama(vocab_size=len(tokenizer))
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.01 * torch.randn_like(p))
    full.save_pretrained(tmp_path / "full")
    lora = get_peft_model(tiny_llama(vocab_size=len(tokenizer)),
                          LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    out = tmp_path / "spectrum"
    rc = main(["analyze", "spectrum", "--base", str(model_dir), "--tuned", str(tmp_path / "full"),
               str(tmp_path / "lora"), "--labels", "Full,LoRA", "--top", "4", "--output", str(out), "--device", "cpu"])
    assert rc == 0
    report = json.loads((out / "spectrum.json").read_text())
    assert set(report) == {"settings", "runs"} and list(report["runs"]) == ["Full", "LoRA"]
    for run in report["runs"].values():
        assert set(run) == {"matrices", "by_type", "by_depth"}
        assert list(run["by_type"]) == LLAMA_TYPES
    lora_rows = report["runs"]["LoRA"]["matrices"]
    # A rank-2 LoRA changes q and v by at most rank 2 and leaves k untouched.
    assert 1 < lora_rows["model.layers.0.self_attn.q_proj.weight"]["effective_rank"] <= 2 + 1e-3
    assert lora_rows["model.layers.0.self_attn.k_proj.weight"]["delta_norm"] == 0
    assert report["runs"]["Full"]["matrices"]["model.layers.0.self_attn.k_proj.weight"]["effective_rank"] > 8
    check_png(out / "spectrum_rank.png")
    check_png(out / "spectrum_alignment.png")


def test_cli_spectrum_reads_a_liftft_delta(model_dir, tmp_path):
    from liftft.deltas.delta import Delta, fingerprint, write_delta

    name = "model.layers.1.mlp.up_proj.weight"
    base = tiny_llama().get_parameter(name).detach()  # the weights saved in model_dir
    idx, values = torch.tensor([0, 5, 33]), torch.tensor([1.0, -2.0, 0.5])
    meta = {"format_version": 1, "weights": {name: {
        "shape": list(base.shape), "dtype": "float32", "base_sha256": fingerprint(base.flatten()[idx])}}}
    write_delta(Delta({name: (idx, values)}, meta), tmp_path / "delta")
    out = tmp_path / "spectrum"
    rc = main(["analyze", "spectrum", "--base", str(model_dir), "--tuned", str(tmp_path / "delta"),
               "--top", "2", "--output", str(out), "--device", "cpu"])
    assert rc == 0
    run = json.loads((out / "spectrum.json").read_text())["runs"]["delta"]
    assert run["matrices"][name]["delta_norm"] == pytest.approx(math.sqrt(5.25))
    assert sum(row["delta_norm"] for row in run["matrices"].values()) == pytest.approx(math.sqrt(5.25))


def test_cli_spectrum_rejects_mismatched_shapes(model_dir, tmp_path, tokenizer, capsys):
    tiny_llama(vocab_size=len(tokenizer), intermediate_size=48).save_pretrained(tmp_path / "other")
    rc = main(["analyze", "spectrum", "--base", str(model_dir), "--tuned", str(tmp_path / "other"),
               "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "gate_proj" in err and "other" in err


def test_cli_overlap_writes_table_json_and_heatmap(model_dir, tmp_path, capsys):
    out = tmp_path / "overlap"
    rc = main(["analyze", "overlap", "--model", str(model_dir), "--output", str(out), "--rank", "1",
               "--filter-rank", "4,8,16", "--device", "cpu"])
    assert rc == 0
    report = json.loads((out / "overlap.json").read_text())
    assert set(report) == {"settings", "comparisons", "matrices", "by_type", "mean"}
    assert report["comparisons"][-3:] == ["filter rank 4 vs 8", "filter rank 4 vs 16", "filter rank 8 vs 16"]
    assert len(report["matrices"]) == 14
    check_png(out / "overlap.png")
    table = capsys.readouterr().out
    assert "principal vs magnitude" in table and "q_proj" in table
