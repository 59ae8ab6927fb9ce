"""Scoring a model on a task's records, in batches.

A task is scored either by generating a response per record (left-padded,
greedy or beam search) and extracting its answer, or, for multiple choice, by
ranking the candidate answers by their log-likelihood under the prompt.
A batch that raises is halved until the failure is confined to the records
that cause it; those are kept with their ``error`` and counted wrong.
"""

from __future__ import annotations

from liftft.eval.extract import EXTRACTORS, check_extractor, extract_answer, is_correct
from liftft.eval.results import mean
from liftft.eval.tasks import LETTER, NUMBER, Task, candidates
from liftft.data.template import build_prompt, encode_prompt, encode_response
from liftft.utils.progress import progress_bar

SCORINGS = ("generate", "loglik")


def continuation(task: Task, label: str) -> str:
    """The response whose likelihood ranks a candidate: the answer sentence the training sets end with."""
    return f"The answer is ({label})." if task.kind == LETTER else f"the correct answer is {label}"


def generates(task: Task, scoring: str) -> bool:
    """Whether ``scoring`` scores ``task`` by generating: always for numeric tasks, which have no choices to rank."""
    return scoring == "generate" or task.kind == NUMBER


def encode_prompts(tokenizer, records: list[dict], template: str = "alpaca") -> list[list[int]]:
    """The prompt ids of each record, exactly as training encoded its prompts."""
    return [encode_prompt(tokenizer, build_prompt(r, template, tokenizer)) for r in records]


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
    check_extractor(extractor)
    prompts = encode_prompts(tokenizer, records, template)
    if not generates(task, scoring):
        texts = [build_prompt(r, template, tokenizer) for r in records]
        predictions = _loglik_predictions(model, tokenizer, task, records, texts, prompts, batch_size)
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
            "max_new_tokens": max_new_tokens,
            "accuracy_by_extractor": {
                mode: mean(p["correct_by_extractor"][mode] for p in predictions) for mode in EXTRACTORS
            },
            "disagreements": sum(p["extracted"]["reference"] != p["extracted"]["strict"] for p in predictions),
        }
    predictions = [{"index": index, **prediction} for index, prediction in enumerate(predictions)]
    return {
        "suite": task.suite,
        "kind": task.kind,
        "accuracy": mean(p["correct"] for p in predictions),
        "count": len(predictions),
        "errors": sum(p["error"] is not None for p in predictions),
        **summary,
    }, predictions


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


def _loglik_predictions(model, tokenizer, task, records, texts, prompts, batch_size) -> list[dict]:
    """Each record's candidates with their summed log-likelihoods; the best one is the prediction."""
    pairs, owners = [], []
    for index, (record, text, prompt) in enumerate(zip(records, texts, prompts)):
        try:
            labels = candidates(task, record)
        except ValueError as err:  # ambiguous options
            raise ValueError(f"{task.name}: record {index}: {err}") from None
        for label in labels:
            # The response's ids as training labels them: in context after the prompt, then EOS.
            response = encode_response(tokenizer, text, continuation(task, label)) + [tokenizer.eos_token_id]
            pairs.append((prompt, response))
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


# ---------------------------------------------------------------- batches


def _run_batches(items: list, batch_size: int, run_batch, desc: str, unit: str = "prompt") -> list[dict]:
    """``run_batch`` over ``items`` in batches of similar length; results come back in input order.

    Longest first, so that an out-of-memory error shows at once.
    """
    order = sorted(range(len(items)), key=lambda i: -_length(items[i]))
    results = [None] * len(items)
    with progress_bar(total=len(items), desc=desc, unit=unit) as progress:
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


# ---------------------------------------------------------------- one batch on the model


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
