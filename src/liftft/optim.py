"""`LiftAdamW`: AdamW over the selected entries of each target weight, with no dense gradients kept."""

from __future__ import annotations

import functools
import math
from typing import Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from liftft import distributed
from liftft.config import LiftConfig
from liftft.layout import compress, expand
from liftft.sampled import sample_weight_gradients, sampled_weight_grad_at
from liftft.selection import budget, index_dtype, iter_select_many
from liftft.targets import find_targets

_SIXTEEN_BIT = (torch.bfloat16, torch.float16)
# Kept on the CPU: the step count, and the record of every entry ever trained with its
# base value (what save_delta needs), which the step never reads.
HOST_STATE = ("step", "touched", "base")


def selection_seed(seed: int, ordinal: int, refreshes: int = 0) -> int:
    """The seed of target number ``ordinal``'s selection after ``refreshes`` refreshes (used by "random" and randomized SVD)."""
    return seed + 7919 * ordinal + 104729 * refreshes


def adamw_update(param, grad, exp_avg, exp_avg_sq, step: int, lr, beta1, beta2, eps, weight_decay) -> None:
    """One torch.optim.AdamW update of fp32 ``param`` in place (decoupled decay, eps after sqrt(v̂))."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


class LiftAdamW(torch.optim.Optimizer):
    """Sparse AdamW over the Principal Weights of ``model``'s target matrices.

    Constructing it selects k entries per target (see :class:`LiftConfig`),
    freezes every parameter that is neither a target nor in ``dense_params``,
    and hooks each target so that, once its gradient is accumulated, the k
    selected entries are added into an fp32 buffer and the dense ``.grad`` is
    freed. ``step()`` applies torch.optim.AdamW's update to those entries only
    (unselected entries never change, bit for bit) and to ``dense_params``
    densely; every ``cfg.update_interval`` steps it re-selects from the current
    weights, keeping the moments of entries that stay selected.

    ``max_grad_norm`` clips the global norm over the gathered sparse gradients
    and the dense params' gradients; a trainer's own clipping sees no target
    gradients, so let this optimizer clip.

    ``step_in_backward=True`` applies each target's update inside its gradient
    hook, as soon as backward has produced its gradient, so no gathered gradient
    is kept between backward and ``step()`` (4 bytes per selected entry less at
    the peak); ``step()`` then updates the dense params and refreshes. The
    result is the same, bit for bit, but one backward pass must be followed by
    one ``step()``: it cannot accumulate gradients (a second backward before
    ``step()`` raises), clip (``max_grad_norm``), or run in several processes,
    and ``zero_grad()`` cannot take back an update already applied.
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
    ):
        if not isinstance(cfg, LiftConfig):
            raise TypeError(f"cfg must be a LiftConfig, got {type(cfg).__name__}")
        _check_hyperparameters(lr, betas, eps, weight_decay, max_grad_norm)
        _check_step_in_backward(step_in_backward, max_grad_norm)
        _check_not_wrapped(model)
        targets = find_targets(model, cfg.target_modules, cfg.exclude_modules)
        dense = _named_dense(model, dense_params, targets)
        for name, p in targets.items():
            if not p.is_contiguous():
                raise ValueError(f"target {name} is not contiguous; LIFT indexes its flat storage")
        # Under FSDP2 the optimizer works on each target's local shard: plain tensors, indexed like any weight.
        shards = distributed.local_shards(targets)
        if shards and dense:
            raise ValueError("dense_params are not supported with FSDP2-sharded targets; train them in another optimizer")
        if shards and cfg.sampled_grad:
            raise ValueError("sampled_grad does not work with FSDP2-sharded targets; use LiftConfig(sampled_grad=False)")
        routed = sample_weight_gradients(model, targets, self._gather_sampled_grad) if cfg.sampled_grad else []
        _freeze_all_but(model, list(targets.values()) + list(dense.values()))
        trained = {name: shards.get(name, p) for name, p in targets.items()}

        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        groups = [dict(params=list(trained.values()), kind="lift", names=list(trained), steps=0, refreshes=0)]
        if dense:
            groups.append(dict(params=list(dense.values()), kind="dense", names=list(dense)))
        super().__init__(groups, defaults)
        self.cfg = cfg
        self.max_grad_norm = max_grad_norm
        self.step_in_backward = step_in_backward
        # Targets already updated by a hook since the last step() (step_in_backward only).
        self._stepped_in_backward: set[torch.Tensor] = set()
        self._params = trained
        self._sharded = {shards[name]: targets[name] for name in shards}
        self._grad_buffers: dict[nn.Parameter, torch.Tensor] = {}
        # Set once the model runs inside DistributedDataParallel: DDP then averages the dense gradients.
        self._reduced_by_ddp = False
        self._hooks = [
            p.register_post_accumulate_grad_hook(
                functools.partial(self._gather_shard_grad, shards[name]) if name in shards else self._gather_grad)
            for name, p in targets.items()
        ]
        self._hooks.append(model.register_forward_pre_hook(self._note_ddp_forward))
        self._hooks += routed
        self._select_all(refresh=False)
        # A wrapper that swaps this list for its own (DeepSpeed ZeRO's flat partitions) is caught at step().
        self._lift_params = self._lift_group["params"]

    # ----- public API -----

    def indices(self, name: str) -> torch.Tensor:
        """Current sorted flat indices of the target weight ``name`` (as in model.named_parameters()).

        The state keeps them compressed (see :mod:`liftft.layout`); this rebuilds
        them, int32 below 2**31 entries.
        """
        if name not in self._params:
            raise KeyError(f"{name!r} is not a LIFT target; targets: {', '.join(self._params)}")
        p = self._params[name]
        return self._flat_indices(p).to(index_dtype(p.numel()))

    @property
    def num_selected(self) -> int:
        """Total number of selected entries over all targets."""
        return sum(self.state[p]["columns"].numel() for p in self._params.values())

    def trained_parameters(self):
        """Yield (name, parameter, kind) for every trained parameter; kind is "lift" or "dense"."""
        for group in self.param_groups:
            yield from ((name, p, group["kind"]) for name, p in zip(group["names"], group["params"]))

    @property
    def target_names(self) -> list[str]:
        """Names of the target weights, in model order."""
        return list(self._params)

    def sharded_parameter(self, shard: torch.Tensor):
        """Under FSDP2, the DTensor parameter whose local shard is ``shard`` (what :meth:`trained_parameters` yields)."""
        return self._sharded[shard]

    def refresh(self) -> None:
        """Re-select every target from its current weights, carrying the state of entries that stay."""
        self._select_all(refresh=True)
        self._lift_group["refreshes"] += 1

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (targets then keep ordinary dense ``.grad``)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gathered sparse gradients and the dense params' gradients."""
        self._grad_buffers.clear()
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        """Apply one AdamW step to the selected entries and the dense params, then refresh if due."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._lift_group["params"] is not self._lift_params:
            raise RuntimeError("LiftAdamW's parameter groups were replaced by a wrapper (DeepSpeed ZeRO does this); "
                               f"LIFT cannot follow flattened partitions. Use {distributed.SUPPORTED}.")
        if self.step_in_backward and self.max_grad_norm is not None:
            raise RuntimeError(f"max_grad_norm was set to {self.max_grad_norm} on a LiftAdamW(step_in_backward=True), "
                               "whose targets were already updated, unclipped, during backward")
        self._synchronize_gradients()
        clip = self._clip_coefficient()
        for group in self.param_groups:
            for p in group["params"]:
                if group["kind"] == "dense":
                    self._step_dense(p, group, clip)
                elif not self.step_in_backward:
                    self._step_target(p, group, self._grad_buffers.get(p), clip)
        self._grad_buffers.clear()
        self._stepped_in_backward.clear()
        lift = self._lift_group
        lift["steps"] += 1
        interval = self.cfg.update_interval
        if interval is not None and lift["steps"] % interval == 0:
            self.refresh()
        return loss

    def load_state_dict(self, state_dict) -> None:
        """Load a :meth:`state_dict`, keeping every state tensor's saved dtype (torch would cast to the weight's)."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            if i in saved:
                state = {
                    key: value.to(p.device) if torch.is_tensor(value) and key not in HOST_STATE else value
                    for key, value in saved[i].items()
                }
                if "indices" in state:  # saved before the indices were kept compressed
                    state["row_offsets"], state["columns"] = compress(state.pop("indices"), tuple(p.shape))
                self.state[p] = state

    # ----- internals -----

    @property
    def _lift_group(self) -> dict:
        return self.param_groups[0]

    def _gather_grad(self, p: nn.Parameter) -> None:
        """Hook: add the selected entries of p.grad into p's fp32 buffer and free the dense gradient."""
        if p.grad is None:
            return  # a sampled_grad target: backward already gathered its selected entries
        if self._reduced_by_ddp:
            return  # DDP has not averaged p.grad yet (it reduces after this hook); step() gathers it
        self._add_selected(p, p.grad)
        p.grad = None

    def _gather_shard_grad(self, shard: torch.Tensor, p) -> None:
        """Hook on an FSDP2 DTensor target: its gradient is this rank's shard of the rank-averaged gradient."""
        self._add_selected(shard, p.grad.to_local())
        p.grad = None

    def _add_selected(self, key: torch.Tensor, grad: torch.Tensor) -> None:
        if _fused_step_available(key):
            from liftft.kernels import gather_selected

            state = self.state[key]
            self._receive(key, gather_selected(grad.view(-1), state["row_offsets"], state["columns"], key.shape[1]))
        else:
            self._receive(key, grad.view(-1).index_select(0, self._flat_indices(key)).float())

    def _flat_indices(self, p) -> torch.Tensor:
        """p's selected entries as sorted int64 flat indices, rebuilt from the compressed state."""
        state = self.state[p]
        return expand(state["row_offsets"], state["columns"], p.shape[1])

    def _receive(self, key: torch.Tensor, picked: torch.Tensor) -> None:
        """Take a target's fp32 gradient at its selected entries: add it to its buffer, or apply it now (step_in_backward)."""
        if not self.step_in_backward:
            buffer = self._grad_buffers.get(key)
            self._grad_buffers[key] = picked if buffer is None else buffer.add_(picked)
            return
        if key in self._stepped_in_backward:
            raise RuntimeError("a second backward pass before step(): LiftAdamW(step_in_backward=True) has already "
                               "applied this step's update and cannot accumulate gradients; call step() after every "
                               "backward, or build it with step_in_backward=False")
        self._stepped_in_backward.add(key)
        with torch.no_grad():
            self._step_target(key, self._lift_group, picked, None)

    def _gather_sampled_grad(self, p: nn.Parameter, grad_output: torch.Tensor, inputs: torch.Tensor) -> None:
        """Sink of liftft.sampled (cfg.sampled_grad): add p's weight gradient, computed at the selected entries only."""
        if self._reduced_by_ddp:
            raise RuntimeError("sampled_grad does not work under DistributedDataParallel, which averages dense "
                               "gradients only; use LiftConfig(sampled_grad=False)")
        state = self.state[p]
        self._receive(p, sampled_weight_grad_at(grad_output, inputs, state["row_offsets"], state["columns"], tuple(p.shape)))

    def _note_ddp_forward(self, module, args) -> None:
        """Forward pre-hook: notice when the model runs inside DistributedDataParallel."""
        if self._reduced_by_ddp or DistributedDataParallel._get_active_ddp_module() is None:
            return
        if self.step_in_backward:
            raise RuntimeError("LiftAdamW(step_in_backward=True) runs in one process only; under "
                               "DistributedDataParallel the ranks must average gradients before any update")
        if self._grad_buffers:
            raise RuntimeError("the model was wrapped in DistributedDataParallel in the middle of an optimizer step")
        self._reduced_by_ddp = True

    def _synchronize_gradients(self) -> None:
        """Make every rank hold the rank-averaged gathered gradients (a no-op in one process and under FSDP2)."""
        if self._reduced_by_ddp:
            for p in self._params.values():
                if p.grad is not None:
                    self._add_selected(p, p.grad)
                    p.grad = None
        elif not self._sharded and distributed.world_size() > 1:
            self._average_gradients()

    def _average_gradients(self) -> None:
        """All-reduce the length-k buffers and the dense grads; a rank lacking one contributes zeros."""
        lift = list(self._params.values())
        dense = [p for g in self.param_groups if g["kind"] == "dense" for p in g["params"]]
        device = lift[0].device
        present = torch.tensor([p in self._grad_buffers for p in lift] + [p.grad is not None for p in dense],
                               dtype=torch.float32, device=device)
        for p in lift:
            if p not in self._grad_buffers:
                self._grad_buffers[p] = torch.zeros(self.state[p]["columns"].numel(), device=p.device)
        for p in dense:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        distributed.average_across_ranks([present, *(self._grad_buffers[p] for p in lift), *(p.grad for p in dense)])
        # Whatever no rank received stays absent, so its moments do not decay, as in one process.
        for p, received in zip(lift + dense, present.tolist()):
            if not received:
                self._grad_buffers.pop(p, None)
                p.grad = None

    def _clip_coefficient(self):
        if self.max_grad_norm is None:
            return None
        grads = list(self._grad_buffers.values())
        grads += [p.grad for g in self.param_groups if g["kind"] == "dense" for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        if self._sharded:  # each rank holds the entries of its own rows
            total = distributed.root_sum_of_squares_across_ranks(total)
        # Same rule as torch.nn.utils.clip_grad_norm_, kept on device: no host sync.
        return (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)

    def _step_target(self, p, group, grad, clip) -> None:
        if grad is None:
            return
        state = self.state[p]
        state["step"] += 1
        step = int(state["step"].item())
        beta1, beta2 = group["betas"]
        hyperparameters = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        flat = p.data.view(-1)
        if _fused_step_available(p):
            from liftft.kernels import sparse_adamw_step

            sparse_adamw_step(flat, state["row_offsets"], state["columns"], p.shape[1], grad, state["exp_avg"],
                              state["exp_avg_sq"], state.get("master"), step, *hyperparameters, clip=clip)
            return
        idx = self._flat_indices(p)
        if clip is not None:
            grad = grad * clip
        values = state["master"] if "master" in state else flat.index_select(0, idx).float()
        adamw_update(values, grad, state["exp_avg"], state["exp_avg_sq"], step, *hyperparameters)
        flat.index_put_((idx,), values.to(flat.dtype))

    def _step_dense(self, p, group, clip) -> None:
        if p.grad is None:
            return
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["base"] = p.detach().cpu().clone()
            if self.cfg.master_weights and p.dtype in _SIXTEEN_BIT:
                state["master"] = p.detach().float()
        grad = p.grad.float()
        if clip is not None:
            grad = grad * clip
        state["step"] += 1
        values = state["master"] if "master" in state else (p.data if p.dtype == torch.float32 else p.data.float())
        beta1, beta2 = group["betas"]
        adamw_update(values, grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"].item()),
                     group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        if values is not p.data:
            p.data.copy_(values)

    @torch.no_grad()
    def _select_all(self, refresh: bool) -> None:
        """Select every target, same-shaped ones batched, turning each group's result into state before the next."""
        cfg = self.cfg
        refreshes = self._lift_group["refreshes"] + int(refresh)
        params = list(self._params.values())
        # Under FSDP2 a target is selected from its whole matrix: group, budget and gather by the full shape.
        whole = [self._sharded.get(p, p) for p in params]
        param_of = {id(w): p for w, p in zip(whole, params)}

        def current(w):
            p = param_of[id(w)]
            return self._whole_matrix(p, self._current_fp32(p) if refresh else p.detach())

        ks = [budget(tuple(w.shape), rank=cfg.rank, density=cfg.density) for w in whole]
        seeds = [selection_seed(cfg.seed, ordinal, refreshes) for ordinal in range(len(params))]
        selections = iter_select_many(whole, ks, cfg.selector, cfg.filter_rank, cfg.svd, seeds, prepare=current)
        for i, idx in selections:
            p = params[i]
            idx = self._agreed_indices(p, idx)
            new = self._carried_state(p, idx) if refresh else self._fresh_state(p, idx)
            self.state[p] = _with_touched(new, idx, self.state[p] if refresh else None, p)

    def _whole_matrix(self, p, current: torch.Tensor) -> torch.Tensor:
        """The matrix to select from: ``current``, or under FSDP2 every rank's shard of it gathered."""
        sharded = self._sharded.get(p)
        return current if sharded is None else distributed.full_matrix(current, sharded)

    def _agreed_indices(self, p, idx: torch.Tensor) -> torch.Tensor:
        """Rank 0's selection, on every rank; under FSDP2 only the part in this rank's rows, as shard indices."""
        idx = distributed.broadcast_from_rank0(idx)
        sharded = self._sharded.get(p)
        if sharded is None:
            return idx
        return distributed.local_indices(idx, distributed.shard_rows(sharded), sharded.shape[1])

    def _current_fp32(self, p) -> torch.Tensor:
        """p in fp32 with its master values written in, so selection sees the true current weights."""
        state = self.state[p]
        current = p.detach().float()
        if "master" in state:
            current.view(-1).index_put_((self._flat_indices(p),), state["master"])
        return current

    def _fresh_state(self, p, idx) -> dict:
        k = idx.numel()
        row_offsets, columns = compress(idx, tuple(p.shape))
        state = {
            "step": torch.tensor(0.0),
            "row_offsets": row_offsets,
            "columns": columns,
            "exp_avg": torch.zeros(k, dtype=torch.float32, device=p.device),
            "exp_avg_sq": torch.zeros(k, dtype=torch.float32, device=p.device),
        }
        if self.cfg.master_weights and p.dtype in _SIXTEEN_BIT:
            state["master"] = p.detach().view(-1).index_select(0, idx).float()
        return state

    def _carried_state(self, p, idx) -> dict:
        """State for new indices ``idx``: moments and masters of kept entries move over, new ones start fresh."""
        old = self.state[p]
        new = self._fresh_state(p, idx)
        new["step"] = old["step"]
        old_idx = self._flat_indices(p).to(idx.dtype)
        pos = torch.searchsorted(old_idx, idx).clamp_(max=old_idx.numel() - 1)
        kept = old_idx[pos] == idx
        for key in ("exp_avg", "exp_avg_sq", "master"):
            if key in old:
                new[key] = torch.where(kept, old[key][pos], new[key])
        return new


def _fused_step_available(p: torch.Tensor) -> bool:
    """Whether p's sparse step runs as liftft.kernels' fused Triton kernel (CUDA with Triton only)."""
    if not p.is_cuda:
        return False
    from liftft.kernels import fused_available  # imports Triton, so only ever for CUDA parameters

    return fused_available(p.device)


def _with_touched(state: dict, selected: torch.Tensor, previous: dict | None, p) -> dict:
    """Add to ``state`` the sorted union of all entries ever selected (``selected`` now), with their base values.

    The record lives on the host, but is merged on p's device, one matrix at a
    time, so the device holds only one matrix's record at once. (On the CPU the
    merge took 0.12 s for one 8192x2048 matrix of Llama-3.2-1B, so tens of
    seconds per refresh over all of them; a GPU does it in a fraction of that.)
    """
    flat = p.detach().view(-1)
    if previous is None:
        state["touched"], state["base"] = selected.cpu(), flat[selected].cpu()
        return state
    touched = previous["touched"].to(selected.device)
    selected = selected.to(touched.dtype)
    pos = torch.searchsorted(touched, selected).clamp_(max=touched.numel() - 1)
    new = selected[touched[pos] != selected]
    # Entries never selected before were never changed: their current value is the base value.
    merged, base = _merge_sorted(touched, previous["base"].to(flat.device), new, flat[new])
    state["touched"], state["base"] = merged.cpu(), base.cpu()
    return state


def _merge_sorted(a, a_values, b, b_values):
    """Merge two disjoint sorted index tensors and their values in O(n log m), without a full sort, on a's device."""
    merged = torch.empty(a.numel() + b.numel(), dtype=a.dtype, device=a.device)
    values = torch.empty(merged.numel(), dtype=a_values.dtype, device=a.device)
    a_at = torch.arange(a.numel(), device=a.device) + torch.searchsorted(b, a)
    b_at = torch.arange(b.numel(), device=a.device) + torch.searchsorted(a, b)
    merged[a_at], values[a_at] = a, a_values
    merged[b_at], values[b_at] = b, b_values
    return merged, values


def _check_step_in_backward(step_in_backward, max_grad_norm) -> None:
    if not isinstance(step_in_backward, bool):
        raise TypeError(f"step_in_backward must be True or False, got {step_in_backward!r}")
    if not step_in_backward:
        return
    if max_grad_norm is not None:
        raise ValueError(f"step_in_backward=True updates each target before the global gradient norm is known, so it "
                         f"cannot clip (max_grad_norm={max_grad_norm!r}); set max_grad_norm=None or step_in_backward=False")
    if distributed.world_size() > 1:
        raise ValueError(f"step_in_backward=True runs in one process only (world size {distributed.world_size()}): "
                         "the ranks must average gradients before any update")


def _check_hyperparameters(lr, betas, eps, weight_decay, max_grad_norm) -> None:
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")


def _named_dense(model, dense_params, targets) -> dict[str, nn.Parameter]:
    if dense_params is None:
        return {}
    names = {id(p): n for n, p in model.named_parameters()}
    target_ids = {id(p) for p in targets.values()}
    dense = {}
    for p in dense_params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"dense_params must hold tensors, got {type(p).__name__}")
        if id(p) not in names:
            raise ValueError(f"a dense param of shape {tuple(p.shape)} is not a parameter of the model")
        if id(p) in target_ids:
            raise ValueError(f"{names[id(p)]} is both a LIFT target and in dense_params")
        dense[names[id(p)]] = p
    return dense


def _freeze_all_but(model: nn.Module, trained: list[nn.Parameter]) -> None:
    trained_ids = {id(p) for p in trained}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained_ids)
    for p in trained:
        p.requires_grad_(True)


def _check_not_wrapped(model: nn.Module) -> None:
    if isinstance(model, DistributedDataParallel):
        raise ValueError("build LiftAdamW on the bare model (ddp.module) and wrap it in DistributedDataParallel "
                         "afterwards, so that DDP only reduces the parameters LIFT trains")
    distributed.reject_deepspeed(model)
