"""`liftft estimate`: per-GPU memory and bytes communicated per optimizer step, from a model's config alone.

The model is built on the meta device (shapes, no storage), so a 70B config
costs nothing to plan. Weights, trained count, optimizer state, gradients and
the bytes liftft hands to collectives are counted through the code paths the
optimizers use (find_targets, selection.budget, LiftAdamW's state layout, PEFT's
adapters, torch AdamW) and equal real objects byte for byte on the CPU
(tests/test_estimate.py). Activations, logits and transient buffers are
estimates (:mod:`liftft.planning.activations`, :func:`buffer_bytes`); the total is the
plain sum, an upper bound of the peak, and has not been compared with a GPU
measurement yet (bench/RESULTS.md holds none). docs/estimate.md has every
formula and assumption.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from liftft.planning.activations import FP32, activation_bytes, logits_bytes
from liftft.planning.communication import communication as collectives, link_bytes
from liftft.planning.quantized import FOUR_BIT_ASSUMPTION, model_bytes
from liftft.utils.quantization import check_4bit_settings
from liftft.engine.config import LiftConfig
from liftft.engine.layout import column_dtype, index_dtype
from liftft.engine.methods import PEFT_METHODS, SPARSE_SELECTORS, method_config
from liftft.engine.preflight import meta_model_from_config
from liftft.engine.selection import budget
from liftft.engine.targets import find_targets

GIB = 2**30
# An "80 GB" GPU holds 80 GiB; 80e9 bytes (74.5 GiB) leaves room for CUDA's context and allocator fragmentation.
GPU_BYTES = 80 * 10**9
DTYPES = ("bfloat16", "float32")
LOSSES = ("chunked", "full")


@dataclass
class Estimate:
    """Per-GPU bytes by part (``memory``), the trained count, and bytes communicated per optimizer step.

    ``memory`` has weights, gradients, optimizer_state, activations, logits and
    buffers (transients). ``communication`` maps each collective to the bytes
    liftft hands it per optimizer step (the whole tensor, before any ring
    splits it); ``link_bytes`` is what passes through each GPU's link for them
    with ring algorithms. ``refresh_bytes`` is communicated once per LIFT
    refresh (0 for method gradient, which never refreshes). ``host_bytes`` is
    LiftAdamW's CPU-side record (indices and base values of every trained
    entry, at the start). ``bytes_per_trained_entry`` is optimizer_state over
    this GPU's share of the trained count.
    """

    settings: dict
    parameters: int
    trainable: int
    memory: dict
    bytes_per_trained_entry: float
    host_bytes: int
    communication: dict
    link_bytes: int
    refresh_bytes: int
    assumptions: list

    @property
    def total(self) -> int:
        """The sum of the per-GPU parts."""
        return sum(self.memory.values())

    def fits(self, gpu_bytes: int = GPU_BYTES) -> bool:
        """Whether the total is at most ``gpu_bytes`` (an 80 GB GPU by default)."""
        return self.total <= gpu_bytes

    def to_dict(self) -> dict:
        """JSON-ready figures, with the total and whether it fits an 80 GB GPU."""
        return {**asdict(self), "total": self.total, "fits_80gb": self.fits()}


def estimate(config, method: str = "lift", *, gpus: int = 1, fsdp: bool = False, batch_size: int = 1,
             seq_len: int = 2048, gradient_checkpointing: bool = False, rank: int | None = None,
             density: float | None = None, step_in_backward: bool = False, dtype: str = "bfloat16",
             loss: str | None = None, target_modules="all-linear", bias_correction: str = "matrix",
             load_in_4bit: bool = False, quant_type: str = "nf4", nested: bool = False) -> Estimate:
    """Plan ``method`` on the model of transformers ``config`` over ``gpus`` GPUs, per GPU; see the module docstring.

    ``batch_size`` is per GPU and one micro-batch makes an optimizer step.
    ``rank`` or ``density`` set the budget (rank 128 when neither is given),
    ``dtype`` is "bfloat16" (liftft train's mixed precision) or "float32",
    ``loss`` "chunked" or "full"; None is what liftft train computes: full
    logits under ``fsdp``, chunked otherwise. ``load_in_4bit`` plans on a
    bitsandbytes 4-bit base (``quant_type`` nf4 or fp4, which take the same
    bytes; ``nested``: nested quantization): QLIFT for the
    sparse methods, QLoRA and QDoRA for lora and dora. Raises ValueError for
    settings that liftft would refuse and for a config that is no causal LM.
    """
    loss = loss or ("full" if fsdp else "chunked")
    _check_settings(method, gpus, fsdp, batch_size, seq_len, step_in_backward, dtype, loss, config)
    check_4bit_settings(method, fsdp=fsdp, load_in_4bit=load_in_4bit, quant_type=quant_type, nested=nested)
    # Method gradient selects once, so it takes no refresh interval.
    interval = None if method == "gradient" else LiftConfig.update_interval
    cfg = method_config(method, LiftConfig(rank=128 if rank is None and density is None else rank, density=density,
                                           target_modules=target_modules, bias_correction=bias_correction,
                                           update_interval=interval))
    mixed = dtype == "bfloat16"
    weight_dtype = torch.float32 if method == "full" or not mixed else torch.bfloat16
    model = meta_model_from_config(config, weight_dtype)
    shards = gpus if fsdp else 1
    if method in SPARSE_SELECTORS:
        plan = _sparse_plan(model, cfg, shards, step_in_backward, load_in_4bit)
    else:
        plan = _dense_plan(model, method, cfg, shards, load_in_4bit)
    compute = 2 if mixed else FP32
    tokens = batch_size * seq_len
    # PEFT's prepare_model_for_kbit_training casts every 16-bit parameter left unquantized to fp32.
    weights = model_bytes(model, nested, FP32 if method in PEFT_METHODS else None) if load_in_4bit else \
        sum(_shard_numel(p.shape, shards) * p.element_size() for p in model.parameters())
    memory = {
        "weights": weights + plan.extra_weights,
        "gradients": plan.gradients,
        "optimizer_state": plan.state,
        "activations": activation_bytes(config, tokens, gradient_checkpointing, compute)
        + _method_activations(model, method, cfg, tokens, mixed, gradient_checkpointing),
        "logits": logits_bytes(config.vocab_size, tokens, loss, compute),
        "buffers": buffer_bytes(model, plan, gpus, fsdp, compute),
    }
    communication = collectives(plan, _unit_numels(model), gpus, fsdp, compute)
    budgeted = method != "full"
    settings = dict(method=method, gpus=gpus, fsdp=fsdp, batch_size=batch_size, seq_len=seq_len,
                    gradient_checkpointing=gradient_checkpointing, rank=cfg.rank if budgeted else None,
                    density=cfg.density if budgeted else None,
                    step_in_backward=step_in_backward, dtype=dtype, loss=loss, load_in_4bit=load_in_4bit,
                    nested=nested and load_in_4bit)
    return Estimate(
        settings=settings,
        parameters=sum(p.numel() for p in model.parameters()),
        trainable=plan.trainable,
        memory=memory,
        bytes_per_trained_entry=plan.state / max(plan.local_trainable, 1),
        host_bytes=plan.host,
        communication=communication,
        link_bytes=link_bytes(communication, gpus),
        refresh_bytes=plan.refresh_bytes if gpus > 1 and cfg.update_interval is not None else 0,
        assumptions=assumptions(method, gpus, fsdp, gradient_checkpointing, loss, mixed)
        + [FOUR_BIT_ASSUMPTION] * load_in_4bit,
    )


def lift_state_bytes(shape: tuple[int, int], k: int, weight_dtype: torch.dtype, cfg: LiftConfig,
                     shards: int = 1, quantized: bool = False) -> int:
    """Device bytes of LiftAdamW's state for one (m, n) target with ``k`` selected entries (liftft.engine.target_state).

    Row offsets (m + 1, int32 below 2**31 entries), one column index per entry
    (int16 up to 32,768 columns), fp32 exp_avg and exp_avg_sq, an fp32 master
    for 16-bit weights (``cfg.master_weights``) and a uint8 ``selected_ago``
    with ``bias_correction="entry"``. Under FSDP2 over ``shards`` ranks, rank 0's
    share: ceil(m / shards) rows and, assuming the selection spreads evenly over
    rows, as many of the k entries. A 4-bit target (``quantized``) keeps its
    trained values beside the packed base: an fp32 value and a flat index per
    entry, and no master.
    """
    m, n = shape
    if quantized:
        weight_dtype = torch.float32
    rows = -(-m // shards)
    local = round(k * rows / m)
    per_entry = torch.tensor([], dtype=column_dtype(n)).element_size() + 2 * FP32
    if cfg.master_weights and weight_dtype in (torch.bfloat16, torch.float16):
        per_entry += FP32
    if cfg.bias_correction == "entry":
        per_entry += 1
    if quantized:  # the trained values beside the packed base, with their flat indices (no master)
        per_entry += _itemsize(index_dtype(m * n)) + FP32
    return (rows + 1) * _itemsize(index_dtype(local)) + local * per_entry


def buffer_bytes(model, plan, gpus: int, fsdp: bool, element_bytes: int) -> int:
    """Estimated transient buffers: what exists for part of a step only.

    - sparse methods without FSDP2: one target's dense gradient at a time,
      before its k entries are gathered;
    - several GPUs without FSDP2: liftft's all-reduce bucket, an fp32 copy of
      up to 2**25 values, or of the largest tensor if that is larger;
    - FSDP2: the root (embeddings, head, final norm) unsharded from forward
      to backward, two layers unsharded at once (one computing, one
      prefetched), and the largest unit's trained gradients unsharded, in
      16-bit and in the fp32 they are reduced in.
    """
    from liftft.utils.distributed import BUCKET_NUMEL

    total = 0 if fsdp else plan.dense_gradient
    if gpus > 1 and not fsdp:
        total += FP32 * max(min(sum(plan.reduced), BUCKET_NUMEL), max(plan.reduced))
    if fsdp:
        units = _unit_numels(model)
        reduce_bytes = element_bytes + FP32 if element_bytes < FP32 else FP32
        total += element_bytes * (units[0] + 2 * max(units[1:], default=0))
        total += reduce_bytes * max(plan.trained_per_unit.values(), default=0)
    return total


def assumptions(method: str, gpus: int, fsdp: bool, checkpointing: bool, loss: str, mixed: bool) -> list[str]:
    """The assumptions behind an estimate of these settings, one sentence each."""
    lines = [
        "weights, trained count and optimizer state are exact counts; activations, logits and buffers are "
        "estimates, and the total (their sum) has not been compared with a GPU measurement yet",
        "one micro-batch per optimizer step; batch size is per GPU",
        f"activations: Llama-style block, flash/efficient attention, {'bf16' if mixed else 'fp32'}, "
        + ("gradient checkpointing per layer" if checkpointing else "no gradient checkpointing"),
        f"logits: {'full fp32 logits' if loss == 'full' else 'chunked loss, 256 tokens at a time'}",
    ]
    if method == "full" and mixed:
        lines.append("full fine-tuning keeps fp32 weights under bf16 autocast, whose bf16 weight copies count as "
                     "activations")
    if method in PEFT_METHODS:
        lines.append("PEFT adapters in fp32; their saved inputs and rank-r outputs count as activations "
                     "(DoRA's extra norm computations are not counted)")
    if fsdp:
        lines.append("FSDP2 over all GPUs as liftft.training.fsdp.shard_model applies it: each decoder layer and the root "
                     "sharded on dim 0; a rank's share of the selected entries assumed proportional to its rows")
    if fsdp and method not in SPARSE_SELECTORS:
        lines.append(f"liftft train --fsdp trains the sparse methods only: this plans {method} under FSDP2 in "
                     "your own training loop")
    if gpus > 1 and not fsdp:
        lines.append("data parallel as liftft train runs it (no DDP wrapper): one all-reduce per optimizer step")
    return lines


# ----------------------------------------------------------------- internals


@dataclass
class _Plan:
    """What one method trains: counts and bytes on one GPU, and what crosses the network."""

    trainable: int
    local_trainable: int
    gradients: int
    state: int
    reduced: list  # numel of each fp32 tensor liftft all-reduces per step without FSDP2
    scattered: int  # numel of dense gradients FSDP2 reduce-scatters per micro-batch
    trained_per_unit: dict  # FSDP2 unit -> trained numel in it
    extra_weights: int = 0
    dense_gradient: int = 0
    host: int = 0
    refresh_bytes: int = 0


def _sparse_plan(model, cfg: LiftConfig, shards: int, step_in_backward: bool, quantized: bool) -> _Plan:
    targets = find_targets(model, cfg.target_modules, cfg.exclude_modules)
    ks = _selected_counts(model, targets, cfg)
    local = {name: round(ks[name] * -(-p.shape[0] // shards) / p.shape[0]) for name, p in targets.items()}
    weight_bytes = next(iter(targets.values())).element_size()
    units = _unit_of(model)
    per_unit = {}
    for p in targets.values():
        per_unit[units.get(id(p), 0)] = per_unit.get(units.get(id(p), 0), 0) + p.numel()
    return _Plan(
        trainable=sum(ks.values()),
        local_trainable=sum(local.values()),
        gradients=0 if step_in_backward else FP32 * sum(local.values()),
        state=sum(lift_state_bytes(tuple(p.shape), ks[name], p.dtype, cfg, shards, quantized)
                  for name, p in targets.items()),
        # The gathered buffers, and one float per target saying whether this rank received its gradient.
        reduced=[len(targets), *ks.values()],
        scattered=sum(p.numel() for p in targets.values()),
        trained_per_unit=per_unit,
        # One target's dense gradient, or on a 4-bit base its dequantized weight (its gradient is sampled).
        dense_gradient=max(p.numel() for p in targets.values()) * weight_bytes,
        # The record of trained entries: int32/int64 indices and base values, plus a step count per target.
        host=sum(k * (_itemsize(index_dtype(p.numel())) + weight_bytes) + FP32
                 for k, p in zip(ks.values(), targets.values())),
        # Rank 0's selection, broadcast; under FSDP2 each matrix is gathered whole first.
        refresh_bytes=sum(k * _itemsize(index_dtype(p.numel())) + (shards > 1) * p.numel() * weight_bytes
                          for k, p in zip(ks.values(), targets.values())),
    )


def _selected_counts(model, targets: dict, cfg: LiftConfig) -> dict[str, int]:
    """Entries selected per target: the budget, or for S2FT the whole channels that fit in it (at least one), as
    :func:`liftft.engine.structured.channel_indices` takes them."""
    ks = {name: budget(tuple(p.shape), rank=cfg.rank, density=cfg.density) for name, p in targets.items()}
    if cfg.selector != "s2ft":
        return ks
    from liftft.engine.structured import channel_count, entries_per_channel, s2ft_channels

    counts = {}
    for name, spec in s2ft_channels(model, targets).items():
        shape = tuple(targets[name].shape)
        counts[name] = channel_count(spec, shape, ks[name]) * entries_per_channel(spec, shape)
    return counts


def _dense_plan(model, method: str, cfg: LiftConfig, shards: int, quantized: bool = False) -> _Plan:
    """Full fine-tuning or a PEFT adapter, trained by torch AdamW: each trained tensor's shape, by FSDP2 unit; on a
    4-bit base, bitsandbytes dequantizes one target's weight at a time."""
    units = _unit_of(model)
    if method == "full":
        trained = [(tuple(p.shape), units.get(id(p), 0)) for p in model.parameters()]
    else:
        trained = [(shape, units.get(id(p), 0)) for name, p in find_targets(model, cfg.target_modules).items()
                   for shape in _adapter_shapes(model, name, p, cfg.rank, method == "dora")]
    local = [_shard_numel(shape, shards) for shape, _ in trained]
    per_unit = {}
    for shape, unit in trained:
        per_unit[unit] = per_unit.get(unit, 0) + math.prod(shape)
    return _Plan(
        trainable=sum(math.prod(shape) for shape, _ in trained),
        local_trainable=sum(local),
        gradients=FP32 * sum(local),
        state=2 * FP32 * sum(local) + FP32 * len(trained),
        reduced=[math.prod(shape) for shape, _ in trained],
        scattered=sum(math.prod(shape) for shape, _ in trained),
        trained_per_unit=per_unit,
        extra_weights=0 if method == "full" else FP32 * sum(local),
        dense_gradient=quantized * max(p.numel() * p.element_size() for p in find_targets(model).values()),
    )


def _adapter_shapes(model, name: str, weight, rank: int, dora: bool) -> list[tuple[int, ...]]:
    """PEFT's trained tensors on one target: lora_A (r, in), lora_B (out, r) and, for DoRA, the magnitude (out,)."""
    module = model.get_submodule(name.removesuffix(".weight"))
    out_features, in_features = (module.out_features, module.in_features) if isinstance(module, torch.nn.Linear) \
        else (weight.shape[1], weight.shape[0])  # transformers' Conv1D stores its weight as (in, out)
    return [(rank, in_features), (out_features, rank)] + [(out_features,)] * dora


def _method_activations(model, method: str, cfg: LiftConfig, tokens: int, mixed: bool, checkpointing: bool) -> int:
    """What a method saves for backward beyond the model's own activations, per layer, for every layer or (under
    gradient checkpointing) one.

    Full fine-tuning under bf16 autocast: the bf16 copies of its fp32 linear
    weights, plus the head's, cast by the loss. PEFT adapters: per target and
    token, lora_A's input cast to bf16 under autocast (PEFT first casts it to
    the adapter's fp32, a copy freed at once) and lora_A's rank-r output.
    """
    units = _unit_of(model)
    per_layer = {}
    compute = 2 if mixed else FP32
    for name, p in find_targets(model, cfg.target_modules).items():
        if method == "full":
            size = 2 * p.numel() * mixed
        elif method in PEFT_METHODS:
            (rank, in_features), _ = _adapter_shapes(model, name, p, cfg.rank, False)
            size = tokens * compute * (in_features * mixed + rank)
        else:
            size = 0
        per_layer[units.get(id(p), 0)] = per_layer.get(units.get(id(p), 0), 0) + size
    kept = max(per_layer.values()) if checkpointing else sum(per_layer.values())
    head = 2 * model.get_output_embeddings().weight.numel() if method == "full" and mixed else 0
    return kept + head


def _unit_of(model) -> dict[int, int]:
    """{id(parameter): FSDP2 unit}: 1, 2, ... for the decoder layers, missing for the root's parameters."""
    from liftft.utils.hf import decoder_layers

    return {id(p): i for i, layer in enumerate(decoder_layers(model), start=1) for p in layer.parameters()}


def _unit_numels(model) -> list[int]:
    """Parameter count of each FSDP2 unit: the root's first, then each decoder layer's."""
    units = _unit_of(model)
    numels = [0] * (max(units.values(), default=0) + 1)
    for p in model.parameters():
        numels[units.get(id(p), 0)] += p.numel()
    return numels


def _shard_numel(shape, shards: int) -> int:
    """Entries of a tensor of ``shape`` on FSDP2's rank 0: ceil(rows / shards) rows (torch.chunk's split)."""
    if not shape:
        return 1
    return -(-shape[0] // shards) * math.prod(shape[1:])


def _itemsize(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def _check_settings(method, gpus, fsdp, batch_size, seq_len, step_in_backward, dtype, loss, config) -> None:
    for name, value in (("gpus", gpus), ("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if loss not in LOSSES:
        raise ValueError(f"unknown --loss {loss!r}; allowed: {', '.join(LOSSES)}")
    if step_in_backward and method not in SPARSE_SELECTORS:
        raise ValueError(f"--step-in-backward is for the sparse methods ({', '.join(SPARSE_SELECTORS)}), not {method}")
    if step_in_backward and (gpus > 1 or fsdp):
        raise ValueError("--step-in-backward runs in one process without sharding: drop --gpus/--fsdp or it")
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and seq_len > positions:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's {positions} positions")
