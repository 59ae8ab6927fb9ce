"""Atomic training checkpoints: a kill during a save leaves the previous checkpoint loadable."""

from __future__ import annotations

import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from liftft.utils.atomic import atomic_directory, atomic_write, remove_leftovers

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
# A checkpoint whose weights made the next loss non-finite is kept under this prefix, out of --resume's way.
DIVERGED_PREFIX = "diverged-"


def save_checkpoint(output_dir, step: int, *, tensors: dict[str, torch.Tensor] | None, write_extra=None,
                    state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``output_dir``/checkpoints and point LATEST at it.

    ``tensors`` (trainable weights) go to weights.safetensors; ``write_extra(dir)``
    may add files (a delta); ``state`` (optimizer, scheduler, RNG, position:
    tensors and plain values only) goes to state.pt, read back with
    ``weights_only=True``. Everything is written into a temporary directory that
    is renamed into place (:func:`liftft.utils.atomic.atomic_directory`), then LATEST
    is replaced atomically, then all but the newest ``keep`` checkpoints are
    removed, so a bad step cannot take the only good state with it.
    """
    root = Path(output_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    with atomic_directory(final) as tmp:
        if tensors is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "weights.safetensors")
        if write_extra is not None:
            write_extra(tmp)
        torch.save(state, tmp / "state.pt")
    atomic_write(root / LATEST, lambda tmp: Path(tmp).write_text(final.name))
    prune_checkpoints(output_dir, keep)
    return final


def prune_checkpoints(output_dir, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints under ``output_dir``/checkpoints."""
    for old in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def set_aside_diverged(output_dir, step: int) -> tuple[Path | None, Path | None]:
    """Move checkpoint ``step``, whose weights made the next step's loss non-finite, out of --resume's way.

    It is renamed to ``checkpoints/diverged-step-N`` (replacing an earlier one
    of that step), where :func:`checkpoints` and --resume do not look, and
    LATEST is pointed at the newest checkpoint before it (removed when there is
    none). Returns (where it went or None if there was no such checkpoint, the
    checkpoint LATEST now names or None).
    """
    root = Path(output_dir) / CHECKPOINTS
    bad = root / checkpoint_name(step)
    moved = None
    if bad.is_dir():
        moved = root / f"{DIVERGED_PREFIX}{bad.name}"
        if moved.exists():
            shutil.rmtree(moved)
        bad.rename(moved)
    good = [c for c in checkpoints(output_dir) if checkpoint_step(c) < step]
    if good:
        atomic_write(root / LATEST, lambda tmp: Path(tmp).write_text(good[-1].name))
    else:
        (root / LATEST).unlink(missing_ok=True)
    return moved, good[-1] if good else None


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint directory named by :func:`checkpoint_name`."""
    return int(Path(path).name.removeprefix("step-"))


def checkpoint_name(step: int) -> str:
    """The directory name of checkpoint ``step`` under ``output_dir``/checkpoints."""
    return f"step-{step:08d}"


def checkpoints(output_dir) -> list[Path]:
    """The checkpoint directories under ``output_dir``/checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def remove_checkpoint_leftovers(output_dir) -> list[Path]:
    """Remove what killed checkpoint writes left under ``output_dir``/checkpoints (see :func:`liftft.utils.atomic.remove_leftovers`)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    names = {LATEST} | {m.group(1) for p in root.iterdir() if (m := re.match(r"\.(step-\d{8})\.", p.name))}
    return [path for name in sorted(names) for path in remove_leftovers(root / name)]


def latest_checkpoint(output_dir) -> Path | None:
    """The checkpoint LATEST points to, or None when there is none."""
    pointer = Path(output_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"{pointer} points to {path}, which is missing or incomplete")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """(trainable weights or None, state) of a checkpoint directory."""
    weights = path / "weights.safetensors"
    tensors = load_file(weights) if weights.is_file() else None
    return tensors, torch.load(path / "state.pt", weights_only=True)


# What torch.save's C++ writer says when a write fails (a full disk, a vanished mount): it names neither.
_WRITE_FAILURE = re.compile(r"file write failed|iostream|unexpected pos", re.IGNORECASE)


@contextmanager
def disk_errors_named(directory):
    """Re-raise a failed write inside the block as an OSError naming ``directory`` and the space left on its disk."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not _WRITE_FAILURE.search(str(err)):
            raise
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[-1]
        raise OSError(f"cannot write under {directory}: {reason} ({_free_space(directory)} free on its disk)") from err


def _free_space(directory) -> str:
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 2**30:.2f} GiB"
    except OSError:
        return "unknown space"
