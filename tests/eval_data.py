"""The LLM-Adapters test sets in shared/, as the evaluation tests read them."""

from __future__ import annotations

import json

from conftest import SHARED_DATA

TEST_DIR = SHARED_DATA / "test"
SHIPPED = sorted(folder.name for folder in TEST_DIR.iterdir() if (folder / "test.json").is_file())


def shipped_records(name: str) -> list[dict]:
    """The records of the shipped test set of task ``name`` (its folder name)."""
    return json.loads((TEST_DIR / name / "test.json").read_text())
