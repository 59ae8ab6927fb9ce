"""Which directories a command may write into: a new or empty one, or its own earlier output."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def check_output_dir(output, marker: str, kind: str, ignore: tuple[str, ...] = ()) -> Path:
    """``output`` as a Path, after refusing an existing non-empty directory that lacks ``marker``.

    ``marker`` is the file every output of this ``kind`` (e.g. "merge") holds,
    so a previous output may be replaced or continued while anything else is
    left alone. Files named in ``ignore`` (the caller's own lock) do not count.
    """
    output = Path(output).expanduser()
    refuse_non_directory(output, "output")
    if output.is_dir() and any(p.name not in ignore for p in output.iterdir()) and not (output / marker).is_file():
        raise ValueError(
            f"output directory {output} is not empty and is not a previous liftft {kind} (no {marker}); "
            "choose another output or remove it"
        )
    return output


def refuse_non_directory(path: Path, name: str) -> None:
    """Raise ValueError naming ``name`` (e.g. "--output") when ``path`` exists as something other than a directory."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path} exists and is not a directory")


def not_writable(directory: Path, name: str, err: OSError) -> ValueError:
    """The error for a directory ``name`` names in which a file could not be created, saying why."""
    return ValueError(f"{name} {directory} is not writable: {err.strerror or err}")


def check_writable_dir(directory, name: str) -> None:
    """Raise ValueError, naming ``name`` (e.g. "--output") and ``directory``, unless files can be written in it.

    Tried for real, by creating the directory and a temporary file in it,
    since permission bits do not tell (root, read-only mounts, ACLs). The file
    and the directories the probe created are removed again, so a run that
    fails later leaves nothing behind.
    """
    directory = Path(directory)
    refuse_non_directory(directory, name)
    # Deepest first, the order in which they can be removed.
    created = [path for path in (directory, *directory.parents) if not path.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as err:
        raise not_writable(directory, name, err) from err
    finally:
        for path in created:
            if path.is_dir():
                path.rmdir()


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
