"""Model shapes by name: the presets `liftft bench` trains and `liftft estimate` plans for, or a config.json.

Each preset is the config of a Llama-architecture model (random weights when
built), so nothing is downloaded: ``tiny`` and ``h256`` for CPU tests, and the
shapes of Llama-3.2-1B and -3B, Llama-3-8B and Llama-3-70B.
"""

from __future__ import annotations

import os

_LLAMA_3 = dict(vocab_size=128256, rope_theta=500000.0)
MODEL_CONFIGS = {
    # Small enough for a CPU smoke test.
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096),
    # The CPU measurements' shape in bench/RESULTS.md (19.3M parameters).
    "h256": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048),
    # The shapes of Llama-3.2-1B and -3B, Llama-3-8B and Llama-3-70B (random weights).
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, tie_word_embeddings=True,
                     **_LLAMA_3),
    "llama-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, tie_word_embeddings=True,
                     **_LLAMA_3),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, tie_word_embeddings=False,
                     **_LLAMA_3),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, tie_word_embeddings=False,
                      **_LLAMA_3),
}


def model_config(name_or_path: str):
    """The transformers config of a preset (:data:`MODEL_CONFIGS`) or of a config.json file or model directory."""
    from transformers import AutoConfig, LlamaConfig

    if name_or_path in MODEL_CONFIGS:
        return LlamaConfig(**MODEL_CONFIGS[name_or_path])
    path = os.path.expanduser(name_or_path)
    if not (os.path.isfile(path) or os.path.isfile(os.path.join(path, "config.json"))):
        raise FileNotFoundError(f"--model-config {name_or_path!r} is neither a preset ({', '.join(MODEL_CONFIGS)}) "
                                "nor a config.json file or a directory holding one")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"--model-config {name_or_path!r} is not a transformers model config: {err}") from err
