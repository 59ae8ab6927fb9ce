"""Evaluation: the authors' rules transcribed independently, gold recovery, hard strings, scoring, `liftft eval`."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
from conftest import SHARED_DATA, tiny_llama

from liftft import cli
from liftft.evaluate import (
    TASKS,
    Task,
    candidates,
    check_candidates,
    continuation,
    custom_task,
    evaluate_task,
    extract_answer,
    get_task,
    is_correct,
    resolve_tasks,
)
from liftft.template import build_prompt, encode_prompt

TEST_DIR = SHARED_DATA / "test"
SHIPPED = sorted(folder.name for folder in TEST_DIR.iterdir() if (folder / "test.json").is_file())


def _records(name: str) -> list[dict]:
    return json.loads((TEST_DIR / name / "test.json").read_text())


# ------------------------------------------------ the authors' rules, transcribed from LLM-Adapters

_AUTHORS_KEYWORDS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}


def authors_extract(task: str, sentence: str):
    """evaluate.py / commonsense_evaluate.py of LLM-Adapters; inf and "" mean nothing found."""
    if task == "AQuA":
        found = re.findall(r"A|B|C|D|E", sentence.strip())
        return found[0] if found else ""
    if task in _AUTHORS_KEYWORDS:
        found = re.findall(_AUTHORS_KEYWORDS[task], sentence.strip().lower())
        return found[0] if found else ""
    found = [s for s in re.findall(r"-?\d+\.?\d*", sentence.replace(",", ""))]
    return float(found[-1]) if found else float("inf")


def authors_correct(task: str, sentence: str, label: str) -> bool:
    predict = authors_extract(task, sentence)
    if isinstance(predict, float):
        return abs(float(label) - predict) <= 0.001
    return label == predict


def _same_extraction(ours, authors) -> bool:
    return ours == authors if ours is not None else authors in ("", float("inf"))


# ------------------------------------------------ generations built from the gold answers


def _plain(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def _number_generations(gold: str) -> list[str]:
    value = float(gold)
    text = _plain(value)
    money = f"${value:,.2f}" if round(value, 2) == value else text
    fraction = Fraction(value).limit_denominator(100)
    as_fraction = f"{fraction.numerator}/{fraction.denominator}" if abs(float(fraction) - value) < 1e-9 else text
    return [
        f"A: We add the parts, so 3 + 4 = 7 and then the total is {text}. The answer is {text}.",
        f"The answer is {money}.",
        f"Answer: {text}",
        f"The answer is {text}. Check: 2 + 2 = 4.",
        f"So, the answer is 12 - 5 + {text} - 7 = {text}.",
        f"Each share is {as_fraction} of the cake. The answer is {as_fraction}.",
        f"That is {text}% of the class.",
        text,
    ]


def _letter_generations(gold: str, other: str) -> list[str]:
    return [
        f"Answer: ({gold})",
        f"The answer is {gold}.",
        f"A: Option ({other}) is too small. The answer is ({gold}).",
        f"Rationale: Among the choices only ({gold}) works.",
        f"A: The answer is {gold}",
        f"Comparing the values, {gold} is the one.",
    ]


def _keyword_generations(gold: str, other: str) -> list[str]:
    return [
        f"the correct answer is {gold}",
        f"Answer: {gold}",
        f"The correct answer is {gold.capitalize()}.",
        f"{other} does not fit, so the answer is {gold}",
        gold,
    ]


def _gold_generations(task: Task, record: dict) -> list[str]:
    gold = record["answer"]
    if task.kind == "number":
        return _number_generations(gold)
    other = next(label for label in candidates(task, record) if label != gold)
    return (_letter_generations if task.kind == "letter" else _keyword_generations)(gold, other)


HARD_STRINGS = [
    "A: The answer is B",
    "-3.5",
    "2/3",
    "50%",
    "the correct answer is answer10",
    "The answer is $1,234.50.",
    "The answer is 7. Check: 2 + 2 = 4.",
    "3-4",
    "1,2",
    "no number here",
    "Answer: (C)",
    "It is not true; the answer is false",
    "option12",
]


@pytest.mark.parametrize("name", SHIPPED)
def test_reference_agrees_with_the_authors_rules_record_for_record(name):
    task = TASKS[name.lower()]
    texts = [(r["output"], r["answer"]) for r in _records(name)]
    texts += [(g, r["answer"]) for r in _records(name)[:50] for g in _gold_generations(task, r)]
    texts += [(hard, r["answer"]) for r in _records(name)[:3] for hard in HARD_STRINGS]
    for text, gold in texts:
        ours = extract_answer(task, text, "reference")
        assert _same_extraction(ours, authors_extract(name, text)), (name, text)
        assert is_correct(task, ours, gold) == authors_correct(name, text, gold), (name, text, gold)
    disagreements = sum(
        extract_answer(task, r["output"], "reference") != extract_answer(task, r["output"], "strict")
        for r in _records(name)
    )
    print(f"{name}: strict and reference disagree on {disagreements} of {len(_records(name))} outputs")


@pytest.mark.parametrize("name", SHIPPED)
def test_strict_recovers_the_gold_answer_from_every_realistic_generation(name):
    # No exceptions: every record of every shipped task, in every format.
    task = TASKS[name.lower()]
    for record in _records(name):
        for text in _gold_generations(task, record):
            assert is_correct(task, extract_answer(task, text), record["answer"]), (name, text, record["answer"])


# ------------------------------------------------ hard strings, values worked out by hand


@pytest.mark.parametrize(
    "task, text, reference, strict",
    [
        ("AQuA", "A: The answer is B", "A", "B"),
        ("AQuA", "Answer: (C)", "A", "C"),
        ("AQuA", "A bag holds the ball, so (D) fits", "A", "D"),
        ("AQuA", "The best choice is D", "D", "D"),
        ("AQuA", "Rationale: none of them", None, None),
        ("AQuA", "A: Comparing them, C fits best", "A", "C"),
        ("AQuA", "A man walks 3 miles, so E", "A", "E"),
        ("AQuA", "Comparing them, A is the one", "C", "A"),
        ("gsm8k", "The change is -$5.", 5.0, -5.0),
        ("gsm8k", "-3.5", -3.5, -3.5),
        ("gsm8k", "2/3", 3.0, 2 / 3),
        ("gsm8k", "50%", 50.0, 50.0),
        ("gsm8k", "The answer is $1,234.50.", 1234.5, 1234.5),
        ("gsm8k", "The answer is 7. Check: 2 + 2 = 4.", 4.0, 7.0),
        ("gsm8k", "The answer is 49 - 34 = 15 customers.", 15.0, 15.0),
        ("gsm8k", "So, the answer is 600 - 327 = 273. Then 5 more.", 5.0, 273.0),
        ("gsm8k", "3-4", -4.0, 4.0),
        ("gsm8k", "1, 2, 3", 3.0, 3.0),
        ("gsm8k", "1,2", 12.0, 2.0),
        ("gsm8k", "They gave 5/0 away", 0.0, None),
        ("gsm8k", "no number here", None, None),
        ("social_i_qa", "the correct answer is answer10", "answer1", "answer10"),
        ("boolq", "It is not true; the answer is false", "true", "false"),
        ("boolq", "The answer is True.", "true", "true"),
        ("boolq", "That claim is untrue, so false", "true", "false"),
        ("piqa", "Solution1 is wrong, the answer is solution2", "solution1", "solution2"),
        ("winogrande", "option12", "option1", "option12"),
    ],
)
def test_hard_strings(task, text, reference, strict):
    assert extract_answer(task, text, "reference") == reference
    assert extract_answer(task, text, "strict") == strict


def test_answer10_against_answer1_is_right_only_for_the_reference_rules():
    text = "the correct answer is answer10"
    assert is_correct("social_i_qa", extract_answer("social_i_qa", text, "reference"), "answer1")
    assert not is_correct("social_i_qa", extract_answer("social_i_qa", text, "strict"), "answer1")


def test_numbers_count_within_a_thousandth():
    gold = "0.6666666666666666"
    assert is_correct("gsm8k", 0.667, gold)
    assert not is_correct("gsm8k", 0.668, gold)
    assert not is_correct("gsm8k", None, gold)
    assert is_correct("number", -10.0, "-10.0")


def test_kinds_stand_for_tasks():
    assert extract_answer("letter", "Answer: (C)") == "C"
    assert extract_answer("choice", "the answer is Ending3") == "ending3"
    assert extract_answer("number", "The answer is 12.") == 12.0


def test_task_names_are_matched_in_any_case_and_unknown_ones_are_listed():
    assert [t.name for t in resolve_tasks("GSM8K, Boolq")] == ["gsm8k", "boolq"]
    assert len(resolve_tasks("math")) == 7 and len(resolve_tasks("commonsense")) == 8
    assert len(resolve_tasks("all,gsm8k")) == 15
    assert get_task("arc-challenge").name == "ARC-Challenge"
    with pytest.raises(ValueError, match="unknown task 'gsm9k'.*gsm8k.*winogrande"):
        resolve_tasks("gsm9k")
    with pytest.raises(ValueError, match="known tasks"):
        extract_answer("nope", "text")


def test_custom_choice_keywords_are_inferred_from_the_gold_answers():
    records = [
        {"instruction": "Pick. Answer1: x Answer2: y Answer3: z", "answer": "answer2"},
        {"instruction": "Pick. Answer1: x Answer2: y", "answer": "answer1"},
    ]
    assert custom_task("mine", "choice", records).labels == ("answer1", "answer2", "answer3")
    yes_no = custom_task("yn", "choice", [{"instruction": "q", "answer": "yes"}, {"instruction": "q", "answer": "no"}])
    assert yes_no.labels == ("yes", "no")
    assert custom_task("tf", "choice", [{"instruction": "q", "answer": "true"}]).labels == ("true", "false")
    with pytest.raises(ValueError, match="record 1.*'option1'"):
        custom_task("bad", "choice", [{"instruction": "q", "answer": "answer1"}, {"instruction": "q", "answer": "option1"}])


def test_candidates_are_parsed_from_the_instruction():
    arc = {"instruction": _records("ARC-Challenge")[0]["instruction"], "answer": "answer3"}
    assert candidates(TASKS["arc-challenge"], arc) == ["answer1", "answer2", "answer3", "answer4"]
    assert candidates(TASKS["aqua"], _records("AQuA")[0]) == ["A", "B", "C", "D", "E"]
    assert candidates(TASKS["boolq"], _records("boolq")[0]) == ["false", "true"]
    for name in SHIPPED:
        task = TASKS[name.lower()]
        if task.kind != "number":
            check_candidates(task, _records(name), name)  # every shipped record offers its gold


# ------------------------------------------------ log-likelihood scoring


class _PreferTokens(torch.nn.Module):
    """A 'model' whose next-token logits are the same everywhere: high on a few favoured ids."""

    def __init__(self, vocab_size: int, favoured: set[int]):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size), requires_grad=False)
        self.bias.data[list(favoured)] = 8.0

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def _response_ids(tokenizer, task, label):
    return tokenizer(continuation(task, label), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@pytest.mark.parametrize("name", ["ARC-Challenge", "AQuA"])
def test_loglik_picks_the_candidate_the_logits_prefer(tokenizer, name):
    task, record = TASKS[name.lower()], _records(name)[0]
    options = candidates(task, record)
    for target in options:
        own = set(_response_ids(tokenizer, task, target))
        others = set().union(*(_response_ids(tokenizer, task, o) for o in options if o != target))
        assert own - others, "precondition: the target has a token of its own"
        model = _PreferTokens(len(tokenizer), own - others)
        _, predictions = evaluate_task(model, tokenizer, task, [record], scoring="loglik")
        assert predictions[0]["prediction"] == target
        assert predictions[0]["correct"] == (target == record["answer"])


def test_loglik_scores_equal_unpadded_single_sequence_sums(tokenizer, model):
    task = TASKS["arc-challenge"]
    records = _records("ARC-Challenge")[:4]
    summary, predictions = evaluate_task(model, tokenizer, task, records, scoring="loglik", batch_size=3)
    assert summary["count"] == 4 and summary["errors"] == 0 and summary["scoring"] == "loglik"
    for record, prediction in zip(records, predictions):
        prompt = encode_prompt(tokenizer, build_prompt(record))
        for label, score in prediction["candidates"].items():
            response = _response_ids(tokenizer, task, label)
            with torch.no_grad():
                logprobs = model(torch.tensor([prompt + response])).logits[0].log_softmax(-1)
            expected = sum(logprobs[len(prompt) - 1 + j, token].item() for j, token in enumerate(response))
            assert score == pytest.approx(expected, abs=1e-3)
        assert prediction["prediction"] == max(prediction["candidates"], key=prediction["candidates"].get)


def test_a_failing_loglik_forward_is_an_error_for_its_record_only(tokenizer, model, monkeypatch):
    records = _records("piqa")[:3]
    poison = encode_prompt(tokenizer, build_prompt(records[1]))
    real_forward = model.forward

    def flaky_forward(input_ids, attention_mask, **kwargs):
        if any(row[: len(poison)] == poison for row in input_ids.tolist()):
            raise RuntimeError("simulated failure")
        return real_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(model, "forward", flaky_forward)
    summary, predictions = evaluate_task(model, tokenizer, TASKS["piqa"], records, scoring="loglik", batch_size=6)
    assert summary["errors"] == 1 and "simulated failure" in predictions[1]["error"]
    assert predictions[1]["prediction"] is None and predictions[1]["correct"] is False
    assert predictions[0]["error"] is None and predictions[0]["prediction"] in ("solution1", "solution2")


# ------------------------------------------------ generation


def test_batched_generation_equals_unbatched_and_holds_only_the_response(tokenizer, model):
    task = TASKS["gsm8k"]
    records = _records("gsm8k")[:5]
    summary, predictions = evaluate_task(model, tokenizer, task, records, max_new_tokens=6, batch_size=5)
    assert summary["count"] == 5 and summary["errors"] == 0
    for record, prediction in zip(records, predictions):
        prompt = encode_prompt(tokenizer, build_prompt(record))
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        new = out[0, len(prompt) :].tolist()
        new = new[: new.index(2)] if 2 in new else new
        assert prediction["generation"] == tokenizer.decode(new, skip_special_tokens=True)
        assert prediction["extracted"]["strict"] == extract_answer(task, prediction["generation"])


def test_responses_are_cut_at_eos_and_marked_when_they_run_out(tokenizer, model, monkeypatch):
    words = tokenizer(" The answer is 7", add_special_tokens=False)["input_ids"]

    def fake_generate(input_ids, attention_mask, max_new_tokens, **kwargs):
        assert (attention_mask[:, -1] == 1).all(), "left padding: every prompt ends at the last column"
        finished = words + [2] + [0] * (max_new_tokens - len(words) - 1)
        rows = [finished, (words * max_new_tokens)[:max_new_tokens]]
        return torch.cat([input_ids, torch.tensor(rows[: len(input_ids)])], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    records = _records("gsm8k")[:2]
    _, predictions = evaluate_task(model, tokenizer, TASKS["gsm8k"], records, max_new_tokens=12, batch_size=2)
    by_length = sorted(predictions, key=lambda p: -len(encode_prompt(tokenizer, build_prompt(p))))
    assert by_length[0]["generation"] == " The answer is 7" and by_length[0]["truncated"] is False
    assert by_length[1]["truncated"] is True and by_length[1]["prediction"] == 7.0


def test_a_failing_generation_is_an_error_never_an_empty_string(tokenizer, model, monkeypatch):
    records = _records("gsm8k")[:5]
    poison = encode_prompt(tokenizer, build_prompt(records[2]))
    real_generate = model.generate

    def flaky_generate(input_ids, attention_mask, **kwargs):
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            if [t for t, m in zip(row, mask) if m] == poison:
                raise RuntimeError("CUDA out of memory (simulated)")
        return real_generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(model, "generate", flaky_generate)
    summary, predictions = evaluate_task(model, tokenizer, TASKS["gsm8k"], records, max_new_tokens=3, batch_size=5)
    assert summary["errors"] == 1
    assert predictions[2]["generation"] is None and "out of memory" in predictions[2]["error"]
    assert predictions[2]["correct"] is False
    assert all(isinstance(p["generation"], str) and p["error"] is None for i, p in enumerate(predictions) if i != 2)


# ------------------------------------------------ the command line


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    path = tmp_path / "tiny"
    tiny_llama(max_position_embeddings=4096).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _eval(model_dir, output, *extra):
    return cli.main(
        ["eval", "--model", str(model_dir), "--output", str(output), "--data-dir", str(TEST_DIR),
         "--max-new-tokens", "6", "--batch-size", "4", "--no-bf16", "--device", "cpu", *extra]
    )  # fmt: skip


@pytest.mark.parametrize("scoring", ["generate", "loglik"])
def test_eval_end_to_end(model_dir, tmp_path, tokenizer, scoring, capsys):
    out = tmp_path / "out"
    tasks = ["gsm8k", "AQuA", "boolq", "piqa"]
    assert _eval(model_dir, out, "--tasks", ",".join(tasks), "--limit", "5", "--scoring", scoring) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == set(tasks)
    for name in tasks:
        summary = results["tasks"][name]
        lines = (out / "predictions" / f"{name}.jsonl").read_text().splitlines()
        assert summary["count"] == len(lines) == 5 and summary["errors"] == 0
        generated = scoring == "generate" or name == "gsm8k"
        assert summary["scoring"] == ("generate" if generated else "loglik")
        first = json.loads(lines[0])
        assert first["answer"] == _records(name)[0]["answer"]
        if generated:
            prompt = encode_prompt(tokenizer, build_prompt(_records(name)[0]))
            model = tiny_llama(max_position_embeddings=4096)
            new = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
            new = new[0, len(prompt) :].tolist()
            assert first["generation"] == tokenizer.decode(new[: new.index(2)] if 2 in new else new, skip_special_tokens=True)
            assert set(first["extracted"]) == {"reference", "strict"}
        else:
            assert set(first["candidates"]) == set(candidates(TASKS[name.lower()], _records(name)[0]))
    assert set(results["suites"]) == {"math", "commonsense"}
    assert results["suites"]["math"]["macro_accuracy"] == pytest.approx(
        (results["tasks"]["gsm8k"]["accuracy"] + results["tasks"]["AQuA"]["accuracy"]) / 2
    )
    assert "gsm8k" in capsys.readouterr().out

    # A rerun with the same settings skips every task.
    assert _eval(model_dir, out, "--tasks", ",".join(tasks), "--limit", "5", "--scoring", scoring) == 0
    assert capsys.readouterr().out.count("already done") == 4


def test_delta_is_applied_to_the_base_model(model_dir, tmp_path, monkeypatch):
    import liftft.delta

    applied = []

    def silence_model(model, path, scale=1.0):
        # Zero hidden states make every logit 0, so greedy decoding emits <pad> (id 0) forever.
        applied.append(path)
        model.model.norm.weight.data.zero_()
        return model

    monkeypatch.setattr(liftft.delta, "apply_delta", silence_model)
    delta_dir = tmp_path / "delta"
    delta_dir.mkdir()
    out = tmp_path / "out"
    assert _eval(model_dir, out, "--tasks", "gsm8k", "--limit", "2", "--delta", str(delta_dir)) == 0
    assert applied == [str(delta_dir)]
    for line in (out / "predictions" / "gsm8k.jsonl").read_text().splitlines():
        prediction = json.loads(line)
        assert prediction["generation"] == "" and prediction["truncated"] is True


def test_peft_adapter_is_loaded_on_the_base_model(model_dir, tmp_path, tokenizer):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(1)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(tiny_llama(max_position_embeddings=4096), lora).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    assert _eval(model_dir, out, "--tasks", "gsm8k", "--limit", "1", "--adapter", str(tmp_path / "adapter")) == 0
    generation = json.loads((out / "predictions" / "gsm8k.jsonl").read_text())["generation"]

    peft_model = PeftModel.from_pretrained(tiny_llama(max_position_embeddings=4096), tmp_path / "adapter")
    prompt = encode_prompt(tokenizer, build_prompt(_records("gsm8k")[0]))
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        adapted = peft_model.generate(input_ids=torch.tensor([prompt]), **greedy)[0, len(prompt) :].tolist()
        base = tiny_llama(max_position_embeddings=4096).generate(torch.tensor([prompt]), **greedy)
    assert base[0, len(prompt) :].tolist() != adapted, "precondition: the adapter changes the generation"
    cut = adapted[: adapted.index(2)] if 2 in adapted else adapted
    assert generation == tokenizer.decode(cut, skip_special_tokens=True)


def test_missing_tasks_are_reported_and_the_rest_still_run(model_dir, tmp_path):
    out = tmp_path / "out"
    assert _eval(model_dir, out, "--tasks", "hellaswag,SingleEq,ARC-Easy", "--limit", "2") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["missing"] == ["ARC-Easy", "hellaswag"]
    assert list(results["tasks"]) == ["SingleEq"]


def test_other_settings_in_the_output_need_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _eval(model_dir, out, "--tasks", "boolq", "--limit", "2", "--scoring", "loglik") == 0
    assert _eval(model_dir, out, "--tasks", "boolq", "--limit", "3", "--scoring", "loglik") == 2
    assert "limit" in capsys.readouterr().err
    assert _eval(model_dir, out, "--tasks", "boolq", "--limit", "3", "--scoring", "loglik", "--overwrite") == 0
    assert json.loads((out / "results.json").read_text())["tasks"]["boolq"]["count"] == 3


def test_task_file_with_kind(model_dir, tmp_path):
    records = [{"instruction": f"Is {i} even? Answer format: yes/no", "input": "", "answer": "yes" if i % 2 == 0 else "no"}
               for i in range(3)]  # fmt: skip
    path = tmp_path / "parity.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "out"
    assert _eval(model_dir, out, "--task-file", str(path), "--kind", "choice", "--scoring", "loglik") == 0
    summary = json.loads((out / "results.json").read_text())["tasks"]["parity"]
    assert summary["count"] == 3 and summary["suite"] == "custom"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "gsm9k"], "unknown task 'gsm9k'.*known.*gsm8k"),
        (["--tasks", "gsm8k", "--num-beams", "0"], "--num-beams must be at least 1"),
        (["--task-file", "x.json"], "--task-file and --kind go together"),
        (["--tasks", "gsm8k", "--delta", "/no/such/delta"], "--delta directory '/no/such/delta'"),
    ],
)
def test_bad_flags_fail_early(model_dir, tmp_path, args, message, capsys):
    assert _eval(model_dir, tmp_path / "out", *args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_missing_model_fails_early(tmp_path, capsys):
    assert _eval(tmp_path / "no-model", tmp_path / "out", "--tasks", "gsm8k") == 2
    assert "no-model" in capsys.readouterr().err


def test_malformed_test_file_names_the_file_and_record(model_dir, tmp_path, capsys):
    records = _records("gsm8k")[:5]
    del records[3]["answer"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(records))
    assert _eval(model_dir, tmp_path / "out", "--task-file", str(path), "--kind", "number") == 2
    err = capsys.readouterr().err
    assert "broken.json: record 3" in err and "answer" in err
    records[3]["answer"] = "seven"
    path.write_text(json.dumps(records))
    assert _eval(model_dir, tmp_path / "out", "--task-file", str(path), "--kind", "number") == 2
    assert "record 3: answer 'seven' is not a number" in capsys.readouterr().err
