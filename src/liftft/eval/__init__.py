"""Evaluation on the LLM-Adapters arithmetic and commonsense benchmarks.

In the order data flows: :mod:`~liftft.eval.tasks` (the benchmarks and their
test files), :mod:`~liftft.eval.scoring` (generating, or ranking the choices by
log-likelihood), :mod:`~liftft.eval.extract` (reading the answer out of a
generation) and :mod:`~liftft.eval.results` (``results.json`` and the
predictions, resumable task by task).
"""

from liftft.eval.extract import EXTRACTORS, NUMBER_TOLERANCE, extract_answer, is_correct
from liftft.eval.results import completed_tasks, format_table, read_results, save_task, write_results
from liftft.eval.scoring import SCORINGS, continuation, evaluate_task
from liftft.eval.tasks import (
    CHOICE,
    KINDS,
    LETTER,
    NUMBER,
    SUITES,
    TASKS,
    Task,
    candidates,
    check_answers,
    check_candidates,
    custom_task,
    get_task,
    read_records,
    resolve_tasks,
)

__all__ = [
    "CHOICE",
    "EXTRACTORS",
    "KINDS",
    "LETTER",
    "NUMBER",
    "NUMBER_TOLERANCE",
    "SCORINGS",
    "SUITES",
    "TASKS",
    "Task",
    "candidates",
    "check_answers",
    "check_candidates",
    "completed_tasks",
    "continuation",
    "custom_task",
    "evaluate_task",
    "extract_answer",
    "format_table",
    "get_task",
    "is_correct",
    "read_records",
    "read_results",
    "resolve_tasks",
    "save_task",
    "write_results",
]
