"""A model as bitsandbytes 4-bit loading leaves it (``BitsAndBytesConfig(load_in_4bit=True)``): the bytes it holds,
from its shapes alone (for `liftft estimate`), and a random model quantized in place (for `liftft bench`).

transformers quantizes every ``nn.Linear`` but the output embedding; each becomes
a ``Linear4bit`` holding, as bitsandbytes 0.49 and later lay it out:

- the packed weight: two 4-bit values per byte, ceil(m·n / 2) bytes;
- one absmax constant per block of 64 values: fp32, or with nested
  quantization one byte each plus, per 256 of them, an fp32 second-level
  constant, the second level's 256-entry fp32 code and an fp32 offset;
- the 16-entry fp32 code of its quant type (nf4 or fp4).

Every other parameter stays 16-bit (or whatever dtype it was loaded in).
tests/test_qlift_plan.py checks these counts against a real bitsandbytes model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

FOUR_BIT_ASSUMPTION = ("4-bit base as bitsandbytes loads it: every linear layer but the head packed, with its "
                       "constants; QLIFT keeps a flat index and an fp32 value per trained entry, dequantizes one "
                       "layer's weight at a time and samples its gradient (the fp32 copies of that layer's output "
                       "gradient and input are not counted); QLoRA's prepare_model_for_kbit_training casts the "
                       "unquantized parameters to fp32")
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
CODE_BYTES = 16 * 4
NESTED_CODE_BYTES = 256 * 4
FP32 = 4


def packed_bytes(shape: tuple[int, int], nested: bool) -> int:
    """Bytes bitsandbytes keeps for one (m, n) weight quantized to 4 bits: packed values, constants and codes."""
    numel = math.prod(shape)
    blocks = -(-numel // BLOCKSIZE)
    total = -(-numel // 2) + CODE_BYTES
    if nested:
        return total + blocks + FP32 * -(-blocks // NESTED_BLOCKSIZE) + NESTED_CODE_BYTES + FP32
    return total + FP32 * blocks


def quantized_weights(model: nn.Module) -> set[int]:
    """ids of the weights transformers quantizes to 4 bits: every nn.Linear's but the output embedding's."""
    head = model.get_output_embeddings()
    return {id(module.weight) for module in model.modules()
            if isinstance(module, nn.Linear) and module is not head}


def model_bytes(model: nn.Module, nested: bool, rest_bytes: int | None = None) -> int:
    """Bytes of ``model`` (built on the meta device) once loaded in 4 bits; ``rest_bytes`` per value of every
    parameter left unquantized (default: its own dtype's)."""
    quantized = quantized_weights(model)
    return sum(packed_bytes(tuple(p.shape), nested) if id(p) in quantized
               else p.numel() * (p.element_size() if rest_bytes is None else rest_bytes)
               for p in model.parameters())


@torch.no_grad()
def quantize_4bit(model, quant_type: str, nested: bool, device: torch.device) -> None:
    """Replace every nn.Linear of ``model`` but its head by a bitsandbytes ``Linear4bit`` holding its weight
    quantized, computing in the model's dtype, as transformers' ``load_in_4bit`` loading leaves a model."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    linears = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and module is not head]
    for name, linear in linears:
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=linear.weight.dtype, quant_type=quant_type,
                                      compress_statistics=nested, device="meta")
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type=quant_type,
                                             compress_statistics=nested)
        if linear.bias is not None:
            quantized.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, quantized.to(device))
