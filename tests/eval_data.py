"""The LLM-Adapters test sets in shared/, as the evaluation tests read them."""

from __future__ import annotations

import json

from conftest import SHARED_DATA, shared_path

TEST_DIR = SHARED_DATA / "test"
# Without ../shared, tests parametrized over the shipped tasks get one name, whose records skip them by name.
SHIPPED = (sorted(folder.name for folder in TEST_DIR.iterdir() if (folder / "test.json").is_file())
           if TEST_DIR.is_dir() else ["gsm8k"])


def shipped_records(name: str) -> list[dict]:
    """The records of the shipped test set of task ``name`` (its folder name); skips the test without ../shared."""
    return json.loads(shared_path("test", name, "test.json").read_text())
