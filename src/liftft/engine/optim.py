"""`LiftAdamW`: AdamW over the selected entries of each target weight, with no dense gradients kept.

The pieces it orchestrates live beside it: selection (:mod:`liftft.engine.selection`),
the per-target state and what a refresh carries (:mod:`liftft.engine.target_state`),
the gradient hooks (:mod:`liftft.engine.gradients`) and the update itself, torch or
Triton (:mod:`liftft.engine.functional`).
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch import nn

from liftft.utils import distributed
from liftft.engine.config import LiftConfig, check_optimizer_settings, checked_clip
from liftft.engine.functional import adamw_at, clip_coefficient, dense_adamw, gradient_norm, sparse_adamw, use_kernels
from liftft.engine.gradients import GradientGatherer, remove_all
from liftft.engine.layout import index_dtype
from liftft.engine.plan import selection_plan
from liftft.engine.quantized import QuantizedTarget, dequantize, quantized_targets
from liftft.engine.selection import budget
from liftft.engine.target_state import (bias_correction_steps, carried_state, current_fp32, dense_state, flat_indices,
                                 fresh_state, loaded_state, record_touched)
from liftft.engine.targets import check_trainable, find_targets, freeze_all_but, named_dense


class LiftAdamW(torch.optim.Optimizer):
    """Sparse AdamW over the Principal Weights of ``model``'s target matrices.

    Constructing it selects k entries per target (see :class:`LiftConfig`),
    freezes every parameter that is neither a target nor in ``dense_params``,
    and hooks each target so that, once its gradient is accumulated, the k
    selected entries are added into an fp32 buffer and the dense ``.grad`` is
    freed. ``step()`` applies torch.optim.AdamW's update to those entries only
    (unselected entries never change, bit for bit) and to ``dense_params``
    densely; every ``cfg.update_interval`` steps it re-selects from the current
    weights, keeping the moments of entries that stay selected. Construction is
    all or nothing: if it raises, the model is as it was.

    ``max_grad_norm`` clips the global norm over the gathered sparse gradients
    and the dense params' gradients (None or 0: no clipping); a trainer's own
    clipping sees no target gradients, so let this optimizer clip.

    ``step_in_backward=True`` applies each target's update in its gradient
    hook, so no gathered gradient waits for ``step()`` (4 bytes per selected
    entry less at the peak; the same result, bit for bit). Each backward must
    then be followed by one ``step()``: it cannot accumulate gradients, clip,
    or run in several processes, and ``zero_grad()`` cannot undo an update.

    The hooks do not keep the optimizer alive; :meth:`close` (or leaving a
    ``with LiftAdamW(...) as opt:`` block) removes them at once, after which
    the model trains with any other optimizer as if LIFT had never hooked it.

    ``scores`` ({target name: scores}, from :func:`liftft.gradient_scores`)
    are what ``LiftConfig(selector="gradient")`` selects from, once.

    Targets that are bitsandbytes ``Linear4bit`` layers (a model loaded with
    ``BitsAndBytesConfig(load_in_4bit=True)``) are trained as QLIFT
    (:mod:`liftft.engine.quantized`): their packed weights never change, the
    trained entries live beside them in fp32, and the layer computes with
    dequant(W₄) + Δ, its weight gradient taken at the selected entries only.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: LiftConfig,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        dense_params: Iterable[nn.Parameter] | None = None,
        step_in_backward: bool = False,
        scores: dict[str, torch.Tensor] | None = None,
    ):
        check_optimizer_settings(cfg, lr, betas, eps, weight_decay, step_in_backward, max_grad_norm)
        targets, dense, shards, quantized = _trained_tensors(model, cfg, dense_params)
        plan = selection_plan(model, targets, cfg, scores)
        # Under FSDP2 the optimizer works on each target's local shard: plain tensors, indexed like any weight.
        keys = {name: shards.get(name, p) for name, p in targets.items()}

        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        groups = [dict(params=list(keys.values()), kind="lift", names=list(keys), steps=0, refreshes=0)]
        if dense:
            groups.append(dict(params=list(dense.values()), kind="dense", names=list(dense)))
        super().__init__(groups, defaults)
        self.cfg = cfg
        self._plan = plan
        self.step_in_backward = step_in_backward
        self.max_grad_norm = max_grad_norm
        self._grad_norm = None
        self._keys = keys
        self._sharded = {shards[name]: targets[name] for name in shards}
        self._quantized = {target.key: target for target in quantized.values()}
        self._gatherer = GradientGatherer(model, targets, keys, self._layout_of, cfg.sampled_grad,
                                          self._update_in_backward if step_in_backward else None, quantized)
        try:
            self.state.update(self._selections(refresh=False))
        except BaseException:  # construction is all or nothing: no hook may outlive a failed one
            self._gatherer.close()
            raise
        weakref.finalize(self, remove_all, self._gatherer.handles)
        freeze_all_but(model, [p for name, p in targets.items() if name not in quantized] + list(dense.values()))
        for target in quantized.values():
            target.attach()
        # A wrapper that swaps this list for its own (DeepSpeed ZeRO's flat partitions) is caught at step().
        self._lift_params = self._lift_group["params"]

    # ----- public API -----

    def __enter__(self) -> "LiftAdamW":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every gradient hook and patched forward, so the targets get ordinary ``.grad`` again (a 4-bit target
        keeps computing with its trained values, and no longer gathers). Idempotent."""
        self._gatherer.close()

    @property
    def max_grad_norm(self) -> float | None:
        """The global gradient norm ``step()`` clips to; None: no clipping. Set it as at construction: 0 or None is
        no clipping, and with ``step_in_backward`` anything else is refused (:func:`~liftft.engine.config.checked_clip`)."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        self._max_grad_norm = checked_clip(value, self.step_in_backward)

    @property
    def gradients_pending(self) -> bool:
        """True while gathered gradients wait for ``step()`` (or ``zero_grad()``)."""
        return self._gatherer.pending

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run: the optimizer no longer receives gradients."""
        return not self._gatherer.handles

    def indices(self, name: str) -> torch.Tensor:
        """Current sorted flat indices of target ``name``, rebuilt from the compressed state (int32 below 2**31)."""
        key = self._key(name)
        return flat_indices(self.state[key], key.shape[1]).to(index_dtype(key.numel()))

    def state_of(self, name: str) -> dict:
        """The optimizer state of the target weight ``name`` (keys described in :mod:`liftft.engine.target_state`)."""
        return self.state[self._key(name)]

    @property
    def num_selected(self) -> int:
        """Total number of selected entries over all targets (of this rank's rows under FSDP2)."""
        return sum(self.state[key]["columns"].numel() for key in self._keys.values())

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """The gradient norm the last ``step()`` clipped by (before clipping; over the gathered entries and the dense
        params' gradients, as torch's clip_grad_norm_ reports it), a 0-d tensor; None while nothing was clipped."""
        return self._grad_norm

    def trained_parameters(self):
        """Yield (name, parameter, kind) for every trained parameter; kind is "lift" or "dense"."""
        for group in self.param_groups:
            yield from ((name, p, group["kind"]) for name, p in zip(group["names"], group["params"]))

    @property
    def target_names(self) -> list[str]:
        """Names of the target weights, in model order."""
        return list(self._keys)

    @property
    def sharded(self) -> bool:
        """True when the targets are FSDP2-sharded: each rank steps its own rows, and counts are this rank's."""
        return bool(self._sharded)

    def quantized_target(self, name: str) -> QuantizedTarget | None:
        """The :class:`~liftft.engine.quantized.QuantizedTarget` of the 4-bit target ``name``; None for any other
        trained parameter."""
        return self._quantized.get(self._keys.get(name))

    def sharded_parameter(self, shard: torch.Tensor):
        """Under FSDP2, the DTensor parameter whose local shard is ``shard`` (what :meth:`trained_parameters` yields)."""
        return self._sharded[shard]

    def trained_entries(self, name: str):
        """(indices, base values) on the host of all that parameter ``name`` has trained: for a target, every entry
        ever selected (of this rank's shard under FSDP2); for a dense param, None and the whole value; None for a
        dense param never stepped."""
        trained = {n: p for n, p, _ in self.trained_parameters()}
        if name not in trained:
            raise KeyError(f"{name!r} is not trained by this optimizer; trained: {', '.join(trained)}")
        p = trained[name]
        state = self.state[p]
        if "base" not in state:
            return None
        return (state["touched"] if name in self._keys else None), state["base"]

    def refresh(self) -> None:
        """Re-select every target from its current weights, carrying the state of entries that stay."""
        self._refuse_if_pending("refresh()")
        # Each target's new state replaces its old one before the next group is selected, bounding the memory.
        for key, state in self._selections(refresh=True):
            self.state[key] = state
        self._lift_group["refreshes"] += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gathered sparse gradients and the dense params' gradients."""
        self._gatherer.clear()
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        """Apply one AdamW step to the selected entries and the dense params, then refresh if due."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_steppable()
        dense = self._dense_params()
        self._gatherer.synchronize(dense)
        clip = self._clip_coefficient(dense)
        for p in dense:
            self._step_dense(p, clip)
        if not self.step_in_backward:
            for key in self._keys.values():
                self._step_target(key, self._gatherer.gathered(key), clip)
        self._gatherer.step_done()
        lift = self._lift_group
        lift["steps"] += 1
        if self.cfg.update_interval is not None and lift["steps"] % self.cfg.update_interval == 0:
            self.refresh()
        return loss

    def load_state_dict(self, state_dict) -> None:
        """Load a :meth:`state_dict`, keeping every state tensor's saved dtype (torch would cast to the weight's)."""
        self._refuse_if_pending("load_state_dict()")
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        self.state.update({p: loaded_state(saved[i], p) for i, p in enumerate(params) if i in saved})
        for key, target in self._quantized.items():  # entries selected in the saved state and never trained here
            target.include(flat_indices(self.state[key], key.shape[1]))

    # ----- internals -----

    @property
    def _lift_group(self) -> dict:
        return self.param_groups[0]

    def _key(self, name: str) -> torch.Tensor:
        if name not in self._keys:
            raise KeyError(f"{name!r} is not a LIFT target; targets: {', '.join(self._keys)}")
        return self._keys[name]

    def _dense_params(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups[1:] for p in group["params"]]

    def _layout_of(self, key: torch.Tensor):
        state = self.state[key]
        return state["row_offsets"], state["columns"]

    def _refuse_if_pending(self, what: str) -> None:
        if self._gatherer.pending:
            raise RuntimeError(f"{what} with gathered gradients pending would apply them to other entries; "
                               "call step() or zero_grad() first")

    def _check_steppable(self) -> None:
        if self.closed:
            raise RuntimeError("this LiftAdamW was closed and receives no gradients; build a new one to go on")
        if self._lift_group["params"] is not self._lift_params:
            raise RuntimeError("LiftAdamW's parameter groups were replaced by a wrapper (DeepSpeed ZeRO does this); "
                               f"LIFT cannot follow flattened partitions. Use {distributed.SUPPORTED}.")

    def _clip_coefficient(self, dense: list[nn.Parameter]):
        max_norm = self.max_grad_norm
        self._grad_norm = None
        if max_norm is None:
            return None
        grads = [*self._gatherer.buffers.values(), *(p.grad for p in dense if p.grad is not None)]
        # Under FSDP2 each rank holds the entries of its own rows.
        self._grad_norm = gradient_norm(grads, distributed.root_sum_of_squares_across_ranks if self._sharded else None)
        return None if self._grad_norm is None else clip_coefficient(self._grad_norm, max_norm)

    def _selections(self, refresh: bool):
        refreshes = self._lift_group["refreshes"] + int(refresh)
        return _selections(self._keys, self._sharded, self._quantized, self.state, self.cfg, self._plan, refreshes,
                           refresh)

    def _update_in_backward(self, key: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.no_grad():
            self._step_target(key, grad, None)

    def _step_target(self, key, grad, clip) -> None:
        if grad is None:
            return
        state = self.state[key]
        state["step"] += 1
        group = self._lift_group
        hyper = (group["lr"], *group["betas"], group["eps"], group["weight_decay"])
        target = self._quantized.get(key)
        if target is not None:  # the trained values stand in for the weight's
            positions = target.positions(flat_indices(state, key.shape[1]))
            adamw_at(target.values, positions, grad, state["exp_avg"], state["exp_avg_sq"], None,
                     bias_correction_steps(state), *hyper, clip=clip)
            return
        sparse_adamw(key.data.view(-1), state["row_offsets"], state["columns"], key.shape[1], grad,
                     state["exp_avg"], state["exp_avg_sq"], state.get("master"), bias_correction_steps(state),
                     *hyper, clip=clip)

    def _step_dense(self, p, clip) -> None:
        if p.grad is None:
            return
        state = self.state[p]
        if not state:
            state.update(dense_state(p, self.cfg))
        state["step"] += 1
        group = self.param_groups[1]
        dense_adamw(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state.get("master"), int(state["step"].item()),
                    group["lr"], *group["betas"], group["eps"], group["weight_decay"], clip=clip)


@torch.no_grad()
def _selections(keys: dict[str, torch.Tensor], sharded: dict, quantized: dict, states, cfg: LiftConfig, plan,
                refreshes: int, refresh: bool):
    """Yield (key, state) for every target as its selection is made, same-shaped targets batched.

    ``keys`` maps target names to the tensors the state is keyed by; ``states``
    is the optimizer's state; ``plan`` makes the selections. Under FSDP2 (``sharded`` maps a local shard to its
    DTensor) a target is selected from its whole matrix (budget, grouping and
    SVD by the full shape), and every rank takes rank 0's selection. A 4-bit
    target (``quantized`` maps its key to its QuantizedTarget) is selected
    from dequant(W₄) + Δ, and its newly selected entries join its trained values.
    """
    names, keys = list(keys), list(keys.values())
    whole = [sharded.get(key, key) for key in keys]
    position = {id(w): i for i, w in enumerate(whole)}

    def current(w):
        i = position[id(w)]
        if keys[i] in quantized:
            return _finite(quantized[keys[i]].dense(torch.float32), names[i])
        local = current_fp32(keys[i], states[keys[i]]) if refresh else keys[i].detach()
        return _finite(distributed.whole_matrix(local, sharded.get(keys[i])), names[i])

    ks = [budget(tuple(w.shape), rank=cfg.rank, density=cfg.density) for w in whole]
    for i, idx in plan.iter_select(whole, ks, refreshes, prepare=current):
        key = keys[i]
        idx = distributed.agreed_indices(idx, sharded.get(key))
        previous = states[key] if refresh else None
        new = carried_state(previous, key, idx, cfg) if refresh else fresh_state(key, idx, cfg)
        yield key, record_touched(new, idx, previous, _standing_values(key, quantized.get(key), idx))


def _finite(matrix: torch.Tensor, name: str) -> torch.Tensor:
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"target {name} holds non-finite values (nan or inf); LIFT cannot select from it")
    return matrix


def _standing_values(key: torch.Tensor, target: QuantizedTarget | None, selected: torch.Tensor) -> torch.Tensor:
    """``key``'s matrix flattened as it stands, base values where never trained; a 4-bit target's dequant(W₄),
    after its newly ``selected`` entries join its trained values."""
    if target is None:
        return key.detach().view(-1)
    base = dequantize(target.module)
    target.include(selected, base)
    return base.view(-1)


def _trained_tensors(model: nn.Module, cfg: LiftConfig, dense_params):
    """(targets, dense params, FSDP2 local shards of the targets), all by name, checked before anything changes."""
    distributed.reject_wrapped(model)
    targets = find_targets(model, cfg.target_modules, cfg.exclude_modules)
    quantized = quantized_targets(model, targets)
    targets.update({name: target.key for name, target in quantized.items()})
    dense = named_dense(model, dense_params, targets)
    check_trainable({**targets, **dense}, quantized=set(quantized))
    shards = distributed.local_shards(targets)
    if shards and quantized:
        raise ValueError("4-bit targets cannot be FSDP2-sharded; train a 4-bit base in one process or with "
                         "torchrun/accelerate launch without FSDP2 (each process holds the whole 4-bit model)")
    if shards and dense:
        raise ValueError("dense_params are not supported with FSDP2-sharded targets; train them in another optimizer")
    if shards and cfg.sampled_grad:
        raise ValueError("sampled_grad does not work with FSDP2-sharded targets; use LiftConfig(sampled_grad=False)")
    for p in (shards or targets).values():
        use_kernels(p)  # the kernels' first-use check syncs with the device: run it now, never in a hook or step()
    return targets, dense, shards, quantized
