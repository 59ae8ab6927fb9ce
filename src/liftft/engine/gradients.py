"""Gathering the selected entries of each target's gradient, as backward produces it.

A :class:`GradientGatherer` hooks every target of a LiftAdamW. When backward has
accumulated a target's gradient, the hook reads its k selected entries into a
length-k fp32 buffer and frees the dense ``.grad``, so at most one matrix's
dense gradient exists at a time. Micro-batches add into the buffer. Besides
that ordinary path it handles:

- FSDP2 targets: the hook reads this rank's shard of the rank-averaged gradient;
- DistributedDataParallel: noticed at the first forward inside DDP, which
  averages gradients after the hooks run, so the entries are gathered at step;
- several processes without a wrapper: the buffers are averaged once per step;
- ``LiftConfig(sampled_grad=True)``: target Linears compute their weight
  gradient at the selected entries only (:mod:`liftft.engine.sampled`);
- 4-bit targets (:mod:`liftft.engine.quantized`) always do, their layers handing
  (dY, X) to the gatherer in backward;
- ``step_in_backward``: each gathered gradient goes straight to a callback.

The hooks hold the gatherer only by weak reference: a dropped optimizer does
not live on in its model's hooks, and a hook whose gatherer is gone does
nothing. :meth:`GradientGatherer.close` removes every hook and patched forward.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from liftft.utils import distributed
from liftft.engine.functional import gather_selected
from liftft.engine.sampled import sample_weight_gradients, sampled_weight_grad_at


def weak_method(method) -> Callable:
    """A function that calls the bound ``method`` while its object lives and does nothing once it is gone."""
    ref = weakref.WeakMethod(method)

    def call(*args):
        bound = ref()
        return None if bound is None else bound(*args)

    return call


class SinkHandle:
    """A 4-bit target's layer handing its (dY, X) to ``sink`` in backward until ``remove()``."""

    def __init__(self, target, sink: Callable):
        self.target = target
        target.sink = sink

    def remove(self) -> None:
        """Stop handing over: the layer still computes with its trained values, and no longer gathers."""
        self.target.sink = None


def remove_all(handles: list) -> None:
    """Remove every hook handle or patched forward in ``handles`` and empty the list (idempotent)."""
    while handles:
        handles.pop().remove()


class GradientGatherer:
    """The selected entries of every target's gradient, gathered in backward; see the module docstring.

    ``targets`` maps names to the model's target parameters and ``keys`` the
    same names to the tensors the optimizer keys its state by (the parameter,
    or its local shard under FSDP2). ``layout_of(key)`` gives the key's current
    (row_offsets, columns). With ``on_gathered``, every gathered gradient is
    handed to ``on_gathered(key, grad)`` at once instead of being buffered.
    ``quantized`` maps the names of 4-bit targets to their
    :class:`~liftft.engine.quantized.QuantizedTarget` (their key in ``targets``
    and ``keys`` alike).
    """

    def __init__(self, model: nn.Module, targets: dict[str, nn.Parameter], keys: dict[str, torch.Tensor],
                 layout_of: Callable, sampled: bool, on_gathered: Callable | None = None,
                 quantized: dict | None = None):
        self.keys = keys
        self.layout_of = layout_of
        self.on_gathered = on_gathered
        self.buffers: dict[torch.Tensor, torch.Tensor] = {}
        self.reduced_by_ddp = False
        self._targets = targets
        self._handed_over: set[torch.Tensor] = set()
        self.handles: list = []
        sharded = {name for name, p in targets.items() if keys[name] is not p}
        quantized = quantized or {}
        plain = {name: p for name, p in targets.items() if name not in quantized}
        try:
            for target in quantized.values():
                self.handles.append(SinkHandle(target, weak_method(self._receive_sampled)))
            if sampled:
                self.handles += sample_weight_gradients(model, plain, weak_method(self._receive_sampled))
            for name, p in plain.items():
                hook = (functools.partial(weak_method(self._receive_shard), keys[name]) if name in sharded
                        else weak_method(self._receive_dense))
                self.handles.append(p.register_post_accumulate_grad_hook(hook))
            self.handles.append(model.register_forward_pre_hook(weak_method(self._notice_ddp)))
        except BaseException:
            self.close()
            raise

    @property
    def pending(self) -> bool:
        """True while gathered gradients wait for ``step()`` (or, under DDP, dense ones wait to be gathered)."""
        return bool(self.buffers) or (self.reduced_by_ddp and any(p.grad is not None for p in self._targets.values()))

    def gathered(self, key: torch.Tensor) -> torch.Tensor | None:
        """The gathered fp32 gradient of ``key``'s selected entries, or None when none arrived."""
        return self.buffers.get(key)

    def clear(self) -> None:
        """Forget every gathered gradient (on zero_grad)."""
        self.buffers.clear()

    def step_done(self) -> None:
        """Forget every gathered gradient and which targets were updated in backward: a new step begins."""
        self.buffers.clear()
        self._handed_over.clear()

    def close(self) -> None:
        """Remove every hook and patched forward; the targets get ordinary dense gradients again. Idempotent."""
        remove_all(self.handles)

    def synchronize(self, dense: list[nn.Parameter]) -> None:
        """Make every rank hold the rank-averaged gradients: gather them under DDP, average the buffers otherwise.

        A no-op in one process and under FSDP2 (whose gradients arrive averaged).
        """
        if self.reduced_by_ddp:
            for name, p in self._targets.items():
                if p.grad is not None:
                    self._receive(self.keys[name], p.grad)
                    p.grad = None
        elif distributed.world_size() > 1 and all(self.keys[n] is p for n, p in self._targets.items()):
            self._average(dense)

    def _average(self, dense: list[nn.Parameter]) -> None:
        """All-reduce the length-k buffers and the dense grads; a rank lacking one contributes zeros."""
        keys = list(self.keys.values())
        device = keys[0].device
        present = torch.tensor([k in self.buffers for k in keys] + [p.grad is not None for p in dense],
                               dtype=torch.float32, device=device)
        for key in keys:
            if key not in self.buffers:
                self.buffers[key] = torch.zeros(self.layout_of(key)[1].numel(), device=key.device)
        for p in dense:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        distributed.average_across_ranks([present, *(self.buffers[k] for k in keys), *(p.grad for p in dense)])
        # Whatever no rank received stays absent, so its moments do not decay, as in one process.
        for t, received in zip(keys + dense, present.tolist()):
            if not received:
                self.buffers.pop(t, None)
                t.grad = None

    # ----- hooks -----

    def _receive_dense(self, p: nn.Parameter) -> None:
        if p.grad is None:
            return  # a sampled_grad target: backward already gathered its selected entries
        if self.reduced_by_ddp:
            return  # DDP has not averaged p.grad yet (it reduces after this hook); synchronize() gathers it
        self._receive(p, p.grad)
        p.grad = None

    def _receive_shard(self, shard: torch.Tensor, p) -> None:
        self._receive(shard, p.grad.to_local())
        p.grad = None

    def _receive_sampled(self, p: nn.Parameter, grad_output: torch.Tensor, inputs: torch.Tensor) -> None:
        if self.reduced_by_ddp:
            raise RuntimeError("sampled_grad does not work under DistributedDataParallel, which averages dense "
                               "gradients only; use LiftConfig(sampled_grad=False)")
        self._take(p, sampled_weight_grad_at(grad_output, inputs, *self.layout_of(p), tuple(p.shape)))

    def _notice_ddp(self, module, args) -> None:
        if self.reduced_by_ddp or DistributedDataParallel._get_active_ddp_module() is None:
            return
        if self.on_gathered is not None:
            raise RuntimeError("LiftAdamW(step_in_backward=True) runs in one process only; under "
                               "DistributedDataParallel the ranks must average gradients before any update")
        if self.buffers:
            raise RuntimeError("the model was wrapped in DistributedDataParallel in the middle of an optimizer step")
        self.reduced_by_ddp = True

    def _receive(self, key: torch.Tensor, grad: torch.Tensor) -> None:
        self._take(key, gather_selected(grad.view(-1), *self.layout_of(key), key.shape[1]))

    def _take(self, key: torch.Tensor, picked: torch.Tensor) -> None:
        if self.on_gathered is None:
            buffer = self.buffers.get(key)
            self.buffers[key] = picked if buffer is None else buffer.add_(picked)
            return
        if key in self._handed_over:
            raise RuntimeError("a second backward pass before step(): LiftAdamW(step_in_backward=True) has already "
                               "applied this step's update and cannot accumulate gradients; call step() after every "
                               "backward, or build it with step_in_backward=False")
        self._handed_over.add(key)
        self.on_gathered(key, picked)
