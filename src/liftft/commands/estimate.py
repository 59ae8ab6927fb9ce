"""`liftft estimate`: will a method fit on the GPUs, and how many bytes will it communicate per step?"""

from __future__ import annotations

import json
import os

from liftft.commands import DefaultsShown, add_4bit_flags, lift_fields_as_flags
from liftft.engine.methods import METHODS
from liftft.planning.shapes import MODEL_CONFIGS

PARTS = {"weights": "weights", "gradients": "gradients", "optimizer_state": "optimizer state",
         "activations": "activations", "logits": "logits", "buffers": "buffers"}
ESTIMATED = ("activations", "logits", "buffers")


def register(subparsers) -> None:
    """Add `estimate` to the `liftft` command."""
    p = subparsers.add_parser(
        "estimate",
        help="per-GPU memory by part and bytes communicated per step, planned from a model's config alone",
        description="Plan a fine-tuning run without loading any weights: the model is built from its config on the "
        "meta device. Prints per-GPU memory (weights, gradients, optimizer state, activations, logits, transient "
        "buffers) in GiB, the trained count and the bytes communicated per optimizer step. Weights, state and "
        "counts are exact; activations, logits and buffers are estimates (the assumptions are printed).",
        formatter_class=DefaultsShown,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a Hugging Face hub id or model directory (only its config.json is read)")
    source.add_argument("--model-config",
                        help=f"a preset ({', '.join(MODEL_CONFIGS)}) or PATH to a config.json file or a directory "
                        "holding one")
    p.add_argument("--method", default="lift", choices=METHODS, help="the fine-tuning method, as liftft train --method")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (processes), one model replica or shard each")
    p.add_argument("--fsdp", action="store_true",
                   help="shard every decoder layer and the root with FSDP2 over the GPUs (bf16 compute, fp32 reduce)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per GPU per micro-batch")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--rank", type=int,
                        help="LoRA rank, and the sparse methods' LoRA-parity budget k = (m+n)*rank per matrix "
                        "(128 unless --density is given)")
    budget.add_argument("--density", type=float, help="the sparse methods' budget as a share of each matrix, in (0, 1]")
    p.add_argument("--step-in-backward", action="store_true",
                   help="sparse methods: update each matrix in its gradient hook, keeping no gathered gradients")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="bfloat16 as liftft train --bf16 runs it (bf16 weights, full fine-tuning in fp32 under "
                   "autocast), or float32 throughout")
    p.add_argument("--loss", choices=("chunked", "full"),
                   help="the loss's logits: chunked (a chunk of tokens at a time) or full fp32 logits; by default what "
                   "liftft train computes: full under --fsdp, chunked otherwise")
    add_4bit_flags(p, "plan on")
    p.add_argument("--json", metavar="FILE.json", help="also write the figures as JSON to this file ('-': stdout only)")
    p.set_defaults(func=run)


@lift_fields_as_flags()
def run(args) -> int:
    """Estimate, print the table (or the JSON, with --json -) and write --json; returns the exit code."""
    from liftft.planning.estimate import estimate
    from liftft.utils.hf import load_config
    from liftft.planning.shapes import model_config

    if args.json not in (None, "-"):
        parent = os.path.dirname(os.path.abspath(os.path.expanduser(args.json)))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"--json {args.json!r}: directory {parent} does not exist")
    config = load_config(args.model) if args.model is not None else model_config(args.model_config)
    result = estimate(config, args.method, gpus=args.gpus, fsdp=args.fsdp, batch_size=args.batch_size,
                      seq_len=args.seq_len, gradient_checkpointing=args.gradient_checkpointing, rank=args.rank,
                      density=args.density, step_in_backward=args.step_in_backward, dtype=args.dtype, loss=args.loss,
                      load_in_4bit=args.load_in_4bit, quant_type=args.bnb_4bit_quant_type,
                      nested=args.use_bnb_nested_quant)
    figures = {"model": args.model or args.model_config, **result.to_dict()}
    if args.json == "-":
        print(json.dumps(figures, indent=2))
        return 0
    print(format_estimate(figures))
    if args.json is not None:
        from liftft.utils.atomic import write_json_atomic

        write_json_atomic(os.path.expanduser(args.json), figures)
        print(f"wrote {args.json}")
    return 0


def format_estimate(figures: dict) -> str:
    """An estimate's JSON figures as the plain-text table `liftft estimate` prints."""
    from liftft.planning.estimate import GIB, GPU_BYTES

    s = figures["settings"]
    budget = "" if s["rank"] is None and s["density"] is None else (
        f" (rank {s['rank']})" if s["density"] is None else f" (density {s['density']:g})")
    lines = [
        f"{figures['model']}: {s['method']}{budget}, {s['gpus']} GPU{'s' * (s['gpus'] > 1)}"
        f"{', FSDP2' * s['fsdp']}, {s['dtype']}, batch {s['batch_size']} x {s['seq_len']} per GPU, "
        f"{'' if s['gradient_checkpointing'] else 'no '}gradient checkpointing, {s['loss']} loss"
        f"{', step in backward' * s['step_in_backward']}"
        f"{(', 4-bit base' + ' (nested)' * s['nested']) * s.get('load_in_4bit', False)}",
        f"parameters {figures['parameters']:,}; trained {figures['trainable']:,} "
        f"({figures['trainable'] / figures['parameters']:.2%})",
        "",
        f"{'per GPU':<18}{'GiB':>9}",
    ]
    for key, label in PARTS.items():
        note = "  estimated" if key in ESTIMATED else ""
        if key == "optimizer_state":
            note = f"  {figures['bytes_per_trained_entry']:.2f} bytes per trained entry"
        lines.append(f"{label:<18}{figures['memory'][key] / GIB:>9.2f}{note}")
    verdict = "fits" if figures["fits_80gb"] else "does not fit"
    lines.append(f"{'total':<18}{figures['total'] / GIB:>9.2f}  {verdict} an 80 GB GPU "
                 f"({GPU_BYTES / GIB:.1f} GiB usable assumed)")
    lines += ["", _communication_lines(figures)]
    if figures["host_bytes"]:
        lines.append(f"host memory, LiftAdamW's record of trained entries: {figures['host_bytes'] / GIB:.2f} GiB")
    lines += ["assumptions:", *(f"- {line}" for line in figures["assumptions"])]
    return "\n".join(lines)


def _communication_lines(figures: dict) -> str:
    communication = figures["communication"]
    if not communication:
        return "communicated per optimizer step: nothing (one GPU)"
    rows = [*communication.items(), ("through each GPU link (ring)", figures["link_bytes"])]
    if figures["refresh_bytes"]:
        rows.append(("per LIFT refresh", figures["refresh_bytes"]))
    width = max(len(name) for name, _ in rows) + 2
    lines = ["communicated per optimizer step (bytes handed to collectives):"]
    lines += [f"  {name:<{width}}{_megabytes(size):>14}" for name, size in rows]
    return "\n".join(lines)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB" if size >= 10**5 else f"{size:,} bytes"


# The planning table of docs/estimate.md: (row label, method, FSDP2).
PLAN_ROWS = (("Full FT, DDP", "full", False), ("Full FT, FSDP2", "full", True), ("LoRA r128", "lora", False),
             ("LoRA r128, FSDP2", "lora", True), ("LIFT r128", "lift", False), ("LIFT r128, FSDP2", "lift", True))


def planning_table(models=("llama-8b", "llama-70b"), gpus=(1, 8, 64), batch_size: int = 1, seq_len: int = 2048) -> str:
    """The markdown table of docs/estimate.md: per-GPU GiB of each of PLAN_ROWS for each preset and GPU count, with gradient
    checkpointing, bf16 and the loss liftft train computes (full logits under FSDP2, chunked otherwise); ✓ where
    it fits an 80 GB GPU, – for FSDP2 on one GPU."""
    from liftft.planning.estimate import GIB, estimate
    from liftft.planning.shapes import model_config

    configs = {name: model_config(name) for name in models}
    header = ["per-GPU GiB"] + [f"{name} × {n}" for name in models for n in gpus]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for label, method, fsdp in PLAN_ROWS:
        cells = []
        for name in models:
            for n in gpus:
                if fsdp and n == 1:
                    cells.append("–")
                    continue
                e = estimate(configs[name], method, gpus=n, fsdp=fsdp, batch_size=batch_size, seq_len=seq_len,
                             gradient_checkpointing=True, rank=128)
                cells.append(f"{e.total / GIB:.1f}{' ✓' if e.fits() else ''}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
