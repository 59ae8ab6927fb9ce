"""`liftft bench`: step time, tokens/s, peak memory and selection time of LIFT and its peers on one model shape."""

from __future__ import annotations

import json
import os

from liftft.commands import add_4bit_flags, comma_list
from liftft.planning.shapes import MODEL_CONFIGS

PRESETS = ", ".join(MODEL_CONFIGS)

ALL_METHODS = "floor, full, lora, dora, lift, lift-sampled, lift-in-backward"


def register(subparsers) -> None:
    """Add `bench` to the `liftft` command."""
    p = subparsers.add_parser(
        "bench",
        help="time and measure LIFT against frozen-weights, full fine-tuning and LoRA on a random model",
        description="Build a model from a config with random weights and train it for a few steps with each "
        "method on random tokens. Prints a table and, with --output, writes the figures as JSON.",
    )
    p.add_argument("--model-config", default="tiny",
                   help=f"model shape: a preset ({PRESETS}) or PATH to a config.json file or a directory holding one "
                   "(default: tiny)")
    p.add_argument("--methods", type=comma_list,
                   help=f"comma-separated methods, from: {ALL_METHODS} (default: floor,full,lora,lift; with "
                   "--load-in-4bit floor,lora,dora,lift)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: 4)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: 1024)")
    p.add_argument("--timed-steps", "--steps", dest="steps", type=int, default=10,
                   help="timed steps; the median is reported (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default: 3)")
    p.add_argument("--rank", type=int, default=128,
                   help="LoRA rank, and LIFT's LoRA-parity budget k = (m+n)*rank per matrix (default: 128)")
    p.add_argument("--filter-rank", type=int, default=64, help="rank of the SVD approximation LIFT selects from (default: 64)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available; default)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="weight dtype; auto is bfloat16 on CUDA and float32 on the CPU (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the tokens (default: 0)")
    p.add_argument("--loss", default="chunked", choices=("chunked", "full", "liger"),
                   help="how the step computes its cross-entropy: chunked (the logits a chunk of tokens at a time), "
                   "full (all the fp32 logits at once) or liger (Liger-Kernel's fused kernel, if installed); "
                   "a model whose logits are more than a linear head takes full (default: %(default)s)")
    p.add_argument("--json", "--output", dest="output", metavar="FILE.json",
                   help="also write the figures to this JSON file")
    p.add_argument("--no-selection-timings", dest="selection_timings", action="store_false",
                   help="skip lift's extra timings of every selection variant (exact and randomized SVD, batched and "
                   "one by one), which take minutes at the 8B shape")
    add_4bit_flags(p, "benchmark on")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run the benchmark, print its table and write --output; returns the exit code."""
    from liftft.planning.bench import DEFAULT_4BIT_METHODS, DEFAULT_METHODS, BenchSettings, format_table, run_bench

    if args.output is not None:
        parent = os.path.dirname(os.path.abspath(os.path.expanduser(args.output)))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"--output {args.output!r}: directory {parent} does not exist")
    settings = BenchSettings(
        model_config=args.model_config, batch_size=args.batch_size, seq_len=args.seq_len,
        methods=args.methods or (DEFAULT_4BIT_METHODS if args.load_in_4bit else DEFAULT_METHODS),
        steps=args.steps, warmup=args.warmup, rank=args.rank, filter_rank=args.filter_rank,
        gradient_checkpointing=args.gradient_checkpointing, device=args.device, dtype=args.dtype, seed=args.seed,
        loss=args.loss, selection_timings=args.selection_timings, load_in_4bit=args.load_in_4bit,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type, use_bnb_nested_quant=args.use_bnb_nested_quant,
    )
    report = run_bench(settings, progress=_print_progress)
    print(format_table(report))
    if args.output is not None:
        with open(os.path.expanduser(args.output), "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"wrote {args.output}")
    return 0


def _print_progress(method: str, result: dict) -> None:
    print(f"{method}: {1e3 * result['step_time_s']:.1f} ms per step", flush=True)
