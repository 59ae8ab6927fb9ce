"""Removing an applied delta: the base weights back, bit for bit, verified against the delta's base fingerprints.

A delta stores, per trained entry, the difference final - base in a wider
dtype. The base is rebuilt as final - difference, rounded to the weight's
dtype. That is exact unless an entry grew far beyond its base (from about
2**-16 of its trained value in bf16): then the difference rounded away the
base's low bits, and several base values are consistent with the delta. For those entries, the values
nearest the first guess are tried, nearest first, until the rebuilt base has
the fingerprint the delta recorded; nothing is written unless every weight
matches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from liftft.deltas.delta import Delta, check_shapes, fingerprint, load_delta
from liftft.utils import distributed

# How many undetermined entries of one weight are searched, how far (in steps of the weight's dtype) around the
# first guess, and how many fingerprints are tried at most.
MAX_UNDETERMINED = 32
SEARCH_STEPS = 64
MAX_TRIALS = 4096


@torch.no_grad()
def remove_delta(model: nn.Module, delta) -> nn.Module:
    """Undo :func:`liftft.apply_delta`: restore ``model``'s base weights, bit for bit, in place, and return it.

    ``delta`` is a delta directory or a loaded :class:`liftft.deltas.delta.Delta`.
    Every weight is checked before any is changed: ValueError names the first
    weight that is sharded by FSDP2 (remove the delta before ``fully_shard``),
    missing or shaped otherwise, whose entries do not hold the delta's trained
    values (the delta is not applied, or another one is), or whose base the
    delta cannot pin down (see the module docstring).
    """
    delta = delta if isinstance(delta, Delta) else load_delta(delta)
    params = dict(model.named_parameters())
    sharded = [name for name in delta.entries if name in params and distributed.is_dtensor(params[name])]
    if sharded:
        raise ValueError(f"{sharded[0]} is sharded by FSDP2, and remove_delta restores whole weights: remove the delta "
                         "before fully_shard, or from an unsharded copy of the model given its full state dict "
                         "(torch.distributed.checkpoint.state_dict.get_model_state_dict with full_state_dict=True); "
                         "nothing was changed")
    check_shapes(params, delta)
    bases = {name: restored_base(name, params[name], delta) for name in delta.entries}
    for name, base in bases.items():
        idx = delta.entries[name][0]
        flat = params[name].view(-1)
        if idx is None:
            flat.copy_(base)
        else:
            flat[idx.to(flat.device).long()] = base
    return model


def restored_base(name: str, weight: torch.Tensor, delta: Delta) -> torch.Tensor:
    """The base values of ``weight``'s entries in ``delta`` (flat, in delta order), checked against its fingerprint."""
    idx, values = delta.entries[name]
    flat = weight.detach().view(-1)
    trained = flat if idx is None else flat[idx.to(flat.device).long()]
    trained, values = trained.cpu(), values.cpu()
    expected = delta.meta["weights"][name]["base_sha256"]
    if name in delta.exact:
        positions, exact = delta.exact[name]
        if not torch.equal(trained[positions], exact.to(trained.dtype)):
            raise _not_applied(name)
    if fingerprint(trained) == expected:
        raise ValueError(f"{name} already holds the base weights: the delta is not applied to this model")
    base = (trained.to(values.dtype) - values).to(trained.dtype)
    found = _search(base, trained, values, expected)
    if found is None:
        raise _not_applied(name)
    return found.to(flat.device)


def _search(guess: torch.Tensor, trained: torch.Tensor, values: torch.Tensor, expected: str) -> torch.Tensor | None:
    """``guess``, or the nearest change of its undetermined entries to other consistent values, whose fingerprint is
    ``expected``; None if there is none within the search limits. Changes are tried in order of their summed
    distance from the guess (counting each entry's options nearest first)."""
    if fingerprint(guess) == expected:
        return guess
    alternatives = _alternatives(guess, trained, values)
    positions = [position for position, _ in alternatives]
    sizes = [len(options) for _, options in alternatives]
    trials = 0
    for distance in range(1, sum(sizes) + 1):
        for ranks in _rankings(sizes, distance):
            trial = guess.clone()
            for position, (_, options), rank in zip(positions, alternatives, ranks):
                if rank:
                    trial[position] = options[rank - 1]
            if fingerprint(trial) == expected:
                return trial
            trials += 1
            if trials >= MAX_TRIALS:
                return None
    return None


def _rankings(sizes: list[int], distance: int):
    """Every tuple of ranks r_i in [0, sizes[i]] (0: keep the guess; r: the r-th option) that sums to ``distance``."""
    if not sizes:
        if distance == 0:
            yield ()
        return
    for rank in range(min(distance, sizes[0]) + 1):
        for rest in _rankings(sizes[1:], distance - rank):
            yield (rank, *rest)


def _alternatives(guess: torch.Tensor, trained: torch.Tensor, values: torch.Tensor) -> list[tuple[int, list]]:
    """(position, other base values, nearest first) for up to MAX_UNDETERMINED entries where ``guess`` may not be
    the base: other values within SEARCH_STEPS of it also have difference ``values`` to ``trained`` (or the guess
    has not, or it is 0.0, whose base may have been -0.0)."""
    consistent = _consistency(trained, values)
    undetermined = ~consistent(guess) | (guess == 0)
    for direction in (math.inf, -math.inf):
        undetermined |= consistent(torch.nextafter(guess, torch.full_like(guess, direction)))
    result = []
    for position in undetermined.nonzero().flatten()[:MAX_UNDETERMINED].tolist():
        at = slice(position, position + 1)
        options = [-guess[position]] if guess[position] == 0 else []
        below, above = guess[at], guess[at]
        for _ in range(SEARCH_STEPS):
            above, below = torch.nextafter(above, above + math.inf), torch.nextafter(below, below - math.inf)
            options += [value[0] for value in (above, below) if consistent(value, at)[0]]
        if options:
            result.append((position, options))
    return result


def _consistency(trained: torch.Tensor, values: torch.Tensor):
    """``consistent(base, at=slice(None))``: whether delta_from_optimizer would have stored ``values[at]`` for base
    values ``base`` of the entries ``trained[at]``."""
    wide = values.dtype

    def consistent(base: torch.Tensor, at: slice = slice(None)) -> torch.Tensor:
        return (trained[at].to(wide) - base.to(wide)) == values[at]

    return consistent


def _not_applied(name: str) -> ValueError:
    return ValueError(f"{name} does not hold this delta's trained values (the delta is not applied to this model, "
                      "or another delta is), or its base is not pinned down by the delta; nothing was changed")
