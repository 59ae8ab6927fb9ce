"""Perturbation sensitivity (the paper's Figure 2): how far perplexity rises when the
entries a selector would train are disturbed, with the same k for every selector."""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from numbers import Real

import torch
import torch.nn.functional as F

from liftft.analysis.matrices import select_as_training, target_budgets
from liftft.engine.config import LiftConfig, SELECTORS
from liftft.engine.targets import find_targets
from liftft.utils.progress import progress_bar

MODES = ("relative", "absolute", "zero")
DEFAULT_SELECTORS = ("principal", "magnitude", "random")
DEFAULT_NOISE = (0, 0.5, 1, 2, 4)


def perturb(
    model,
    input_ids: torch.Tensor,
    *,
    selectors=DEFAULT_SELECTORS,
    rank: int | None = None,
    density: float | None = None,
    filter_rank: int = LiftConfig.filter_rank,
    mode: str = "relative",
    noise=DEFAULT_NOISE,
    seed: int = 0,
    svd: str = "exact",
    target_modules="all-linear",
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Perplexity of ``model`` on ``input_ids`` with each selector's entries perturbed.

    For every target matrix each selector picks k entries with the same
    ``select_indices`` call training makes (k from ``rank`` or ``density``,
    LiftConfig's rank when neither is set). Only those entries change:
    ``relative`` sets W[i] ← W[i]·(1 + s·z), ``absolute`` W[i] ← W[i] + s·std(W)·z,
    ``zero`` W[i] ← 0 (no noise scales; its single entry has ``"noise": None``).
    z ~ N(0, 1) is drawn from ``seed`` and is the same for every selector and
    scale s. The loss covers every position of ``input_ids`` [batch, seq]. The
    weights are restored bit for bit after each measurement.

    Returns ``{selector: [{"noise": s, "perplexity": p}, ...]}``.
    """
    selectors, scales = check_perturb_options(selectors, mode, noise)
    input_ids = check_input_ids(input_ids)
    _check_batch_size(batch_size)
    targets = find_targets(model, target_modules)
    ks = target_budgets(targets, rank, density)
    bar = progress_bar(total=len(selectors) * len(scales), desc="perturb", disable=not progress)
    results = {}
    for selector in selectors:
        indices = select_as_training(targets, ks, selector, filter_rank, svd, seed)
        results[selector] = []
        for scale in scales:
            with perturbed(targets, indices, mode, scale, seed):
                results[selector].append({"noise": scale, "perplexity": perplexity(model, input_ids, batch_size)})
            bar.update()
    bar.close()
    return results


def check_perturb_options(selectors, mode: str, noise) -> tuple[tuple[str, ...], tuple]:
    """Validated (selectors, noise scales); the scales are ``(None,)`` for mode ``zero``.

    Raises ValueError for an unknown or missing selector or mode and for
    negative, non-finite or missing scales, TypeError for a scale that is not a number.
    """
    if isinstance(selectors, str):
        selectors = (selectors,)
    selectors = tuple(dict.fromkeys(selectors))
    if not selectors:
        raise ValueError(f"no selectors given; allowed: {', '.join(SELECTORS)}")
    unknown = [s for s in selectors if s not in SELECTORS]
    if unknown:
        raise ValueError(f"unknown selector(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(SELECTORS)}")
    if mode not in MODES:
        raise ValueError(f"unknown perturbation mode {mode!r}; allowed: {', '.join(MODES)}")
    if mode == "zero":
        return selectors, (None,)
    scales = tuple(noise)
    if not scales:
        raise ValueError(f"no noise scales given for mode {mode!r}")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, Real):
            raise TypeError(f"noise scale {s!r} is not a number")
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"noise scale {s!r} must be a finite number >= 0")
    return selectors, scales


def check_input_ids(input_ids) -> torch.Tensor:
    """``input_ids`` as a [batch, seq] integer tensor with at least one row of two tokens, or a clear error."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer torch.Tensor [batch, seq], got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [batch, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 2:
        raise ValueError(f"empty data: input_ids of shape {tuple(input_ids.shape)} has no next-token to predict")
    return input_ids.long()


@contextmanager
def perturbed(weights: dict, indices: dict, mode: str, scale: float | None, seed: int):
    """Inside the block, entries ``indices[name]`` of each weight are perturbed per ``mode``.

    z is drawn on the CPU from one generator seeded with ``seed``, matrix after
    matrix in the order of ``weights``, so it does not depend on the device or
    on which entries were chosen. On exit the original values are written back,
    bit for bit, even if the block raised.
    """
    generator = torch.Generator().manual_seed(seed)
    saved = []
    try:
        for name, weight in weights.items():
            flat = weight.detach().view(-1)
            idx = indices[name].to(device=weight.device, dtype=torch.long)
            original = flat[idx]
            saved.append((flat, idx, original))
            flat[idx] = _perturbed_values(weight, original, mode, scale, generator)
        yield
    finally:
        for flat, idx, original in saved:
            flat[idx] = original


def _perturbed_values(weight, original, mode, scale, generator) -> torch.Tensor:
    if mode == "zero":
        return torch.zeros_like(original)
    z = torch.randn(original.numel(), generator=generator).to(original.device)
    # Computed in fp32 so a zero scale gives back each value exactly, whatever the weight's dtype.
    if mode == "relative":
        return (original.float() * (1 + scale * z)).to(original.dtype)
    std = weight.detach().float().std()
    return (original.float() + scale * std * z).to(original.dtype)


def perplexity(model, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    """exp of the mean next-token negative log-likelihood over every position of ``input_ids`` [batch, seq]."""
    input_ids = check_input_ids(input_ids)
    _check_batch_size(batch_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for rows in input_ids.split(batch_size):
            rows = rows.to(device)
            logits = model(input_ids=rows).logits[:, :-1].float()
            nll = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum")
            total += nll.double().cpu()
    model.train(was_training)
    # A tensor exp gives inf rather than OverflowError when a perturbation destroys the model.
    return (total / (input_ids.shape[0] * (input_ids.shape[1] - 1))).exp().item()


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def pack_records(records: list[dict], tokenizer, *, seq_len: int = 256, template: str = "alpaca") -> torch.Tensor:
    """Records as perplexity data: each encoded as training encodes it (prompt, response, EOS),
    all concatenated and cut into rows of ``seq_len`` tokens.

    The tail that does not fill a row is dropped, unless the data is shorter
    than one row, in which case it forms the only row.
    """
    from liftft.data.batches import encode_dataset

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    # The stream is cut into rows below, so no example needs truncating on its own.
    examples, _ = encode_dataset(records, tokenizer, template=template, max_seq_len=sys.maxsize)
    stream = torch.tensor([t for example in examples for t in example["input_ids"]], dtype=torch.long)
    rows = stream.numel() // seq_len
    if rows == 0:
        return stream.unsqueeze(0)
    return stream[: rows * seq_len].view(rows, seq_len)
