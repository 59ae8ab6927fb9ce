"""Evaluation on the LLM-Adapters arithmetic and commonsense benchmarks.

Three parts, in the order data flows:

* **Tasks and answers.** Every benchmark has a kind (a number, a letter A-E or
  a keyword such as ``answer3``). :func:`extract_answer` reads the answer out of
  a generation under one of two extractors: ``reference`` reproduces the
  LLM-Adapters evaluation scripts rule for rule, ``strict`` fixes their known
  failure modes. :func:`is_correct` compares an extracted answer with the gold.
* **Scoring a task.** :func:`evaluate_task` either generates a response per
  record (batched, left-padded, greedy or beam search) or, for multiple
  choice, ranks the candidate answers by their log-likelihood under the prompt.
* **Output directory.** ``results.json`` and ``predictions/<task>.jsonl``,
  written task by task so that an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from liftft.template import build_prompt, encode_prompt

NUMBER, LETTER, CHOICE = "number", "letter", "choice"
KINDS = (NUMBER, LETTER, CHOICE)
EXTRACTORS = ("reference", "strict")
SCORINGS = ("generate", "loglik")
# The authors' tolerance for numeric answers, kept by both extractors so that
# they differ only in what they read, never in what they accept.
NUMBER_TOLERANCE = 0.001


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


# ---------------------------------------------------------------- answers


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
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown extractor {extractor!r}; allowed: {', '.join(EXTRACTORS)}")
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


def _reference_number(text: str) -> float | None:
    numbers = re.findall(r"-?\d+\.?\d*", text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def _reference_letter(labels: tuple[str, ...], text: str) -> str | None:
    match = re.search("|".join(labels), text.strip())
    return match.group(0) if match else None


def _reference_keyword(labels: tuple[str, ...], text: str) -> str | None:
    match = re.search("|".join(labels), text.strip().lower())
    return match.group(0) if match else None


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


def _keyword_pattern(labels: tuple[str, ...]) -> re.Pattern:
    """Whole-word keywords; a numbered family matches any number, so "answer10" is never "answer1"."""
    families = dict.fromkeys(re.sub(r"\d+$", r"\\d+", label) for label in labels)
    return re.compile(rf"\b({'|'.join(families)})\b")


def _strict_keyword(labels: tuple[str, ...], text: str) -> str | None:
    text = text.lower()
    pattern = _keyword_pattern(labels)
    for cue in _ANSWER_CUE.finditer(text):
        match = pattern.match(text, cue.end())
        if match:
            return match.group(1)
    match = pattern.search(text)
    return match.group(1) if match else None


# ---------------------------------------------------------------- records


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


def candidates(task: Task, record: dict) -> list[str]:
    """The answer labels a multiple-choice record offers, parsed from its instruction.

    Letters come from "(A)".."(E)"; keywords (Solution1, Answer3, Option2,
    Ending4, true/false) from whole words in the lower-cased instruction.
    """
    if task.kind == LETTER:
        found = re.findall(rf"\(({'|'.join(task.labels)})\)", record["instruction"])
        return sorted(set(found))
    found = _keyword_pattern(task.labels).findall(record["instruction"].lower())
    return sorted(set(found), key=_label_order)


def _label_order(label: str) -> tuple[str, int]:
    """Stem, then number, so that answer10 follows answer9."""
    stem = re.sub(r"\d+$", "", label)
    return stem, int(label[len(stem) :] or 0)


def check_candidates(task: Task, records: list[dict], path: str | Path) -> None:
    """Raise ValueError, naming the file and record index, where the choices cannot be parsed."""
    for index, record in enumerate(records):
        options = candidates(task, record)
        gold = str(record["answer"]).strip()
        gold = gold if task.kind == LETTER else gold.lower()
        if len(options) < 2 or gold not in options:
            raise ValueError(
                f"{path}: record {index}: log-likelihood scoring needs the choices in the instruction; "
                f"found {options} for answer {gold!r}"
            )


# ---------------------------------------------------------------- scoring


def continuation(task: Task, label: str) -> str:
    """The response whose likelihood ranks a candidate: the answer sentence the training sets end with."""
    return f"The answer is ({label})." if task.kind == LETTER else f"the correct answer is {label}"


def evaluate_task(
    model,
    tokenizer,
    task: Task,
    records: list[dict],
    *,
    scoring: str = "generate",
    extractor: str = "strict",
    template: str = "alpaca",
    batch_size: int = 16,
    max_new_tokens: int = 256,
    num_beams: int = 1,
) -> tuple[dict, list[dict]]:
    """Score ``model`` on ``records`` of ``task``; return the summary and one prediction per record.

    ``scoring="loglik"`` ranks the candidates of a letter or choice task by
    log-likelihood; numeric tasks are always generated. A record whose
    generation or scoring raised is kept with its ``error`` and counted wrong.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; allowed: {', '.join(SCORINGS)}")
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown extractor {extractor!r}; allowed: {', '.join(EXTRACTORS)}")
    prompts = [encode_prompt(tokenizer, build_prompt(r, template, tokenizer)) for r in records]
    if scoring == "loglik" and task.kind != NUMBER:
        predictions = _loglik_predictions(model, tokenizer, task, records, prompts, batch_size)
        summary = {"scoring": "loglik", "extractor": None}
    else:
        outputs = _run_batches(
            prompts,
            batch_size,
            lambda batch: _generate_batch(model, tokenizer, batch, max_new_tokens, num_beams),
            desc=task.name,
        )
        predictions = [_graded_generation(task, r, out, extractor) for r, out in zip(records, outputs)]
        summary = {
            "scoring": "generate",
            "extractor": extractor,
            "accuracy_by_extractor": {
                mode: _mean(p["correct_by_extractor"][mode] for p in predictions) for mode in EXTRACTORS
            },
            "disagreements": sum(p["extracted"]["reference"] != p["extracted"]["strict"] for p in predictions),
        }
    predictions = [{"index": index, **prediction} for index, prediction in enumerate(predictions)]
    return {
        "suite": task.suite,
        "kind": task.kind,
        "accuracy": _mean(p["correct"] for p in predictions),
        "count": len(predictions),
        "errors": sum(p["error"] is not None for p in predictions),
        **summary,
    }, predictions


def _mean(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0


def _graded_generation(task: Task, record: dict, output: dict, extractor: str) -> dict:
    """A generation with what each extractor reads from it and whether that is right."""
    gold = str(record["answer"]).strip()
    text = output.get("generation")
    extracted = {mode: None if text is None else extract_answer(task, text, mode) for mode in EXTRACTORS}
    correct = {mode: text is not None and is_correct(task, extracted[mode], gold) for mode in EXTRACTORS}
    return {
        "instruction": record["instruction"],
        "answer": gold,
        "generation": text,
        "truncated": output.get("truncated"),
        "error": output.get("error"),
        "extracted": extracted,
        "correct_by_extractor": correct,
        "prediction": extracted[extractor],
        "correct": correct[extractor],
    }


def _loglik_predictions(model, tokenizer, task, records, prompts, batch_size) -> list[dict]:
    """Each record's candidates with their summed log-likelihoods; the best one is the prediction."""
    pairs, owners = [], []
    for index, (record, prompt) in enumerate(zip(records, prompts)):
        for label in candidates(task, record):
            response = tokenizer(continuation(task, label), add_special_tokens=False)["input_ids"]
            pairs.append((prompt, response + [tokenizer.eos_token_id]))
            owners.append((index, label))
    scores = _run_batches(
        pairs, batch_size, lambda batch: _loglik_batch(model, tokenizer, batch), desc=task.name, unit="seq"
    )
    predictions = [
        {"instruction": r["instruction"], "answer": str(r["answer"]).strip(), "candidates": {}, "error": None}
        for r in records
    ]
    for (index, label), score in zip(owners, scores):
        predictions[index]["candidates"][label] = score.get("loglik")
        predictions[index]["error"] = predictions[index]["error"] or score.get("error")
    for prediction in predictions:
        options = prediction["candidates"]
        best = None if prediction["error"] else max(options, key=options.get)
        prediction["prediction"] = best
        prediction["correct"] = is_correct(task, best, prediction["answer"])
    return predictions


def _run_batches(items: list, batch_size: int, run_batch, desc: str, unit: str = "prompt") -> list[dict]:
    """``run_batch`` over ``items`` in batches of similar length; results come back in input order.

    Longest first, so that an out-of-memory error shows at once.
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(items)), key=lambda i: -_length(items[i]))
    results = [None] * len(items)
    with tqdm(total=len(items), desc=desc, unit=unit) as progress:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, result in zip(chunk, _run_or_split([items[i] for i in chunk], run_batch, progress)):
                results[i] = result
            progress.update(len(chunk))
    return results


def _length(item) -> int:
    return sum(map(len, item)) if isinstance(item, tuple) else len(item)


def _run_or_split(batch: list, run_batch, progress) -> list[dict]:
    """Run a batch; if it raises, halve it, so that a failure costs only the records that cause it."""
    try:
        return run_batch(batch)
    except (RuntimeError, IndexError) as err:
        _release_cuda_memory()
        if len(batch) > 1:
            half = len(batch) // 2
            return _run_or_split(batch[:half], run_batch, progress) + _run_or_split(batch[half:], run_batch, progress)
        message = f"{type(err).__name__}: {err}"
        progress.write(f"error (recorded, counted wrong): {message}")
        return [{"error": message}]


def _release_cuda_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation EOS ids."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *configured] if i is not None))


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _generate_batch(model, tokenizer, batch: list[list[int]], max_new_tokens: int, num_beams: int) -> list[dict]:
    """Left-padded generation; each response decoded from its new tokens only, cut at the first EOS."""
    import torch

    width = max(map(len, batch))
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
    eos = _eos_ids(model, tokenizer)
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )
    results = []
    for row in output[:, width:].tolist():
        stop = next((i for i, token in enumerate(row) if token in eos), None)
        response = row if stop is None else row[:stop]
        results.append({"generation": tokenizer.decode(response, skip_special_tokens=True), "truncated": stop is None})
    return results


def _loglik_batch(model, tokenizer, batch: list[tuple[list[int], list[int]]]) -> list[dict]:
    """Summed log-probability of each response given its prompt, in one right-padded forward pass."""
    import torch

    sequences = [prompt + response for prompt, response in batch]
    width = max(map(len, sequences))
    device = next(model.parameters()).device
    input_ids = torch.tensor([s + [_pad_id(tokenizer)] * (width - len(s)) for s in sequences], device=device)
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device)
    # Position p predicts token p + 1, so a response starting at len(prompt) is read from len(prompt) - 1 on.
    rows, positions, targets = [], [], []
    for row, (prompt, response) in enumerate(batch):
        rows += [row] * len(response)
        positions += range(len(prompt) - 1, len(prompt) + len(response) - 1)
        targets += response
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        picked = logits[torch.tensor(rows, device=device), torch.tensor(positions, device=device)].float()
        logprobs = picked.log_softmax(-1).gather(1, torch.tensor(targets, device=device)[:, None]).squeeze(1)
        totals = torch.zeros(len(batch), dtype=torch.float64, device=device)
        totals.index_add_(0, torch.tensor(rows, device=device), logprobs.double())
    return [{"loglik": value} for value in totals.tolist()]


# ---------------------------------------------------------------- output directory


def read_results(output_dir: str | Path) -> dict | None:
    """The ``results.json`` of an output directory, or None when there is none yet."""
    path = Path(output_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete it or choose another --output") from err


def completed_tasks(output_dir: str | Path, settings: dict, overwrite: bool = False) -> set[str]:
    """Names of the tasks already evaluated in ``output_dir`` with these settings.

    A task counts as done when ``results.json`` holds it and its predictions
    file has every record. Results written with other settings raise
    ValueError unless ``overwrite``, which also makes every task count as not done.
    """
    results = read_results(output_dir)
    if results is None or overwrite:
        return set()
    previous = results.get("settings") or {}
    if previous != settings:
        changed = sorted(key for key in {**settings, **previous} if settings.get(key) != previous.get(key))
        raise ValueError(
            f"{output_dir} holds results made with other settings ({', '.join(changed)} differ); "
            "pass --overwrite to replace them or choose another --output"
        )
    done = set()
    for name, summary in results.get("tasks", {}).items():
        path = Path(output_dir) / "predictions" / f"{name}.jsonl"
        if path.is_file() and len(path.read_text(encoding="utf-8").splitlines()) == summary["count"]:
            done.add(name)
    return done


def save_task(output_dir: str | Path, settings: dict, task: Task, summary: dict, predictions: list[dict]) -> dict:
    """Write ``predictions/<task>.jsonl`` and fold the summary into ``results.json``; return the results.

    Results from other settings are replaced, not mixed in.
    """
    output_dir = Path(output_dir)
    (output_dir / "predictions").mkdir(parents=True, exist_ok=True)
    with open(output_dir / "predictions" / f"{task.name}.jsonl", "w", encoding="utf-8") as f:
        for prediction in predictions:
            f.write(json.dumps(prediction, ensure_ascii=False) + "\n")
    results = read_results(output_dir)
    if results is None or results.get("settings") != settings:
        results = {"settings": settings, "tasks": {}}
    results["tasks"][task.name] = summary
    return write_results(output_dir, results)


def write_results(output_dir: str | Path, results: dict, missing: list[str] | None = None) -> dict:
    """Recompute the suite averages, record missing tasks if given, and write ``results.json``."""
    if missing is not None:
        results["missing"] = sorted(missing)
    results["suites"] = {}
    for suite in dict.fromkeys(summary["suite"] for summary in results["tasks"].values()):
        members = {n: s for n, s in results["tasks"].items() if s["suite"] == suite}
        results["suites"][suite] = {
            "macro_accuracy": _mean(s["accuracy"] for s in members.values()),
            "tasks": sorted(members),
        }
    path = Path(output_dir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return results


def format_table(results: dict) -> str:
    """A plain-text table of per-task accuracies, suite macro averages and missing tasks."""
    lines = [f"{'task':<16}{'suite':<13}{'scoring':<10}{'extractor':<11}{'n':>6}{'errors':>8}{'accuracy':>10}"]
    for name, s in results.get("tasks", {}).items():
        lines.append(
            f"{name:<16}{s['suite']:<13}{s['scoring']:<10}{s['extractor'] or '-':<11}"
            f"{s['count']:>6}{s['errors']:>8}{100 * s['accuracy']:>9.2f}%"
        )
    for suite, s in results.get("suites", {}).items():
        label = f"{suite} average of {len(s['tasks'])} tasks"
        lines.append(f"{label:<64}{100 * s['macro_accuracy']:>9.2f}%")
    if results.get("missing"):
        lines.append("missing (no test file): " + ", ".join(results["missing"]))
    return "\n".join(lines)
