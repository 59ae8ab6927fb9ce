"""Training data: encoding records with exact label masks, holding out a validation set, batching.

Records are read by :func:`liftft.data.records.load_records`, also importable from here. A record is cut into
segments of text (:func:`record_segments`): the prompt and the response, or a conversation rendered with the
tokenizer's chat template around its assistant turns. The first segment is tokenized by
:func:`liftft.data.template.encode_prompt` exactly as generation feeds a prompt, each next one by
:func:`liftft.data.template.encode_response` as it follows the text before it, as scoring tokenizes an answer; the
loss sees the trained segments only.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass

import torch

from liftft.data.chat import Segment, completion_segments, messages_segments, without_first_exchanges
from liftft.data.records import COMPLETION, MESSAGES, load_records, record_kind
from liftft.data.template import build_prompt, encode_prompt, encode_response

__all__ = ["IGNORE_INDEX", "DataCollator", "encode_dataset", "encode_example", "load_records", "record_segments",
           "split_validation"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# What encoding did with a record.
_KEPT, _TRUNCATED, _EMPTY, _TOO_LONG, _NO_CONTEXT = "kept", "truncated", "empty", "too long", "no context"


# ------------------------------------------------------------ tokenization


def record_segments(record: dict, tokenizer, template: str = "alpaca") -> tuple[list[Segment], bool]:
    """The record cut into (text, trained) segments, and whether EOS closes it.

    An instruction record is its prompt (``template``) and its ``output``; a
    prompt/completion record of strings is the two as they are, like TRL's
    SFTTrainer; both are closed by EOS. A ``messages`` record, or a
    prompt/completion record of turns, is rendered with the tokenizer's chat
    template (:mod:`liftft.data.chat`), whose end-of-turn text closes each trained
    turn.
    """
    kind = record_kind(record)
    if kind == MESSAGES:
        return messages_segments(tokenizer, record["messages"]), False
    if kind == COMPLETION and isinstance(record["prompt"], list):
        return completion_segments(tokenizer, record["prompt"], record["completion"]), False
    if kind == COMPLETION:
        return [(record["prompt"], False), (record["completion"], True)], True
    return [(build_prompt(record, template, tokenizer), False), (record["output"], True)], True


def encode_example(record: dict, tokenizer, *, template: str = "alpaca", max_seq_len: int = 2048) -> dict | None:
    """Token ids and labels of one record, or None when it has nothing to train on.

    ``input_ids`` is the record's segments (:func:`record_segments`): for an
    instruction record, ``encode_prompt(tokenizer, build_prompt(record))``, then
    ``encode_response`` of the output, then EOS. ``labels`` equals
    ``input_ids`` on the trained segments (and EOS) and is -100 elsewhere. The
    prompt's ids are exactly those generation feeds, even where the prompt's
    last characters and the response's first would merge into one token if
    tokenized together.

    The last trained segment and EOS are never cut. An instruction or string
    prompt/completion example longer than ``max_seq_len`` loses tokens from the
    left (keeping BOS). A conversation (``messages``, or prompt/completion turns)
    loses whole turns instead: its first exchanges, as few as make it fit, its
    system prompt kept, so that every assistant turn trained on keeps the turns
    that prompted it (:func:`liftft.data.chat.without_first_exchanges`). None is
    returned when every trained segment is blank; when not even the BOS, the
    last line of the text before the last trained segment (the response cue,
    e.g. "### Response:") and that segment with EOS fit; and for a conversation
    in which no assistant turn fits with its context.
    """
    return _encode(record, tokenizer, template, max_seq_len)[0]


def encode_dataset(
    records: list[dict], tokenizer, *, template: str = "alpaca", max_seq_len: int = 2048
) -> tuple[list[dict], dict]:
    """Encode every record with :func:`encode_example`.

    Returns the kept examples and counts ``{"examples", "truncated", "skipped",
    "empty", "no_context"}``: ``skipped`` counts every record left out, ``empty``
    those of them whose response is empty, ``no_context`` the conversations in
    which no assistant turn fits with the turns that prompted it (the rest are
    too long). ``truncated`` counts the examples kept in part. Raises ValueError
    when no example is left.
    """
    if not records:
        raise ValueError("empty dataset: no records to encode")
    examples, outcomes = [], Counter()
    for record in records:
        example, outcome = _encode(record, tokenizer, template, max_seq_len)
        outcomes[outcome] += 1
        if example is not None:
            examples.append(example)
    empty, too_long, no_context = outcomes[_EMPTY], outcomes[_TOO_LONG], outcomes[_NO_CONTEXT]
    reasons = (f"{empty} with a blank response (output, completion or assistant turns), {too_long} whose last "
               f"response, what closes it (EOS or the end of turn) and the line before it do not fit in "
               f"max_seq_len={max_seq_len}, {no_context} conversations in which no assistant turn fits with the turns "
               "that prompted it")
    skipped = empty + too_long + no_context
    if not examples:
        raise ValueError(f"empty dataset after filtering: all {len(records)} records were skipped ({reasons})")
    if skipped:
        logger.warning("skipped %d of %d records (%s)", skipped, len(records), reasons)
    stats = {"examples": len(examples), "truncated": outcomes[_TRUNCATED], "skipped": skipped, "empty": empty,
             "no_context": no_context}
    return examples, stats


def _encode(record: dict, tokenizer, template: str, max_seq_len: int) -> tuple[dict | None, str]:
    """The encoded example (None if skipped) and what happened to it."""
    _check_max_seq_len(max_seq_len)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")
    if not any(text.strip() for text in _responses(record)):
        return None, _EMPTY
    segments, closed_by_eos = record_segments(record, tokenizer, template)
    ids, labels, last = _tokenized(tokenizer, segments)
    if closed_by_eos:
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    if len(ids) <= max_seq_len:
        return {"input_ids": ids, "labels": labels}, _KEPT
    shorter = _shorter_conversations(record)
    if shorter is not None:
        return _cut_conversation(shorter, tokenizer, template, max_seq_len)
    n_bos = int(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    kept = max_seq_len - n_bos
    cue = segments[[i for i, (_, trained) in enumerate(segments) if trained][-1] - 1][0]
    if kept - (len(ids) - last) < _response_cue_length(tokenizer, cue):
        return None, _TOO_LONG
    example = {"input_ids": ids[:n_bos] + ids[-kept:], "labels": labels[:n_bos] + labels[-kept:]}
    return example, _TRUNCATED


def _shorter_conversations(record: dict) -> list[dict] | None:
    """A conversational record without its first 1, 2, ... exchanges, fewest first; None for other records."""
    kind = record_kind(record)
    if kind == MESSAGES:
        return [{**record, "messages": turns} for turns in without_first_exchanges(record["messages"])]
    if kind == COMPLETION and isinstance(record["prompt"], list):
        prompt, completion = record["prompt"], record["completion"]
        return [{**record, "prompt": turns[: len(turns) - len(completion)]}
                for turns in without_first_exchanges(prompt + completion, before=len(prompt))]
    return None


def _cut_conversation(shorter: list[dict], tokenizer, template: str, max_seq_len: int) -> tuple[dict | None, str]:
    """The first of the ``shorter`` conversations (fewest exchanges dropped) that fits in ``max_seq_len`` and trains on
    something, found by bisection: each is shorter than the one before."""
    low, high, fitting = 0, len(shorter), None
    while low < high:
        middle = (low + high) // 2
        segments, closed_by_eos = record_segments(shorter[middle], tokenizer, template)
        ids, labels, _ = _tokenized(tokenizer, segments)
        if closed_by_eos:
            ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
        if len(ids) <= max_seq_len:
            high, fitting = middle, {"input_ids": ids, "labels": labels}
        else:
            low = middle + 1
    if fitting is None or not any(text.strip() for text in _responses(shorter[high])):
        return None, _NO_CONTEXT
    return fitting, _TRUNCATED


def _responses(record: dict) -> list[str]:
    """The texts a record trains on, without the template around them."""
    kind = record_kind(record)
    if kind == MESSAGES:
        return [turn["content"] for turn in record["messages"][1:] if turn["role"] == "assistant"]
    if kind == COMPLETION:
        completion = record["completion"]
        return [turn["content"] for turn in completion] if isinstance(completion, list) else [completion]
    return [record["output"]]


def _tokenized(tokenizer, segments: list[Segment]) -> tuple[list[int], list[int], int]:
    """Ids and labels of the segments, and where the last trained segment starts.

    The first segment is context, tokenized as a prompt; each next one as it
    follows all the text before it.
    """
    text = segments[0][0]
    ids = encode_prompt(tokenizer, text)
    labels, last = [IGNORE_INDEX] * len(ids), 0
    for piece, trained in segments[1:]:
        piece_ids = encode_response(tokenizer, text, piece)
        if trained:
            last = len(ids)
        ids += piece_ids
        labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
        text += piece
    return ids, labels, last


def _response_cue_length(tokenizer, prompt: str) -> int:
    """Tokens in the prompt's last line: the least prompt worth training on."""
    body = prompt.rstrip("\n")
    cue = prompt[body.rfind("\n") + 1 :]
    return len(tokenizer(cue, add_special_tokens=False)["input_ids"])


def _check_max_seq_len(max_seq_len) -> None:
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int):
        raise TypeError(f"max_seq_len must be an int, got {max_seq_len!r}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")


# -------------------------------------------------------------- validation


def split_validation(records: list, val_size: int, seed: int) -> tuple[list, list]:
    """Hold out ``val_size`` records chosen by ``seed``; returns (train, validation).

    Both parts keep the records' original order. ``val_size=0`` gives an empty
    validation set.
    """
    if isinstance(val_size, bool) or not isinstance(val_size, int):
        raise TypeError(f"val_size must be an int, got {val_size!r}")
    if val_size < 0:
        raise ValueError(f"--val-size must be >= 0 (0 holds out none), got {val_size}")
    if val_size >= len(records):
        raise ValueError(f"--val-size {val_size} leaves no record to train on: the data holds {len(records)} "
                         f"record{'s' if len(records) != 1 else ''}, so pass --val-size below {len(records)} "
                         "(0 holds out none)")
    held_out = set(random.Random(seed).sample(range(len(records)), val_size))
    train = [record for i, record in enumerate(records) if i not in held_out]
    validation = [record for i, record in enumerate(records) if i in held_out]
    return train, validation


# ---------------------------------------------------------------- batching


@dataclass
class DataCollator:
    """Right-pads encoded examples into LongTensors ``input_ids``, ``attention_mask``, ``labels``.

    The attention mask follows each example's length, never its token ids, so a
    pad id equal to EOS never hides a real EOS. Labels are -100 on padding.
    Usable as ``data_collator=`` of a transformers ``Trainer``.
    """

    pad_token_id: int

    def __post_init__(self):
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
            raise TypeError(f"pad_token_id must be an int, got {self.pad_token_id!r}; set tokenizer.pad_token")

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Batch examples whose ``input_ids`` and ``labels`` are lists or 1-D tensors."""
        ids = [torch.as_tensor(example["input_ids"], dtype=torch.long) for example in examples]
        labels = [torch.as_tensor(example["labels"], dtype=torch.long) for example in examples]
        for i, (x, y) in enumerate(zip(ids, labels)):
            if x.shape != y.shape:
                raise ValueError(f"example {i}: input_ids {tuple(x.shape)} and labels {tuple(y.shape)} differ in shape")
        width = max(len(x) for x in ids)
        batch = {
            "input_ids": torch.full((len(ids), width), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(ids), width), dtype=torch.long),
            "labels": torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long),
        }
        for row, (x, y) in enumerate(zip(ids, labels)):
            batch["input_ids"][row, : len(x)] = x
            batch["attention_mask"][row, : len(x)] = 1
            batch["labels"][row, : len(y)] = y
        return batch


def step_micro_batches(examples: list, step: int, *, seed: int, batch_size: int, grad_accum: int, world: int = 1,
                       rank: int = 0) -> list[list]:
    """This rank's share of each micro-batch of optimizer step ``step`` of a `liftft train` run over ``examples``.

    A function of the seed and the position alone: each epoch is a seeded
    permutation, cut into global micro-batches of ``batch_size * world``
    examples, ``grad_accum`` of them per step (an epoch's last step may have
    fewer); rank r takes its ``batch_size`` of each, which at an epoch's end
    may be short or empty.
    """
    size = batch_size * world
    micro_per_epoch = math.ceil(len(examples) / size)
    epoch, within = divmod(step, math.ceil(micro_per_epoch / grad_accum))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    first = within * grad_accum
    parts = [order[m * size:(m + 1) * size][rank * batch_size:(rank + 1) * batch_size]
             for m in range(first, min(first + grad_accum, micro_per_epoch))]
    return [[examples[i] for i in part.tolist()] for part in parts]
