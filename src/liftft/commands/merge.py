"""`liftft merge`: base model plus delta, written as a normal Hugging Face model directory."""

from __future__ import annotations

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def register(subparsers) -> None:
    """Add the `merge` subcommand."""
    parser = subparsers.add_parser(
        "merge",
        help="merge a liftft delta into its base model",
        description=(
            "Apply a liftft delta to its base model and write a model directory, with the base's tokenizer, "
            "that AutoModelForCausalLM.from_pretrained loads, and a model card (README.md) with the facts the "
            "delta's liftft.json records. The output is written atomically; an existing "
            "output is replaced only if it is empty or a previous merge."
        ),
    )
    parser.add_argument("--model", "--base", dest="model", required=True,
                        help="base model the delta was trained from: a local directory or a hub id")
    parser.add_argument("--delta", required=True, help="liftft delta directory (delta.safetensors and liftft.json)")
    parser.add_argument("--output", required=True, help="directory for the merged model")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="dtype of the saved weights (default: auto, the dtype the delta was trained in)",
    )
    parser.add_argument("--original-weights", action="store_true",
                        help="for a delta trained on a 4-bit base (--load-in-4bit), which merges by default into "
                        "the 16-bit model the run trained, dequant(base) + delta: add it to the base's original "
                        "16-bit weights instead, which it was not trained on (docs/qlift.md measures the difference)")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Merge and report where the model went."""
    from liftft.deltas.merge import merge_delta

    output = merge_delta(args.model, args.delta, args.output, dtype=args.dtype, original_weights=args.original_weights)
    print(f"wrote merged model to {output}")
    return 0
