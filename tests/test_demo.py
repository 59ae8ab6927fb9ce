"""`liftft demo --quick` end to end, its frontiers and matched levels, its cache, its threads and its bad input."""

import itertools
import json
import random

import pytest
import torch

from liftft.cli import main
from liftft.demo import DEMO_METHODS
from liftft.demo.base import DemoSettings
from liftft.demo.frontier import LEVELS, frontier, matched_levels, source_at_level
from liftft.demo.threads import free_cores, torch_threads

pytestmark = pytest.mark.filterwarnings("ignore")


def pareto_by_brute_force(points: list[dict]) -> list[dict]:
    """The points no other point dominates, of equal points the first, by rising target accuracy."""
    def dominates(q, p):
        return (q["target_acc"] >= p["target_acc"] and q["source_acc"] >= p["source_acc"]
                and (q["target_acc"], q["source_acc"]) != (p["target_acc"], p["source_acc"]))

    kept = [p for i, p in enumerate(points)
            if not any(dominates(q, p) for q in points)
            and not any((q["target_acc"], q["source_acc"]) == (p["target_acc"], p["source_acc"]) for q in points[:i])]
    return sorted(kept, key=lambda p: p["target_acc"])


def _points(pairs):
    return [{"target_acc": t, "source_acc": s, "id": i} for i, (t, s) in enumerate(pairs)]


def test_frontier_of_hand_made_points():
    points = _points([(0.0, 1.0), (0.2, 0.5), (0.2, 0.6), (0.1, 0.6), (0.5, 0.1), (0.4, 0.05), (0.5, 0.1), (0.3, 0.0)])
    assert [p["id"] for p in frontier(points)] == [0, 2, 4]


def test_frontier_equals_brute_force_pareto_on_random_points_with_ties():
    rng = random.Random(0)
    grid = [i / 8 for i in range(9)]  # a coarse grid, so that equal and partly equal points are common
    for n in (0, 1, 2, 5, 12, 30):
        for _ in range(40):
            points = _points([(rng.choice(grid), rng.choice(grid)) for _ in range(n)])
            assert [p["id"] for p in frontier(points)] == [p["id"] for p in pareto_by_brute_force(points)]


def test_source_at_level_is_the_best_kept_at_that_learning_or_more_and_the_frontier_holds_it():
    rng = random.Random(1)
    points = _points([(rng.random(), rng.random()) for _ in range(25)])
    for level in (0.0, 0.1, 0.35, 0.8, 0.999):
        expected = max((p["source_acc"] for p in points if p["target_acc"] >= level), default=None)
        assert source_at_level(points, level) == expected == source_at_level(frontier(points), level)
    assert source_at_level(points, 1.5) is None


def test_matched_levels_keep_only_levels_every_method_reaches():
    by_method = {"a": _points([(0.0, 1.0), (0.15, 0.7), (0.35, 0.2), (0.6, 0.0)]),
                 "b": _points([(0.25, 0.5), (0.3, 0.4), (0.1, 0.9)])}
    assert matched_levels(by_method, levels=(0.1, 0.2, 0.3, 0.4, 0.5)) == {
        "levels": [0.1, 0.2, 0.3],
        "dropped": [0.4, 0.5],
        "source_acc": {"a": {"0.1": 0.7, "0.2": 0.2, "0.3": 0.2}, "b": {"0.1": 0.9, "0.2": 0.5, "0.3": 0.4}},
    }
    assert matched_levels({"a": _points([(0.05, 1.0)])}, levels=(0.1,)) == {
        "levels": [], "dropped": [0.1], "source_acc": {"a": {}}}


def test_table_leads_with_retention_at_the_matched_levels_and_names_the_dropped_ones():
    from liftft.demo.report import table

    points = {"lift": _points([(0.0, 1.0), (0.25, 0.5), (0.6, 0.1)]), "full": _points([(0.0, 1.0), (0.3, 0.25)])}
    methods = {m: {"best_target_acc": max(p["target_acc"] for p in ps), "source_acc_at_best_target": 0.1,
                   "trainable": 10, "train_seconds": 1.0, "peak_mem_mb": 2.0} for m, ps in points.items()}
    results = {"base": {"target_acc": 0.0, "source_acc": 1.0}, "methods": methods, "settings": {},
               "matched": matched_levels(points, levels=(0.2, 0.4))}
    lines = table(results).splitlines()
    assert "levels 0.4 left out" in lines[1]
    assert lines[2].split()[:4] == ["model", "kept", "@", "≥0.2"]
    assert lines[5].split()[:3] == ["LIFT", "0.500", "0.600"] and lines[6].split()[:3] == ["Full", "FT", "0.250"]


def test_free_cores_leave_the_busy_ones_and_keep_one():
    assert [free_cores(2, load) for load in (0.0, 0.4, 0.6, 1.4, 1.6, 2.0, 7.5)] == [2, 2, 1, 1, 1, 1, 1]
    assert free_cores(8, 3.0) == 5 and free_cores(8, 0.0) == 8


def test_torch_threads_are_restored_after_the_block():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_score_steps_are_fractions_of_the_run():
    assert DemoSettings().score_steps() == [25, 50, 100, 200]
    assert DemoSettings(finetune_steps=3, score_at=(0.1, 0.5, 1)).score_steps() == [1, 2, 3]
    with pytest.raises(ValueError, match="score_at must be fractions in"):
        DemoSettings(score_at=(0.5, 1.5))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("LIFTFT_CACHE", str(cache))
    assert main(["demo", "--quick", "--output", str(out), "--no-progress"]) == 0
    yield out, mp
    mp.undo()


def test_quick_demo_writes_results_of_the_documented_shape(demo_run):
    out, _ = demo_run
    results = json.loads((out / "demo_results.json").read_text())
    assert set(results) == {"base", "methods", "matched", "settings"}
    assert list(results["methods"]) == list(DEMO_METHODS)
    sparse = {results["methods"][m]["trainable"] for m in ("lift", "lora", "magnitude", "random")}
    assert len(sparse) == 1 and results["methods"]["full"]["trainable"] > sparse.pop()
    assert results["settings"]["quick"] is True
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_demo_points_frontiers_and_matched_levels_agree(demo_run):
    out, _ = demo_run
    results = json.loads((out / "demo_results.json").read_text())
    settings = results["settings"]
    steps = DemoSettings.quick().score_steps()
    for method, r in results["methods"].items():
        start, *trained = r["points"]
        assert start == {"step": 0, "lr": None, **results["base"]}
        runs = list(itertools.product(settings["learning_rates"][method], steps))
        assert [(p["lr"], p["step"]) for p in trained] == runs, method
        assert all(0 <= p[k] <= 1 for p in r["points"] for k in ("target_acc", "source_acc"))
        assert r["frontier"] == pareto_by_brute_force(r["points"]), method
        best = max(p["target_acc"] for p in r["points"])
        assert r["best_target_acc"] == best
        assert r["source_acc_at_best_target"] == max(p["source_acc"] for p in r["points"] if p["target_acc"] == best)
    matched = results["matched"]
    assert matched["levels"] + matched["dropped"] == list(LEVELS)
    for level in LEVELS:
        reached = {m: [p["source_acc"] for p in r["points"] if p["target_acc"] >= level]
                   for m, r in results["methods"].items()}
        if all(reached.values()):
            assert {m: matched["source_acc"][m][f"{level:g}"] for m in reached} == {m: max(v) for m, v in reached.items()}
        else:
            assert level in matched["dropped"]


def test_second_run_reuses_the_cached_base(demo_run, tmp_path, capsys):
    assert main(["demo", "--quick", "--output", str(tmp_path), "--methods", "lift", "--no-progress"]) == 0
    results = json.loads((tmp_path / "demo_results.json").read_text())
    assert results["settings"]["base_cached"] is True
    assert "pretraining" not in capsys.readouterr().err.lower()


def test_unknown_method(tmp_path, capsys):
    assert main(["demo", "--quick", "--output", str(tmp_path), "--methods", "lift,dora"]) == 2
    assert "unknown demo method(s) dora" in capsys.readouterr().err


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["demo", "--quick", "--output", str(blocker / "out")]) == 2
    assert "is not writable" in capsys.readouterr().err
