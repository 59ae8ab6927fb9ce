"""The demo's generated world, its word problems and the cached base model."""

from __future__ import annotations

import random
import re

import pytest
import torch

from liftft.demo import base as demo_base
from liftft.demo.base import BaseSettings, build_tokenizer, cache_root, get_base
from liftft.demo.data import (
    FACTS,
    arithmetic_records,
    corpus_texts,
    make_source,
    make_target,
    make_world,
    pretraining_records,
    story_record,
)
from liftft.data.template import build_prompt, encode_prompt

WORLD = make_world(seed=0, n_people=8)

# A second reading of the word problems, from their English alone.
_START = re.compile(r"(\w+) has (\d+) (\w+)")
_GAIN = re.compile(r"(\w+) (?:buys|finds) (\d+) more (\w+)|(\w+) gets (\d+) more (\w+) from \w+")
_LOSS = re.compile(r"(\w+) (?:gives (\d+) (\w+) to \w+|(?:loses|sells) (\d+) (\w+))")
_QUESTION = re.compile(r"How many (\w+) does (\w+) have now")


def solve_from_text(question: str) -> tuple[int, list[int]]:
    """The count a word problem asks for, and the numbers its question states."""
    first, *events, last = [s.strip() for s in re.split(r"[.?]", question) if s.strip()]
    name, start, item = _START.fullmatch(first).groups()
    count, stated = int(start), [int(start)]
    for event in events:
        gain, loss = _GAIN.fullmatch(event), _LOSS.fullmatch(event)
        assert (gain is None) != (loss is None), event
        who, n, what = [g for g in (gain or loss).groups() if g is not None]
        assert (who, what) == (name, item), event
        count += int(n) if gain else -int(n)
        stated.append(int(n))
    assert _QUESTION.fullmatch(last).groups() == (item, name)
    return count, stated


def test_target_train_and_test_do_not_overlap():
    train, test = make_target(WORLD, seed=1, n_train=400, n_test=100)
    assert len(train) == 400 and len(test) == 100
    train_instructions = {r["instruction"] for r in train}
    assert len(train_instructions) == 400
    assert train_instructions.isdisjoint(r["instruction"] for r in test)


def test_target_answers_are_arithmetically_right():
    train, test = make_target(WORLD, seed=2, n_train=300, n_test=100, n_steps=(2, 3), max_value=20)
    for record in train + test:
        expected, stated = solve_from_text(record["instruction"])
        assert float(record["answer"]) == expected
        assert record["output"].endswith(f"The answer is {expected}.")
        assert expected not in stated
        equations = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", record["output"])
        assert len(equations) == len(stated) - 1 in (2, 3)
        for a, op, b, c in equations:
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c), record["output"]
            assert 1 <= int(c) <= 20
        assert int(equations[-1][3]) == expected
        # each event of the question is restated before it is worked out
        events = re.split(r"(?<=\.) ", record["instruction"])[1:-1]
        for event in events:
            assert event[:-1] + ", so " in record["output"]
        assert set(record) == {"instruction", "input", "output", "answer"} and record["input"] == ""


def test_source_questions_ask_every_fact_once():
    records = make_source(WORLD)
    assert len(records) == len(WORLD.people) * len(FACTS)
    asked = set()
    for record in records:
        if m := re.fullmatch(r"How old is (\w+)\?", record["instruction"]):
            person, value = m.group(1), WORLD.facts[m.group(1)]["age"]
            assert record["output"] == f"{person} is {value} years old. The answer is {value}."
            asked.add((person, "age"))
        else:
            person = re.fullmatch(r"What is the house number of (\w+)\?", record["instruction"]).group(1)
            value = WORLD.facts[person]["house"]
            assert record["output"] == f"{person} lives at number {value}. The answer is {value}."
            asked.add((person, "house"))
        assert float(record["answer"]) == value
    assert asked == {(p, attr) for p in WORLD.people for attr in ("age", "house")}


def test_story_answer_is_what_the_story_says_about_the_person():
    rng = random.Random(0)
    for _ in range(50):
        record = story_record(WORLD.people, rng)
        person, story = re.fullmatch(r"Repeat what this story says about (\w+): (.*)", record["instruction"]).groups()
        about = [s for s in re.split(r"(?<=\.) ", story) if s.startswith(f"{person} ")]
        assert record["output"] == " ".join(about) and len(about) == 3


def test_arithmetic_records_are_right():
    records = arithmetic_records(max_value=12)
    for record in records:
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", record["instruction"]).groups()
        result = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert record["output"] == f"{a} {op} {b} = {result}." and float(record["answer"]) == result
        assert 1 <= result <= 12
    # every a + b and a - b with a <= 12, b <= 9 and a result in [1, 12]
    expected = sum(1 <= a + s * b <= 12 for a in range(1, 13) for b in range(1, 10) for s in (1, -1))
    assert len({r["instruction"] for r in records}) == len(records) == expected


def test_generators_are_deterministic_per_seed():
    assert make_world(5, 10) == make_world(5, 10)
    assert make_world(5, 10) != make_world(6, 10)
    assert make_target(WORLD, 4, 50, 10) == make_target(WORLD, 4, 50, 10)
    assert make_target(WORLD, 4, 50, 10) != make_target(WORLD, 5, 50, 10)
    kwargs = dict(fact_repeats=2, arithmetic_repeats=1, n_stories=20, max_value=10)
    assert pretraining_records(WORLD, **kwargs, seed=1) == pretraining_records(WORLD, **kwargs, seed=1)
    assert pretraining_records(WORLD, **kwargs, seed=1) != pretraining_records(WORLD, **kwargs, seed=2)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="n_people"):
        make_world(0, 1000)
    with pytest.raises(ValueError, match="too few distinct"):
        make_target(make_world(0, 3), 0, n_train=10_000, n_test=10, n_steps=(2,), max_value=4)
    with pytest.raises(TypeError, match="n_train"):
        make_target(WORLD, 0, n_train=1.5, n_test=1)
    with pytest.raises(ValueError, match="n_steps"):
        make_target(WORLD, 0, 10, 10, n_steps=())


def test_tokenizer_round_trips_and_keeps_the_template_whole():
    train, _ = make_target(WORLD, 0, 30, 0)
    tokenizer = build_tokenizer(corpus_texts(train), vocab_size=400)
    for record in train:
        ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == record["output"]
    head, tail = build_prompt({"instruction": "@"}).split("@")
    ids = encode_prompt(tokenizer, build_prompt(train[0]))
    assert tokenizer.convert_ids_to_tokens([ids[1], ids[-1]]) == [head, tail]
    assert tokenizer.decode(ids[2:-1]) == train[0]["instruction"]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


TINY = BaseSettings(
    n_people=4, fact_repeats=1, n_stories=10, arithmetic_repeats=1, max_value=6, vocab_size=300,
    hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, pretrain_steps=3, batch_size=4,
)  # fmt: skip


@pytest.fixture
def counted_pretraining(monkeypatch, tmp_path):
    """Point the cache at a temporary directory and count pretraining runs."""
    monkeypatch.setenv("LIFTFT_CACHE", str(tmp_path / "cache"))
    calls = []
    real_train = demo_base.train_on_sequences

    def counting_train(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(demo_base, "train_on_sequences", counting_train)
    return calls


def test_second_call_reuses_the_cached_base(counted_pretraining):
    first = get_base(TINY, progress=False)
    assert not first.cached and len(counted_pretraining) == 1
    assert (first.path / "model.safetensors").is_file()
    assert first.path.parent.parent == cache_root()
    second = get_base(TINY, progress=False)
    assert second.cached and len(counted_pretraining) == 1
    assert second.path == first.path and second.pretrain_seconds == first.pretrain_seconds
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name
    text = "Alice has 3 coins."
    assert second.tokenizer(text)["input_ids"] == first.tokenizer(text)["input_ids"]


@pytest.mark.parametrize("damage", ["truncate-weights", "delete-tokenizer", "delete-marker"])
def test_damaged_cache_is_rebuilt_with_a_message(counted_pretraining, capsys, damage):
    path = get_base(TINY, progress=False).path
    if damage == "truncate-weights":
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "delete-tokenizer":
        (path / "tokenizer.json").unlink()
    else:
        (path / "demo_base.json").unlink()
    capsys.readouterr()
    rebuilt = get_base(TINY, progress=False)
    assert not rebuilt.cached and len(counted_pretraining) == 2
    assert "damaged" in capsys.readouterr().err
    assert get_base(TINY, progress=False).cached and len(counted_pretraining) == 2
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary directory left behind


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LIFTFT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_root() == tmp_path / "a"
    monkeypatch.delenv("LIFTFT_CACHE")
    assert cache_root() == tmp_path / "b" / "liftft"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "liftft"


def test_bad_base_settings_are_refused():
    with pytest.raises(ValueError, match="lr"):
        BaseSettings(lr=0)
    with pytest.raises(TypeError, match="hidden_size"):
        BaseSettings(hidden_size=64.0)
    with pytest.raises(ValueError, match="pretrain_steps"):
        BaseSettings(pretrain_steps=0)
    with pytest.raises(ValueError, match="num_heads"):
        BaseSettings(hidden_size=30, num_heads=4)
    with pytest.raises(TypeError, match="BaseSettings"):
        get_base({"seed": 0})


def test_cache_key_changes_with_any_setting():
    assert BaseSettings().key() == BaseSettings().key()
    assert BaseSettings().key() != BaseSettings(seed=1).key()
    assert BaseSettings().key() != BaseSettings(lr=1e-3).key()
