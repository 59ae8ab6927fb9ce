"""`liftft bench`: LIFT against its peers, side by side, on one randomly initialised model shape.

Every method trains the same model (built from a config, so nothing is
downloaded) on the same random tokens: ``floor`` (frozen weights, a full
backward through the activations: the cost every method pays), ``full``
(torch AdamW, fused on CUDA), ``lora`` (PEFT LoRA at r = rank on the LIFT
targets), ``lift`` (LiftAdamW at the same rank, so the same trainable count)
and, on request, ``dora`` and ``lift-sampled`` (lift with ``sampled_grad=True``).
With ``load_in_4bit`` the model's linear layers but the head are quantized
with bitsandbytes first, as ``load_in_4bit`` loading does: lift is then QLIFT,
lora and dora QLoRA and QDoRA. Each step's loss is
:func:`liftft.engine.loss.causal_lm_loss_sum` in the ``loss`` setting's mode (chunked by default).

Each method runs in a fresh process forked from a server that has only
imported the libraries, so its peak memory (CUDA's max_memory_allocated, or
the process's max RSS on the CPU) is its own and no allocator cache carries
over from the method before.
"""

from __future__ import annotations

import multiprocessing
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from liftft.planning.bench_memory import max_rss, peak_memory
from liftft.planning.quantized import quantize_4bit
from liftft.utils.hf import set_activation_checkpointing
from liftft.engine.loss import causal_lm_loss_sum, check_loss_mode, loss_path
from liftft.utils.quantization import check_4bit_settings, require_bitsandbytes
from liftft.planning.shapes import MODEL_CONFIGS, model_config  # noqa: F401 - MODEL_CONFIGS: liftft.planning.bench's name for the presets

METHODS = ("floor", "full", "lora", "dora", "lift", "lift-sampled", "lift-in-backward")
DEFAULT_METHODS = ("floor", "full", "lora", "lift")
DEFAULT_4BIT_METHODS = ("floor", "lora", "dora", "lift")
DTYPES = ("auto", "bfloat16", "float16", "float32")
LIFT_METHODS = ("lift", "lift-sampled", "lift-in-backward")
# Timing does not depend on the learning rate; any fixed value will do.
LEARNING_RATE = 1e-4


@dataclass
class BenchSettings:
    """What to benchmark. ``dtype`` "auto" is bfloat16 on CUDA and float32 on the CPU."""

    model_config: str = "tiny"
    methods: tuple[str, ...] = DEFAULT_METHODS
    batch_size: int = 4
    seq_len: int = 1024
    steps: int = 10
    warmup: int = 3
    rank: int = 128
    filter_rank: int = 64
    gradient_checkpointing: bool = False
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    loss: str = "chunked"
    selection_timings: bool = True
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    use_bnb_nested_quant: bool = False

    def __post_init__(self):
        self.methods = tuple(self.methods)
        for method in self.methods:
            check_4bit_settings(method, fsdp=False, load_in_4bit=self.load_in_4bit,
                                quant_type=self.bnb_4bit_quant_type, nested=self.use_bnb_nested_quant)
        if self.load_in_4bit:
            require_bitsandbytes()
        if not self.methods:
            raise ValueError(f"--methods is empty; choose from {', '.join(METHODS)}")
        for method in self.methods:
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r} in --methods; allowed: {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods repeats a method: {', '.join(self.methods)}")
        for name in ("batch_size", "seq_len", "steps", "rank", "filter_rank"):
            _check_int(name, getattr(self, name), 1)
        _check_int("warmup", self.warmup, 0)
        _check_int("seed", self.seed, 0)
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown --dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        check_loss_mode(self.loss)


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when available, else cpu; a CUDA device that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: liftft bench runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asks for CUDA, which is not available here")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def run_bench(settings: BenchSettings, progress: Callable[[str, dict], None] | None = None) -> dict:
    """Benchmark every method of ``settings``, each in its own process; returns the JSON-ready report.

    The report holds the settings, the environment, the model's size, one entry
    per method (median step time, tokens/s, peak memory after setup and during
    setup, and for lift the selection times) and the ratios of lift to its
    peers. ``progress(method, result)`` is called as each method finishes.
    """
    device = resolve_device(settings.device)
    config = model_config(settings.model_config)
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_positions is not None and settings.seq_len > max_positions:
        raise ValueError(f"--seq-len {settings.seq_len} exceeds the model's {max_positions} positions")
    resolved = {**asdict(settings), "device": str(device), "dtype": str(resolve_dtype(settings.dtype, device)).removeprefix("torch.")}
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "peft", "liftft.planning.bench"])
    methods = {}
    for method in settings.methods:
        with context.Pool(1) as pool:
            methods[method] = pool.apply(bench_method, (method, resolved))
        if progress is not None:
            progress(method, methods[method])
    model = methods[settings.methods[0]].pop("model")
    for result in methods.values():
        result.pop("model", None)
    return {
        "settings": resolved,
        "environment": environment(device),
        "model": model,
        "methods": methods,
        "ratios": ratios(methods),
    }


def bench_method(method: str, settings: dict) -> dict:
    """Set up and time one method in this process (run_bench calls it in a fresh one); returns its figures."""
    s = BenchSettings(**settings)
    device, dtype = torch.device(s.device), getattr(torch, s.dtype)
    cuda = device.type == "cuda"
    baseline = max_rss()
    if cuda:
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    config = model_config(s.model_config)
    model = build_model(config, dtype, device, s.seed)
    model_info = {"parameters": sum(p.numel() for p in model.parameters()), "config": _shape_of(config)}
    if s.load_in_4bit:
        quantize_4bit(model, s.bnb_4bit_quant_type, s.use_bnb_nested_quant, device)
    if s.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    model.train()

    start = _now(device)
    model, optimizer, trainable = _set_up(method, model, s)
    setup_s = _now(device) - start
    setup_peak = peak_memory(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    gen = torch.Generator(device=device).manual_seed(s.seed)
    ids = torch.randint(config.vocab_size, (s.batch_size, s.seq_len), generator=gen, device=device)
    timed = [_timed_step(model, optimizer, ids, s.loss, device) for _ in range(s.warmup + s.steps)][s.warmup:]
    times = [wall for wall, _ in timed]
    step_s = statistics.median(times)
    result = {
        "trainable": trainable,
        "loss_path": loss_path(model, s.loss),
        "setup_s": setup_s,
        "step_time_s": step_s,
        "step_times_s": times,
        "tokens_per_s": s.batch_size * s.seq_len / step_s,
        "peak_memory_bytes": peak_memory(device),
        "setup_peak_memory_bytes": setup_peak,
        "memory_measure": "torch.cuda.max_memory_allocated" if cuda else "process max RSS (getrusage)",
        "model": model_info,
    }
    if not cuda:
        # On a shared CPU, wall time swings with other processes' load; this process's CPU time much less.
        result["step_cpu_time_s"] = statistics.median(cpu for _, cpu in timed)
        result["baseline_rss_bytes"] = baseline
    if method in LIFT_METHODS:
        result.update(_lift_figures(optimizer, setup_s, device))
    if method == "lift" and s.selection_timings and not s.load_in_4bit:  # QLIFT's refresh time is above
        result["selection"] = selection_timings(model, s.rank, s.filter_rank, device)
    return result


def build_model(config, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A causal LM with random weights from ``config``, created directly in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    from liftft.utils.hf import DTYPE_KEYWORD

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **{DTYPE_KEYWORD: dtype})
    model.config.use_cache = False
    return model


def selection_timings(model, rank: int, filter_rank: int, device: torch.device) -> dict:
    """Seconds to select every LIFT target of ``model`` from its current weights, batched and not, randomized and exact."""
    from liftft.engine.selection import budget, select_indices, select_many
    from liftft.engine.targets import find_targets

    weights = [p.detach() for p in find_targets(model).values()]
    ks = [budget(tuple(w.shape), rank=rank) for w in weights]
    seeds = list(range(len(weights)))

    def one_by_one(svd):
        return [select_indices(w, k, "principal", filter_rank, svd, seed) for w, k, seed in zip(weights, ks, seeds)]

    timings = {"matrices": len(weights)}
    for svd in ("randomized", "exact"):
        timings[f"{svd}_batched_s"] = _timed(lambda: select_many(weights, ks, "principal", filter_rank, svd, seeds), device)
        timings[f"{svd}_unbatched_s"] = _timed(lambda: one_by_one(svd), device)
    return timings


def ratios(methods: dict) -> dict:
    """tokens/s, peak memory and step time of each lift method relative to full, lora and floor, where measured."""
    out = {}
    for lift in LIFT_METHODS:
        for peer in ("full", "lora", "dora", "floor"):
            if lift in methods and peer in methods:
                a, b = methods[lift], methods[peer]
                out[f"{lift}/{peer}"] = {
                    "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
                    "peak_memory": a["peak_memory_bytes"] / b["peak_memory_bytes"],
                    "step_time": a["step_time_s"] / b["step_time_s"],
                }
    return out


def environment(device: torch.device) -> dict:
    """Versions and the device, as RESULTS.md records them."""
    import peft
    import transformers

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        from liftft.engine.kernels import fused_available, triton

        env["triton"] = None if triton is None else triton.__version__
        env["fused_sparse_adamw"] = fused_available(device)
    return env


def format_table(report: dict) -> str:
    """The report as a plain-text table, with the lift figures and ratios underneath."""
    gib = 2**30
    cpu = report["settings"]["device"] == "cpu"
    header = ["method", "trainable", "step ms", "tokens/s", "peak GiB", "setup peak GiB"] + ["CPU-time ms"] * cpu
    rows = [[name, f"{r['trainable']:,}", f"{1e3 * r['step_time_s']:.1f}", f"{r['tokens_per_s']:,.0f}",
             f"{r['peak_memory_bytes'] / gib:.3f}", f"{r['setup_peak_memory_bytes'] / gib:.3f}"]
            + [f"{1e3 * r['step_cpu_time_s']:.1f}"] * cpu
            for name, r in report["methods"].items()]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
             for line in [header, ["-" * w for w in widths], *rows]]
    methods = report["methods"]
    for name in LIFT_METHODS:
        if name in methods:
            r = methods[name]
            lines.append(f"{name}: selection of all targets at init {r['selection_init_s']:.3f} s, one refresh "
                         f"{r['selection_refresh_s']:.3f} s; state {r['state_bytes_per_entry']:.1f} bytes per entry")
    if "selection" in methods.get("lift", {}):
        t = methods["lift"]["selection"]
        lines.append(f"selection of {t['matrices']} matrices: randomized {t['randomized_batched_s']:.3f} s batched, "
                     f"{t['randomized_unbatched_s']:.3f} s one by one; exact {t['exact_batched_s']:.3f} s batched, "
                     f"{t['exact_unbatched_s']:.3f} s one by one")
    for key, r in report["ratios"].items():
        lines.append(f"{key}: tokens/s {r['tokens_per_s']:.2f}x, peak memory {r['peak_memory']:.2f}x")
    if "lift" in methods and "lora" in methods and methods["lift"]["trainable"] < methods["lora"]["trainable"]:
        lines.append(f"note: at --rank {report['settings']['rank']} some matrices of this model are smaller than "
                     f"LoRA's budget and are trained whole, so lift trains {methods['lift']['trainable']:,} values "
                     f"against LoRA's {methods['lora']['trainable']:,}; a smaller --rank compares equal budgets")
    lines.append(f"loss (--loss {report['settings']['loss']}): "
                 + ", ".join(f"{name} {r['loss_path']}" for name, r in methods.items()))
    if cpu:
        lines.append("memory on the CPU is the process's max RSS, including "
                     f"{next(iter(methods.values()))['baseline_rss_bytes'] / gib:.3f} GiB of imported libraries")
    return "\n".join(lines)


# ----------------------------------------------------------------- internals


def _set_up(method: str, model, s: BenchSettings):
    """(model, optimizer or None, trainable count) for ``method``."""
    from liftft.engine.config import LiftConfig
    from liftft.engine.methods import setup_method
    from liftft.engine.optim import LiftAdamW

    if method == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        # Gradients flow from the embeddings' output, so the backward runs through every layer.
        model.enable_input_require_grads()
        return model, None, 0
    # One config for every method, so LoRA's rank and targets are LIFT's.
    cfg = LiftConfig(rank=s.rank, filter_rank=s.filter_rank, update_interval=None, svd="randomized", seed=s.seed)
    if method in LIFT_METHODS:
        cfg = replace(cfg, sampled_grad=method == "lift-sampled")
        optimizer = LiftAdamW(model, cfg, lr=LEARNING_RATE, step_in_backward=method == "lift-in-backward")
        return model, optimizer, optimizer.num_selected
    setup = setup_method(model, method, cfg, lr=LEARNING_RATE)
    return setup.model, setup.optimizer, setup.trainable


def _timed_step(model, optimizer, ids, loss: str, device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one forward, backward and optimizer step, the loss by ``loss``."""
    start, cpu_start = _now(device), time.process_time()
    (causal_lm_loss_sum(model, ids, None, ids, mode=loss) / ids[:, 1:].numel()).backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return _now(device) - start, time.process_time() - cpu_start


def _lift_figures(optimizer, setup_s: float, device) -> dict:
    """Selection time at init (the optimizer's construction) and of one refresh, and bytes of state per entry."""
    from liftft.engine.target_state import HOST_STATE

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    refresh_s = _timed(optimizer.refresh, device)
    state_bytes = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                      for key, t in state.items() if torch.is_tensor(t) and key not in HOST_STATE)
    # A 4-bit target's trained values and their indices live beside its packed weight.
    state_bytes += sum(t.numel() * t.element_size() for name in optimizer.target_names
                       if (target := optimizer.quantized_target(name)) is not None for t in (target.values, target.index))
    return {
        "selection_init_s": setup_s,
        "selection_refresh_s": refresh_s,
        "refresh_workspace_bytes": torch.cuda.max_memory_allocated(device) - before if cuda else None,
        "state_bytes_per_entry": state_bytes / optimizer.num_selected,
    }


def _timed(fn, device) -> float:
    start = _now(device)
    fn()
    return _now(device) - start


def _now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _shape_of(config) -> dict:
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    return {key: getattr(config, key) for key in keys if hasattr(config, key)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
