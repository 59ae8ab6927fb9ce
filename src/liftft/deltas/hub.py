"""Deltas on the Hugging Face Hub: load one (local or hub) as a ready model, and share one with its model card."""

from __future__ import annotations

from pathlib import Path

import torch

from liftft.deltas.card import CARD_FILE, write_model_card
from liftft.deltas.delta import DELTA_FILE, META_FILE, load_delta
from liftft.utils.hf import looks_local
from liftft.deltas.merge import load_merged

# What a delta repository holds; a Trainer checkpoint dir also holds a full model, which is never uploaded.
DELTA_FILES = [DELTA_FILE, META_FILE, CARD_FILE]


def delta_directory(delta: str | Path) -> Path:
    """The local directory holding ``delta``: ``delta`` itself when it is a local directory, else the snapshot of
    the hub repository ``delta`` (downloaded by huggingface_hub, or taken from its cache, offline included).

    Raises FileNotFoundError naming ``delta`` when it is neither.
    """
    path = Path(delta).expanduser()
    if path.is_dir():
        return path
    if looks_local(str(delta)) or path.exists():
        raise FileNotFoundError(f"delta {delta} is not a directory holding {DELTA_FILE} and {META_FILE}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(delta), allow_patterns=DELTA_FILES))
    except (OSError, ValueError) as err:  # huggingface_hub's HTTP, offline-cache and repo-id errors
        raise FileNotFoundError(f"delta {delta!r} is neither a local directory nor a hub repository that could be "
                                f"downloaded: {err}") from err


def from_pretrained(delta: str | Path, base: str | None = None, dtype: str | torch.dtype | None = None,
                    device: str | torch.device | None = None):
    """The base model with ``delta`` applied, exactly the trained weights: a transformers causal LM.

    ``delta`` is a local delta directory or a hub repository id (see
    :func:`delta_directory`); ``base`` (a local directory or hub id) defaults to
    the base model recorded in the delta's liftft.json. The delta is checked
    whole and applied in the dtype it was trained in, then the model is cast to
    ``dtype`` (None or "auto": keep that dtype) on ``device`` (default CPU).
    """
    directory = delta_directory(delta)
    loaded = load_delta(directory)
    base = base or loaded.meta.get("base_model")
    if not base:
        raise ValueError(f"delta {delta} records no base model; pass base= (a local directory or hub id)")
    return load_merged(base, loaded, directory, dtype=dtype, device=device or "cpu")


def push_to_hub(delta_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                commit_message: str = "Upload liftft delta"):
    """Upload the delta in ``delta_dir`` (delta.safetensors, liftft.json and its model card) to hub repo ``repo_id``.

    The repository is created if needed (``private`` then applies). The delta
    is checked whole before anything is uploaded; a directory without a
    README.md gets the model card of :mod:`liftft.deltas.card` written into it first.
    Nothing else in the directory (a Trainer checkpoint's full model, say) is
    uploaded. Returns huggingface_hub's commit info.
    """
    from huggingface_hub import HfApi

    directory = Path(delta_dir).expanduser()
    delta = load_delta(directory)
    if not (directory / CARD_FILE).is_file():
        write_model_card(directory, delta.meta)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=directory, allow_patterns=DELTA_FILES,
                             commit_message=commit_message, repo_type="model")
