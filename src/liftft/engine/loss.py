"""The summed next-token cross-entropy of a causal LM, without its full fp32 logits.

A step's largest single tensor is usually its logits: at Llama-3's 128,256-token
vocabulary a 2048-token sequence has 1 GiB of them in fp32, and the backward
holds as much again in their gradient. That is the same for every method, so
it hides what LIFT saves and caps the batch size. The ``"chunked"`` loss takes
the decoder's last hidden states and the head's weight instead, and computes
the logits a chunk of tokens at a time, in forward and again in backward, so
only one chunk's logits ever exist. ``"full"`` is the plain computation from
``model(...).logits``, and ``"liger"`` is Liger-Kernel's fused linear
cross-entropy (``pip install 'liftft[liger]'``).

The chunked and liger losses compute ``head(decoder(inputs))``, which is the
model's own logits only where the model says nothing more; :func:`full_path_reason`
states the rule, and a model outside it takes the full path.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from liftft.data.batches import IGNORE_INDEX

LOSS_MODES = ("chunked", "full", "liger")
# One chunk's fp32 logits at a 128,256-token vocabulary take 125 MiB (a 2048-token sequence's take
# 1 GiB); a 256-row matrix product still keeps a GPU's matrix units busy, and a 4096-token batch
# is 16 chunks, so the loop's overhead is negligible.
DEFAULT_CHUNK_TOKENS = 256
# Causal LMs whose forward (in the transformers versions liftft supports) is
# `logits = lm_head(model(...).last_hidden_state)` and nothing else, apart from the config
# attributes of LOGIT_TRANSFORMS; tests/test_loss.py checks each against the full path.
PLAIN_HEAD_MODELS = frozenset({
    "GPT2LMHeadModel", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "LlamaForCausalLM",
    "MistralForCausalLM", "MixtralForCausalLM", "Olmo2ForCausalLM", "Phi3ForCausalLM", "PhiForCausalLM",
    "Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
})
# Config attributes by which transformers models scale or cap their logits after the head.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logits_soft_cap",
                    "output_logit_soft_cap", "output_multiplier", "lm_head_multiplier", "logits_mup_width_multiplier")
LIGER_HINT = "pip install 'liftft[liger]' (Liger-Kernel)"


def check_loss_mode(mode: str) -> None:
    """Raise ValueError for a mode outside :data:`LOSS_MODES`, or for "liger" where Liger-Kernel is not installed.

    A ValueError in both cases: to the CLI, either is a flag this installation cannot honour.
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown --loss {mode!r}; allowed: {', '.join(LOSS_MODES)}")
    if mode == "liger" and importlib.util.find_spec("liger_kernel") is None:
        raise ValueError(f"--loss liger needs Liger-Kernel, which is not installed: {LIGER_HINT}")


def full_path_reason(model: nn.Module) -> str | None:
    """Why ``model``'s loss must be computed from its full logits, or None when the chunked loss may be used.

    The chunked (and liger) loss computes ``head(decoder(input_ids, attention_mask))``
    with the module ``get_output_embeddings()`` returns as the head and
    ``get_decoder()`` as the decoder. That is what ``model`` computes when:

    - its class is one of :data:`PLAIN_HEAD_MODELS`, from transformers itself
      (a class loaded with trust_remote_code may compute anything); a PEFT
      model counts as its base model unless it is prompt learning, whose
      forward changes the inputs;
    - its config sets none of :data:`LOGIT_TRANSFORMS` (Gemma 2's default
      ``final_logit_softcapping=30`` is one);
    - the head is a plain ``nn.Linear`` with its class's forward and no forward
      hooks (a LoRA-wrapped or quantized head, or one routed by
      ``LiftConfig(sampled_grad=True)``, is not);
    - the model's forward is its class's and it has no forward hooks, which
      could change the logits it returns;
    - it is not sharded by FSDP2, whose root gathers the head's weight only
      around the model's own forward.

    Forward pre-hooks on the top-level model do not run in the chunked path
    (the decoder's own do): LiftAdamW's, the only one liftft registers there,
    watches for DistributedDataParallel, whose forward this path never runs in.
    """
    from liftft.utils.distributed import is_sharded

    if is_sharded(model):
        return "FSDP2 shards the head's weight outside the model's own forward"
    model = _unwrap_peft(model)
    if model is None:
        return "a PEFT prompt-learning model changes its inputs in its own forward"
    name = type(model).__name__
    if name not in PLAIN_HEAD_MODELS or not type(model).__module__.startswith("transformers.models."):
        return f"{type(model).__module__}.{name} is not among the models whose logits are known to be a plain head"
    config = model.config
    transforms = [attr for attr in LOGIT_TRANSFORMS if getattr(config, attr, None) is not None]
    if transforms:
        return f"its config transforms the logits after the head ({', '.join(f'{a}={getattr(config, a)}' for a in transforms)})"
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or _replaced_forward(head) or head._forward_hooks or head._forward_pre_hooks:
        return f"its head is a {type(head).__name__} with a replaced forward or hooks, not a plain nn.Linear"
    if _replaced_forward(model) or model._forward_hooks:
        return "the model has a replaced forward or forward hooks"
    return None


def loss_path(model: nn.Module, mode: str) -> str:
    """The mode that :func:`causal_lm_loss_sum` will use for ``model``: ``mode``, or "full" where
    :func:`full_path_reason` gives a reason; raises as :func:`check_loss_mode` does."""
    check_loss_mode(mode)
    return "full" if mode == "full" or full_path_reason(model) is not None else mode


def causal_lm_loss_sum(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    mode: str = "chunked",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """The fp32 next-token cross-entropy of ``model``, summed over the target tokens.

    Position t of ``labels`` (batch, seq) is the target of the logits at t - 1;
    ``IGNORE_INDEX`` labels count for nothing. ``mode`` is one of
    :data:`LOSS_MODES`; "chunked" computes at most ``chunk_tokens`` tokens'
    logits at a time (see :func:`chunked_linear_cross_entropy`). A model that
    :func:`full_path_reason` refuses takes the full path whatever the mode.
    Call it inside the autocast context the model's forward should run under.
    """
    if loss_path(model, mode) == "full":
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    base = _unwrap_peft(model)
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    # Shifting the targets rather than the hidden states keeps those a view; the last position's target is ignored.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    head = base.get_output_embeddings()
    if mode == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
        return liger(head.weight, hidden.flatten(0, 1), targets, head.bias)
    return chunked_linear_cross_entropy(hidden.flatten(0, 1), head.weight, head.bias, targets, chunk_tokens)


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")``, ``chunk_tokens`` rows at a time.

    ``hidden`` is (tokens, hidden size) and ``targets`` (tokens,), with
    ``IGNORE_INDEX`` skipped. The logits of at most ``chunk_tokens`` tokens
    exist at once, in forward and in backward, which recomputes them; only
    ``hidden`` and ``weight`` are saved. The matrix products run in the
    autocast dtype when autocast is on (else in ``weight``'s), the softmax in
    fp32, as the full computation does. ``weight``'s gradient is returned once,
    summed over the chunks in ``weight``'s dtype, so a gradient hook on it
    (LiftAdamW's) fires once with the whole gradient.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an integer >= 1, got {chunk_tokens!r}")
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_tokens, dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """:func:`chunked_linear_cross_entropy`'s forward and backward, casting by hand in ``dtype`` with autocast off."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, dtype):
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_tokens, ctx.dtype = chunk_tokens, dtype
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for rows in _chunks(hidden.shape[0], chunk_tokens):
                logits = _logits(hidden[rows], w, b)
                total += F.cross_entropy(logits, targets[rows], ignore_index=IGNORE_INDEX, reduction="sum")
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(ctx.dtype), None if bias is None else bias.to(ctx.dtype)
            for rows in _chunks(hidden.shape[0], ctx.chunk_tokens):
                h = hidden[rows].to(ctx.dtype)
                grad_logits = _cross_entropy_grad(_logits(h, w, b), targets[rows], grad_total).to(ctx.dtype)
                if need_hidden:
                    grad_hidden[rows] = grad_logits @ w
                if need_weight:
                    _accumulate_weight_grad(grad_weight, grad_logits, h)
                if need_bias:
                    grad_bias += grad_logits.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(hidden.to(weight.dtype), weight, bias).float()


def _cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, grad_total: torch.Tensor) -> torch.Tensor:
    """d(summed cross-entropy)/d(logits), scaled by ``grad_total``: softmax minus one-hot on counted rows, 0 elsewhere.

    Computed in place over ``logits``, so the chunk needs no second (tokens, vocab) buffer.
    """
    counted = targets != IGNORE_INDEX
    probs = logits.sub_(logits.logsumexp(-1, keepdim=True)).exp_()
    # An ignored row's target becomes 0 for the scatter; the row is zeroed just after. No host sync.
    columns = targets.masked_fill(~counted, 0).unsqueeze(1)
    probs.scatter_add_(1, columns, torch.full(columns.shape, -1.0, device=probs.device))
    return probs.mul_((counted * grad_total).unsqueeze(1))


def _accumulate_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    if grad_weight.dtype == grad_logits.dtype:
        grad_weight.addmm_(grad_logits.t(), hidden)
    else:
        # fp32 weights under 16-bit autocast: multiply in 16 bits as autocast would, sum the chunks in fp32.
        grad_weight += grad_logits.t() @ hidden


def _unwrap_peft(model: nn.Module) -> nn.Module | None:
    """The transformers model inside a PEFT model (``model`` itself if it is none), or None for prompt learning."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    return None if model.active_peft_config.is_prompt_learning else model.get_base_model()


def _replaced_forward(module: nn.Module) -> bool:
    """Whether ``module`` has an instance forward, as accelerate's hooks and liftft's sampled_grad give one."""
    return "forward" in vars(module)
