"""`liftft demo --quick` end to end, its results file, its cache and its bad input."""

import json

import pytest

from liftft.cli import main
from liftft.demo import DEMO_METHODS

pytestmark = pytest.mark.filterwarnings("ignore")


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
    assert set(results) == {"base", "methods", "settings"}
    assert set(results["methods"]) == set(DEMO_METHODS)
    for scores in [results["base"], *results["methods"].values()]:
        assert 0 <= scores["source_acc"] <= 1 and 0 <= scores["target_acc"] <= 1
    for method, r in results["methods"].items():
        assert {"target_acc", "source_acc", "trainable", "train_seconds", "peak_mem_mb"} <= set(r), method
    sparse = {results["methods"][m]["trainable"] for m in ("lift", "lora", "magnitude", "random")}
    assert len(sparse) == 1 and results["methods"]["full"]["trainable"] > sparse.pop()
    assert results["settings"]["quick"] is True
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
