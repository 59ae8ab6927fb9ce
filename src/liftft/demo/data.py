"""The demo's offline world: a source domain the base model learns in pretraining
and a target domain of arithmetic word problems it has never seen.

Everything is generated from a seed, in the record format of LLM-Adapters'
``math_data.json`` (``instruction``, ``input`` = "", ``output``, ``answer``), so
the shared data loader and evaluator (kind ``number``) read it unchanged:

- **source**: questions about the people of a generated world: how old each
  one is and the number of their house ("How old is Alice?" -> "Alice is 34
  years old. The answer is 34."). The source test asks exactly the facts the
  base was taught: it measures what the model *remembers*, which fine-tuning
  can erase.
- **target**: multi-step word problems about the same people and the things
  they collect, with a worked solution that restates each event and ends in
  "The answer is N.". The answer is never one of the numbers in the question,
  so copying a number earns nothing.

Pretraining also reads each person's profile, the arithmetic table the word
problems need, and short stories about two people from which it repeats what
is said about one; they use the word problems' sentences without any count to
work out. So the base knows the words, the sums and how to find things in its
prompt, but has never seen a word problem: the target task is new, its parts
are not, as for a pretrained LLM learning a new task.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from liftft.data.template import build_prompt

NAMES = (
    "Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy",
    "Ken", "Laura", "Mike", "Nina", "Oscar", "Paula", "Quinn", "Rosa", "Sam", "Tina",
    "Uma", "Victor", "Wendy", "Xavier", "Yara", "Zack", "Amir", "Bella", "Chen", "Diego",
    "Elena", "Farid", "Gina", "Hugo", "Iris", "Jonas", "Kira", "Leo", "Maya", "Noah",
    "Olga", "Pedro", "Rita", "Sven", "Tara", "Umar", "Vera", "Walid",
)  # fmt: skip
ITEMS = ("stamps", "coins", "shells", "cards", "stones", "marbles", "buttons", "books")

# numeric attribute -> (question, statement, smallest value, largest value)
FACTS = {
    "age": ("How old is {name}?", "{name} is {value} years old.", 20, 69),
    "house": ("What is the house number of {name}?", "{name} lives at number {value}.", 10, 99),
}

# The events of a word problem; the verb alone tells a gain from a loss.
_GAINS = (
    "{name} buys {n} more {item}",
    "{name} finds {n} more {item}",
    "{name} gets {n} more {item} from {other}",
)
_LOSSES = (
    "{name} gives {n} {item} to {other}",
    "{name} loses {n} {item}",
    "{name} sells {n} {item}",
)


@dataclass(frozen=True)
class World:
    """The people of the demo, with their numeric facts and what each collects."""

    people: tuple[str, ...]
    facts: dict  # person -> {attribute: int}
    collections: dict  # person -> item

    def profile(self, person: str) -> str:
        """Every fact about ``person``, one sentence each."""
        sentences = [FACTS[attr][1].format(name=person, value=v) for attr, v in self.facts[person].items()]
        return " ".join([*sentences, f"{person} collects {self.collections[person]}."])


def make_world(seed: int = 0, n_people: int = 48) -> World:
    """A world of ``n_people`` people with random facts, fixed by ``seed``."""
    _check_count("n_people", n_people, minimum=3)
    if n_people > len(NAMES):
        raise ValueError(f"n_people must be at most {len(NAMES)}, got {n_people}")
    rng = random.Random(f"world-{seed}")
    people = tuple(rng.sample(NAMES, n_people))
    facts = {p: {attr: rng.randint(low, high) for attr, (_, _, low, high) in FACTS.items()} for p in people}
    collections = {p: rng.choice(ITEMS) for p in people}
    return World(people, facts, collections)


def make_source(world: World) -> list[dict]:
    """One question per fact of ``world``, answered with the fact (kind ``number``)."""
    return [
        {
            "instruction": question.format(name=person),
            "input": "",
            "output": f"{statement.format(name=person, value=world.facts[person][attr])} "
            f"The answer is {world.facts[person][attr]}.",
            "answer": f"{float(world.facts[person][attr])}",
        }
        for person in world.people
        for attr, (question, statement, _, _) in FACTS.items()
    ]


def profile_records(world: World) -> list[dict]:
    """One "Tell me about NAME." record per person, answered with the profile."""
    return [
        {"instruction": f"Tell me about {p}.", "input": "", "output": world.profile(p), "answer": ""}
        for p in world.people
    ]


def word_problem(people: tuple[str, ...], rng: random.Random, n_steps: int, max_value: int) -> dict:
    """One word problem of ``n_steps`` additions or subtractions, with its worked solution.

    Every count stays in [1, ``max_value``], every step adds or takes away 1 to
    9, and the answer is not one of the numbers the question states.
    """
    while True:
        name, other = rng.sample(people, 2)
        item = rng.choice(ITEMS)
        start = rng.randint(2, max_value)
        count, stated, events, lines = start, [start], [], [f"{name} has {start} {item}."]
        for _ in range(n_steps):
            # At either bound only one direction keeps the count in range.
            gain = rng.random() < 0.5 if 1 < count < max_value else count == 1
            n = rng.randint(1, min(9, max_value - count)) if gain else rng.randint(1, min(9, count - 1))
            event = rng.choice(_GAINS if gain else _LOSSES).format(name=name, other=other, n=n, item=item)
            new = count + n if gain else count - n
            events.append(f"{event}.")
            # The solution restates each event before working it out, as a person would.
            lines.append(f"{event}, so {count} {'+' if gain else '-'} {n} = {new}.")
            count = new
            stated.append(n)
        if count not in stated:
            break
    question = " ".join([f"{name} has {start} {item}.", *events, f"How many {item} does {name} have now?"])
    output = " ".join([*lines, f"The answer is {count}."])
    return {"instruction": question, "input": "", "output": output, "answer": f"{float(count)}"}


def make_target(
    world: World, seed: int, n_train: int, n_test: int, n_steps: tuple[int, ...] = (2, 3), max_value: int = 20
) -> tuple[list[dict], list[dict]]:
    """Disjoint train and test sets of word problems about ``world`` (kind ``number``).

    Each problem has a number of steps drawn from ``n_steps``; counts stay in
    [1, ``max_value``]. No instruction appears in both sets.
    """
    if not n_steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in n_steps):
        raise ValueError(f"n_steps must be a non-empty tuple of positive ints, got {n_steps!r}")
    _check_count("max_value", max_value, minimum=4)
    rng = random.Random(f"target-{seed}")
    return _distinct_split(lambda: word_problem(world.people, rng, rng.choice(n_steps), max_value), n_train, n_test)


def story_record(people: tuple[str, ...], rng: random.Random, n_events: int = 2, max_value: int = 20) -> dict:
    """A story about two people, interleaved, and what it says about one of them,
    repeated word for word.

    It uses the word problems' sentences but has no count to work out: it
    teaches the words and finding things in the prompt, not the arithmetic.
    """
    subject, neighbour, other = rng.sample(people, 3)
    tales = []
    for name in (subject, neighbour):
        item = rng.choice(ITEMS)
        events = [
            rng.choice(_GAINS + _LOSSES).format(name=name, other=other, n=rng.randint(1, 9), item=item)
            for _ in range(n_events)
        ]
        tales.append([f"{name} has {rng.randint(1, max_value)} {item}.", *(f"{e}." for e in events)])
    story = " ".join(sentence for pair in zip(*tales) for sentence in pair)
    return {
        "instruction": f"Repeat what this story says about {subject}: {story}",
        "input": "",
        "output": " ".join(tales[0]),
        "answer": "",
    }


def arithmetic_records(max_value: int) -> list[dict]:
    """Every sum and difference a word problem with counts up to ``max_value`` can need,
    written as its solutions write them ("14 + 5 = 19.")."""
    _check_count("max_value", max_value, minimum=2)
    records = []
    for a in range(1, max_value + 1):
        for b in range(1, 10):
            for op, result in (("+", a + b), ("-", a - b)):
                if 1 <= result <= max_value:
                    records.append({
                        "instruction": f"What is {a} {op} {b}?",
                        "input": "",
                        "output": f"{a} {op} {b} = {result}.",
                        "answer": f"{float(result)}",
                    })  # fmt: skip
    return records


def pretraining_records(
    world: World, *, fact_repeats: int, arithmetic_repeats: int, n_stories: int, max_value: int = 20, seed: int = 0
) -> list[dict]:
    """The base model's pretraining set, unshuffled.

    The source questions and the profiles ``fact_repeats`` times each (they are
    few, so they repeat to be remembered), the arithmetic table
    ``arithmetic_repeats`` times, and ``n_stories`` stories to repeat.
    """
    _check_count("fact_repeats", fact_repeats, minimum=0)
    _check_count("arithmetic_repeats", arithmetic_repeats, minimum=0)
    _check_count("n_stories", n_stories, minimum=0)
    rng = random.Random(f"stories-{seed}")
    stories = [story_record(world.people, rng, max_value=max_value) for _ in range(n_stories)]
    facts = (make_source(world) + profile_records(world)) * fact_repeats
    return facts + arithmetic_records(max_value) * arithmetic_repeats + stories


def corpus_texts(records: list[dict]) -> list[str]:
    """The texts a tokenizer trains on: each record's prompt and its output, apart,
    since they are always encoded apart."""
    return [text for r in records for text in (build_prompt(r), r["output"])]


def _distinct_split(draw, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """Draw records until ``n_train + n_test`` distinct instructions are found; the first
    ``n_test`` distinct ones form the test set, the rest the train set."""
    _check_count("n_train", n_train, minimum=0)
    _check_count("n_test", n_test, minimum=0)
    wanted = n_train + n_test
    records, seen, misses = [], set(), 0
    while len(records) < wanted:
        record = draw()
        if record["instruction"] in seen:
            misses += 1
            # So many repeats in a row mean the space of problems is used up.
            if misses > 10_000:
                raise ValueError(
                    f"too few distinct word problems for n_train + n_test = {wanted} (found {len(records)}); "
                    "raise max_value or n_steps"
                )
            continue
        seen.add(record["instruction"])
        records.append(record)
        misses = 0
    return records[n_test:], records[:n_test]


def _check_count(name: str, value, minimum: int) -> None:
    """Raise TypeError unless ``value`` is an int, ValueError if it is below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
