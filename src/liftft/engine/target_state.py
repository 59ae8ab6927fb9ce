"""The optimizer state of one target matrix: its selected entries, their moments and masters, and what they carry.

LiftAdamW keeps, per target, a dict (torch.optim's ``state[p]``):

- ``row_offsets``, ``columns``: the selected entries, compressed (:mod:`liftft.engine.layout`);
- ``exp_avg``, ``exp_avg_sq``: fp32 moments, one per entry; ``master``: fp32
  values of the entries of a 16-bit weight (``LiftConfig.master_weights``);
- ``step``: the matrix's step count, for the bias correction;
- ``touched``, ``base``: every entry ever selected and its value before training (what a delta needs);
- with ``LiftConfig(bias_correction="entry")``, ``selected_ago`` (uint8 per
  entry: selected at the j-th most recent refresh, 0 for the first selection)
  and ``refresh_steps`` (the matrix's step count at its last refreshes).

A refresh keeps the moments and masters of entries that stay selected; new
entries start from zero moments and their current values.
"""

from __future__ import annotations

import torch

from liftft.engine.config import LiftConfig
from liftft.engine.layout import carry_over, compress, difference, expand, merge_sorted

# Kept on the CPU: step counts, and the record of every entry ever trained with its base value, which no step reads.
HOST_STATE = ("step", "touched", "base", "refresh_steps")
SIXTEEN_BIT = (torch.bfloat16, torch.float16)
# selected_ago is one byte: entries selected this many refreshes ago or earlier count from the matrix's first step.
TRACKED_REFRESHES = 255


def flat_indices(state: dict, n_columns: int) -> torch.Tensor:
    """The selected entries of a target with ``n_columns`` columns as sorted int64 flat indices."""
    return expand(state["row_offsets"], state["columns"], n_columns)


def fresh_state(p: torch.Tensor, idx: torch.Tensor, cfg: LiftConfig) -> dict:
    """The state of target ``p`` when the sorted flat indices ``idx`` are first selected."""
    k = idx.numel()
    row_offsets, columns = compress(idx, tuple(p.shape))
    state = {
        "step": torch.tensor(0.0),
        "row_offsets": row_offsets,
        "columns": columns,
        "exp_avg": torch.zeros(k, dtype=torch.float32, device=p.device),
        "exp_avg_sq": torch.zeros(k, dtype=torch.float32, device=p.device),
    }
    if cfg.master_weights and p.dtype in SIXTEEN_BIT:
        state["master"] = p.detach().view(-1).index_select(0, idx).float()
    if cfg.bias_correction == "entry":
        state["selected_ago"] = torch.zeros(k, dtype=torch.uint8, device=p.device)
        state["refresh_steps"] = torch.zeros(0, dtype=torch.int64)
    return state


def carried_state(old: dict, p: torch.Tensor, idx: torch.Tensor, cfg: LiftConfig) -> dict:
    """The state of ``p`` after a refresh selected ``idx``: kept entries carry their state, new ones start fresh."""
    new = fresh_state(p, idx, cfg)
    new["step"] = old["step"]
    old_idx = flat_indices(old, p.shape[1]).to(idx.dtype)
    for key in ("exp_avg", "exp_avg_sq", "master"):
        if key in old:
            new[key] = carry_over(old_idx, old[key], idx, new[key])
    if "selected_ago" in new:
        ago = old["selected_ago"]
        older = torch.where((ago == 0) | (ago >= TRACKED_REFRESHES), torch.zeros_like(ago), ago + 1)
        new["selected_ago"] = carry_over(old_idx, older, idx, torch.ones_like(new["selected_ago"]))
        new["refresh_steps"] = torch.cat([old["refresh_steps"], old["step"].long().view(1)])[-TRACKED_REFRESHES:]
    return new


def bias_correction_steps(state: dict):
    """The step count of the bias correction: the matrix's (an int), or one per entry (``bias_correction="entry"``)."""
    step = int(state["step"].item())
    if "selected_ago" not in state:
        return step
    ago = state["selected_ago"]
    # starts[j] is the matrix's step count when the entries selected j refreshes ago were selected.
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), state["refresh_steps"].flip(0)]).to(ago.device)
    return step - starts[ago.long()]


def record_touched(state: dict, selected: torch.Tensor, previous: dict | None, flat: torch.Tensor) -> dict:
    """Add to ``state`` the sorted union of all entries ever selected (``selected`` now), with their base values.

    ``flat`` is the matrix flattened as it stands, whose entries never selected
    before still hold their base values (a 4-bit target's: dequant(W₄)). The
    record lives on the host, but is merged on flat's device, one matrix at a
    time, so the device holds only one matrix's record at once. (On the CPU the
    merge took 0.12 s for one 8192x2048 matrix of Llama-3.2-1B, so tens of
    seconds per refresh over all of them; a GPU does it in a fraction of that.)
    """
    if previous is None:
        state["touched"], state["base"] = selected.cpu(), flat[selected].cpu()
        return state
    touched = previous["touched"].to(selected.device)
    new = difference(selected.to(touched.dtype), touched)
    # Entries never selected before were never changed: their current value is the base value.
    merged, base = merge_sorted(touched, previous["base"].to(flat.device), new, flat[new])
    state["touched"], state["base"] = merged.cpu(), base.cpu()
    return state


def current_fp32(p: torch.Tensor, state: dict) -> torch.Tensor:
    """``p`` in fp32 with its master values written in, so a refresh selects from the true current weights."""
    current = p.detach().float()
    if "master" in state:
        current.view(-1).index_put_((flat_indices(state, p.shape[1]),), state["master"])
    return current


def dense_state(p: torch.Tensor, cfg: LiftConfig) -> dict:
    """The state of a dense param at its first step: AdamW's, its value before training, and an fp32 master copy."""
    state = {
        "step": torch.tensor(0.0),
        "exp_avg": torch.zeros_like(p, dtype=torch.float32),
        "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32),
        "base": p.detach().cpu().clone(),
    }
    if cfg.master_weights and p.dtype in SIXTEEN_BIT:
        state["master"] = p.detach().float()
    return state


def loaded_state(saved: dict, p: torch.Tensor) -> dict:
    """A state from a state_dict, its tensors moved to p's device (host state stays) in their saved dtypes."""
    state = {key: value.to(p.device) if torch.is_tensor(value) and key not in HOST_STATE else value
             for key, value in saved.items()}
    if "indices" in state:  # saved before the indices were kept compressed
        state["row_offsets"], state["columns"] = compress(state.pop("indices"), tuple(p.shape))
    return state
