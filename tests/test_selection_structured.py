"""S2FT, block and gradient selection against brute-force selections written with Python loops and numpy."""

import json

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import tiny_llama
from liftft import LiftAdamW
from liftft import LiftConfig
from liftft import gradient_scores
from liftft import load_delta
from liftft import select_indices
from liftft.cli import main
from liftft.engine.selection import budget, select_many, selection_seed

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")


def _stable_top(scores: np.ndarray, count: int, largest: bool = True) -> np.ndarray:
    # A stable sort keeps lower indices first among ties: liftft's tie rule.
    return np.argsort(-scores if largest else scores, kind="stable")[:count]


def _as_set(idx: torch.Tensor) -> set[int]:
    return set(idx.tolist())


# ----- block selection -----


def _brute_force_blocks(w: np.ndarray, k: int, rank: int, b: int, largest: bool) -> set[int]:
    u, s, vh = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    scores = np.abs((u[:, :rank] * s[:rank]) @ vh[:rank])
    m, n = w.shape
    sums, corners = [], []
    for r in range(0, m, b):
        for c in range(0, n, b):
            sums.append(sum(scores[i, j] for i in range(r, r + b) for j in range(c, c + b)))
            corners.append((r, c))
    picked = _stable_top(np.array(sums), max(1, k // (b * b)), largest)
    return {(corners[p][0] + i) * n + corners[p][1] + j for p in picked for i in range(b) for j in range(b)}


@pytest.mark.parametrize("shape,b,k", [((24, 40), 4, 300), ((40, 24), 2, 97), ((16, 16), 8, 200), ((32, 48), 4, 5)])
@pytest.mark.parametrize("selector", ["principal", "principal-smallest"])
def test_blocks_match_brute_force(shape, b, k, selector):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    got = select_indices(w, k, selector, filter_rank=4, svd="exact", block_size=b)
    want = _brute_force_blocks(w.numpy(), k, 4, b, selector == "principal")
    assert _as_set(got) == want
    assert got.dtype == torch.int32 and torch.all(got[1:] > got[:-1])
    # k // b**2 whole blocks (k = 5 < 16 still takes one).
    assert got.numel() == max(1, k // b**2) * b * b


def test_block_size_one_is_entry_selection_and_batched_equals_single():
    ws = [torch.randn(24, 32, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    assert torch.equal(select_indices(ws[0], 77, filter_rank=3, block_size=1), select_indices(ws[0], 77, filter_rank=3))
    batched = select_many(ws, 128, filter_rank=3, svd="randomized", seeds=[5, 6, 7], block_size=4)
    for w, seed, got in zip(ws, [5, 6, 7], batched):
        assert torch.equal(got, select_indices(w, 128, filter_rank=3, svd="randomized", seed=seed, block_size=4))


def test_block_size_refusals():
    with pytest.raises(ValueError, match="block_size=4 is for the principal selectors"):
        LiftConfig(selector="magnitude", block_size=4)
    with pytest.raises(ValueError, match="block_size=4 is for the principal selectors"):
        select_indices(torch.randn(8, 8), 16, "random", block_size=4)
    with pytest.raises(ValueError, match=r"block_size 3 does not divide the shape \(8, 9\) of the weight"):
        select_indices(torch.randn(8, 9), 16, block_size=3)
    with pytest.raises(ValueError, match=r"block_size 3 does not divide the shape \(32, 32\) of target "
                                         r"model.layers.0.self_attn.q_proj.weight"):
        LiftAdamW(tiny_llama(), LiftConfig(rank=2, block_size=3))
    with pytest.raises(TypeError, match="block_size must be an integer"):
        LiftConfig(block_size=2.0)


# ----- S2FT -----


def _s2ft_reference(model, names, k_of, seed):
    """{name: set of flat indices} by S2FT's documented rule, with Python loops over channels, rows and columns."""
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    params = dict(model.named_parameters())
    first_of_draw, chosen = {}, {}
    for ordinal, name in enumerate(names):
        parent, leaf = name.split(".")[-3], name.split(".")[-2]
        layer = name.rsplit(".", 3)[0]
        draw = (layer, parent) if leaf in ("gate_proj", "up_proj", "down_proj", "v_proj", "o_proj") else name
        first_of_draw.setdefault(draw, ordinal)
        gen_seed = selection_seed(seed, first_of_draw[draw])
        m, n = params[name].shape
        k = k_of(name)
        if leaf == "v_proj":
            order = []
            for h in torch.randperm(heads, generator=torch.Generator().manual_seed(gen_seed)).tolist():
                if h // (heads // kv) not in order:
                    order.append(h // (heads // kv))
            per, axis, width = head_dim * n, 0, head_dim
        else:
            size = heads if leaf == "o_proj" else (n if leaf == "down_proj" else m)
            order = torch.randperm(size, generator=torch.Generator().manual_seed(gen_seed)).tolist()
            axis = 1 if leaf in ("o_proj", "down_proj") else 0
            width = head_dim if leaf == "o_proj" else 1
            per = width * (m if axis else n)
        channels = order[: min(max(1, k // per), len(order))]
        lines = {c * width + j for c in channels for j in range(width)}
        chosen[name] = {i * n + j for i in range(m) for j in range(n) if (i if axis == 0 else j) in lines}
    return chosen


@pytest.mark.parametrize("overrides", [{}, dict(num_key_value_heads=4), dict(num_key_value_heads=1, head_dim=16),
                                       dict(num_attention_heads=8, num_key_value_heads=2)])
@pytest.mark.parametrize("budget_kw", [dict(rank=2), dict(rank=None, density=0.3)])
def test_s2ft_matches_brute_force_on_gqa_shapes(overrides, budget_kw):
    model = tiny_llama(**overrides)
    cfg = LiftConfig(selector="s2ft", seed=11, **budget_kw)
    opt = LiftAdamW(model, cfg)
    params = dict(model.named_parameters())

    def k_of(name):
        return budget(tuple(params[name].shape), rank=cfg.rank, density=cfg.density)

    want = _s2ft_reference(model, opt.target_names, k_of, seed=11)
    for name in opt.target_names:
        assert _as_set(opt.indices(name)) == want[name], name
    assert opt.num_selected == sum(len(s) for s in want.values())


def test_s2ft_value_takes_kv_heads_in_first_use_order_beyond_those_o_uses():
    # GQA, 16 query heads of dim 4 over 4 KV heads, rank 7: v (16 x 64) fits 560 // 256 = 2 of the 4 KV heads, o
    # (64 x 64) 896 // 256 = 3 query heads. With seed 3, o's three query heads of layer 0 all share KV head 2; v
    # takes it and the next KV head the query order uses, which none of o's heads use.
    model = tiny_llama(hidden_size=64, num_attention_heads=16, num_key_value_heads=4)
    opt = LiftAdamW(model, LiftConfig(rank=7, selector="s2ft", seed=3))
    params = dict(model.named_parameters())

    def k_of(name):
        return budget(tuple(params[name].shape), rank=7)

    want = _s2ft_reference(model, opt.target_names, k_of, seed=3)
    for name in opt.target_names:
        assert _as_set(opt.indices(name)) == want[name], name
    prefix = "model.layers.0.self_attn."
    kv_heads = {i // 64 // 4 for i in want[prefix + "v_proj.weight"]}
    query_heads = {i % 64 // 4 for i in want[prefix + "o_proj.weight"]}
    assert len(kv_heads) == 2 and len(query_heads) == 3
    used_by_o = {h // 4 for h in query_heads}
    assert len(used_by_o) == 1 and used_by_o < kv_heads


def test_s2ft_couples_mlp_channels_and_value_heads_to_output_heads():
    model = tiny_llama(num_attention_heads=8, num_key_value_heads=2, intermediate_size=128)
    opt = LiftAdamW(model, LiftConfig(rank=None, density=0.3, selector="s2ft"))
    for layer in range(2):
        prefix = f"model.layers.{layer}."

        def lines(name, axis, width, shape):
            mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
            mask[opt.indices(prefix + name).long()] = True
            whole = mask.view(shape).all(dim=1 - axis)
            # Every selected entry lies in a whole selected line.
            assert torch.equal(mask.view(shape), whole.unsqueeze(1 - axis).expand(shape))
            return {i // width for i in whole.nonzero().flatten().tolist()}

        up, gate = lines("mlp.up_proj.weight", 0, 1, (128, 32)), lines("mlp.gate_proj.weight", 0, 1, (128, 32))
        assert up == gate == lines("mlp.down_proj.weight", 1, 1, (32, 128))
        kv_heads = lines("self_attn.v_proj.weight", 0, 4, (8, 32))
        query_heads = lines("self_attn.o_proj.weight", 1, 4, (32, 32))
        # density 0.3: o trains 2 of 8 query heads, v 1 of 2 KV heads, the one serving o's first-drawn head.
        assert len(query_heads) == 2 and len(kv_heads) == 1 and kv_heads <= {h // 4 for h in query_heads}


def test_s2ft_on_gpt2_conv1d_swaps_rows_and_columns():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=32, vocab_size=64))
    opt = LiftAdamW(model, LiftConfig(rank=4, selector="s2ft"))
    block = "transformer.h.0."

    def mask(name):
        w = dict(model.named_parameters())[block + name]
        m = torch.zeros(w.numel(), dtype=torch.bool)
        m[opt.indices(block + name).long()] = True
        return m.view(w.shape)

    c_fc, c_proj = mask("mlp.c_fc.weight"), mask("mlp.c_proj.weight")  # stored (in, out): (32, 128), (128, 32)
    fc_columns = c_fc.all(dim=0).nonzero().flatten()
    assert torch.equal(c_fc, c_fc.all(dim=0, keepdim=True).expand_as(c_fc))
    assert torch.equal(fc_columns, c_proj.all(dim=1).nonzero().flatten())
    assert fc_columns.numel() == budget((32, 128), rank=4) // 32
    out = mask("attn.c_proj.weight")  # stored (in, out): query heads are row blocks of head_dim 8
    rows = out.all(dim=1).nonzero().flatten()
    assert rows.numel() == 8 and torch.equal(rows, rows[0] + torch.arange(8)) and rows[0] % 8 == 0


def test_s2ft_refresh_keeps_channels_and_state():
    model = tiny_llama()
    opt = LiftAdamW(model, LiftConfig(rank=2, selector="s2ft", update_interval=1), lr=1e-2)
    before = {name: opt.indices(name).clone() for name in opt.target_names}
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # refreshes after this step
    name = "model.layers.0.mlp.up_proj.weight"
    moments = opt.state_of(name)["exp_avg"].clone()
    assert moments.abs().min() > 0
    opt.refresh()
    assert all(torch.equal(opt.indices(n), before[n]) for n in opt.target_names)
    assert torch.equal(opt.state_of(name)["exp_avg"], moments)


def test_s2ft_needs_the_heads_of_attention_targets():
    model = torch.nn.Module()
    model.self_attn = torch.nn.Module()
    model.self_attn.v_proj = torch.nn.Linear(8, 8)
    with pytest.raises(ValueError, match="s2ft trains whole attention heads of self_attn.v_proj.weight"):
        LiftAdamW(model, LiftConfig(rank=1, selector="s2ft"))
    model = tiny_llama(head_dim=4)
    model.model.layers[0].self_attn.v_proj = torch.nn.Linear(32, 12, bias=False)
    with pytest.raises(ValueError, match="v_proj.weight has 12 rows, not 2 heads x head_dim 4"):
        LiftAdamW(model, LiftConfig(rank=1, selector="s2ft"))


# ----- gradient magnitude -----


def _batches():
    return [dict(input_ids=ids, labels=ids)
            for ids in (torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(s)) for s in range(3))]


def _brute_force_gradient_scores(model, batches) -> dict[str, np.ndarray]:
    names = [n for n, _ in model.named_parameters() if "layers" in n and n.endswith("proj.weight")]
    params = dict(model.named_parameters())
    total = {n: np.zeros(tuple(params[n].shape)) for n in names}
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, [params[n] for n in names])
        for n, g in zip(names, grads):
            total[n] += np.abs(g.double().numpy())
    return total


def test_gradient_selection_matches_brute_force():
    model, batches = tiny_llama(), _batches()
    want_scores = _brute_force_gradient_scores(tiny_llama(), batches)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    scores = gradient_scores(model, batches)
    assert list(scores) == list(want_scores)
    for name, want in want_scores.items():
        np.testing.assert_allclose(scores[name].numpy(), want, rtol=1e-4, atol=1e-9)
    # The model is as it was: weights, requires_grad, no gradients.
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] and p.grad is None

    opt = LiftAdamW(model, LiftConfig(rank=2, selector="gradient", update_interval=None), scores=scores)
    for name in opt.target_names:
        k = budget(tuple(scores[name].shape), rank=2)
        assert _as_set(opt.indices(name)) == set(_stable_top(scores[name].numpy().ravel(), k).tolist()), name
    with pytest.raises(RuntimeError, match="selector 'gradient' selected once"):
        opt.refresh()


def test_gradient_selector_refusals():
    model = tiny_llama()
    scores = gradient_scores(model, _batches()[:1], target_modules="mlp")
    with pytest.raises(ValueError, match="selector 'gradient' selects once"):
        LiftConfig(selector="gradient")
    gradient = LiftConfig(rank=2, selector="gradient", update_interval=None)
    with pytest.raises(ValueError, match="needs scores=liftft.gradient_scores"):
        LiftAdamW(model, gradient)
    with pytest.raises(ValueError, match="only it takes scores"):
        LiftAdamW(model, LiftConfig(rank=2), scores=scores)
    with pytest.raises(ValueError, match="missing: model.layers.0.self_attn.q_proj.weight"):
        LiftAdamW(model, gradient, scores=scores)
    bad = dict(scores, **{"model.layers.0.mlp.up_proj.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"must be a tensor of the weight's shape \(64, 32\)"):
        LiftAdamW(model, LiftConfig(rank=2, selector="gradient", update_interval=None, target_modules="mlp"),
                  scores=bad)
    signed = {name: score.clone() for name, score in scores.items()}
    signed["model.layers.1.mlp.down_proj.weight"][3, 5] = -1e-3  # a signed gradient, not |gradient|
    with pytest.raises(ValueError, match=r"scores\['model.layers.1.mlp.down_proj.weight'\] holds negative values"):
        LiftAdamW(model, LiftConfig(rank=2, selector="gradient", update_interval=None, target_modules="mlp"),
                  scores=signed)
    with pytest.raises(ValueError, match="no calibration batches"):
        gradient_scores(model, [])
    assert all(p.grad is None for p in model.parameters())


# ----- one step moves whole chosen structures only -----


def _one_step(cfg, scores=None):
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = LiftAdamW(model, cfg, lr=1e-2, scores=scores)
    batch = _batches()[0]
    model(**batch).loss.backward()
    opt.step()
    return model, before, opt


@pytest.mark.parametrize("kind", ["s2ft", "block", "gradient"])
def test_one_step_moves_exactly_the_selected_structures(kind):
    if kind == "gradient":
        cfg = LiftConfig(rank=2, selector="gradient", update_interval=None)
        model, before, opt = _one_step(cfg, gradient_scores(tiny_llama(), _batches()))
    else:
        cfg = LiftConfig(rank=2, filter_rank=4, selector=kind if kind == "s2ft" else "principal",
                         block_size=4 if kind == "block" else None)
        model, before, opt = _one_step(cfg)
    for name, p in model.named_parameters():
        changed = (p.detach() != before[name]).flatten()
        selected = torch.zeros_like(changed)
        if name in opt.target_names:
            selected[opt.indices(name).long()] = True
        assert torch.equal(changed, selected), name
        if kind == "block" and name in opt.target_names:
            blocks = selected.view(p.shape).view(p.shape[0] // 4, 4, p.shape[1] // 4, 4)
            assert torch.equal(blocks.all(dim=3).all(dim=1), blocks.any(dim=3).any(dim=1))


# ----- liftft train -----


def _train(base_dir, data_file, out, *extra):
    return main(["train", "--model", str(base_dir), "--data", str(data_file), "--output", str(out), "--max-steps", "2",
                 "--rank", "2", "--filter-rank", "4", "--batch-size", "2", "--grad-accum", "1", "--max-seq-len", "128",
                 "--update-interval", "1", "--no-progress", *extra])


def test_train_method_s2ft_trains_whole_channels(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "s2ft"
    assert _train(base_dir, data_file, out, "--method", "s2ft", "--seed", "3") == 0
    model = tiny_llama()
    params = dict(model.named_parameters())
    names = [n for n in params if "layers" in n and n.endswith("proj.weight")]
    want = _s2ft_reference(model, names, lambda n: budget(tuple(params[n].shape), rank=2), seed=3)
    delta = load_delta(out)
    # Refreshing after every step kept the channels: the trained entries are exactly the first selection's.
    assert {n: _as_set(idx) for n, (idx, _) in delta.entries.items()} == want
    assert f"trainable={sum(len(s) for s in want.values()):,}" in capsys.readouterr().out
    assert json.loads((out / "liftft.json").read_text())["config"]["selector"] == "s2ft"


def test_train_block_size(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "blocks"
    assert _train(base_dir, data_file, out, "--block-size", "4") == 0
    for name, (idx, _) in load_delta(out).entries.items():
        n = 32 if "down_proj" not in name else 64
        rows, cols = idx // n, idx % n
        corners = {(r - r % 4, c - c % 4) for r, c in zip(rows.tolist(), cols.tolist())}
        assert idx.numel() == 16 * len(corners), name
    assert _train(base_dir, data_file, tmp_path / "m", "--method", "magnitude", "--block-size", "4") == 2
    assert "block_size=4 is for the principal selectors" in capsys.readouterr().err
