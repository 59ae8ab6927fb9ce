"""Training data: loading records, tokenizing them with exact label masks, batching.

A record is an LLM-Adapters-style dict: ``instruction`` and ``output`` are
required, ``input`` and ``answer`` optional. An encoded example is the prompt's
ids, made by :func:`liftft.template.encode_prompt` exactly as generation makes
them, followed by the response's own ids and EOS; the loss sees only the latter.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from liftft.hf import looks_local
from liftft.template import build_prompt, encode_prompt

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
_DATA_FILE_SUFFIXES = (".json", *_JSON_LINES_SUFFIXES)
# What encoding did with a record.
_KEPT, _TRUNCATED, _EMPTY, _TOO_LONG = "kept", "truncated", "empty", "too long"


# ---------------------------------------------------------------- loading


def load_records(paths: str | os.PathLike | list[str | os.PathLike]) -> list[dict]:
    """Load and validate training records from one or more sources, concatenated.

    Each source is a JSON file holding a list of records, a JSON Lines file
    (``.jsonl``/``.ndjson``) with one record per line, a directory written by
    ``Dataset.save_to_disk`` (a ``DatasetDict`` gives its ``train`` split), a
    directory of data files that ``datasets.load_dataset`` reads (not one with
    a loading script, ``*.py``), or a dataset name on the Hugging Face hub (its
    ``train`` split).

    Every record comes back as a plain dict with ``instruction``, ``output``,
    ``input`` ("" when absent) and any other non-null fields, such as ``answer``.
    Raises FileNotFoundError for a missing source and ValueError for invalid JSON
    (with line and column), a record without a non-empty ``instruction`` or
    without an ``output`` string (with the record index), a source with no
    records and a directory with a loading script. An empty ``output`` is
    allowed here (the paper's math_data.json has three) and skipped, with a
    count, by :func:`encode_dataset`.
    """
    sources = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not sources:
        raise ValueError("no data files given")
    records = []
    for source in sources:
        records.extend(_load_source(os.fspath(source)))
    return records


def _load_source(source: str) -> list[dict]:
    """Validated records of one file, directory or hub dataset."""
    path = Path(source).expanduser()
    if path.is_file():
        raw = _read_json_lines(path) if path.suffix.lower() in _JSON_LINES_SUFFIXES else _read_json(path)
        name = str(path)
    elif path.is_dir():
        raw, name = _read_dataset_dir(path), str(path)
    elif looks_local(source) or source.lower().endswith(_DATA_FILE_SUFFIXES):
        raise FileNotFoundError(f"data file {source!r} does not exist")
    else:
        raw, name = _read_hub_dataset(source), f"hub dataset {source!r}"
    if not raw:
        raise ValueError(f"empty dataset: {name} holds no records")
    return [_validate_record(record, name, index) for index, record in enumerate(raw)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from err


def _read_json(path: Path) -> list:
    """The list of records in a JSON file."""
    text = _read_text(path)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON in {path}: line {err.lineno} column {err.colno}: {err.msg}") from err
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of records, got a {type(data).__name__}")
    return data


def _read_json_lines(path: Path) -> list:
    """The records of a JSON Lines file; blank lines are ignored."""
    records = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"invalid JSON in {path}: line {lineno} column {err.colno}: {err.msg}") from err
    return records


def _read_dataset_dir(path: Path):
    """The train split of a ``save_to_disk`` directory or a directory of data files."""
    import datasets

    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if "train" not in data:
                raise ValueError(f"dataset {path} has no 'train' split (splits: {', '.join(data)})")
            data = data["train"]
        return data
    _refuse_loading_script(path)
    try:
        return datasets.load_dataset(str(path), split="train")
    except datasets.exceptions.DatasetsError as err:
        raise ValueError(f"cannot load dataset directory {path}: {err}") from err


def _refuse_loading_script(path: Path) -> None:
    """Refuse a directory with a dataset loading script: datasets no longer runs them, and one is arbitrary code.

    Reading the directory's data files without the script could train on
    something other than what the script defines, so no script is ignored either.
    """
    scripts = sorted(script.name for script in path.glob("*.py"))
    if scripts:
        raise ValueError(
            f"dataset directory {path} holds a loading script ({', '.join(scripts)}), which liftft does not run; "
            "convert the data to a JSON or JSON Lines file, or save it with datasets' save_to_disk, and pass that"
        )


def _read_hub_dataset(name: str):
    """The train split of a dataset on the Hugging Face hub."""
    import datasets

    try:
        return datasets.load_dataset(name, split="train")
    except (OSError, datasets.exceptions.DatasetNotFoundError) as err:
        raise FileNotFoundError(
            f"data {name!r} is neither a local file or directory nor a loadable hub dataset: {err}"
        ) from err


def _validate_record(record, source: str, index: int) -> dict:
    """A clean copy of one record, or a ValueError naming its source and index."""
    where = f"{source}: record {index}"
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be an object with 'instruction' and 'output', got {type(record).__name__}")
    instruction, output = record.get("instruction"), record.get("output")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"{where} has no non-empty 'instruction' string (got {instruction!r})")
    if not isinstance(output, str):
        raise ValueError(f"{where} has no 'output' string (got {output!r})")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise ValueError(f"{where} has a non-string 'input' ({type(extra).__name__})")
    # Tabular sources fill absent fields with None; dropping them makes every
    # format give the same records.
    clean = {key: value for key, value in record.items() if value is not None}
    clean["input"] = extra or ""
    return clean


# ------------------------------------------------------------ tokenization


def encode_example(record: dict, tokenizer, *, template: str = "alpaca", max_seq_len: int = 2048) -> dict | None:
    """Token ids and labels of one record, or None when it has nothing to train on.

    ``input_ids`` is ``encode_prompt(tokenizer, build_prompt(record))``, then the
    response's own ids (tokenized on their own, without special tokens), then
    EOS. ``labels`` equals ``input_ids`` on the response and EOS and is -100 on
    the prompt, so the boundary is exact even where the last prompt character
    and the first response characters would merge into one token if tokenized
    together.

    EOS is never cut. An example longer than ``max_seq_len`` loses prompt tokens
    from the left (keeping BOS). None is returned for an empty response, and
    when not even the BOS, the prompt's last line (the response cue, e.g.
    "### Response:") and the response with EOS fit.
    """
    return _encode(record, tokenizer, template, max_seq_len)[0]


def encode_dataset(
    records: list[dict], tokenizer, *, template: str = "alpaca", max_seq_len: int = 2048
) -> tuple[list[dict], dict]:
    """Encode every record with :func:`encode_example`.

    Returns the kept examples and counts ``{"examples", "truncated", "skipped",
    "empty"}``: ``skipped`` counts every record left out, ``empty`` those of them
    whose response is empty (the rest are too long). Raises ValueError when no
    example is left.
    """
    if not records:
        raise ValueError("empty dataset: no records to encode")
    examples, outcomes = [], Counter()
    for record in records:
        example, outcome = _encode(record, tokenizer, template, max_seq_len)
        outcomes[outcome] += 1
        if example is not None:
            examples.append(example)
    empty, too_long = outcomes[_EMPTY], outcomes[_TOO_LONG]
    reasons = f"{empty} with an empty output, {too_long} whose output plus EOS does not fit in max_seq_len={max_seq_len}"
    if not examples:
        raise ValueError(f"empty dataset after filtering: all {len(records)} records were skipped ({reasons})")
    if empty or too_long:
        logger.warning("skipped %d of %d records (%s)", empty + too_long, len(records), reasons)
    stats = {"examples": len(examples), "truncated": outcomes[_TRUNCATED], "skipped": empty + too_long, "empty": empty}
    return examples, stats


def _encode(record: dict, tokenizer, template: str, max_seq_len: int) -> tuple[dict | None, str]:
    """The encoded example (None if skipped) and what happened to it."""
    _check_max_seq_len(max_seq_len)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")
    prompt = build_prompt(record, template, tokenizer)
    prompt_ids = encode_prompt(tokenizer, prompt)
    if not record["output"].strip():
        return None, _EMPTY
    response_ids = _response_ids(tokenizer, record["output"]) + [tokenizer.eos_token_id]
    outcome = _KEPT
    if len(prompt_ids) + len(response_ids) > max_seq_len:
        n_bos = int(tokenizer.bos_token_id is not None and prompt_ids[:1] == [tokenizer.bos_token_id])
        room = max_seq_len - len(response_ids) - n_bos
        if room < _response_cue_length(tokenizer, prompt):
            return None, _TOO_LONG
        prompt_ids = prompt_ids[:n_bos] + prompt_ids[len(prompt_ids) - room :]
        outcome = _TRUNCATED
    example = {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }
    return example, outcome


def _response_ids(tokenizer, text: str) -> list[int]:
    """The response's own ids, without special tokens, as they continue a prompt.

    SentencePiece-style tokenizers (Llama-2, Mistral) prepend a word-boundary
    "▁" to the start of a text, a token that the prompt + response text does
    not hold. Tokenizing after an EOS anchor avoids it: text that follows a
    special token is not the start, and a special token never merges with it.
    """
    ids = tokenizer(tokenizer.eos_token + text, add_special_tokens=False)["input_ids"]
    if ids[:1] == [tokenizer.eos_token_id]:
        return ids[1:]
    # The tokenizer did not read the EOS text as its special token.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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
    if not 0 <= val_size < len(records):
        raise ValueError(
            f"val_size must be in [0, {len(records)}) so that training keeps a record, got {val_size}"
        )
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
