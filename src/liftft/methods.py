"""The fine-tuning methods `liftft train` compares, each set up on a loaded model at the same budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from liftft.config import LiftConfig
from liftft.optim import LiftAdamW
from liftft.targets import find_targets

SPARSE_SELECTORS = {"lift": "principal", "magnitude": "magnitude", "random": "random",
                    "principal-smallest": "principal-smallest"}
PEFT_METHODS = ("lora", "dora", "pissa")
METHODS = (*SPARSE_SELECTORS, "full", *PEFT_METHODS)


@dataclass
class MethodSetup:
    """A model ready to train, with its optimizer and the number of trained values."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    trainable: int
    kind: str  # "sparse", "full" or "peft"


def setup_method(
    model: nn.Module,
    method: str,
    *,
    rank: int | None = 128,
    density: float | None = None,
    filter_rank: int = 64,
    update_interval: int | None = 400,
    target_modules="all-linear",
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    betas: tuple[float, float] = (0.9, 0.95),
    svd: str = "randomized",
    seed: int = 0,
    step_in_backward: bool = False,
) -> MethodSetup:
    """Prepare ``model`` for ``method`` and build its optimizer.

    Sparse methods (lift, magnitude, random, principal-smallest) use
    :class:`LiftAdamW` with that selector; ``full`` is torch AdamW over every
    parameter (fused on CUDA); lora, dora and pissa are PEFT adapters with
    r = ``rank``, alpha = 2r, on the same target modules, so a sparse method and
    a LoRA of the same rank train the same number of values. The sparse
    optimizer clips its own gradients with ``max_grad_norm``; for the others the
    training loop clips. ``step_in_backward`` is passed to :class:`LiftAdamW`
    (sparse methods only).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if method in SPARSE_SELECTORS:
        cfg = LiftConfig(rank=rank, density=density, filter_rank=filter_rank, update_interval=update_interval,
                         selector=SPARSE_SELECTORS[method], svd=svd, target_modules=target_modules, seed=seed)
        opt = LiftAdamW(model, cfg, lr=lr, betas=betas, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                        step_in_backward=step_in_backward)
        return MethodSetup(model, opt, opt.num_selected, "sparse")
    if step_in_backward:
        raise ValueError(f"step_in_backward is for the sparse methods ({', '.join(SPARSE_SELECTORS)}), not {method}")
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        opt = _adamw(list(model.parameters()), lr, betas, weight_decay)
        return MethodSetup(model, opt, sum(p.numel() for p in model.parameters()), "full")
    if density is not None:
        raise ValueError(f"--density has no meaning for {method}; PEFT adapters take --rank")
    model = _peft_model(model, method, rank, target_modules)
    params = [p for p in model.parameters() if p.requires_grad]
    return MethodSetup(model, _adamw(params, lr, betas, weight_decay), sum(p.numel() for p in params), "peft")


def _adamw(params, lr, betas, weight_decay) -> torch.optim.AdamW:
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


def _peft_model(model: nn.Module, method: str, rank: int, target_modules) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    modules = [name.removesuffix(".weight") for name in find_targets(model, target_modules)]
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=modules,
        use_dora=method == "dora",
        init_lora_weights="pissa" if method == "pissa" else True,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
