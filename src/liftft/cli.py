"""The `liftft` command: one subcommand per module in `liftft.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

from liftft.errors import RunStopped

# Each module defines register(subparsers); its parser sets `func`.
COMMAND_MODULES = ("train", "merge", "export_shira", "eval", "analyze", "bench", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liftft",
        description="LIFT: fine-tune only the Principal Weights of a Hugging Face causal LM.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"liftft.commands.{name}").register(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except (ValueError, TypeError, OSError) as err:  # bad input: a flag, a file, a directory, a disk
        print(f"liftft {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        print(f"liftft {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
