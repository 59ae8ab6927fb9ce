"""Loading a base in 4 bits with bitsandbytes, for QLIFT and QLoRA: the settings, named as TRL's ``ModelConfig``
names them (``load_in_4bit``, ``bnb_4bit_quant_type``, ``use_bnb_nested_quant``), checked before any weight loads."""

from __future__ import annotations

import importlib.util

import torch

QUANT_TYPES = ("nf4", "fp4")
INSTALL = "pip install 'liftft[bnb]'"
# Methods that cannot train on a 4-bit base, and what to do instead.
REFUSED = {
    "full": "full fine-tuning updates every weight, and 4-bit weights cannot be updated; train a sparse method "
            "(QLIFT) or lora/dora (QLoRA/QDoRA) on the 4-bit base, or drop --load-in-4bit",
    "pissa": "PiSSA initializes its adapter from the SVD of the 16-bit weights; use lora or dora (QLoRA/QDoRA) "
             "on a 4-bit base, or drop --load-in-4bit",
}


def require_bitsandbytes() -> None:
    """Raise ValueError naming the extra to install when bitsandbytes is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"--load-in-4bit needs bitsandbytes, which is not installed: {INSTALL}")


def check_4bit_settings(method: str, *, fsdp: bool, load_in_4bit: bool, quant_type: str = "nf4",
                        nested: bool = False) -> None:
    """Raise ValueError, naming the flag, for 4-bit settings liftft cannot run: a quant type other than nf4/fp4,
    quantization flags without --load-in-4bit, a method that needs 16-bit weights, --fsdp."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"--bnb-4bit-quant-type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    if not load_in_4bit:
        if nested or quant_type != "nf4":
            flag = "--use-bnb-nested-quant" if nested else "--bnb-4bit-quant-type"
            raise ValueError(f"{flag} sets how a 4-bit base is quantized: it needs --load-in-4bit")
        return
    if method in REFUSED:
        raise ValueError(f"--method {method} cannot run with --load-in-4bit: {REFUSED[method]}")
    if fsdp:
        raise ValueError("--fsdp cannot shard a 4-bit base (bitsandbytes' packed weights do not shard with FSDP2); "
                         "drop --fsdp: each process then holds the whole 4-bit model, which is what makes it fit, "
                         "and torchrun/accelerate launch still split the batches")


def load_settings(quant_type: str, nested: bool) -> dict:
    """How a 4-bit base was loaded, as a delta's liftft.json records it: ``BitsAndBytesConfig``'s own keywords."""
    return {"load_in_4bit": True, "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": nested}


def bnb_config(quant_type: str, nested: bool, compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for a 4-bit base computing in ``compute_dtype``."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=nested,
                              bnb_4bit_compute_dtype=compute_dtype)
