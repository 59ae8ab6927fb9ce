"""Conversational and prompt/completion records: chat-template rendering, exact assistant-only label masks, one BOS,
truncation, and the refusals (no chat template, a template whose prefixes do not begin the whole, mixed kinds)."""

from __future__ import annotations

import copy
import json
import re

import datasets
import pytest
from conftest import CHAT_TEMPLATE, tiny_llama

from liftft import cli
from liftft.data.batches import IGNORE_INDEX, encode_dataset, encode_example, load_records
from liftft.eval.scoring import encode_prompts
from liftft.data.template import build_prompt, encode_prompt

BOS, EOS = 1, 2

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "The answer is 5."},
    {"role": "user", "content": "Thanks. How are you?"},
    {"role": "assistant", "content": "Fine, thanks."},
]
# CONVERSATION as CHAT_TEMPLATE renders it, written by hand and cut where the loss starts and stops seeing it.
CONVERSATION_PIECES = [
    ("<s><|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 2 plus 3?<|end|>\n<|assistant|>\n", False),
    ("The answer is 5.<|end|>\n", True),
    ("<|user|>\nThanks. How are you?<|end|>\n<|assistant|>\n", False),
    ("Fine, thanks.<|end|>\n", True),
]


def expected_example(tokenizer, pieces) -> dict:
    """The example of hand-cut pieces: special tokens separate them, so tokenizing piece by piece is exact."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return {"input_ids": ids, "labels": labels}


# ------------------------------------------------------------- messages


def test_messages_train_on_every_assistant_turn_and_its_end_of_turn_only(chat_tokenizer):
    tok = chat_tokenizer
    whole = "".join(text for text, _ in CONVERSATION_PIECES)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == whole, "precondition: the pieces are the rendering"
    example = encode_example({"messages": CONVERSATION}, tok)
    assert example == expected_example(tok, CONVERSATION_PIECES)
    assert example["input_ids"] == tok(whole, add_special_tokens=False)["input_ids"]
    assert example["input_ids"].count(BOS) == 1
    trained = [i for i in example["labels"] if i != IGNORE_INDEX]
    assert tok.decode(trained) == "The answer is 5.<|end|>\nFine, thanks.<|end|>\n"


def test_an_assistant_turn_that_opens_the_conversation_is_context(chat_tokenizer):
    turns = [{"role": "assistant", "content": "Hello!"}, *CONVERSATION[1:3]]
    pieces = [("<s><|assistant|>\nHello!<|end|>\n<|user|>\nWhat is 2 plus 3?<|end|>\n<|assistant|>\n", False),
              ("The answer is 5.<|end|>\n", True)]
    assert encode_example({"messages": turns}, chat_tokenizer) == expected_example(chat_tokenizer, pieces)


def test_a_final_user_turn_is_left_out_and_empty_answers_are_skipped(chat_tokenizer):
    tok = chat_tokenizer
    with_question = encode_example({"messages": [*CONVERSATION, {"role": "user", "content": "Bye?"}]}, tok)
    assert with_question == expected_example(tok, CONVERSATION_PIECES)
    blank = [*CONVERSATION[1:2], {"role": "assistant", "content": "  "}]
    examples, stats = encode_dataset([{"messages": CONVERSATION}, {"messages": blank}], tok)
    assert stats == {"examples": 1, "truncated": 0, "skipped": 1, "empty": 1, "no_context": 0}


def test_a_long_conversation_loses_whole_first_turns_never_its_system_prompt_or_last_answer(chat_tokenizer):
    # More cases in tests/test_chat_truncation.py.
    tok = chat_tokenizer
    full = expected_example(tok, CONVERSATION_PIECES)
    last = expected_example(tok, [("<s><|system|>\nBe brief.<|end|>\n<|user|>\nThanks. How are you?<|end|>\n"
                                   "<|assistant|>\n", False), ("Fine, thanks.<|end|>\n", True)])
    assert encode_example({"messages": CONVERSATION}, tok, max_seq_len=len(full["input_ids"]) - 1) == last
    assert encode_example({"messages": CONVERSATION}, tok, max_seq_len=len(last["input_ids"])) == last
    assert encode_example({"messages": CONVERSATION}, tok, max_seq_len=len(last["input_ids"]) - 1) is None


def test_without_a_chat_template_messages_are_refused(tokenizer):
    assert not tokenizer.chat_template, "precondition"
    with pytest.raises(ValueError, match="chat template.*has none"):
        encode_example({"messages": CONVERSATION}, tokenizer)


def test_a_template_whose_prefixes_do_not_begin_the_whole_is_refused(chat_tokenizer):
    # Renders the last turn without its end-of-turn text, so the first 2 turns, rendered alone, do not begin the whole.
    template = CHAT_TEMPLATE.replace("<|end|>\n{% endfor %}", "{% if not loop.last %}<|end|>\n{% endif %}{% endfor %}")
    other = copy.deepcopy(chat_tokenizer)
    other.chat_template = template
    with pytest.raises(ValueError, match="'Be brief.'.*first 2 turns.*cannot be masked exactly"):
        encode_example({"messages": CONVERSATION}, other)


# ------------------------------------------------------------- prompt/completion


def test_string_prompt_completion_trains_on_the_completion_and_eos(chat_tokenizer):
    tok = chat_tokenizer
    example = encode_example({"prompt": "What is 2 plus 3?", "completion": " The answer is 5."}, tok)
    prompt = tok("What is 2 plus 3?")["input_ids"]
    whole = tok("What is 2 plus 3? The answer is 5.")["input_ids"]
    assert whole[: len(prompt)] == prompt, "precondition: no token spans the seam"
    assert example["input_ids"] == whole + [EOS]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + whole[len(prompt) :] + [EOS]


def test_conversational_prompt_completion_trains_on_the_completion_turns(chat_tokenizer):
    record = {"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:3]}
    assert encode_example(record, chat_tokenizer) == expected_example(chat_tokenizer, CONVERSATION_PIECES[:2])


# ------------------------------------------------------------- one BOS


def test_a_template_that_renders_bos_gets_one_bos_in_training_and_eval(chat_tokenizer):
    tok = chat_tokenizer
    record = {"instruction": "What is 2 plus 3?", "input": "", "output": "The answer is 5.", "answer": "5"}
    prompt = build_prompt(record, "chat", tok)
    assert prompt.startswith("<s>") and tok(prompt)["input_ids"][:2] == [BOS, BOS], "precondition: BOS twice"
    assert encode_prompt(tok, prompt) == tok(prompt, add_special_tokens=False)["input_ids"]
    assert encode_example(record, tok, template="chat")["input_ids"][:2] == [BOS, tok.convert_tokens_to_ids("<|user|>")]
    assert encode_prompts(tok, [record], "chat") == [encode_prompt(tok, prompt)]
    # A prompt that does not render BOS still gets it from the tokenizer.
    assert encode_prompt(tok, build_prompt(record))[:1] == [BOS]


# ------------------------------------------------------------- loading


def test_messages_load_from_json_lines_and_parquet_alike(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    records = [{"messages": CONVERSATION, "source": "x"}, {"messages": CONVERSATION[1:3]}]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    datasets.Dataset.from_list(records).to_parquet(tmp_path / "chat.parquet")
    assert load_records(tmp_path / "chat.jsonl") == records
    # Parquet gives every row every column, null where absent; the nulls are dropped.
    assert load_records(tmp_path / "chat.parquet") == records


def test_mixed_kinds_in_one_file_are_refused_naming_the_record(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([{"messages": CONVERSATION}, {"messages": CONVERSATION},
                                {"prompt": "a", "completion": "b"}]))
    with pytest.raises(ValueError, match=re.escape(f"{path}: record 2 is a prompt-completion record but record 0 "
                                                   "is a messages record")):
        load_records(path)


@pytest.mark.parametrize(
    "bad, complaint",
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user", "content": 3}]}, "turn 0 must have string 'role' and 'content'"),
        ({"messages": CONVERSATION[1:2]}, "no assistant turn"),
        ({"messages": CONVERSATION[2:3]}, "no assistant turn"),
        ({"prompt": "a", "completion": CONVERSATION[2:3]}, "both strings or both lists"),
        ({"prompt": "a"}, "both strings or both lists"),
    ],
)
def test_bad_conversational_records_name_file_and_index(tmp_path, bad, complaint):
    path = tmp_path / "recs.json"
    path.write_text(json.dumps([bad]))
    with pytest.raises(ValueError, match=re.escape(f"{path}: record 0") + ".*" + re.escape(complaint)):
        load_records(path)


# ------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, chat_tokenizer):
    path = tmp_path_factory.mktemp("chat-base")
    tiny_llama().save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path


def _train(model_dir, data, out, *extra):
    return cli.main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--max-steps", "1",
                     "--rank", "1", "--filter-rank", "2", "--max-seq-len", "64", "--no-progress", *extra])


def test_cli_trains_on_mapped_parquet_conversations_and_records_the_data_options(
    chat_model_dir, chat_tokenizer, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    data = tmp_path / "chat.parquet"
    datasets.Dataset.from_list([{"messages": CONVERSATION[:3], "dialogue": CONVERSATION}]).to_parquet(data)
    out = tmp_path / "run"
    assert _train(chat_model_dir, data, out, "--columns", "messages=dialogue") == 0
    run = json.loads((out / "run.json").read_text())
    assert run["args"]["columns"] == {"messages": "dialogue"} and run["args"]["data_split"] == "train"
    assert run["args"]["data_config"] is None
    assert run["metrics"]["data"] == {"examples": 1, "truncated": 0, "skipped": 0, "empty": 0,
                                      "no_context": 0}
    # The one step saw the whole dialogue, not the shorter conversation in the column named messages.
    assert run["metrics"]["tokens"] == len(expected_example(chat_tokenizer, CONVERSATION_PIECES)["input_ids"])
    capsys.readouterr()
    assert _train(chat_model_dir, data, out, "--columns", "messages=dialogue") == 2
    assert "already holds this run; pass --resume" in capsys.readouterr().err
    assert _train(chat_model_dir, data, out) == 2
    assert "differs in: columns)" in capsys.readouterr().err

    # A run recorded before the data options existed read the train split, without a mapping.
    record = json.loads((out / "run.json").read_text())
    record["args"] = {k: v for k, v in record["args"].items() if k not in ("columns", "data_split", "data_config")}
    (out / "run.json").write_text(json.dumps(record))
    assert _train(chat_model_dir, data, out) == 2
    assert "already holds this run; pass --resume" in capsys.readouterr().err


def test_cli_refuses_bad_data_options_before_the_model_loads(chat_model_dir, tmp_path, capsys):
    data = tmp_path / "chat.json"
    data.write_text(json.dumps([{"dialogue": CONVERSATION}]))
    out = tmp_path / "run"
    assert _train(chat_model_dir, data, out, "--columns", "messages=turns") == 2
    assert "--columns messages=turns: " + str(data) + " has no column 'turns'; its columns: dialogue" in (
        capsys.readouterr().err)
    assert _train(chat_model_dir, data, out, "--columns", "message=dialogue") == 2
    assert "unknown field 'message'" in capsys.readouterr().err
    assert _train(chat_model_dir, data, out, "--columns", "messages") == 2
    assert "'messages' is not FIELD=COLUMN" in capsys.readouterr().err
    assert _train(chat_model_dir, data, out, "--columns", "messages=dialogue", "--data-split", "test") == 2
    assert "single data file, which has no splits" in capsys.readouterr().err
    assert not out.exists()
