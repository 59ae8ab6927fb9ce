"""Estimated activation and logits memory of one training step of a Llama-style causal LM.

Unlike the optimizer's state, which :mod:`liftft.planning.estimate` counts exactly,
what autograd saves depends on the model's code and kernels; these formulas
tally the tensors an eager transformers Llama with flash or memory-efficient
attention saves for backward, and are checked against a hand computation,
not a measurement.
"""

from __future__ import annotations

from liftft.engine.loss import DEFAULT_CHUNK_TOKENS

FP32 = 4


def activation_bytes(config, tokens: int, gradient_checkpointing: bool, element_bytes: int) -> int:
    """Estimated bytes of activations saved for backward by a Llama-style decoder over ``tokens`` tokens.

    Per token and layer, with h hidden, f intermediate, a heads, g KV heads of
    dim d, and activations of ``element_bytes`` (2 under bf16):
    two RMSNorms, each keeping an fp32 copy of its input (4h bytes) and its
    output before and after the weight (2h elements); q and k before rotary,
    their rotate_half and after rotary (3(a + g)d), v (gd); the attention output
    (ad) and its fp32 log-sum-exp per head (4a bytes, flash/efficient SDPA, no
    S×S matrix); gate, up, silu(gate) and their product (4f). The final norm
    adds one RMSNorm. With gradient checkpointing each layer keeps only its
    input (h elements per token) and one layer's activations exist at a time,
    recomputed in backward. Models other than Llama's are estimated as if they
    were one of the same sizes.
    """
    h, f, a, g, d = _block_dims(config)
    norm = FP32 * h + 2 * h * element_bytes  # one RMSNorm
    layer = (2 * norm + (3 * (a + g) + g) * d * element_bytes + a * d * element_bytes + FP32 * a
             + 4 * f * element_bytes)
    layers = config.num_hidden_layers
    kept = layers * h * element_bytes + layer if gradient_checkpointing else layers * layer
    return tokens * (kept + norm)


def logits_bytes(vocab_size: int, tokens: int, loss: str, element_bytes: int) -> int:
    """Estimated peak bytes of the logits and their gradient (see liftft.engine.loss).

    "chunked" (liftft's default): one chunk of DEFAULT_CHUNK_TOKENS tokens'
    fp32 logits at a time, and in backward their 16-bit copy. "full": the
    fp32 log-probabilities saved for backward, their gradient and the
    logits' gradient, three fp32 tensors of tokens × vocab.
    """
    if loss == "full":
        return 3 * FP32 * tokens * vocab_size
    cast = element_bytes if element_bytes < FP32 else 0
    return min(tokens, DEFAULT_CHUNK_TOKENS) * vocab_size * (FP32 + cast)


def _block_dims(config) -> tuple[int, int, int, int, int]:
    h, a = config.hidden_size, config.num_attention_heads
    g = getattr(config, "num_key_value_heads", None) or a
    d = getattr(config, "head_dim", None) or h // a
    f = getattr(config, "intermediate_size", None) or 4 * h
    return h, f, a, g, d
