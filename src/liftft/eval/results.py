"""The output directory of an evaluation: ``results.json`` and ``predictions/<task>.jsonl``.

Written task by task, and stamped with the settings that made them, so that an
interrupted run resumes where it stopped and a rerun with other settings never
mixes its results with the old ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from liftft.eval.tasks import Task
from liftft.utils.outputs import check_writable_dir

RESULTS_FILE = "results.json"
PREDICTIONS_DIR = "predictions"


def mean(values) -> float:
    """The mean of ``values`` (flags count as 0 and 1); 0.0 when there are none, so an empty task scores 0."""
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def read_results(output_dir: str | Path) -> dict | None:
    """The ``results.json`` of an output directory, or None when there is none yet."""
    path = Path(output_dir) / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete it or choose another --output") from err


def results_with_settings(output_dir: str | Path, settings: dict) -> dict:
    """The results in ``output_dir`` if made with ``settings``, else empty ones for them: never a mix."""
    results = read_results(output_dir)
    if results is None or results.get("settings") != settings:
        results = {"settings": settings, "tasks": {}}
    return results


def completed_tasks(output_dir: str | Path, settings: dict, overwrite: bool = False) -> set[str]:
    """Names of the tasks already evaluated in ``output_dir`` with these settings.

    A task counts as done when ``results.json`` holds it and its predictions
    file has every record. Results written with other settings raise
    ValueError unless ``overwrite``, which also makes every task count as not done.
    """
    results = read_results(output_dir)
    if results is None or overwrite:
        return set()
    previous = results.get("settings") or {}
    if previous != settings:
        changed = sorted(key for key in {**settings, **previous} if settings.get(key) != previous.get(key))
        raise ValueError(
            f"{output_dir} holds results made with other settings ({', '.join(changed)} differ); "
            "pass --overwrite to replace them or choose another --output"
        )
    done = set()
    for name, summary in results.get("tasks", {}).items():
        path = _predictions_file(output_dir, name)
        if path.is_file() and len(path.read_text(encoding="utf-8").splitlines()) == summary["count"]:
            done.add(name)
    return done


def check_output(output_dir: str | Path, task_names: list[str]) -> None:
    """Raise ValueError, before any work, unless every path an evaluation writes can be written.

    Those are ``output_dir``, its results.json, predictions/ and the
    predictions file of each of ``task_names``. Nothing is left behind.
    """
    output_dir = Path(output_dir)
    check_writable_dir(output_dir, "--output")
    check_writable_dir(output_dir / PREDICTIONS_DIR, "--output")
    for path in [output_dir / RESULTS_FILE, *(_predictions_file(output_dir, name) for name in task_names)]:
        if path.is_dir():
            raise ValueError(f"--output {output_dir}: {path.name} is a directory where a file is to be written")
        if path.exists() and not os.access(path, os.W_OK):
            raise ValueError(f"--output {output_dir}: {path.name} is read-only")


def _predictions_file(output_dir: str | Path, task_name: str) -> Path:
    return Path(output_dir) / PREDICTIONS_DIR / f"{task_name}.jsonl"


def save_task(output_dir: str | Path, settings: dict, task: Task, summary: dict, predictions: list[dict]) -> dict:
    """Write ``predictions/<task>.jsonl`` and fold the summary into ``results.json``; return the results.

    Results from other settings are replaced, not mixed in.
    """
    path = _predictions_file(output_dir, task.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for prediction in predictions:
            f.write(json.dumps(prediction, ensure_ascii=False) + "\n")
    results = results_with_settings(output_dir, settings)
    results["tasks"][task.name] = summary
    return write_results(output_dir, results)


def write_results(output_dir: str | Path, results: dict, missing: list[str] | None = None) -> dict:
    """Recompute the suite averages, record missing tasks if given, and write ``results.json``."""
    if missing is not None:
        results["missing"] = sorted(missing)
    results["suites"] = {}
    for suite in dict.fromkeys(summary["suite"] for summary in results["tasks"].values()):
        members = {n: s for n, s in results["tasks"].items() if s["suite"] == suite}
        results["suites"][suite] = {
            "macro_accuracy": mean(s["accuracy"] for s in members.values()),
            "tasks": sorted(members),
        }
    path = Path(output_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return results


def format_table(results: dict) -> str:
    """A plain-text table of per-task accuracies, suite macro averages and missing tasks."""
    lines = [f"{'task':<16}{'suite':<13}{'scoring':<10}{'extractor':<11}{'n':>6}{'errors':>8}{'accuracy':>10}"]
    for name, s in results.get("tasks", {}).items():
        lines.append(
            f"{name:<16}{s['suite']:<13}{s['scoring']:<10}{s['extractor'] or '-':<11}"
            f"{s['count']:>6}{s['errors']:>8}{100 * s['accuracy']:>9.2f}%"
        )
    for suite, s in results.get("suites", {}).items():
        label = f"{suite} average of {len(s['tasks'])} tasks"
        lines.append(f"{label:<64}{100 * s['macro_accuracy']:>9.2f}%")
    if results.get("missing"):
        lines.append("missing (no test file): " + ", ".join(results["missing"]))
    return "\n".join(lines)
