"""A conversation longer than max_seq_len is cut at turn boundaries: its first exchanges are dropped whole, as few as
make it fit, its system prompt kept; one in which no assistant turn fits with the turns that prompted it is skipped
and counted. The expected examples are CHAT_TEMPLATE's renderings written by hand."""

from __future__ import annotations

import logging

import pytest

from liftft.data.batches import IGNORE_INDEX, encode_dataset, encode_example
from liftft.data.chat import without_first_exchanges

SYSTEM = {"role": "system", "content": "Be brief."}
EXCHANGES = [
    [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "The answer is 5."}],
    [{"role": "user", "content": "Thanks. How are you?"}, {"role": "assistant", "content": "Fine, thanks."}],
    [{"role": "user", "content": "Hello there?"}, {"role": "assistant", "content": "Hello."}],
]


def turn(message: dict) -> str:
    """CHAT_TEMPLATE's rendering of one turn."""
    return f"<|{message['role']}|>\n{message['content']}<|end|>\n"


def expected(tokenizer, turns: list[dict]) -> dict:
    """The example of ``turns`` rendered by hand, trained on each assistant turn after the first turn: special tokens
    separate the pieces, so tokenizing piece by piece is exact."""
    ids, labels, context = [], [], "<s>"
    for index, message in enumerate(turns):
        if message["role"] == "assistant" and index:
            for text, trained in [(context + "<|assistant|>\n", False), (f"{message['content']}<|end|>\n", True)]:
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece
                labels += piece if trained else [IGNORE_INDEX] * len(piece)
            context = ""
        else:
            context += turn(message)
    return {"input_ids": ids, "labels": labels}


def length(tokenizer, turns) -> int:
    return len(expected(tokenizer, turns)["input_ids"])


def flat(*groups) -> list[dict]:
    return [message for group in groups for message in group]


@pytest.mark.parametrize("system", [[SYSTEM], []], ids=["system prompt", "none"])
def test_the_fewest_whole_first_exchanges_are_dropped_and_the_system_prompt_kept(chat_tokenizer, system):
    tok = chat_tokenizer
    whole = flat(system, *EXCHANGES)
    assert tok.apply_chat_template(whole, tokenize=False) == "<s>" + "".join(map(turn, whole)), "precondition"
    last_two, last_one = flat(system, *EXCHANGES[1:]), flat(system, EXCHANGES[2])
    cases = [
        (length(tok, whole), whole),
        (length(tok, whole) - 1, last_two),
        (length(tok, last_two), last_two),
        (length(tok, last_two) - 1, last_one),
        (length(tok, last_one), last_one),
    ]
    for max_seq_len, kept in cases:
        example = encode_example({"messages": whole}, tok, max_seq_len=max_seq_len)
        assert example == expected(tok, kept), max_seq_len
        trained = tok.decode([i for i in example["labels"] if i != IGNORE_INDEX])
        assert trained == "".join(f"{m['content']}<|end|>\n" for m in kept if m["role"] == "assistant")
    # Not even the system prompt and the last exchange fit: skipped, never cut inside a turn.
    assert encode_example({"messages": whole}, tok, max_seq_len=length(tok, last_one) - 1) is None


def test_no_cut_falls_between_a_question_and_its_answer():
    user, answer, tool = ({"role": role, "content": role} for role in ("user", "assistant", "tool"))
    # Two questions before an answer, and a tool call with its result: an exchange begins at a user turn after an
    # answer (or a tool's turn), so each kept answer keeps every turn since the answer before it.
    turns = [SYSTEM, user, user, answer, tool, answer, user, answer, user, user, answer]
    assert without_first_exchanges(turns) == [[SYSTEM, *turns[6:]], [SYSTEM, *turns[8:]]]
    assert without_first_exchanges(turns[1:]) == [turns[6:], turns[8:]]
    assert without_first_exchanges([SYSTEM, user, answer]) == []
    # A completion's turns are never dropped, nor the prompt's last question.
    assert without_first_exchanges(turns, before=9) == [[SYSTEM, *turns[6:]], [SYSTEM, *turns[8:]]]
    assert without_first_exchanges(turns, before=8) == [[SYSTEM, *turns[6:]]]


def test_conversational_prompt_completion_drops_the_prompts_first_exchanges(chat_tokenizer):
    tok = chat_tokenizer
    prompt, completion = flat([SYSTEM], *EXCHANGES[:2], EXCHANGES[2][:1]), EXCHANGES[2][1:]
    record = {"prompt": prompt, "completion": completion}
    # The prompt's answers are context: only the completion is trained.
    labels_of = lambda turns: [i for i in expected(tok, turns)["labels"] if i != IGNORE_INDEX]  # noqa: E731
    whole = encode_example(record, tok)
    assert whole["input_ids"] == tok("<s>" + "".join(map(turn, prompt + completion)),
                                     add_special_tokens=False)["input_ids"]
    assert [i for i in whole["labels"] if i != IGNORE_INDEX] == labels_of([EXCHANGES[2][0], *completion])
    cut = encode_example(record, tok, max_seq_len=len(whole["input_ids"]) - 1)
    assert cut == encode_example({"prompt": flat([SYSTEM], EXCHANGES[1], EXCHANGES[2][:1]), "completion": completion},
                                 tok)
    shortest = encode_example({"prompt": [SYSTEM, EXCHANGES[2][0]], "completion": completion}, tok)
    assert shortest == expected(tok, flat([SYSTEM], EXCHANGES[2]))
    assert encode_example(record, tok, max_seq_len=len(shortest["input_ids"])) == shortest
    assert encode_example(record, tok, max_seq_len=len(shortest["input_ids"]) - 1) is None


def test_conversations_without_a_trained_turn_in_context_are_skipped_and_counted(chat_tokenizer, caplog):
    tok = chat_tokenizer
    short = flat([SYSTEM], EXCHANGES[2])  # fits whole
    long_answer = [SYSTEM, EXCHANGES[0][0], {"role": "assistant", "content": "The answer is 5. " * 10}]
    cut = flat([SYSTEM], *EXCHANGES)  # fits without its first two exchanges
    blank_last = flat([SYSTEM], EXCHANGES[0], [EXCHANGES[1][0], {"role": "assistant", "content": " "}])
    max_seq_len = length(tok, short)
    assert length(tok, long_answer) > max_seq_len and length(tok, blank_last) > max_seq_len, "precondition"
    records = [{"messages": m} for m in (short, long_answer, cut, blank_last, [*short, {"role": "user", "content": ""}])]
    with caplog.at_level(logging.WARNING, logger="liftft.data.batches"):
        examples, stats = encode_dataset(records, tok, max_seq_len=max_seq_len)
    # blank_last fits only without the exchange that holds its one non-blank answer: nothing left to learn.
    assert stats == {"examples": 3, "truncated": 1, "skipped": 2, "empty": 0, "no_context": 2}
    assert examples == [expected(tok, short), expected(tok, short), expected(tok, short)]
    assert "skipped 2 of 5 records" in caplog.text
    assert "2 conversations in which no assistant turn fits with the turns that prompted it" in caplog.text
    with pytest.raises(ValueError, match="all 1 records were skipped .*1 conversations in which no assistant turn "
                                         "fits with the turns that prompted it"):
        encode_dataset([{"messages": long_answer}], tok, max_seq_len=max_seq_len)
