"""Merging a delta into its base: a normal Hugging Face model directory, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from liftft.utils.atomic import atomic_directory, remove_leftovers
from liftft.utils.outputs import check_output_dir

MERGE_FILE = "liftft_merge.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge_delta(base: str, delta_dir: str, output: str, *, dtype: str | torch.dtype | None = None,
                original_weights: bool = False) -> Path:
    """Write ``base`` plus the delta at ``delta_dir`` to ``output`` as a model directory with tokenizer.

    The delta is applied in the dtype it was trained in (the dtype recorded in
    its liftft.json), so the merged weights are exactly the trained ones; they
    are then cast to ``dtype`` (``None`` or ``"auto"`` keeps the trained dtype).
    A delta trained on a bitsandbytes 4-bit base is applied to that base loaded
    the same way, and the output is the 16-bit model the run trained,
    dequant(W₄) + Δ; with ``original_weights`` it is added to the 16-bit
    weights the base was quantized from instead (not the weights it was
    trained on: docs/qlift.md measures how far that model is from the trained one).
    ``output`` is loadable with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained``; it also holds liftft_merge.json, which
    records where it came from, and a model card (README.md, see
    :mod:`liftft.deltas.card`). It is written to a temporary directory beside
    ``output`` and renamed into place; an existing ``output`` is replaced only
    if it is empty or a previous merge. The delta is checked whole before the
    base is loaded, and what an interrupted merge to ``output`` left beside it
    is removed first.
    """
    from liftft.deltas.card import write_model_card
    from liftft.deltas.delta import load_delta
    from liftft.utils.hf import check_model_path

    out_dtype = _parse_dtype(dtype)
    delta = load_delta(delta_dir)
    output = check_output_dir(output, MERGE_FILE, "merge")
    remove_leftovers(output)
    check_model_path(base)
    tokenizer = _load_tokenizer_unchanged(base)
    model = load_merged(base, delta, delta_dir, dtype=out_dtype, original_weights=original_weights)
    with atomic_directory(output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"base_model": base, "delta": str(Path(delta_dir).resolve()),
                  "dtype": str(model.dtype).removeprefix("torch.")}
        if "quantization" in delta.meta:
            record["onto"] = "original 16-bit weights" if original_weights else "dequantized 4-bit base"
        (tmp / MERGE_FILE).write_text(json.dumps(record, indent=2))
        write_model_card(tmp, {**delta.meta, "base_model": base}, merged=True)
    return output


def load_merged(base: str, delta, delta_dir, *, dtype: str | torch.dtype | None = None,
                device: str | torch.device = "cpu", original_weights: bool = False):
    """``base`` loaded on ``device`` with ``delta`` (a :class:`liftft.deltas.delta.Delta` read from ``delta_dir``) applied.

    The delta is applied in the dtype it was trained in, so the weights are
    exactly the trained ones, and the model is then cast to ``dtype`` (None or
    ``"auto"`` keeps the trained dtype). A delta of a 4-bit base gives the
    16-bit model it trained (see :func:`merge_delta`, also for ``original_weights``).
    """
    from liftft.deltas.delta import apply_delta
    from liftft.utils.hf import load_model

    trained_dtype = recorded_dtype(delta.meta, delta_dir)
    quantization = delta.meta.get("quantization")
    if original_weights and quantization is None:
        raise ValueError(f"delta {delta_dir} was trained on 16-bit weights: --original-weights is for a delta of a "
                         "4-bit base")
    if quantization is None or original_weights:
        model = load_model(base, dtype=trained_dtype, device=device)
        apply_delta(model, delta, original_weights=original_weights)
    else:
        from liftft.engine.quantized import dequantized_model

        model = dequantized_model(load_trained_4bit(base, delta, delta_dir, device))
    return model.to(_parse_dtype(dtype) or trained_dtype)


def load_trained_4bit(base: str, delta, delta_dir, device: str | torch.device = "cpu"):
    """The model a QLIFT run trained, as it trained it: ``base`` loaded in 4 bits as ``delta`` (a
    :class:`liftft.deltas.delta.Delta` read from ``delta_dir``) records, in its trained dtype, with the delta applied."""
    from liftft.deltas.delta import apply_delta
    from liftft.utils.hf import load_model
    from liftft.utils.quantization import bnb_config

    trained_dtype = recorded_dtype(delta.meta, delta_dir)
    quantization = delta.meta["quantization"]
    config = bnb_config(quantization["bnb_4bit_quant_type"], quantization["bnb_4bit_use_double_quant"], trained_dtype)
    return apply_delta(load_model(base, trained_dtype, device, quantization_config=config), delta)


def recorded_dtype(meta: dict, delta_dir) -> torch.dtype:
    """The single dtype of the trained weights recorded in a delta's metadata."""
    names = {info["dtype"] for info in meta["weights"].values()}
    if len(names) != 1 or next(iter(names)) not in DTYPES:
        raise ValueError(f"delta {delta_dir} records weight dtypes {sorted(names)}; expected one of {list(DTYPES)}")
    return DTYPES[names.pop()]


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")


def _load_tokenizer_unchanged(base: str):
    # liftft.utils.hf.load_tokenizer sets a missing pad token; the merged copy must be the base's own tokenizer.
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(base))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load the tokenizer of base model {base!r}: {err}") from err

