"""remove_delta on an FSDP2-sharded model: refused before anything changes, naming the weight and what to do."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
from torch import nn

from liftft import apply_delta, remove_delta
from liftft.deltas.delta import Delta, exact_difference, fingerprint

NAME = "proj.weight"


class Square(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x):
        return self.proj(x)


def delta_of(base: torch.Tensor, final: torch.Tensor) -> Delta:
    """The delta of every entry of a Square model going from ``base`` to ``final``, as delta_from_optimizer makes it."""
    idx = torch.arange(base.numel(), dtype=torch.int32)
    weights = {NAME: {"shape": list(base.shape), "dtype": "float32", "base_sha256": fingerprint(base.flatten())}}
    return Delta({NAME: (idx, exact_difference(final.flatten(), base.flatten()))}, {"format_version": 2,
                                                                                    "weights": weights})


def test_remove_delta_refuses_a_sharded_model_names_the_way_and_changes_nothing():
    from torch.distributed.fsdp import fully_shard

    base = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 8
    final = base + 0.5
    delta = delta_of(base, final)
    model = apply_delta(Square(base), delta)
    assert torch.equal(model.proj.weight, final), "precondition: the delta is applied"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fully_shard(model)
        before = model.proj.weight.full_tensor().clone()
        message = (f"{NAME} is sharded by FSDP2, and remove_delta restores whole weights: remove the delta before "
                   "fully_shard")
        with pytest.raises(ValueError, match=re.escape(message)):
            remove_delta(model, delta)
        assert torch.equal(model.proj.weight.full_tensor(), before)
    finally:
        dist.destroy_process_group()
    # The way it names works: unsharded, the same delta comes off bit for bit.
    unsharded = Square(final)
    remove_delta(unsharded, delta)
    assert torch.equal(unsharded.proj.weight, base)
