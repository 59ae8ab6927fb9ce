"""Writing files so that a reader sees the old version or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path


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

    A failure or kill while writing leaves any previous ``output`` untouched.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output.exists():
        # A directory can't be renamed over a non-empty one: move the old one aside first.
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old)
    else:
        os.replace(tmp, output)
