"""Loading Hugging Face models and tokenizers from a hub id or a local directory."""

from __future__ import annotations

import os

import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer

# transformers 4.56 renamed `torch_dtype` to `dtype`.
DTYPE_KEYWORD = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def looks_local(path_or_id: str) -> bool:
    """Whether ``path_or_id`` can only be a local path: absolute, starting with . or ~, or deeper than a hub id's owner/name."""
    return os.path.isabs(path_or_id) or path_or_id.startswith((".", "~")) or path_or_id.count("/") > 1


def check_model_path(path_or_id: str) -> None:
    """Raise FileNotFoundError for a local-looking path that does not exist."""
    if looks_local(path_or_id) and not os.path.isdir(os.path.expanduser(path_or_id)):
        raise FileNotFoundError(f"model path {path_or_id!r} does not exist")


def load_model(path_or_id: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """AutoModelForCausalLM from a hub id or local directory, in ``dtype`` on ``device``."""
    check_model_path(path_or_id)
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(path_or_id), **{DTYPE_KEYWORD: dtype})
    except OSError as err:
        raise FileNotFoundError(f"cannot load model {path_or_id!r}: {err}") from err
    return model.to(device)


def load_tokenizer(path_or_id: str):
    """AutoTokenizer from a hub id or local directory, with a pad token set."""
    check_model_path(path_or_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(path_or_id))
    except OSError as err:
        raise FileNotFoundError(f"cannot load tokenizer {path_or_id!r}: {err}") from err
    if tokenizer.pad_token is None:
        # Padding is masked by sequence lengths, never by token id, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
