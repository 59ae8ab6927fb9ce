"""Benchmark tasks: names and suites, custom tasks, and the choices a record offers."""

from __future__ import annotations

import pytest
from eval_data import SHIPPED, shipped_records

from liftft.eval import TASKS, candidates, check_candidates, custom_task, extract_answer, get_task, resolve_tasks


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
    arc = {"instruction": shipped_records("ARC-Challenge")[0]["instruction"], "answer": "answer3"}
    assert candidates(TASKS["arc-challenge"], arc) == ["answer1", "answer2", "answer3", "answer4"]
    assert candidates(TASKS["aqua"], shipped_records("AQuA")[0]) == ["A", "B", "C", "D", "E"]
    assert candidates(TASKS["boolq"], shipped_records("boolq")[0]) == ["false", "true"]
    for name in SHIPPED:
        task = TASKS[name.lower()]
        if task.kind != "number":
            check_candidates(task, shipped_records(name), name)  # every shipped record offers its gold
