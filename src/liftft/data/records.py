"""Reading training data into records: files by extension, datasets directories and hub datasets, column mapping.

A record is one of three kinds, each checked here and encoded by :mod:`liftft.data.batches`:

- instruction: LLM-Adapters style, ``instruction`` and ``output`` required, ``input`` and ``answer`` optional;
- messages: ``messages``, a list of ``{"role", "content"}`` turns, trained on the assistant turns;
- prompt-completion: ``prompt`` and ``completion``, both strings or both lists of turns (TRL's conversational
  form), trained on the completion.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from liftft.utils.hf import looks_local

INSTRUCTION, MESSAGES, COMPLETION = "instruction", "messages", "prompt-completion"
RECORD_KINDS = (INSTRUCTION, MESSAGES, COMPLETION)
# The fields a --columns mapping may fill.
FIELDS = ("instruction", "input", "output", "answer", "messages", "prompt", "completion")
_JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
# Tabular files, read by the datasets builder of that name.
_TABLE_BUILDERS = {".parquet": "parquet", ".csv": "csv"}
_DATA_FILE_SUFFIXES = (".json", *_JSON_LINES_SUFFIXES, *_TABLE_BUILDERS)


def load_records(
    paths: str | os.PathLike | list[str | os.PathLike],
    *,
    split: str = "train",
    config: str | None = None,
    columns: dict[str, str] | None = None,
) -> list[dict]:
    """Load and validate training records from one or more sources, concatenated.

    Each source is a file read by its extension: JSON (a list of records; also
    any unknown extension), JSON Lines (``.jsonl``/``.ndjson``), Parquet or CSV
    (through ``datasets``; every CSV cell is a string, an empty one ""); a directory
    written by ``save_to_disk``; a directory of data files that
    ``datasets.load_dataset`` reads (not one with a loading script, ``*.py``);
    or a dataset name on the Hugging Face hub. ``split`` and ``config`` choose
    a dataset's split and configuration; a single file has neither.
    ``columns`` maps our fields to a source's columns, e.g. ``{"instruction":
    "question", "output": "answer"}`` (see :func:`parse_columns`).

    Every record comes back as a plain dict without null fields; an instruction
    record gets ``input`` ("" when absent). Raises FileNotFoundError for a
    missing source and ValueError, naming the source and record index, for
    invalid JSON (with line and column), a record of no known kind or with a
    bad field, records of different kinds in one source, a source with no
    records, a mapped column the source lacks and a directory with a loading
    script. An empty ``output`` or ``completion`` is allowed here (the paper's
    math_data.json has three) and skipped, with a count, by
    :func:`liftft.data.batches.encode_dataset`.
    """
    sources = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not sources:
        raise ValueError("no data files given")
    _check_columns(columns or {})
    records = []
    for source in sources:
        records.extend(_load_source(os.fspath(source), split, config, columns or {}))
    return records


def parse_columns(spec: str) -> dict[str, str]:
    """``"instruction=question,output=answer"`` as ``{"instruction": "question", "output": "answer"}``.

    Each item is one of :data:`FIELDS`, ``=``, and the source's column that fills it.
    """
    mapping = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        field, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not field or not column:
            raise ValueError(f"--columns: {item!r} is not FIELD=COLUMN (e.g. instruction=question)")
        if field in mapping:
            raise ValueError(f"--columns: field {field!r} is mapped twice")
        mapping[field] = column
    if not mapping:
        raise ValueError(f"--columns {spec!r} maps no field; expected e.g. instruction=question,output=answer")
    _check_columns(mapping)
    return mapping


def record_kind(record: dict) -> str:
    """The kind of a record, by its fields: ``messages``, else ``instruction``, else ``prompt``/``completion``.

    Other fields are kept and ignored, so an instruction record may carry a ``prompt`` column too.
    """
    if "messages" in record:
        return MESSAGES
    if "instruction" not in record and ("prompt" in record or "completion" in record):
        return COMPLETION
    return INSTRUCTION


def _check_columns(columns: dict) -> None:
    unknown = [field for field in columns if field not in FIELDS]
    if unknown:
        raise ValueError(f"--columns: unknown field {unknown[0]!r}; fields: {', '.join(FIELDS)}")


# ---------------------------------------------------------------- sources


def _load_source(source: str, split: str, config: str | None, columns: dict) -> list[dict]:
    """Validated records of one file, directory or hub dataset."""
    path = Path(source).expanduser()
    if path.is_file():
        _refuse_split_of_a_file(path, split, config)
        raw, name = _read_file(path), str(path)
    elif path.is_dir():
        raw, name = _read_dataset_dir(path, split, config), str(path)
    elif looks_local(source) or source.lower().endswith(_DATA_FILE_SUFFIXES):
        raise FileNotFoundError(f"data file {source!r} does not exist")
    else:
        raw, name = _read_hub_dataset(source, split, config), f"hub dataset {source!r}"
    if not raw:
        raise ValueError(f"empty dataset: {name} holds no records")
    if columns:
        raw = _mapped(raw, columns, name)
    records = [_validate_record(record, name, index) for index, record in enumerate(raw)]
    _refuse_mixed_kinds(records, name)
    return records


def _refuse_split_of_a_file(path: Path, split: str, config: str | None) -> None:
    if split != "train" or config is not None:
        raise ValueError(f"{path} is a single data file, which has no splits or configurations; "
                         f"drop --data-split {split} / --data-config {config} or pass a dataset")


def _read_file(path: Path) -> list:
    suffix = path.suffix.lower()
    if suffix in _JSON_LINES_SUFFIXES:
        return _read_json_lines(path)
    if suffix in _TABLE_BUILDERS:
        return _read_table(path, _TABLE_BUILDERS[suffix])
    return _read_json(path)


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


def _read_table(path: Path, builder: str):
    """The rows of a Parquet or CSV file, through the datasets builder of that name."""
    import datasets

    try:
        options = _csv_as_text(path) if builder == "csv" else {}
        return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    # pyarrow's and pandas' parse errors, and UnicodeDecodeError, are ValueErrors; datasets wraps some of them.
    except (datasets.exceptions.DatasetsError, ValueError) as err:
        raise ValueError(f"cannot read {path} as {builder}: {err.__cause__ or err}") from err


def _csv_as_text(path: Path) -> dict:
    """Options that read every CSV cell as text, as our fields are: pandas would read "5" as a number and an empty
    cell as missing."""
    import datasets

    with path.open(newline="", encoding="utf-8-sig") as file:
        header = next(csv.reader(file), [])
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}),
            "keep_default_na": False}


def _read_dataset_dir(path: Path, split: str, config: str | None):
    """A split of a ``save_to_disk`` directory or of a directory of data files."""
    import datasets

    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        if config is not None:
            raise ValueError(f"dataset {path} was saved with save_to_disk and has no configurations; "
                             f"drop --data-config {config}")
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"dataset {path} has no {split!r} split (splits: {', '.join(data)})")
            data = data[split]
        return data
    _refuse_loading_script(path)
    try:
        return datasets.load_dataset(str(path), name=config, split=split)
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


def _read_hub_dataset(name: str, split: str, config: str | None):
    """A split of a dataset on the Hugging Face hub."""
    import datasets

    try:
        return datasets.load_dataset(name, name=config, split=split)
    except (OSError, datasets.exceptions.DatasetNotFoundError) as err:
        raise FileNotFoundError(
            f"data {name!r} is neither a local file or directory nor a loadable hub dataset: {err}"
        ) from err


# ---------------------------------------------------------------- columns


def _mapped(raw, columns: dict, source: str) -> list:
    """The records with each field filled from its mapped column, the mapped columns themselves removed."""
    present = _column_names(raw)
    for field, column in columns.items():
        if column not in present:
            raise ValueError(f"--columns {field}={column}: {source} has no column {column!r}; "
                             f"its columns: {', '.join(present)}")
    moved = set(columns.values())
    return [
        {**{k: v for k, v in record.items() if k not in moved}, **{f: record.get(c) for f, c in columns.items()}}
        if isinstance(record, dict) else record
        for record in raw
    ]


def _column_names(raw) -> list[str]:
    names = getattr(raw, "column_names", None)
    if names is not None:
        return list(names)
    return list(dict.fromkeys(key for record in raw if isinstance(record, dict) for key in record))


# ---------------------------------------------------------------- validation


def _validate_record(record, source: str, index: int) -> dict:
    """A clean copy of one record, or a ValueError naming its source and index."""
    where = f"{source}: record {index}"
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be an object with 'instruction' and 'output', 'messages', or 'prompt' and "
                         f"'completion', got {type(record).__name__}")
    # Tabular sources fill absent fields with None; dropping them makes every format give the same records.
    clean = {key: value for key, value in record.items() if value is not None}
    kind = record_kind(clean)
    if kind == MESSAGES:
        clean["messages"] = _checked_turns(clean["messages"], f"{where}: 'messages'")
        if not any(turn["role"] == "assistant" for turn in clean["messages"][1:]):
            raise ValueError(f"{where} has no assistant turn after the first turn: nothing to train on")
    elif kind == COMPLETION:
        _check_completion(clean, where)
    else:
        _check_instruction(clean, where)
    return clean


def _check_instruction(record: dict, where: str) -> None:
    instruction, output = record.get("instruction"), record.get("output")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"{where} has no non-empty 'instruction' string (got {instruction!r})")
    if not isinstance(output, str):
        raise ValueError(f"{where} has no 'output' string (got {output!r})")
    extra = record.get("input", "")
    if not isinstance(extra, str):
        raise ValueError(f"{where} has a non-string 'input' ({type(extra).__name__})")
    record["input"] = extra


def _check_completion(record: dict, where: str) -> None:
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return
    if isinstance(prompt, list) and isinstance(completion, list):
        record["prompt"] = _checked_turns(prompt, f"{where}: 'prompt'")
        record["completion"] = _checked_turns(completion, f"{where}: 'completion'")
        return
    raise ValueError(f"{where} needs 'prompt' and 'completion' both strings or both lists of turns "
                     f"(got {type(prompt).__name__} and {type(completion).__name__})")


def _checked_turns(turns, where: str) -> list[dict]:
    """Turns with string ``role`` and ``content``, their null fields dropped (tabular sources fill them in)."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where} must be a non-empty list of {{'role', 'content'}} turns")
    clean = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(
            turn.get("content"), str
        ):
            raise ValueError(f"{where}: turn {number} must have string 'role' and 'content' (got {turn!r})")
        clean.append({key: value for key, value in turn.items() if value is not None})
    return clean


def _refuse_mixed_kinds(records: list[dict], source: str) -> None:
    first = record_kind(records[0])
    for index, record in enumerate(records):
        if record_kind(record) != first:
            raise ValueError(f"{source}: record {index} is a {record_kind(record)} record but record 0 is a {first} "
                             "record; one source holds one kind")
