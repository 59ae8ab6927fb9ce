"""`liftft.evaluate`, kept for its importers: every name it made public still imports from it."""

from __future__ import annotations

import liftft.eval
import liftft.evaluate

PUBLIC_BEFORE_THE_SPLIT = {
    "CHOICE", "EXTRACTORS", "KINDS", "LETTER", "NUMBER", "NUMBER_TOLERANCE", "SCORINGS", "SUITES", "TASKS", "Task",
    "candidates", "check_answers", "check_candidates", "completed_tasks", "continuation", "custom_task",
    "evaluate_task", "extract_answer", "format_table", "get_task", "is_correct", "read_records", "read_results",
    "resolve_tasks", "save_task", "write_results",
}  # fmt: skip


def test_evaluate_reexports_its_former_public_names_from_liftft_eval():
    assert set(liftft.evaluate.__all__) == PUBLIC_BEFORE_THE_SPLIT
    for name in PUBLIC_BEFORE_THE_SPLIT:
        assert getattr(liftft.evaluate, name) is getattr(liftft.eval, name), name
