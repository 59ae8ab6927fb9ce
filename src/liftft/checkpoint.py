"""Atomic training checkpoints: a kill during a save leaves the previous checkpoint loadable."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from liftft.atomic import atomic_directory, atomic_write

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"


def save_checkpoint(output_dir, step: int, *, tensors: dict[str, torch.Tensor] | None, write_extra=None,
                    state: dict) -> Path:
    """Write checkpoint ``step`` under ``output_dir``/checkpoints and point LATEST at it.

    ``tensors`` (trainable weights) go to weights.safetensors; ``write_extra(dir)``
    may add files (a delta); ``state`` (optimizer, scheduler, RNG, position:
    tensors and plain values only) goes to state.pt, read back with
    ``weights_only=True``. Everything is written into a temporary directory that
    is renamed into place (:func:`liftft.atomic.atomic_directory`), then LATEST
    is replaced atomically, then older checkpoints are removed.
    """
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    with atomic_directory(final) as tmp:
        if tensors is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "weights.safetensors")
        if write_extra is not None:
            write_extra(tmp)
        torch.save(state, tmp / "state.pt")
    atomic_write(root / LATEST, lambda tmp: Path(tmp).write_text(final.name))
    for old in root.iterdir():
        if old.name not in (final.name, LATEST) and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    return final


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
