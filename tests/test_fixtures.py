"""The excerpts of the LLM-Adapters data under tests/fixtures: small, attributed, and what their script makes."""

from __future__ import annotations

import importlib.util
import json
import re

from conftest import DATA, FULL_DATA, full_data_path


def load_make_excerpts():
    spec = importlib.util.spec_from_file_location("make_excerpts", DATA / "make_excerpts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def excerpt_files() -> dict[str, list[dict]]:
    return {path.relative_to(DATA).as_posix(): json.loads(path.read_text(encoding="utf-8"))
            for path in sorted(DATA.rglob("*.json"))}


def test_excerpts_are_small_attributed_and_listed():
    assert sum(path.stat().st_size for path in DATA.rglob("*.json")) < 300_000
    assert (DATA / "DATA_LICENSE").read_text().startswith("Attribution License (ODC-By)")
    source = (DATA / "SOURCE.md").read_text()
    assert "AGI-Edgerunners/LLM-Adapters" in source and "816657208af4db747803f87ba40a4c71383fed7a" in source
    listed = {path: int(count) for path, count in re.findall(r"^\| (\S+\.json) \| (\d+) \|", source, re.MULTILINE)}
    assert listed == {path: len(records) for path, records in excerpt_files().items()}
    make_excerpts = load_make_excerpts()
    assert sorted(path.split("/")[1] for path in listed if path.startswith("test/")) == sorted(make_excerpts.TASK_NAMES)
    for path, records in excerpt_files().items():
        assert all(set(r) == {"instruction", "input", "output", "answer"} for r in records), path


def test_excerpts_are_what_the_script_makes_of_the_full_files(tmp_path, monkeypatch):
    """Every record unmodified and in order, each kind of record of the full test sets kept (make_excerpts.py)."""
    full_data_path("train", "math_data.json")
    make_excerpts = load_make_excerpts()
    monkeypatch.setattr(make_excerpts, "HERE", tmp_path)
    make_excerpts.main(FULL_DATA)
    written = {path.relative_to(tmp_path).as_posix(): json.loads(path.read_text(encoding="utf-8"))
               for path in sorted(tmp_path.rglob("*.json"))}
    assert written == excerpt_files()
    for name in make_excerpts.TASK_NAMES:
        full = json.loads(full_data_path("test", name, "test.json").read_text(encoding="utf-8"))
        kinds = {make_excerpts.signature(name, record) for record in written[f"test/{name}/test.json"]}
        assert kinds == {make_excerpts.signature(name, record) for record in full}, name
