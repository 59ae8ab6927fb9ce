"""Sampled weight gradients: a target Linear's dL/dW computed only at the selected entries.

The weight gradient of y = x Wᵀ + b is dYᵀ X, summed over tokens. LIFT keeps only
k of its m·n entries, so :class:`SampledLinearFunction` hands dY and X to a sink
instead, and :func:`sampled_weight_grad` computes just the selected entries,
Σ_t dY[t, i]·X[t, j] for each selected (i, j): a sampled dense-dense product
(SDDMM). The dense m×n gradient is never formed.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from liftft.engine.layout import compress

# Called in backward as sink(weight, grad_output, input), weight being the target parameter as
# given (not the tensor autograd saved: activation checkpointing hands back a different object).
GradSink = Callable[[nn.Parameter, torch.Tensor, torch.Tensor], None]


def sampled_weight_grad(
    grad_output: torch.Tensor, inputs: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """fp32 values of the Linear weight gradient ``grad_outputᵀ @ inputs`` at flat ``indices`` of an (m, n) weight.

    ``grad_output`` is (..., m) and ``inputs`` (..., n), leading dimensions being
    tokens; ``indices`` must be sorted and unique, as LiftAdamW keeps them. The
    result is in the order of ``indices``. It is computed with
    ``torch.sparse.sampled_addmm`` over the CSR pattern of the indices, in fp32
    (the only dtype it supports; 16-bit inputs are widened exactly), so the
    dense m×n gradient is never formed.
    """
    return sampled_weight_grad_at(grad_output, inputs, *compress(indices, shape), shape)


def sampled_weight_grad_at(
    grad_output: torch.Tensor, inputs: torch.Tensor, row_offsets: torch.Tensor, columns: torch.Tensor,
    shape: tuple[int, int],
) -> torch.Tensor:
    """:func:`sampled_weight_grad` for entries given in LiftAdamW's compressed layout (:func:`liftft.engine.layout.compress`)."""
    m, n = shape
    dy = grad_output.reshape(-1, m).float()
    x = inputs.reshape(-1, n).float()
    values = torch.zeros(columns.numel(), dtype=torch.float32, device=columns.device)
    with warnings.catch_warnings():
        # torch warns once that sparse CSR support is "beta"; the op itself is what we want.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(row_offsets, columns.to(row_offsets.dtype), values, (m, n),
                                          check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, dy.t(), x, beta=0.0).values()


class SampledLinearFunction(torch.autograd.Function):
    """``F.linear`` whose backward calls ``on_weight_grad(dY, X)`` instead of returning a dense weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, on_weight_grad: Callable[[torch.Tensor, torch.Tensor], None]):
        ctx.save_for_backward(x, weight)
        ctx.on_weight_grad = on_weight_grad
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            # Under autocast dY is 16-bit while x and W may be fp32: compute as autocast did, return x's dtype.
            grad_x = (grad_output @ weight.to(grad_output.dtype)).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        if ctx.needs_input_grad[1]:
            ctx.on_weight_grad(grad_output, x)
        return grad_x, None, grad_bias, None


class SampledForward:
    """Handle for one Linear routed through :class:`SampledLinearFunction`; ``remove()`` restores its own forward."""

    def __init__(self, module: nn.Linear):
        self.module = module

    def remove(self) -> None:
        """Give the module back its class's forward."""
        self.module.__dict__.pop("forward", None)


def sample_weight_gradients(model: nn.Module, targets: dict[str, nn.Parameter], sink: GradSink) -> list[SampledForward]:
    """Route every target's nn.Linear through :class:`SampledLinearFunction`, calling ``sink`` in backward.

    ``targets`` maps weight names (as in ``model.named_parameters()``) to the
    weights. Each must be the weight of a plain nn.Linear whose forward has not
    been replaced already (e.g. by an accelerate hook); all are checked before
    any is changed. The targets then never receive a dense ``.grad``. The
    patched forwards refer to ``model``'s own modules, so deep-copy a model
    before routing it, not after.
    """
    modules = [_plain_linear(model, name, weight) for name, weight in targets.items()]
    handles = []
    for module, weight in zip(modules, targets.values()):
        module.forward = _sampled_forward(module, functools.partial(sink, weight))
        handles.append(SampledForward(module))
    return handles


def _plain_linear(model: nn.Module, name: str, weight: nn.Parameter) -> nn.Linear:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if type(module) is not nn.Linear or leaf != "weight" or module.weight is not weight:
        raise ValueError(f"sampled_grad needs plain nn.Linear targets; {name} belongs to a {type(module).__name__}")
    if "forward" in module.__dict__:
        raise ValueError(f"{module_name} already has a replaced forward (an accelerate or PEFT hook?); "
                         "sampled_grad cannot route it")
    return module


def _sampled_forward(module: nn.Linear, on_weight_grad):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return SampledLinearFunction.apply(x, module.weight, module.bias, on_weight_grad)

    return forward
