"""The `liftft` command: one subcommand per module in `liftft.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from importlib.metadata import version

from liftft.commands import add_progress_flag
from liftft.utils.errors import RunStopped
from liftft.utils.progress import progress_shown

# Each module defines register(subparsers); its parser sets `func`.
COMMAND_MODULES = ("train", "merge", "export_shira", "eval", "lm_eval_tasks", "analyze", "bench", "estimate", "demo",
                   "reproduce")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liftft",
        description="LIFT: fine-tune only the Principal Weights of a Hugging Face causal LM.",
    )
    parser.add_argument("--version", action="version", version=f"liftft {version('liftft')}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"liftft.commands.{name}").register(subparsers)
    for command in subparsers.choices.values():
        if command.get_default("progress") is None:  # every command takes --no-progress, as train and demo do
            add_progress_flag(command)
    return parser


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """warnings' format for the CLI: one line saying what, without the source line that raised it."""
    return f"liftft: warning: {message}\n"


def progress_bars(shown: bool):
    """Hide every progress bar, liftft's and transformers', inside the block unless ``shown``: see
    :func:`liftft.utils.progress.progress_shown`."""
    return progress_shown(shown)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    formatwarning = warnings.formatwarning
    warnings.formatwarning = one_line_warning
    try:
        with progress_bars(args.progress):
            return args.func(args) or 0
    except (ValueError, TypeError, OSError) as err:  # bad input: a flag, a file, a directory, a disk
        print(f"liftft {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        print(f"liftft {args.command}: error: {err}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
