"""Triton kernels for LiftAdamW on CUDA: the fused sparse AdamW step, and the gather of selected gradients.

Both address a matrix's selected entries through LiftAdamW's compressed layout
(row offsets and narrow column indices, :mod:`liftft.engine.layout`): each entry finds
its row by a binary search over the row offsets, so no flat index is ever
materialised. :func:`sparse_adamw_step` reads, in one launch per target matrix,
the k gathered fp32 gradients, the two moments and the fp32 master values (or,
without masters, the selected weight entries), applies torch.optim.AdamW's
update, and writes the moments, the masters and the selected weight entries,
rounded to the weight's dtype, back. :func:`gather_selected` reads a dense
gradient at the selected entries. The pure-torch paths of liftft.engine.functional stay the
CPU path and the reference these kernels are tested against (tests/test_kernels.py).

Triton is imported here only; liftft.engine.functional imports this module lazily, for
CUDA parameters, so CPU-only installs never need it. With ``TRITON_INTERPRET=1``
set before this module is imported, Triton's interpreter runs the same kernel
on CPU tensors: that is how the kernel is tested on machines without a GPU.
LiftAdamW still dispatches to it on CUDA only.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: liftft.engine.functional keeps its torch path
    triton = None

# Whether @triton.jit below builds interpreted kernels; Triton decides at decoration, so it is read once here.
INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")

# Set LIFTFT_NO_TRITON=1 to run the torch path on CUDA too (to compare, or to rule the kernel out).
DISABLE_ENV = "LIFTFT_NO_TRITON"
BLOCK_SIZE = 1024


def fused_available(device: torch.device | str) -> bool:
    """True when LiftAdamW should use the kernels on ``device``: CUDA, Triton compiled (not interpreted), LIFTFT_NO_TRITON unset."""
    return (
        triton is not None
        and not INTERPRETED
        and torch.device(device).type == "cuda"
        and os.environ.get(DISABLE_ENV, "") in ("", "0")
    )


def kernels_run_on(device: torch.device | str) -> bool:
    """True when this module's kernels can run on tensors on ``device``: CUDA with Triton, or the CPU under its interpreter."""
    kind = torch.device(device).type
    return triton is not None and (kind == "cuda" or (kind == "cpu" and INTERPRETED))


def sparse_adamw_step(
    weight: torch.Tensor,
    row_offsets: torch.Tensor,
    columns: torch.Tensor,
    n_columns: int,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    master: torch.Tensor | None,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip: torch.Tensor | None = None,
) -> None:
    """One AdamW step, in place and in one kernel, on the selected entries of the flat tensor ``weight``.

    The entries are those of :func:`liftft.engine.layout.compress`'s ``(row_offsets,
    columns)`` in a matrix of ``n_columns`` columns. The update is
    :func:`liftft.engine.functional.adamw_update` applied to ``master`` (fp32, length k), or
    to the selected entries of ``weight`` widened to fp32 when ``master`` is
    None; the new values go to ``master`` and, rounded to ``weight``'s dtype, to
    the weight. ``grad``, ``exp_avg`` and ``exp_avg_sq`` are contiguous fp32 of
    length k; ``grad`` is first multiplied by the 0-d tensor ``clip`` when given,
    read on the device. ``step`` is the step number after this update's
    increment, a host int, so nothing syncs. On the CPU it runs only under
    Triton's interpreter (see the module docstring).
    """
    k = _check_layout(weight, row_offsets, columns)
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("master", master)):
        if t is not None and (t.dtype != torch.float32 or t.numel() != k or not t.is_contiguous()):
            raise ValueError(f"{name} must be contiguous fp32 with {k} entries, got {t.dtype} {tuple(t.shape)}")
    if k == 0:
        return
    bias_correction1 = 1 - beta1**step
    # torch divides a CUDA tensor by a Python scalar as a multiplication by its fp32 reciprocal; so does the kernel.
    inverse_bias_correction2_sqrt = 1.0 / _fp32(math.sqrt(1 - beta2**step))
    _sparse_adamw_kernel[(triton.cdiv(k, BLOCK_SIZE),)](
        weight, row_offsets, columns, grad, exp_avg, exp_avg_sq,
        exp_avg if master is None else master,  # never read without HAS_MASTER
        grad if clip is None else clip,  # never read without HAS_CLIP
        k, row_offsets.numel() - 1, n_columns,
        1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, inverse_bias_correction2_sqrt, eps, -lr / bias_correction1,
        HAS_MASTER=master is not None,
        HAS_CLIP=clip is not None,
        LERP_FROM_START=abs(1 - beta1) < 0.5,
        SEARCH_STEPS=_search_steps(row_offsets),
        BLOCK=BLOCK_SIZE,
        enable_fp_fusion=False,
    )


def gather_selected(grad: torch.Tensor, row_offsets: torch.Tensor, columns: torch.Tensor, n_columns: int) -> torch.Tensor:
    """The entries of the flat gradient ``grad`` selected by ``(row_offsets, columns)``, as a new fp32 tensor of length k."""
    k = _check_layout(grad, row_offsets, columns)
    out = torch.empty(k, dtype=torch.float32, device=grad.device)
    if k:
        _gather_kernel[(triton.cdiv(k, BLOCK_SIZE),)](
            grad, row_offsets, columns, out, k, row_offsets.numel() - 1, n_columns,
            SEARCH_STEPS=_search_steps(row_offsets), BLOCK=BLOCK_SIZE,
        )
    return out


def _check_layout(flat: torch.Tensor, row_offsets: torch.Tensor, columns: torch.Tensor) -> int:
    """k, after checking that the kernels can run on ``flat``'s device and that the layout is contiguous there."""
    if not kernels_run_on(flat.device):
        raise RuntimeError(f"liftft's Triton kernels need CUDA and Triton, or TRITON_INTERPRET=1 on the CPU "
                           f"(tensor is on {flat.device}, triton {'missing' if triton is None else 'present'})")
    for name, t in (("row_offsets", row_offsets), ("columns", columns)):
        if t.device != flat.device or not t.is_contiguous() or t.dim() != 1:
            raise ValueError(f"{name} must be a contiguous 1-D tensor on {flat.device}, got {tuple(t.shape)} on {t.device}")
    if columns.numel() >= 2**31:
        raise ValueError(f"{columns.numel():,} selected entries in one matrix; the kernels number entries with int32 "
                         f"(at most {2**31 - 1:,}); set {DISABLE_ENV}=1 to use the torch path")
    return columns.numel()


def _search_steps(row_offsets: torch.Tensor) -> int:
    """Halvings that narrow rows [0, m - 1] down to one: ceil(log2(m)), at least 1."""
    return max(1, (row_offsets.numel() - 2).bit_length())


def _fp32(value: float) -> float:
    return torch.tensor(value, dtype=torch.float32).item()


if triton is not None:

    @triton.jit
    def _flat_indices(row_offsets_ptr, columns_ptr, entries, mask, n_rows, n_cols, SEARCH_STEPS: tl.constexpr):
        """Flat indices of the selected ``entries``: each lies in the last row whose offset is <= it."""
        lo = tl.zeros_like(entries)
        hi = tl.zeros_like(entries) + (n_rows - 1)
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo + hi + 1) // 2
            right = tl.load(row_offsets_ptr + mid, mask=mask, other=0) <= entries
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid - 1)
        column = tl.load(columns_ptr + entries, mask=mask, other=0)
        return lo.to(tl.int64) * n_cols + column.to(tl.int64)

    @triton.jit
    def _gather_kernel(grad_ptr, row_offsets_ptr, columns_ptr, out_ptr, k, n_rows, n_cols,
                       SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):
        entries = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = entries < k
        idx = _flat_indices(row_offsets_ptr, columns_ptr, entries, mask, n_rows, n_cols, SEARCH_STEPS)
        tl.store(out_ptr + entries, tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32), mask=mask)

    @triton.jit
    def _sparse_adamw_kernel(
        weight_ptr, row_offsets_ptr, columns_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, master_ptr, clip_ptr,
        k, n_rows, n_cols,
        decay, one_minus_beta1, beta2, one_minus_beta2, inverse_bias_correction2_sqrt, eps, neg_step_size,
        HAS_MASTER: tl.constexpr, HAS_CLIP: tl.constexpr, LERP_FROM_START: tl.constexpr,
        SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < k
        idx = _flat_indices(row_offsets_ptr, columns_ptr, offsets, mask, n_rows, n_cols, SEARCH_STEPS)
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
        if HAS_CLIP:
            g = g * tl.load(clip_ptr)
        m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
        if HAS_MASTER:
            p = tl.load(master_ptr + offsets, mask=mask, other=0.0)
        else:
            p = tl.load(weight_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        # Each line is one op of adamw_update as torch's CUDA kernels compute it: param.mul_; exp_avg.lerp_ (torch's
        # two-branch formula, which nvcc contracts into an FMA); exp_avg_sq.mul_ then addcmul_ (fma(value, b·c, a));
        # the denominator (division by a scalar is a multiplication by its reciprocal); addcdiv_ (fma(value, b/c, a)).
        # Those FMAs are explicit tl.fma, and the launch turns off Triton's own contraction everywhere else.
        # (With beta2 = 0 torch's addcmul_ takes another branch, fma(b, c, a): bit-exactness assumes beta2 > 0.)
        p = p * decay
        if LERP_FROM_START:
            m = tl.fma(one_minus_beta1, g - m, m)
        else:
            m = tl.fma(-(g - m), 1.0 - one_minus_beta1, g)
        v = v * beta2
        v = tl.fma(one_minus_beta2, g * g, v)
        denom = tl.sqrt_rn(v) * inverse_bias_correction2_sqrt
        denom = denom + eps
        p = tl.fma(neg_step_size, tl.div_rn(m, denom), p)
        tl.store(exp_avg_ptr + offsets, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)
        if HAS_MASTER:
            tl.store(master_ptr + offsets, p, mask=mask)
        tl.store(weight_ptr + idx, p.to(weight_ptr.dtype.element_ty), mask=mask)
