"""AdamW on the selected entries of a matrix, as functions: the torch path, the Triton kernels, and the choice.

:func:`adamw_update` is torch.optim.AdamW's update written out; :func:`sparse_adamw`
applies it to the entries of a flat weight that LiftAdamW's compressed layout
(:mod:`liftft.engine.layout`) selects, and :func:`gather_selected` reads those entries
of a gradient. Both run as liftft.engine.kernels' Triton kernels on CUDA and as plain
torch elsewhere; the torch path is the reference the kernels are tested
against. This is torch.optim's own functional/fused split.

The kernels are not trusted blindly: the first time they would run on a
(device, dtype), :func:`kernel_mismatch` runs one small step through both paths.
If the kernels raise or disagree beyond :data:`KERNEL_TOLERANCE`, liftft warns
once, naming the mismatch, and uses the torch path there from then on.
``LIFTFT_NO_TRITON=1`` forces the torch path everywhere.
"""

from __future__ import annotations

import math
import warnings

import torch

from liftft.engine.layout import compress, expand

# How far the kernels may differ from the torch path at the start-up check: fp32 state relatively, and the weight
# by one unit in the last place of its dtype (torch's CPU and CUDA ops round differently from each other).
KERNEL_TOLERANCE = {"state_rtol": 1e-5, "atol": 1e-6}
# (device, dtype) -> whether the kernels agreed with the torch path there; filled on first use.
KERNEL_VERDICTS: dict[tuple[torch.device, torch.dtype], bool] = {}


def adamw_update(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay) -> None:
    """One torch.optim.AdamW update of fp32 ``param`` in place (decoupled decay, eps after sqrt(v̂)).

    ``step`` is the step number after this update's increment: an int, or a
    tensor with one step count per entry (``LiftConfig(bias_correction="entry")``).
    """
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if torch.is_tensor(step):
        # The scalars of the int branch, entry by entry: computed in fp64 as Python does, used in fp32 as torch does.
        step = step.double()
        step_size = (lr / (1 - beta1**step)).float()
        bias_correction2_sqrt = (1 - beta2**step).sqrt().float()
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.sub_((exp_avg / denom).mul_(step_size))
        return
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def sparse_adamw(flat, row_offsets, columns, n_columns, grad, exp_avg, exp_avg_sq, master, step,
                 lr, beta1, beta2, eps, weight_decay, clip=None) -> None:
    """:func:`adamw_update` on the entries of the flat weight ``flat`` that ``(row_offsets, columns)`` select.

    The update is applied to ``master`` (fp32, one value per entry) when given,
    else to the selected entries widened to fp32, and written back to ``flat``
    rounded to its dtype. ``grad``, ``exp_avg`` and ``exp_avg_sq`` are fp32, one
    value per entry; ``clip``, a 0-d tensor, scales ``grad`` first. Runs as one
    Triton kernel where :func:`use_kernels` allows and ``step`` is an int, else
    as :func:`torch_sparse_adamw`.
    """
    if not torch.is_tensor(step) and use_kernels(flat):
        from liftft.engine.kernels import sparse_adamw_step

        sparse_adamw_step(flat, row_offsets, columns, n_columns, grad, exp_avg, exp_avg_sq, master, step,
                          lr, beta1, beta2, eps, weight_decay, clip=clip)
        return
    torch_sparse_adamw(flat, row_offsets, columns, n_columns, grad, exp_avg, exp_avg_sq, master, step,
                       lr, beta1, beta2, eps, weight_decay, clip=clip)


def torch_sparse_adamw(flat, row_offsets, columns, n_columns, grad, exp_avg, exp_avg_sq, master, step,
                       lr, beta1, beta2, eps, weight_decay, clip=None) -> None:
    """:func:`sparse_adamw` in plain torch: the CPU path, and the reference of the kernels."""
    adamw_at(flat, expand(row_offsets, columns, n_columns), grad, exp_avg, exp_avg_sq, master, step,
             lr, beta1, beta2, eps, weight_decay, clip=clip)


def adamw_at(flat, idx, grad, exp_avg, exp_avg_sq, master, step, lr, beta1, beta2, eps, weight_decay,
             clip=None) -> None:
    """:func:`adamw_update` on the entries ``idx`` (int64) of the 1-D ``flat`` (a weight, or a 4-bit target's
    trained values), on ``master`` when given, written back to ``flat`` rounded to its dtype."""
    if clip is not None:
        grad = grad * clip
    values = master if master is not None else flat.index_select(0, idx).float()
    adamw_update(values, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)
    flat.index_put_((idx,), values.to(flat.dtype))


def dense_adamw(p, grad, exp_avg, exp_avg_sq, master, step, lr, beta1, beta2, eps, weight_decay, clip=None) -> None:
    """:func:`adamw_update` on a whole parameter ``p``: in fp32 on ``master`` when given, else on p itself
    (widened to fp32 for 16-bit p), written back to p; ``clip``, a 0-d tensor, scales ``grad`` first."""
    grad = grad.float()
    if clip is not None:
        grad = grad * clip
    values = master if master is not None else (p.data if p.dtype == torch.float32 else p.data.float())
    adamw_update(values, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)
    if values is not p.data:
        p.data.copy_(values)


def gather_selected(grad, row_offsets, columns, n_columns) -> torch.Tensor:
    """The entries of the flat gradient ``grad`` that ``(row_offsets, columns)`` select, as new fp32 tensor."""
    if use_kernels(grad):
        from liftft.engine import kernels

        return kernels.gather_selected(grad, row_offsets, columns, n_columns)
    return torch_gather_selected(grad, row_offsets, columns, n_columns)


def torch_gather_selected(grad, row_offsets, columns, n_columns) -> torch.Tensor:
    """:func:`gather_selected` in plain torch: the CPU path, and the reference of the gather kernel."""
    return grad.index_select(0, expand(row_offsets, columns, n_columns)).float()


def gradient_norm(grads: list[torch.Tensor], global_norm=None):
    """The L2 norm over all of ``grads`` that torch.nn.utils.clip_grad_norm_ clips by, as a 0-d fp32 tensor.

    ``global_norm`` maps this process's norm to the norm over every process's
    pieces (FSDP2 shards); the result stays on the device, so nothing syncs.
    None when there is no gradient.
    """
    if not grads:
        return None
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    return total if global_norm is None else global_norm(total)


def clip_coefficient(total: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s factor min(1, max_norm / (total + 1e-6)) for a :func:`gradient_norm`."""
    return (max_norm / (total + 1e-6)).clamp(max=1.0)


def kernels_possible(t: torch.Tensor) -> bool:
    """Whether liftft.engine.kernels could run for ``t``: a CUDA tensor, Triton compiled, LIFTFT_NO_TRITON unset."""
    if not t.is_cuda:
        return False
    from liftft.engine.kernels import fused_available  # imports Triton, so only ever for CUDA tensors

    return fused_available(t.device)


def use_kernels(t: torch.Tensor) -> bool:
    """Whether ``t``'s step and gather run as kernels: :func:`kernels_possible`, and they passed their check there."""
    if not kernels_possible(t):
        return False
    key = (t.device, t.dtype)
    if key not in KERNEL_VERDICTS:
        mismatch = kernel_mismatch(t.device, t.dtype)
        if mismatch is not None:
            warnings.warn(f"liftft's Triton kernels disagree with the torch path on {t.device} for {t.dtype}: "
                          f"{mismatch}. LiftAdamW uses the torch path there from now on.", RuntimeWarning,
                          stacklevel=2)
        KERNEL_VERDICTS[key] = mismatch is None
    return KERNEL_VERDICTS[key]


def kernel_mismatch(device, dtype: torch.dtype) -> str | None:
    """How the kernels differ from the torch path on one small seeded step on (device, dtype); None if they agree."""
    from liftft.engine import kernels

    case, layout = _check_case(torch.device(device), dtype)
    fused, reference = ({key: value.clone() for key, value in case.items()} for _ in range(2))
    try:
        fused["gathered"] = kernels.gather_selected(fused["grad"], *layout)
        _check_step(kernels.sparse_adamw_step, fused, layout)
    except Exception as err:  # whatever goes wrong in a kernel is a reason to fall back, never to stop training
        return f"the kernel raised {type(err).__name__}: {err}"
    reference["gathered"] = torch_gather_selected(reference["grad"], *layout)
    _check_step(torch_sparse_adamw, reference, layout)
    for key in [key for key in ("gathered", "exp_avg", "exp_avg_sq", "master", "weight") if key in reference]:
        rtol = torch.finfo(dtype).eps if key == "weight" else KERNEL_TOLERANCE["state_rtol"]
        got, want = fused[key].float(), reference[key].float()
        error = (got - want).abs()
        if not bool((error <= rtol * want.abs() + KERNEL_TOLERANCE["atol"]).all()):
            return f"{key} differs by up to {error.max().item():.3g}"
    return None


def _check_case(device: torch.device, dtype: torch.dtype):
    """(tensors, layout) of the step :func:`kernel_mismatch` runs: 300 selected entries of a 37x29 weight."""
    gen = torch.Generator().manual_seed(0)
    shape, k = (37, 29), 300
    idx = torch.randperm(shape[0] * shape[1], generator=gen)[:k].sort().values
    weight = torch.randn(shape[0] * shape[1], generator=gen).to(dtype)
    case = {"weight": weight, "grad": torch.randn(weight.numel(), generator=gen).to(dtype),
            "exp_avg": torch.randn(k, generator=gen) * 1e-2, "exp_avg_sq": torch.rand(k, generator=gen) * 1e-4}
    if dtype != torch.float32:  # as LiftAdamW runs it: fp32 masters for 16-bit weights only
        case["master"] = weight[idx].float()
    row_offsets, columns = compress(idx, shape)
    return {key: value.to(device) for key, value in case.items()}, (row_offsets.to(device), columns.to(device), shape[1])


def _check_step(step, case: dict, layout) -> None:
    step(case["weight"], *layout, case["gathered"], case["exp_avg"], case["exp_avg_sq"], case.get("master"), 3,
         1e-3, 0.9, 0.999, 1e-8, 0.01, clip=torch.tensor(0.5, device=case["weight"].device))
