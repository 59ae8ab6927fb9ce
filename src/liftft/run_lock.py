"""One `liftft train` run per output directory: a lock file holding the owner's pid, taken atomically.

Two runs started on one ``--output`` would otherwise both write there, both
report success, and leave one run's files interleaved with the other's. The
first run creates ``DIR/.liftft.lock`` with O_CREAT | O_EXCL; a second one is
refused, naming the holder. A lock whose process is gone (a killed run) is
taken over with a message. A lock written on another host cannot be checked
from here, so it is honoured, and the message says how to remove it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

LOCK_FILE = ".liftft.lock"


def acquire(output: Path) -> Path:
    """Create ``output`` if needed and take its lock; returns the lock file. ValueError if a live run holds it."""
    output.mkdir(parents=True, exist_ok=True)
    lock = output / LOCK_FILE
    try:
        _create(lock)
        return lock
    except FileExistsError:
        pass
    pid, host = _holder(lock)
    if host != socket.gethostname() or _alive(pid):
        where = "" if host == socket.gethostname() else f" on host {host} (remove {lock} if no run is there)"
        raise ValueError(f"output dir {output} is in use by another liftft train run (pid {pid}{where}, lock "
                         f"{lock}); wait for it to finish or choose another --output")
    print(f"liftft train: taking over the lock of process {pid}, which is gone ({lock})")
    lock.unlink(missing_ok=True)
    _create(lock)
    return lock


def release(lock: Path) -> None:
    """Remove ``lock`` if this process holds it."""
    if lock.is_file() and _holder(lock) == (os.getpid(), socket.gethostname()):
        lock.unlink(missing_ok=True)


def _create(lock: Path) -> None:
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")


def _holder(lock: Path) -> tuple[int, str]:
    """(pid, host) written in ``lock``; (0, this host) for an unreadable one, which no live process holds."""
    try:
        pid, host = lock.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return 0, socket.gethostname()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
