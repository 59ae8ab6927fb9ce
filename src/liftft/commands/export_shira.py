"""`liftft export-shira`: a liftft delta as a PEFT SHiRA adapter."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the `export-shira` subcommand."""
    parser = subparsers.add_parser(
        "export-shira",
        help="export a liftft delta as a PEFT SHiRA adapter",
        description=(
            "Write a PEFT SHiRA adapter that PeftModel.from_pretrained(base, OUTPUT) loads with stock PEFT. "
            "SHiRA holds r(m+n) entries per matrix with one r for all; the smallest r that holds every matrix's "
            "trained entries is chosen and printed. Dense params (e.g. norms) go in modules_to_save."
        ),
    )
    parser.add_argument("--delta", required=True, help="liftft delta directory (delta.safetensors and liftft.json)")
    parser.add_argument("--output", required=True, help="directory for the adapter")
    parser.add_argument("--model", "--base", dest="model",
                        help="base model: a local directory or a hub id (default: the one the delta records)")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Export and report where the adapter went."""
    from liftft.deltas.shira import export_shira

    output = export_shira(args.delta, args.output, base=args.model)
    print(f"wrote SHiRA adapter to {output}")
    return 0
