"""The fine-tuning methods `liftft train` compares, each set up on a loaded model at the same budget."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from liftft.engine.config import LiftConfig, clip_norm
from liftft.engine.optim import LiftAdamW
from liftft.engine.quantized import is_4bit
from liftft.engine.targets import find_targets
from liftft.engine.trainable import trainable_parameters
from liftft.utils.quantization import REFUSED

SPARSE_SELECTORS = {"lift": "principal", "magnitude": "magnitude", "random": "random",
                    "principal-smallest": "principal-smallest", "s2ft": "s2ft", "gradient": "gradient"}
PEFT_METHODS = ("lora", "dora", "pissa")
METHODS = (*SPARSE_SELECTORS, "full", *PEFT_METHODS)
# The LiftConfig default, which the method overrides; methods without a selector keep it.
UNSET_SELECTOR = LiftConfig.selector


@dataclass
class MethodSetup:
    """A model ready to train, with its optimizer and the number of trained values.

    ``loop_clip_norm`` is the gradient-norm threshold the training loop must
    clip at: None when nothing clips, and for the sparse methods, whose
    optimizer clips the gathered gradients itself.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    trainable: int
    kind: str  # "sparse", "full" or "peft"
    loop_clip_norm: float | None = None


def method_config(method: str, cfg: LiftConfig) -> LiftConfig:
    """``cfg`` with the selector that ``method`` implies, after refusing settings that contradict ``method``.

    The method decides the selector, so ``cfg.selector`` must be left at its
    default ("principal", which stands for "not set") or name the method's own
    selector. PEFT methods take their LoRA rank from ``cfg.rank`` and refuse
    a ``density``; ``full`` ignores the budget. ``gradient`` selects once,
    so it refuses an ``update_interval``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if method == "gradient" and cfg.update_interval is not None:
        raise ValueError(f"method 'gradient' selects once, from calibration gradients, and never refreshes; set "
                         f"update_interval=None (--update-interval 0), got {cfg.update_interval!r}")
    implied = SPARSE_SELECTORS.get(method, UNSET_SELECTOR)
    if cfg.selector not in (UNSET_SELECTOR, implied):
        raise ValueError(f"LiftConfig.selector={cfg.selector!r} contradicts method {method!r}, which selects "
                         f"{implied if method in SPARSE_SELECTORS else 'nothing'}; choose the selector by the method")
    if method in PEFT_METHODS and cfg.density is not None:
        raise ValueError(f"density has no meaning for {method}; PEFT adapters take a rank (--rank)")
    return replace(cfg, selector=implied)


def setup_method(
    model: nn.Module,
    method: str,
    cfg: LiftConfig,
    *,
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    betas: tuple[float, float] = (0.9, 0.95),
    step_in_backward: bool = False,
    scores: dict[str, torch.Tensor] | None = None,
) -> MethodSetup:
    """Prepare ``model`` for ``method`` with the budget and targets of ``cfg``, and build its optimizer.

    Sparse methods (lift, magnitude, random, principal-smallest, s2ft, gradient) use
    :class:`LiftAdamW` with that selector (see :func:`method_config`); ``full``
    is torch AdamW over every parameter (fused on CUDA); lora, dora and pissa
    are PEFT adapters with r = ``cfg.rank``, alpha = 2r, on ``cfg``'s target
    modules, so a sparse method and a LoRA of the same rank train the same
    number of values. ``max_grad_norm`` is read by
    :func:`liftft.engine.config.clip_norm` (0 or None: no clipping); the sparse
    optimizer clips its own gathered gradients, for the others the training
    loop clips at ``MethodSetup.loop_clip_norm``. ``step_in_backward`` is
    passed to :class:`LiftAdamW` (sparse methods only), and so are ``scores``,
    which ``gradient`` selects from (:func:`liftft.engine.calibration.gradient_scores`)
    and the other methods refuse. On a bitsandbytes 4-bit base the sparse
    methods are QLIFT (:mod:`liftft.engine.quantized`), lora and dora are
    QLoRA and QDoRA (PEFT's ``prepare_model_for_kbit_training`` first), and
    full and pissa are refused.
    """
    cfg = method_config(method, cfg)
    clip = clip_norm(max_grad_norm)
    if method in SPARSE_SELECTORS:
        opt = LiftAdamW(model, cfg, lr=lr, betas=betas, weight_decay=weight_decay, max_grad_norm=clip,
                        step_in_backward=step_in_backward, scores=scores)
        return MethodSetup(model, opt, trainable_parameters(model, opt)[0], "sparse")
    if step_in_backward:
        raise ValueError(f"step_in_backward is for the sparse methods ({', '.join(SPARSE_SELECTORS)}), not {method}")
    if scores is not None:
        raise ValueError(f"scores are what method 'gradient' selects from; {method} takes none")
    quantized = any(is_4bit(module) for module in model.modules())
    if quantized and method in REFUSED:
        raise ValueError(f"method {method} cannot train a 4-bit base: {REFUSED[method]}")
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        opt = _adamw(list(model.parameters()), lr, betas, weight_decay)
        return MethodSetup(model, opt, sum(p.numel() for p in model.parameters()), "full", clip)
    if quantized:  # QLoRA, QDoRA: PEFT's preparation of a k-bit base (16-bit parameters cast to fp32)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = _peft_model(model, method, cfg.rank, cfg.target_modules)
    params = [p for p in model.parameters() if p.requires_grad]
    return MethodSetup(model, _adamw(params, lr, betas, weight_decay), sum(p.numel() for p in params), "peft", clip)


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
