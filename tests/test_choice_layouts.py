"""`--scoring loglik` reads a letter task's options in every common inline layout: the same choices, written each
way, give the same candidates and the same scores; only truly ambiguous options are refused, naming the record."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import full_data_path

from liftft.data.template import build_prompt
from liftft.eval import TASKS, candidates, check_candidates, continuation, evaluate_task
from liftft.data.template import encode_response

AQUA = TASKS["aqua"]
QUESTION = "A train covers 60 km in 1.5 hours. What is its speed?"
CHOICES = ["20 km/h", "30 km/h", "40 km/h", "45 km/h", "50 km/h"]
LETTERS = ["A", "B", "C", "D", "E"]

# (opener of letter X, separator between options)
MARKERS = {
    "paren": "({}) ", "paren spaced": "( {} ) ", "bracket": "[{}] ", "close": "{}) ", "close spaced": "{} ) ",
    "close tight": "{})", "dot": "{}. ", "dot tight": "{}.", "colon": "{}: ", "colon spaced": "{} : ",
    "lower close": "{}) ", "lower dot": "{}. ",
}
SEPARATORS = {"space": " ", "comma": ", ", "semicolon": "; ", "newline": "\n", "comma tight": ",", "tab": "\t"}
INTROS = {"answer choices": " Answer Choices: ", "options line": "\nOptions:\n", "tight": "", "question mark": "?"}


def instruction(marker: str, separator: str, intro: str = " Answer Choices: ") -> str:
    case = str.lower if marker.startswith("lower") else str
    options = separator.join(MARKERS[marker].format(case(letter)) + text for letter, text in zip(LETTERS, CHOICES))
    return QUESTION + intro + options


LAYOUTS = [pytest.param(m, SEPARATORS[s], INTROS["answer choices"], id=f"{m}, {s}") for m in MARKERS for s in SEPARATORS]
LAYOUTS += [pytest.param(m, SEPARATORS[s], INTROS[i], id=f"{m}, {s}, {i}") for m, s in [("close tight", "comma tight"),
                                                                                      ("paren", "space")]
            for i in INTROS]


class _SameLogits(torch.nn.Module):
    """A 'model' whose next-token logits are the same at every position, whatever the input: high on a few ids.
    A candidate's log-likelihood depends on its own response tokens only, so every layout must score alike."""

    def __init__(self, vocab_size: int, favoured: list[int]):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.linspace(0, 1, vocab_size), requires_grad=False)
        self.bias.data[favoured] = 8.0

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


@pytest.mark.parametrize("marker, separator, intro", LAYOUTS)
def test_every_layout_offers_the_same_letters(marker, separator, intro):
    record = {"instruction": instruction(marker, separator, intro), "input": "", "answer": "C"}
    assert candidates(AQUA, record) == LETTERS, record["instruction"]


def test_every_layout_scores_identically(tokenizer):
    records = [{"instruction": instruction(*layout.values), "input": "", "answer": "C"} for layout in LAYOUTS]
    reference = records[0]
    assert reference["instruction"].endswith("(A) 20 km/h (B) 30 km/h (C) 40 km/h (D) 45 km/h (E) 50 km/h")
    # Favour a token of D's response that no other response has: D wins, by a margin the layouts cannot change.
    responses = {label: encode_response(tokenizer, build_prompt(reference), continuation(AQUA, label)) for label in
                 LETTERS}
    own = set(responses["D"]) - set().union(*(set(ids) for label, ids in responses.items() if label != "D"))
    assert own, "precondition: D's response has a token of its own"
    model = _SameLogits(len(tokenizer), sorted(own))
    summary, predictions = evaluate_task(model, tokenizer, AQUA, records, scoring="loglik", batch_size=7)
    first = predictions[0]["candidates"]
    assert list(first) == LETTERS and max(first, key=first.get) == "D"
    for record, prediction in zip(records, predictions):
        assert prediction["candidates"] == pytest.approx(first, abs=1e-5), record["instruction"]
        assert prediction["prediction"] == "D" and prediction["correct"] is False
    assert summary["accuracy"] == 0.0 and summary["errors"] == 0


@pytest.mark.parametrize(
    "text, letters",
    [
        # Lettered words before the options are not options.
        ("Tom likes plan A. Jane likes plan B. Who is right? Answer Choices: (A) Tom (B) Jane (C) both", "ABC"),
        ("Point A: (1, 2) and point B: (4, 6). Distance? (A) 3 (B) 4 (C) 5 (D) 6", "ABCD"),
        # Nor are lettered words within them.
        ("Which plan? (A) plan A. (B) plan B. (C) neither", "ABC"),
        # Abbreviations and decimals.
        ("At 9 A.M. in the U.S.A. a train leaves. When? A) 9:30 B) 10:00 C) 10.5", "ABC"),
        ("Pick: A.1.5 B.2.5 C.3.5", "ABC"),
        # An option referred to after the list is not a second option.
        ("Which? (A) x (B) y (C) z. Hint: (B) is not it.", "ABC"),
        # An earlier example's options: the last list counts.
        ("Example: A) 1 B) 2. Now: which? A) 3 B) 4 C) 5 D) 6", "ABCD"),
        # Lower case only where no upper-case list is.
        ("Find (a) the area and (b) the side. Answer Choices: (A) 4 (B) 8 (C) 16", "ABC"),
        ("No options here", ""),
        ("Only one: (A) 5", ""),
    ],
)
def test_what_is_not_an_option_is_not_read(text, letters):
    assert candidates(AQUA, {"instruction": text}) == list(letters)


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("Which? A) 1 (A) 2 B) 3 (B) 4 (C) 5", "the A) list A/B overlaps the (A) list A/B/C"),
        ("Which? A) 1 B) 2 B) 3 C) 4", "B opens two options of the A) list A/B/C"),
    ],
)
def test_ambiguous_options_are_refused_naming_the_record(tmp_path, tokenizer, text, complaint):
    records = [{"instruction": instruction("paren", " "), "input": "", "answer": "A"},
               {"instruction": text, "input": "", "answer": "A"}]
    path = tmp_path / "test.json"
    with pytest.raises(ValueError, match=re.escape(f"{path}: record 1: its options are ambiguous: {complaint}")):
        check_candidates(AQUA, records, path)
    model = _SameLogits(len(tokenizer), [3])
    with pytest.raises(ValueError, match=re.escape(f"AQuA: record 1: its options are ambiguous: {complaint}")):
        evaluate_task(model, tokenizer, AQUA, records, scoring="loglik")


def test_the_shipped_letter_options_read_as_before():
    # Every AQuA record writes "(A) .. (E)": the new reading equals the old, which took every "(X)" in the text.
    records = json.loads(full_data_path("test", "AQuA", "test.json").read_text())
    for index, record in enumerate(records):
        old = sorted(set(re.findall(r"\(([A-E])\)", record["instruction"])))
        assert candidates(AQUA, record) == old, index
