"""Loading Hugging Face models and tokenizers from a hub id or a local directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from torch import nn
from packaging.version import Version
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

# transformers 4.56 renamed `torch_dtype` to `dtype`.
DTYPE_KEYWORD = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


def looks_local(path_or_id: str) -> bool:
    """Whether ``path_or_id`` can only be a local path: absolute, starting with . or ~, or deeper than a hub id's owner/name."""
    return os.path.isabs(path_or_id) or path_or_id.startswith((".", "~")) or path_or_id.count("/") > 1


def check_model_path(path_or_id: str) -> None:
    """Raise FileNotFoundError for a local-looking path that does not exist."""
    if looks_local(path_or_id) and not os.path.isdir(os.path.expanduser(path_or_id)):
        raise FileNotFoundError(f"model path {path_or_id!r} does not exist")


def check_model_files(path_or_id: str) -> None:
    """Raise, naming the directory and the file, for a local model directory that cannot load.

    That is one without config.json (FileNotFoundError), with a shard its
    safetensors index lists missing (FileNotFoundError), or with a weight file
    whose safetensors header is damaged, e.g. a truncated download
    (ValueError). Only headers are read, so this takes milliseconds where
    transformers would fail without naming the file. A hub id is left to
    transformers.
    """
    check_model_path(path_or_id)
    path = Path(path_or_id).expanduser()
    if not path.is_dir():
        return
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"model {path}: no {CONFIG_FILE}, so it is not a Hugging Face model directory")
    for name in _weight_files(path):
        if not (path / name).is_file():
            raise FileNotFoundError(f"model {path}: {name}, listed in {WEIGHTS_INDEX_FILE}, does not exist")
        _check_safetensors(path, name)


def _weight_files(path: Path) -> list[str]:
    """The safetensors files transformers loads from a model directory: the index's shards, else the single file."""
    index = path / WEIGHTS_INDEX_FILE
    if not index.is_file():
        return [WEIGHTS_FILE] if (path / WEIGHTS_FILE).is_file() else []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"model {path}: {WEIGHTS_INDEX_FILE} is damaged ({err})") from err
    if not isinstance(weight_map, dict):
        raise ValueError(f"model {path}: {WEIGHTS_INDEX_FILE} is damaged (no 'weight_map' object)")
    return sorted(set(weight_map.values()))


def _check_safetensors(path: Path, name: str) -> None:
    """Open a safetensors file, which reads its header and checks it against the file's size."""
    try:
        with safe_open(path / name, framework="pt"):
            pass
    except SafetensorError as err:
        raise ValueError(f"model {path}: {name} is damaged ({err})") from err


def load_config(path_or_id: str):
    """The model's AutoConfig alone, no weights, after :func:`check_model_files`: what can be decided before loading."""
    check_model_files(path_or_id)
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(path_or_id))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot read the config of model {path_or_id!r}: {err}") from err


def load_model(path_or_id: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               quantization_config=None):
    """AutoModelForCausalLM from a hub id or local directory, in ``dtype`` on ``device``.

    A local directory is checked by :func:`check_model_files` first. With a
    ``quantization_config`` (a 4-bit base, :mod:`liftft.utils.quantization`)
    the weights are quantized as they load onto ``device``.
    """
    check_model_files(path_or_id)
    placement = {} if quantization_config is None else {"quantization_config": quantization_config,
                                                         "device_map": {"": str(device)}}
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(path_or_id), **{DTYPE_KEYWORD: dtype},
                                                     **placement)
    except OSError as err:
        raise FileNotFoundError(f"cannot load model {path_or_id!r}: {err}") from err
    except SafetensorError as err:
        # A hub model's cached download, which check_model_files does not read.
        raise ValueError(f"model {path_or_id!r}: a safetensors file is damaged ({err})") from err
    return model if quantization_config is not None else model.to(device)


def set_activation_checkpointing(model, enabled: bool) -> None:
    """Recompute each layer's activations in backward (non-reentrant) or stop doing so, by the name this
    transformers has (5.x renamed gradient checkpointing to activation checkpointing); the KV cache goes with it."""
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    model.config.use_cache = not enabled


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


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` whose class its ``_no_split_modules`` names (a transformers model's decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"--fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules), so "
                         "liftft cannot tell which modules to shard")
    return layers
