"""Writing the task pack: one lm-eval YAML task per benchmark found in a data dir, one group per suite.

Each task reads its test file through the ``json`` dataset builder at an
absolute path, generates greedily with liftft's template (as ``liftft eval``
does by default: 256 new tokens, stopping at EOS only) and scores two filters,
``strict`` and ``reference``, the two extractors of ``liftft eval``. A group
averages its tasks unweighted, as the paper's Math-7 and Commonsense-8 do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

from liftft.utils.atomic import atomic_directory
from liftft.eval.extract import EXTRACTORS
from liftft.eval.tasks import SUITES, TASKS, TEST_FILE, Task, check_answers, find_test_file, read_records
from liftft.lm_eval_tasks.hooks import PROCESS_RESULTS
from liftft.utils.outputs import check_output_dir

DATA_DIR_ENV = "LIFTFT_DATA_DIR"
MARKER = "liftft_tasks.json"  # what the pack holds; also what marks a directory as a pack that may be replaced
PREFIX = "liftft_"
MAX_NEW_TOKENS = 256

_UTILS = '''"""What lm-eval calls for this pack, written by `liftft lm-eval-tasks`: liftft's template and extraction."""

from liftft.lm_eval_tasks.hooks import (
    ExtractAnswer,
    doc_to_text,
    process_choice,
    process_letter,
    process_number,
)

__all__ = ["ExtractAnswer", "doc_to_text", "process_choice", "process_letter", "process_number"]
'''


def lm_eval_name(task: Task) -> str:
    """The lm-eval name of a benchmark: ``liftft_`` and its lower-cased name, e.g. ``liftft_arc_challenge``."""
    return PREFIX + re.sub(r"[^a-z0-9]+", "_", task.name.lower())


def suite_name(suite: str) -> str:
    """The lm-eval group of a suite: ``liftft_math`` or ``liftft_commonsense``."""
    return PREFIX + suite


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir``, else ``$LIFTFT_DATA_DIR``, as an absolute path to an existing directory."""
    given = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not given:
        raise ValueError(
            f"no data dir: pass --data-dir, the folder that holds <task>/{TEST_FILE}, or set ${DATA_DIR_ENV}"
        )
    path = Path(given).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"data dir {given!r} does not exist or is not a directory")
    return path


def default_output(data_dir: Path) -> Path:
    """The pack's directory when none is given: under liftft's cache, one per data dir."""
    from liftft.demo.base import cache_root

    key = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return cache_root() / "lm-eval-tasks" / key


def write_task_pack(data_dir: str | os.PathLike | None = None, output: str | os.PathLike | None = None) -> Path:
    """Write the lm-eval task pack for the benchmarks in ``data_dir`` into ``output`` and return its path.

    ``data_dir`` holds ``<task>/test.json`` for the LLM-Adapters tasks (default:
    ``$LIFTFT_DATA_DIR``); ``output`` defaults to a directory in liftft's cache
    (``$LIFTFT_CACHE``, else ``$XDG_CACHE_HOME/liftft``, else ``~/.cache/liftft``).
    Every test file is checked as ``liftft eval`` checks it; tasks without one
    are left out, with a warning. The pack replaces ``output`` atomically, and
    only when it is empty or an earlier pack; an identical pack is left as it
    is, so that an lm-eval run reading it is never disturbed.
    """
    data_dir = resolve_data_dir(data_dir)
    output = check_output_dir(output if output is not None else default_output(data_dir), MARKER, "lm-eval-tasks")
    output = output.resolve()
    files = {name: text.encode() for name, text in pack_files(data_dir).items()}
    if output.is_dir() and {p.name: p.read_bytes() for p in output.iterdir() if p.is_file()} == files:
        return output
    with atomic_directory(output) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return output


def pack_files(data_dir: Path) -> dict[str, str]:
    """The pack's files, name to text, for the test files found in ``data_dir``; warns about the tasks left out."""
    found, missing = {}, []
    for task in TASKS.values():
        path = find_test_file(data_dir, task.name)
        if path is None:
            missing.append(task.name)
            continue
        check_answers(task, read_records(path), path)
        found[task.name] = (task, path)
    if not found:
        raise FileNotFoundError(f"data dir {data_dir} holds no <task>/{TEST_FILE} of a known task")
    if missing:
        warnings.warn(f"left out of the lm-eval task pack, no {TEST_FILE} in {data_dir}: {', '.join(missing)}")
    groups = {suite: [found[name][0] for name in names if name in found] for suite, names in SUITES.items()}
    groups = {suite: tasks for suite, tasks in groups.items() if tasks}
    manifest = {
        "data_dir": str(data_dir),
        "tasks": {lm_eval_name(task): str(path) for task, path in found.values()},
        "groups": {suite_name(suite): [lm_eval_name(task) for task in tasks] for suite, tasks in groups.items()},
        "missing": missing,
    }
    return {
        **{f"{lm_eval_name(task)}.yaml": task_yaml(task, path) for task, path in found.values()},
        **{f"{suite_name(suite)}.yaml": group_yaml(suite, tasks) for suite, tasks in groups.items()},
        "utils.py": _UTILS,
        MARKER: json.dumps(manifest, indent=2) + "\n",
    }


def task_yaml(task: Task, test_file: Path) -> str:
    """One benchmark as an lm-eval ``generate_until`` task reading ``test_file``."""
    quoted = json.dumps  # a JSON string is a YAML double-quoted scalar, whatever the path holds
    filters = "".join(
        f"  - name: {extractor}\n"
        "    filter:\n"
        "      - function: !function utils.ExtractAnswer\n"
        f"        task: {quoted(task.name)}\n"
        f"        extractor: {extractor}\n"
        for extractor in EXTRACTORS
    )
    return (
        f"# Written by `liftft lm-eval-tasks`: {task.name} with liftft's template and answer extraction.\n"
        f"task: {lm_eval_name(task)}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {quoted(str(test_file))}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "num_fewshot: 0\n"
        "doc_to_text: !function utils.doc_to_text\n"
        "doc_to_target: answer\n"
        "generation_kwargs:\n"
        "  until: []\n"  # EOS only, which lm-eval always adds, as liftft eval stops
        f"  max_gen_toks: {MAX_NEW_TOKENS}\n"
        "  do_sample: false\n"
        f"filter_list:\n{filters}"
        f"process_results: !function utils.{PROCESS_RESULTS[task.kind]}\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


def group_yaml(suite: str, tasks: list[Task]) -> str:
    """A suite as an lm-eval group whose ``acc`` is the unweighted mean over its tasks, per extractor."""
    members = "".join(f"  - {lm_eval_name(task)}\n" for task in tasks)
    return (
        f"# Written by `liftft lm-eval-tasks`: the {suite} benchmarks, averaged as the paper does.\n"
        f"group: {suite_name(suite)}\n"
        f"task:\n{members}"
        "aggregate_metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    weight_by_size: false\n"
        f"    filter_list: [{', '.join(EXTRACTORS)}]\n"
        "metadata:\n"
        "  version: 1.0\n"
    )
