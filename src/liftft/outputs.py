"""Which directories a command may write into: a new or empty one, or its own earlier output."""

from __future__ import annotations

import json
from pathlib import Path


def check_output_dir(output, marker: str, kind: str) -> Path:
    """``output`` as a Path, after refusing an existing non-empty directory that lacks ``marker``.

    ``marker`` is the file every output of this ``kind`` (e.g. "merge") holds,
    so a previous output may be replaced or continued while anything else is
    left alone.
    """
    output = Path(output).expanduser()
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not (output / marker).is_file():
        raise ValueError(
            f"output directory {output} is not empty and is not a previous liftft {kind} (no {marker}); "
            "choose another output or remove it"
        )
    return output


def differing_settings(recorded: dict, current: dict, defaults: dict) -> list[str]:
    """The sorted names of the settings in which ``current`` differs from an earlier output's ``recorded`` ones.

    A setting missing from ``recorded`` was written by an older liftft that did
    not have it, so it counts as its value in ``defaults`` (the value that older
    version used). Values are compared as JSON, so a tuple equals its list and
    1 equals 1.0.
    """
    previous = _as_json({**{k: v for k, v in defaults.items() if k in current}, **recorded})
    current = _as_json(current)
    return sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))


def _as_json(settings: dict) -> dict:
    return json.loads(json.dumps(settings, default=str))
