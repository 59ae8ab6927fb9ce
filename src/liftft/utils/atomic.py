"""Writing files so that a reader sees the old version or the new one, never half of one."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

SUFFIX_DIGITS = 8  # the hex digits that tell atomic_directory's temporaries of one output apart


def atomic_write(target, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``target``, then rename it into place."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path, data) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, default=str)))


@contextmanager
def atomic_directory(output: Path):
    """Yield a fresh directory beside ``output``; on success it replaces ``output``, on error it is removed.

    A failure or kill while writing leaves any previous ``output`` untouched;
    what a kill leaves beside it, :func:`remove_leftovers` removes.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(output, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output.exists():
        # A directory can't be renamed over a non-empty one: move the old one aside first.
        old = _beside(output, "old")
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old)
    else:
        os.replace(tmp, output)


def _beside(output: Path, kind: str) -> Path:
    return output.parent / f".{output.name}.{kind}-{uuid.uuid4().hex[:SUFFIX_DIGITS]}"


def remove_leftovers(target) -> list[Path]:
    """Remove what interrupted writes of ``target`` left beside it, and return the removed paths, sorted.

    A kill between creating a temporary and renaming it leaves it for good (for
    a merge, a whole model copy). Only names the writers here make for
    ``target`` named NAME are touched: :func:`atomic_directory`'s
    ``.NAME.tmp-XXXXXXXX`` and ``.NAME.old-XXXXXXXX`` directories (8 lowercase
    hex digits) and :func:`atomic_write`'s ``.NAME.XXXXXXXX`` files (mkstemp's 8
    random characters). Call it before writing ``target`` again, never while
    another process writes ``target``: its temporary would go too.
    """
    target = Path(target).expanduser()
    if not target.parent.is_dir():
        return []
    name = re.escape(target.name)
    directories = re.compile(rf"\.{name}\.(tmp|old)-[0-9a-f]{{{SUFFIX_DIGITS}}}")
    files = re.compile(rf"\.{name}\.[a-z0-9_]{{8}}")
    removed = []
    for path in sorted(target.parent.iterdir()):
        if path.is_symlink():
            continue
        if path.is_dir() and directories.fullmatch(path.name):
            shutil.rmtree(path)
        elif path.is_file() and files.fullmatch(path.name):
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed
