"""Reading the answer out of a generation, and judging it against the gold.

Two extractors: ``reference`` reproduces the LLM-Adapters evaluation scripts
rule for rule, so that scores compare with the paper's; ``strict`` fixes their
known failure modes (the first letter "A" of a sentence, "answer10" read as
"answer1", a check sum after the answer). Both are recorded for every record.
"""

from __future__ import annotations

import re

from liftft.eval.tasks import LETTER, NUMBER, Task, get_task, keyword_pattern

EXTRACTORS = ("reference", "strict")
# The authors' tolerance for numeric answers, kept by both extractors so that
# they differ only in what they read, never in what they accept.
NUMBER_TOLERANCE = 0.001


def check_extractor(extractor: str) -> None:
    """Raise ValueError for an extractor name outside :data:`EXTRACTORS`."""
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown extractor {extractor!r}; allowed: {', '.join(EXTRACTORS)}")


def extract_answer(task_or_kind: str | Task, text: str, extractor: str = "strict"):
    """The answer a generation gives: a float for numeric tasks, a label otherwise, None if none.

    ``extractor="reference"`` applies the LLM-Adapters rules exactly: numbers
    are the last match of ``-?\\d+\\.?\\d*`` after removing commas; letters the
    first A-E anywhere; keywords the first match of the task's alternation in
    the lower-cased text. ``extractor="strict"`` prefers the value after
    "answer is"/"answer:", reads $, %, thousands separators and fractions, and
    matches letters and keywords only as whole words.
    """
    task = get_task(task_or_kind)
    check_extractor(extractor)
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    strict = extractor == "strict"
    if task.kind == NUMBER:
        return _strict_number(text) if strict else _reference_number(text)
    if task.kind == LETTER:
        return _strict_letter(task.labels, text) if strict else _reference_letter(task.labels, text)
    return _strict_keyword(task.labels, text) if strict else _reference_keyword(task.labels, text)


def is_correct(task_or_kind: str | Task, prediction, gold) -> bool:
    """Whether an extracted answer matches the gold one.

    Numbers count within 0.001 of ``float(gold)``; letters must be equal and
    keywords equal ignoring case. A None prediction (nothing extracted) is wrong.
    """
    task = get_task(task_or_kind)
    if prediction is None:
        return False
    if task.kind == NUMBER:
        return abs(float(prediction) - float(gold)) <= NUMBER_TOLERANCE
    if task.kind == LETTER:
        return prediction == str(gold).strip()
    return str(prediction).lower() == str(gold).strip().lower()


# ---------------------------------------------------------------- reference: the authors' rules


def _reference_number(text: str) -> float | None:
    numbers = re.findall(r"-?\d+\.?\d*", text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def _reference_letter(labels: tuple[str, ...], text: str) -> str | None:
    match = re.search("|".join(labels), text.strip())
    return match.group(0) if match else None


def _reference_keyword(labels: tuple[str, ...], text: str) -> str | None:
    match = re.search("|".join(labels), text.strip().lower())
    return match.group(0) if match else None


# ---------------------------------------------------------------- strict


# "answer is", "answer:" and "answer =" introduce the final answer; "answer1" does not.
_ANSWER_CUE = re.compile(r"\banswer(?:\s+is\b|\s*[:=])[\s:=*(\"']*", re.IGNORECASE)
# A sign counts only where it cannot be a minus between two operands ("3-4").
_NUMBER = re.compile(
    r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:\s*/\s*(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?!\.\d))?"
)
_CURRENCY = re.compile(r"[$€£¥]")


def _number_value(literal: str) -> float | None:
    """The value of a matched number; a fraction with a zero denominator has none."""
    numerator, _, denominator = literal.replace(",", "").replace(" ", "").partition("/")
    if not denominator:
        return float(numerator)
    return float(numerator) / float(denominator) if float(denominator) else None


def _last_number(text: str) -> float | None:
    values = [_number_value(match.group(0)) for match in _NUMBER.finditer(text)]
    values = [value for value in values if value is not None]
    return values[-1] if values else None


def _strict_number(text: str) -> float | None:
    text = _CURRENCY.sub("", text)
    for cue in _ANSWER_CUE.finditer(text):
        # The answer sentence often carries its own arithmetic ("The answer is 49 - 34 = 15"),
        # so its last number is the answer; a full stop before a digit is a decimal point.
        sentence = re.match(r".*?(?:\.(?!\d)|\n|$)", text[cue.end() :]).group(0)
        value = _last_number(sentence)
        if value is not None:
            return value
    return _last_number(text)


def _strict_letter(labels: tuple[str, ...], text: str) -> str | None:
    options = "|".join(labels)
    for cue in _ANSWER_CUE.finditer(text):
        match = re.compile(rf"\(?({options})\b").match(text, cue.end())
        if match:
            return match.group(1)
    match = re.search(rf"\(({options})\)", text)
    if match:
        return match.group(1)
    for match in re.finditer(rf"\b({options})\b", text):
        rest = text[match.end() : match.end() + 4]
        # "A:" is a dialogue marker and "A man" an article, neither a choice; "A is" is.
        if rest.startswith(":") or (match.group(1) == "A" and re.match(r" (?!is\b)[a-z]", rest)):
            continue
        return match.group(1)
    return None


def _strict_keyword(labels: tuple[str, ...], text: str) -> str | None:
    text = text.lower()
    pattern = keyword_pattern(labels)
    for cue in _ANSWER_CUE.finditer(text):
        match = pattern.match(text, cue.end())
        if match:
            return match.group(1)
    match = pattern.search(text)
    return match.group(1) if match else None
