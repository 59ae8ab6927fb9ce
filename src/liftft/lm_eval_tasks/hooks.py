"""What lm-eval-harness calls while it runs liftft's task pack: the prompt, the answer filter, the scoring.

They wrap liftft's own template (:func:`liftft.data.template.build_prompt`), extraction
(:func:`liftft.eval.extract_answer`) and judgement (:func:`liftft.eval.is_correct`),
so that lm-eval's per-example answers and accuracy are those of ``liftft eval``.
The pack's ``utils.py`` re-exports them; nothing here imports lm-eval.
"""

from __future__ import annotations

from liftft.eval.extract import check_extractor, extract_answer, is_correct
from liftft.eval.tasks import CHOICE, LETTER, NUMBER, get_task
from liftft.data.template import build_prompt


def doc_to_text(doc: dict) -> str:
    """The prompt of a test record: liftft's "alpaca" template, as training and ``liftft eval`` render it."""
    return build_prompt(doc, "alpaca")


class ExtractAnswer:
    """An lm-eval filter that reads each generation's answer as ``liftft eval`` does.

    lm-eval builds it from a filter entry of the task YAML (``task`` and
    ``extractor`` are the entry's keys) and calls :meth:`apply`; the answer is
    a float for numeric tasks, a label otherwise, None where none was found.
    """

    def __init__(self, task: str, extractor: str = "strict") -> None:
        check_extractor(extractor)
        self.task = get_task(task)
        self.extractor = extractor

    def apply(self, resps, docs) -> list:
        """One answer per document, from its first generation (the pack asks for one)."""
        return [extract_answer(self.task, generations[0], self.extractor) for generations in resps]


def _accuracy(kind: str, doc: dict, results: list) -> dict:
    return {"acc": float(is_correct(kind, results[0], doc["answer"]))}


def process_number(doc: dict, results: list) -> dict:
    """``acc``: 1.0 when the extracted number is within 0.001 of the gold answer, else 0.0."""
    return _accuracy(NUMBER, doc, results)


def process_letter(doc: dict, results: list) -> dict:
    """``acc``: 1.0 when the extracted letter equals the gold one, else 0.0."""
    return _accuracy(LETTER, doc, results)


def process_choice(doc: dict, results: list) -> dict:
    """``acc``: 1.0 when the extracted keyword equals the gold one, ignoring case, else 0.0."""
    return _accuracy(CHOICE, doc, results)


PROCESS_RESULTS = {NUMBER: "process_number", LETTER: "process_letter", CHOICE: "process_choice"}
