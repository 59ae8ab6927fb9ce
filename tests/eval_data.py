"""The LLM-Adapters test sets as the evaluation tests read them: the excerpts the repository holds, and the full
files where a test of the full files finds them."""

from __future__ import annotations

import json

from conftest import DATA, data_path, full_data_path

TEST_DIR = DATA / "test"
# The tasks whose test sets are excerpted, by folder name: 13 of liftft's 15, as the full data lacks ARC-Easy and
# hellaswag (tests of `liftft eval` count on their absence).
SHIPPED = sorted(folder.name for folder in TEST_DIR.iterdir() if (folder / "test.json").is_file())


def shipped_records(name: str) -> list[dict]:
    """The records of the excerpt of task ``name``'s test set (its folder name)."""
    return json.loads(data_path("test", name, "test.json").read_text())


def full_records(name: str) -> list[dict]:
    """The records of task ``name``'s full test set; skips the test, naming the path, without the full data."""
    return json.loads(full_data_path("test", name, "test.json").read_text())
