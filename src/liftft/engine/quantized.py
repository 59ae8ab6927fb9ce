"""QLIFT: LIFT on a bitsandbytes 4-bit base (a model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``).

A target that is a bitsandbytes ``Linear4bit`` keeps its packed weight W₄ and its quantization constants frozen,
bit for bit. What LIFT trains lives beside them, in a :class:`QuantizedTarget`: the sorted flat indices of every
entry ever selected, and those entries' trained values in fp32. The layer computes with
W = dequant(W₄) + Δ, Δ being the trained values minus dequant(W₄) at those entries and zero elsewhere, in one
matmul (:class:`QuantizedLinearFunction`): forward keeps only its input, backward dequantizes again, and the
weight gradient is computed at the selected entries only, never as a dense m×n matrix.

The optimizer keys such a target's state by :attr:`QuantizedTarget.key`, a stand-in of the matrix's shape that
holds no storage, and steps its trained values in place of a weight's.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from liftft.engine.layout import find_sorted, index_dtype, merge_sorted

# Called in backward as sink(key, grad_output, input), like liftft.engine.sampled's GradSink.
QuantizedSink = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
# The module attribute that holds a Linear4bit's QuantizedTarget once its forward is routed.
ATTRIBUTE = "liftft_quantized"


def is_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` (whatever its quant type), without importing bitsandbytes."""
    return any(cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")
               for cls in type(module).__mro__)


def dequantize(module: nn.Module) -> torch.Tensor:
    """dequant(W₄) of a ``Linear4bit``, (out_features, in_features), in the dtype the weight was quantized from."""
    import bitsandbytes.functional as bnbF

    weight = module.weight
    return bnbF.dequantize_4bit(weight.data, weight.quant_state)


def packed_fingerprint(module: nn.Module) -> str:
    """sha256 of a ``Linear4bit``'s packed weight and quantization constants (the nested ones too)."""
    state = module.weight.quant_state
    parts = [module.weight.data, state.absmax]
    if state.nested:
        parts += [state.state2.absmax, torch.as_tensor(state.offset)]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def load_hint(settings: dict) -> str:
    """How to load a base quantized as ``settings`` (:meth:`QuantizedTarget.settings`) says, in transformers' words."""
    return (f"BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={settings['quant_type']!r}, "
            f"bnb_4bit_use_double_quant={settings['nested']})")


class QuantizedTarget:
    """One ``Linear4bit`` target: its frozen packed base, and the trained entries that stand in for its values.

    ``index`` holds the sorted flat indices of every entry ever selected and
    ``values`` their trained values (fp32). :meth:`include` adds newly
    selected entries at their dequantized values; :meth:`attach` routes the
    module's forward through :class:`QuantizedLinearFunction`.
    """

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.shape = tuple(module.weight.quant_state.shape)
        device = module.weight.device
        self.index = torch.zeros(0, dtype=index_dtype(self.shape[0] * self.shape[1]), device=device)
        self.values = torch.zeros(0, dtype=torch.float32, device=device)
        # Keys the optimizer's state: the matrix's shape and device, no storage.
        self.key = torch.zeros((), dtype=torch.float32, device=device).expand(self.shape)
        # Receives (key, dY, X) in backward while an optimizer trains this target; None otherwise.
        self.sink: QuantizedSink | None = None
        # An input that requires grad, so that backward reaches the layer even when nothing before it trains.
        self._anchor = torch.zeros(0, device=device, requires_grad=True)

    @property
    def device(self) -> torch.device:
        return self.index.device

    def settings(self) -> dict:
        """How the base is quantized, as a delta records it: the quant type, nested quantization, block size and
        dequantized dtype, and the sha256 of the packed weight and its constants."""
        state = self.module.weight.quant_state
        return {"quant_type": state.quant_type, "nested": bool(state.nested), "blocksize": state.blocksize,
                "dtype": str(state.dtype).removeprefix("torch."), "packed_sha256": packed_fingerprint(self.module)}

    def trained_values(self, index: torch.Tensor) -> torch.Tensor:
        """The fp32 trained values of the sorted flat ``index`` entries (all trained)."""
        return self.values.index_select(0, self.positions(index))

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """dequant(W₄) + Δ as a dense matrix in ``dtype`` (default: the dequantized dtype)."""
        weight = dequantize(self.module)
        if dtype is not None:
            weight = weight.to(dtype)
        weight.view(-1).index_put_((self.index.long(),), self.values.to(weight.dtype))
        return weight

    def include(self, selected: torch.Tensor, base: torch.Tensor | None = None) -> None:
        """Add the sorted flat ``selected`` entries not trained yet, at their dequantized values (``base``: the
        dequantized matrix, when the caller has it)."""
        selected = selected.to(device=self.device, dtype=self.index.dtype)
        _, known = find_sorted(self.index, selected)
        new = selected[~known]
        if not new.numel():
            return
        base = dequantize(self.module) if base is None else base
        fresh = base.reshape(-1).index_select(0, new.long()).float()
        self.index, self.values = merge_sorted(self.index, self.values, new, fresh)

    def positions(self, selected: torch.Tensor) -> torch.Tensor:
        """Where each of the sorted flat ``selected`` entries (all trained) sits in :attr:`values`."""
        where, found = find_sorted(self.index, selected.to(device=self.device, dtype=self.index.dtype))
        if not bool(found.all()):
            raise RuntimeError(f"{self.name}: a selected entry has no trained value")
        return where

    def set_entries(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the trained entries by sorted flat ``index`` and fp32 ``values`` (a loaded delta)."""
        self.index = index.to(device=self.device, dtype=self.index.dtype)
        self.values = values.to(device=self.device, dtype=torch.float32)

    @property
    def attached(self) -> bool:
        """Whether the module's forward is routed through this target."""
        return getattr(self.module, ATTRIBUTE, None) is self

    def attach(self) -> None:
        """Route the module's forward through :class:`QuantizedLinearFunction` (once; the module keeps it, so the
        trained values stay in its output when an optimizer lets go of it)."""
        module = self.module
        if self.attached:
            return
        if "forward" in module.__dict__:
            raise ValueError(f"{self.name}'s module already has a replaced forward (an accelerate or PEFT hook?); "
                             "LIFT cannot route its 4-bit layer")

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not module.compute_type_is_set:  # as bitsandbytes' own forward picks its compute dtype
                module.set_compute_type(x)
                module.compute_type_is_set = True
            dtype = module.compute_dtype or x.dtype
            bias = None if module.bias is None else module.bias.to(dtype)
            anchor = self._anchor if self.sink is not None and torch.is_grad_enabled() else None
            return QuantizedLinearFunction.apply(x.to(dtype), self, bias, anchor).to(x.dtype)

        module.forward = forward
        setattr(module, ATTRIBUTE, self)

    def detach(self) -> None:
        """Give the module back bitsandbytes' forward, which computes with dequant(W₄) alone."""
        self.module.__dict__.pop("forward", None)
        self.module.__dict__.pop(ATTRIBUTE, None)


class QuantizedLinearFunction(torch.autograd.Function):
    """y = x (dequant(W₄) + Δ)ᵀ + b, keeping only x for backward, which dequantizes again and hands (dY, X) to the
    sink instead of forming the weight gradient."""

    @staticmethod
    def forward(ctx, x, target: QuantizedTarget, bias, anchor):
        ctx.save_for_backward(x)
        ctx.target = target
        return F.linear(x, target.dense(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_output @ ctx.target.dense(grad_output.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        if ctx.target.sink is not None:
            ctx.target.sink(ctx.target.key, grad_output, x)
        return grad_x, None, grad_bias, None


def parameter_count(model: nn.Module) -> int:
    """The values of ``model``'s parameters, each 4-bit weight counted as the matrix it stands for (as PEFT counts
    them), not as its packed bytes."""
    return sum(math.prod(p.quant_state.shape) if getattr(p, "quant_state", None) is not None else p.numel()
               for p in model.parameters())


def quantized_targets(model: nn.Module, names) -> dict[str, QuantizedTarget]:
    """{weight name: QuantizedTarget} for the names among ``names`` that are a ``Linear4bit``'s weight."""
    found = {}
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf == "weight" and is_4bit(module):
            found[name] = getattr(module, ATTRIBUTE, None) or QuantizedTarget(name, module)
    return found


def dequantized_model(model: nn.Module) -> nn.Module:
    """``model`` with every ``Linear4bit`` replaced by an ``nn.Linear`` holding dequant(W₄) + Δ in the model's dtype:
    the 16-bit model a 4-bit run trained (transformers' ``dequantize``, then the trained values written in)."""
    trained = {name: (target.index.long(), target.values) for name, module in model.named_modules()
               if (target := getattr(module, ATTRIBUTE, None)) is not None}
    model = model.dequantize()
    with torch.no_grad():
        for name, (index, values) in trained.items():
            weight = model.get_submodule(name).weight
            weight.view(-1).index_put_((index,), values.to(weight.dtype))
    return model
