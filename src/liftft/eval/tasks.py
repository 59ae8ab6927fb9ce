"""The LLM-Adapters benchmarks: their answer kinds and labels, and their test files.

Every benchmark has a kind: a number, a letter A-E, or a choice among keywords
such as ``answer3``. A test file is a JSON list of records, each with an
``instruction``, an optional ``input`` and a gold ``answer``; a multiple-choice
record offers its candidate labels in the instruction.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

NUMBER, LETTER, CHOICE = "number", "letter", "choice"
KINDS = (NUMBER, LETTER, CHOICE)


@dataclass(frozen=True)
class Task:
    """A benchmark: its name, answer kind, suite, and the labels a choice can take.

    ``labels`` lists the allowed answers of a letter or choice task in the
    order the authors' regular expression alternates them; numeric tasks have none.
    """

    name: str
    kind: str
    suite: str
    labels: tuple[str, ...] = ()


def _numbered(stem: str, count: int) -> tuple[str, ...]:
    return tuple(f"{stem}{i}" for i in range(1, count + 1))


_LETTERS = ("A", "B", "C", "D", "E")
_MATH = [
    Task("gsm8k", NUMBER, "math"),
    Task("SVAMP", NUMBER, "math"),
    Task("AQuA", LETTER, "math", _LETTERS),
    Task("AddSub", NUMBER, "math"),
    Task("MultiArith", NUMBER, "math"),
    Task("SingleEq", NUMBER, "math"),
    Task("mawps", NUMBER, "math"),
]
_COMMONSENSE = [
    Task("boolq", CHOICE, "commonsense", ("true", "false")),
    Task("piqa", CHOICE, "commonsense", _numbered("solution", 2)),
    Task("social_i_qa", CHOICE, "commonsense", _numbered("answer", 5)),
    Task("ARC-Challenge", CHOICE, "commonsense", _numbered("answer", 5)),
    Task("ARC-Easy", CHOICE, "commonsense", _numbered("answer", 5)),
    Task("openbookqa", CHOICE, "commonsense", _numbered("answer", 5)),
    Task("hellaswag", CHOICE, "commonsense", _numbered("ending", 4)),
    Task("winogrande", CHOICE, "commonsense", _numbered("option", 2)),
]
TASKS = {task.name.lower(): task for task in (*_MATH, *_COMMONSENSE)}
SUITES = {"math": tuple(t.name for t in _MATH), "commonsense": tuple(t.name for t in _COMMONSENSE)}

# A bare kind stands for a task of that kind; a bare "choice" accepts every
# keyword family of the known tasks.
_ALL_KEYWORDS = tuple(dict.fromkeys(label for task in _COMMONSENSE for label in task.labels))
_KIND_TASKS = {
    NUMBER: Task(NUMBER, NUMBER, "custom"),
    LETTER: Task(LETTER, LETTER, "custom", _LETTERS),
    CHOICE: Task(CHOICE, CHOICE, "custom", _ALL_KEYWORDS),
}


def get_task(task_or_kind: str | Task) -> Task:
    """The :class:`Task` for a task name (any case), a kind, or a Task itself."""
    if isinstance(task_or_kind, Task):
        return task_or_kind
    if not isinstance(task_or_kind, str):
        raise TypeError(f"expected a task name, a kind or a Task, got {type(task_or_kind).__name__}")
    key = task_or_kind.lower()
    if key in TASKS:
        return TASKS[key]
    if key in _KIND_TASKS:
        return _KIND_TASKS[key]
    raise ValueError(
        f"unknown task {task_or_kind!r}; known tasks: {', '.join(t.name for t in TASKS.values())}; "
        f"kinds: {', '.join(KINDS)}"
    )


def resolve_tasks(spec: str) -> list[Task]:
    """The tasks named by ``math``, ``commonsense``, ``all`` or a comma-separated list (any case)."""
    tasks = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key = item.lower()
        if key == "all":
            names = SUITES["math"] + SUITES["commonsense"]
        elif key in SUITES:
            names = SUITES[key]
        elif key in TASKS:
            names = (TASKS[key].name,)
        else:
            raise ValueError(
                f"--tasks: unknown task {item!r}; known: math, commonsense, all, "
                + ", ".join(t.name for t in TASKS.values())
            )
        tasks.extend(TASKS[name.lower()] for name in names)
    if not tasks:
        raise ValueError(f"--tasks {spec!r} names no task")
    return list(dict.fromkeys(tasks))


def custom_task(name: str, kind: str, records: list[dict]) -> Task:
    """A task for a file outside the known benchmarks; a choice task's labels come from its gold answers.

    Gold answers that are all words (true/false, yes/no) are the labels
    themselves; numbered keywords (answer2, option1) of one stem give
    stem1..stemN, N the highest number among the golds and the instructions.
    """
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == NUMBER:
        return Task(name, NUMBER, "custom")
    if kind == LETTER:
        return Task(name, LETTER, "custom", _LETTERS)
    golds = [str(record["answer"]).strip().lower() for record in records]
    if all(re.fullmatch(r"[a-z]+", gold) for gold in golds):
        labels = ("true", "false") if set(golds) <= {"true", "false"} else tuple(dict.fromkeys(golds))
        return Task(name, CHOICE, "custom", labels)
    stem = re.sub(r"\d+$", "", golds[0])
    for index, gold in enumerate(golds):
        if not (re.fullmatch(r"[a-z]+", stem) and re.fullmatch(rf"{stem}\d+", gold)):
            raise ValueError(
                f"{name}: record {index}: cannot infer the choice keywords from answer {gold!r}; --kind choice "
                "expects words such as true/false or numbered keywords of one stem such as answer1..answer5"
            )
    mentioned = (re.findall(rf"\b{stem}(\d+)\b", r["instruction"].lower()) for r in records)
    count = max(int(n) for n in [gold[len(stem) :] for gold in golds] + [n for ns in mentioned for n in ns])
    return Task(name, CHOICE, "custom", _numbered(stem, count))


# ---------------------------------------------------------------- test files

TEST_FILE = "test.json"


def find_test_file(data_dir: str | Path, name: str) -> Path | None:
    """DATA_DIR/<name>/test.json, the folder matched in any case, or None."""
    for folder in sorted(Path(data_dir).iterdir()):
        if folder.name.lower() == name.lower() and (folder / TEST_FILE).is_file():
            return folder / TEST_FILE
    return None


def read_records(path: str | Path) -> list[dict]:
    """The records of a test file, checked for the fields evaluation needs.

    Raises FileNotFoundError for a missing file and ValueError, naming the file
    and the record index, for invalid JSON or a record without a non-empty
    string ``instruction`` and an ``answer``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"test file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid JSON file: {err}") from err
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of records")
    for index, record in enumerate(data):
        where = f"{path}: record {index}"
        if not isinstance(record, dict):
            raise ValueError(f"{where} is a {type(record).__name__}, not an object")
        if not isinstance(record.get("instruction"), str) or not record["instruction"].strip():
            raise ValueError(f"{where} has no non-empty 'instruction' string")
        if not isinstance(record.get("input", ""), (str, type(None))):
            raise ValueError(f"{where} has a non-string 'input'")
        answer = record.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise ValueError(f"{where} has no 'answer' (got {answer!r})")
    return data


def check_answers(task: Task, records: list[dict], path: str | Path) -> None:
    """Raise ValueError, naming the file and record index, for a gold answer the task cannot have."""
    for index, record in enumerate(records):
        gold = str(record["answer"]).strip()
        if task.kind == NUMBER:
            try:
                valid = math.isfinite(float(gold))
            except ValueError:
                valid = False
        elif task.kind == LETTER:
            valid = gold in task.labels
        else:
            valid = gold.lower() in task.labels
        if not valid:
            expected = "a number" if task.kind == NUMBER else "one of " + "/".join(task.labels)
            raise ValueError(f"{path}: record {index}: answer {gold!r} is not {expected} ({task.name})")


# ---------------------------------------------------------------- choices


def keyword_pattern(labels: tuple[str, ...]) -> re.Pattern:
    """Whole-word keywords; a numbered family matches any number, so "answer10" is never "answer1"."""
    families = dict.fromkeys(re.sub(r"\d+$", r"\\d+", label) for label in labels)
    return re.compile(rf"\b({'|'.join(families)})\b")


def candidates(task: Task, record: dict) -> list[str]:
    """The answer labels a multiple-choice record offers, parsed from its instruction.

    Letters come from the list of options written inline (:func:`letter_options`):
    "(A) x (B) y", "[A] x [B] y", "A) x, B) y", "A. x; B. y", "A: x" on lines of
    their own, with any spacing. Keywords (Solution1, Answer3, Option2, Ending4, true/false) come
    from whole words in the lower-cased instruction. ValueError says why a list of
    letters is ambiguous.
    """
    if task.kind == LETTER:
        return letter_options(record["instruction"], task.labels)
    found = keyword_pattern(task.labels).findall(record["instruction"].lower())
    return sorted(set(found), key=_label_order)


# How a letter opens an option, in each layout; spaces or tabs may stand around the letter. The letter may not be part
# of a word: it follows the start of the text, whitespace, or one of ,;:/|?!( (or the layout's own brackets).
_OPENER = r"(?<![^\s,;:/|?!(])"
_LAYOUTS = {
    "(A)": r"\([ \t]*({letters})[ \t]*\)",
    "[A]": r"\[[ \t]*({letters})[ \t]*\]",
    "A)": r"(?<![^\s,;:/|?!])({letters})[ \t]*\)",  # as _OPENER, but "(A)" is the first layout
    "A.": _OPENER + r"({letters})[ \t]*\.(?![A-Za-z]\.)",  # not an abbreviation (A.M., U.S.A.)
    "A:": _OPENER + r"({letters})[ \t]*:",
}


def letter_options(text: str, letters: tuple[str, ...] = _LETTERS) -> list[str]:
    """The letters of the options listed in ``text``, in order, e.g. ["A", "B", "C", "D"].

    A list is written in one layout of :data:`_LAYOUTS` ("(A)", "[A]", "A)", "A."
    or "A:", separated by anything: commas, semicolons, newlines, spaces) and runs
    from A through consecutive letters, each after the one before; the next A of
    its layout starts another list. The options are the list that ends last, so
    lettered text before them (an earlier example's options, "plan A. or plan
    B.?") does not count, nor does one nested inside them ("(A) plan A. (B) plan
    B."). Lower-case letters ("a) x b) y") are read only where no upper-case list
    is. An empty list means no list of two options or more was found.

    ValueError when the options are ambiguous: a list of other letters begins
    before them and ends within them ("A) 1 (A) 2 B) 3 (B) 4 (C) 5": A/B or
    A/B/C?), or a letter of theirs opens two options ("A) 1 B) 2 B) 3 C) 4").
    """
    for case in (str, str.lower):
        lists = [found for layout in _LAYOUTS for found in _lists(text, layout, tuple(map(case, letters)))]
        if lists:
            break
    else:
        return []
    start, end, labels, layout, repeated = max(lists, key=lambda found: (found[1], -found[0]))
    for other_start, other_end, other_labels, other_layout, _ in lists:
        if other_start < start < other_end and other_labels != labels:
            raise ValueError(f"its options are ambiguous: the {other_layout} list {'/'.join(other_labels).upper()} "
                             f"overlaps the {layout} list {'/'.join(labels).upper()}; write them in one layout")
    if repeated:
        raise ValueError(f"its options are ambiguous: {repeated.upper()} opens two options of the {layout} list "
                         f"{'/'.join(labels).upper()}")
    return [label.upper() for label in labels]


def _lists(text: str, layout: str, letters: tuple[str, ...]) -> list[tuple[int, int, list[str], str, str | None]]:
    """Every list of two options or more in ``layout``: (start, end of its last marker, its letters, the layout,
    a letter of it that opens a second option within it or None)."""
    pattern = re.compile(_LAYOUTS[layout].format(letters="|".join(map(re.escape, letters))))
    markers = [(match.start(), match.end(), match.group(1)) for match in pattern.finditer(text)]
    starts = [i for i, (_, _, letter) in enumerate(markers) if letter == letters[0]] + [len(markers)]
    found = []
    for first, stop in zip(starts, starts[1:]):
        labels, end, again = [letters[0]], markers[first][1], []
        for marker_start, marker_end, letter in markers[first + 1:stop]:
            if len(labels) < len(letters) and letter == letters[len(labels)]:
                labels.append(letter)
                end = marker_end
            elif letter in labels:
                again.append((marker_start, letter))
        repeated = next((letter for at, letter in again if at < end), None)  # later ones refer back to an option
        if len(labels) >= 2:
            found.append((markers[first][0], end, labels, layout, repeated))
    return found


def _label_order(label: str) -> tuple[str, int]:
    """Stem, then number, so that answer10 follows answer9."""
    stem = re.sub(r"\d+$", "", label)
    return stem, int(label[len(stem) :] or 0)


def check_candidates(task: Task, records: list[dict], path: str | Path) -> None:
    """Raise ValueError, naming the file and record index, where the choices cannot be parsed."""
    for index, record in enumerate(records):
        try:
            options = candidates(task, record)
        except ValueError as err:
            raise ValueError(f"{path}: record {index}: {err}") from None
        gold = str(record["answer"]).strip()
        gold = gold if task.kind == LETTER else gold.lower()
        if len(options) < 2 or gold not in options:
            raise ValueError(
                f"{path}: record {index}: log-likelihood scoring needs the choices in the instruction; "
                f"found {options} for answer {gold!r}"
            )
