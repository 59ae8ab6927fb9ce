"""The output directory of a `liftft train` run: who may write it, whether a run there continues, what to clean.

One run per directory: the first run creates ``DIR/.liftft.lock`` with
O_CREAT | O_EXCL, holding its pid and host; a second one is refused, naming
the holder. Two runs on one ``--output`` would otherwise both write there and
both report success. A lock whose process is gone (a killed run) is taken over
with a message; one written on another host cannot be checked from here, so it
is honoured, and the message says how to remove it.

A directory may hold only this run: a new one, or the same settings again with
``--resume``, which may change the few settings the caller names changeable
(`liftft train`: the learning rate and the schedule's length; run.json records
each change under ``changes``). The comparison leaves out the output path (a run
dir may move) and resolves local model and data paths (``runs/x`` and
``/abs/runs/x`` are one).
Holding the lock, a run removes what interrupted writes of its own files left.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

from liftft.utils import distributed
from liftft.utils.atomic import remove_leftovers
from liftft.training.checkpoint import remove_checkpoint_leftovers
from liftft.utils.hf import looks_local
from liftft.utils.outputs import check_output_dir, differing_settings, not_writable, refuse_non_directory

RUN_FILE = "run.json"
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
    """Create ``lock`` holding this process's pid and host; FileExistsError if it exists.

    The lock appears with its contents (a hard link to a file already
    written): created empty and then written, it could be read empty in
    between by a second run, which would take it as abandoned and take it over.
    """
    fd, written = tempfile.mkstemp(dir=lock.parent, prefix=f".{lock.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        try:
            os.link(written, lock)
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links: an exclusive create, with its tiny empty window
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
    finally:
        os.unlink(written)


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


def take(output: Path) -> Path | None:
    """Rank 0 takes ``output``'s lock (returned), which shows the dir writable; every rank raises if it could not."""
    lock, error = None, None
    if distributed.is_main_process():
        try:
            refuse_non_directory(output, "--output")
            lock = acquire(output)
        except OSError as err:
            error = not_writable(output, "--output", err)
        except ValueError as err:
            error = err
    (failed,) = distributed.sum_across_ranks([float(error is not None)])
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"rank 0 could not take output dir {output}; see its error")
    return lock


def check_continues(output: Path, record: dict, defaults: dict, resume: bool,
                    changeable: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Raise ValueError unless ``output`` is new, or holds the run of settings ``record`` and ``resume`` is set.

    ``defaults`` gives the value of each setting an older liftft did not record.
    The settings named in ``changeable`` may differ on ``resume`` unless the run
    finished: returned as {name: (recorded value, value in ``record``)}, empty
    when none differs.
    """
    check_output_dir(output, RUN_FILE, "train run", ignore=(LOCK_FILE,))
    if not (output / RUN_FILE).is_file():
        return {}
    run = json.loads((output / RUN_FILE).read_text())
    recorded = _comparable(run.get("args", {}))
    differing = differing_settings(recorded, _comparable(record), _comparable(defaults))
    # A finished run changes no setting: resuming it would train again from its last checkpoint and replace its outputs.
    fixed = [name for name in differing if name not in changeable or run.get("status") == "done"]
    if fixed:
        raise ValueError(f"output dir {output} holds a different run (differs in: {', '.join(fixed)}); "
                         "choose another --output")
    with_defaults = {**defaults, **recorded}
    changed = {name: (with_defaults.get(name), record.get(name)) for name in differing}
    if not resume:
        if changed:
            was = ", ".join(f"{_flag(name)} {_shown(old)}" for name, (old, _) in changed.items())
            now = ", ".join(f"{_flag(name)} {_shown(new)}" for name, (_, new) in changed.items())
            raise ValueError(f"output dir {output} holds this run with {was}; pass --resume to continue it with "
                             f"{now} from its last checkpoint, or choose another --output")
        raise ValueError(f"output dir {output} already holds this run; pass --resume to continue it or choose another "
                         "--output")
    if run.get("world_size", 1) != distributed.world_size():
        raise ValueError(f"output dir {output} holds a run on {run.get('world_size', 1)} processes; resume it on as "
                         f"many (torchrun --nproc-per-node {run.get('world_size', 1)}), not {distributed.world_size()}")
    return changed


def recorded_changes(output: Path) -> list[dict]:
    """The changes of settings on earlier resumptions that ``output``'s run.json records (``changes``), oldest first."""
    path = output / RUN_FILE
    return list(json.loads(path.read_text()).get("changes", [])) if path.is_file() else []


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def remove_run_leftovers(output: Path, names: tuple[str, ...]) -> list[Path]:
    """Remove what killed writes of the run's files ``names`` and of its checkpoints left in ``output``."""
    return [*(path for name in names for path in remove_leftovers(output / name)), *remove_checkpoint_leftovers(output)]


def remove_if_empty(output: Path, log_name: str | None = None) -> None:
    """Remove ``output`` if nothing is in it (a run that failed before writing anything); its log ``log_name``
    alone, without a run.json, counts as nothing (a next run would otherwise refuse the directory as foreign)."""
    if log_name is not None and output.is_dir() and not (output / RUN_FILE).exists():
        if {p.name for p in output.iterdir()} == {log_name}:
            (output / log_name).unlink(missing_ok=True)
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()


def _comparable(record: dict) -> dict:
    record = {k: v for k, v in record.items() if k != "output"}
    if isinstance(record.get("model"), str):
        record["model"] = _resolved(record["model"])
    if isinstance(record.get("data"), list):
        record["data"] = [_resolved(d) for d in record["data"]]
    return record


def _resolved(path_or_id: str) -> str:
    local = looks_local(path_or_id) or os.path.exists(os.path.expanduser(path_or_id))
    return str(Path(path_or_id).expanduser().resolve()) if local else path_or_id
