"""One module per `liftft` subcommand, each with register(subparsers); shared argument parsers below."""

import argparse
import contextlib
import math
import re


def comma_list(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated flag value; none at all is an error."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def target_modules_arg(text: str) -> str | list[str]:
    """--target-modules: a comma makes a list of module-name suffixes; otherwise a preset or a regex."""
    return comma_list(text) if "," in text else text


def numbers_arg(text: str) -> list[float]:
    """Comma-separated finite numbers."""
    values = []
    for part in comma_list(text):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{part!r} is not a finite number")
        values.append(value)
    return values


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return int_at_least(text, 0)


def int_at_least(text: str, minimum: int) -> int:
    """An integer >= ``minimum``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= {minimum}")
    return value


def positive_ints(text: str) -> list[int]:
    """Comma-separated integers >= 1."""
    return [positive_int(part) for part in comma_list(text)]


def density_arg(text: str) -> float:
    """A share in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]")
    return value


def add_progress_flag(parser) -> None:
    """``--no-progress``, which every command takes: it hides liftft's and transformers' progress bars."""
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide progress bars (liftft's, those of the evaluations it runs, and transformers'). "
                             "Where stderr is not a terminal (a file, a pipe, CI), progress is a plain line every "
                             "10%% of the work or every 30 s, with the ETA")


def add_4bit_flags(parser, what: str) -> None:
    """``--load-in-4bit``, ``--bnb-4bit-quant-type`` and ``--use-bnb-nested-quant``, as TRL's ModelConfig names them;
    ``what`` says what a 4-bit base does for this command."""
    group = parser.add_argument_group("4-bit base (QLIFT, QLoRA; needs pip install 'liftft[bnb]')")
    group.add_argument("--load-in-4bit", action="store_true",
                       help=f"{what}: a bitsandbytes 4-bit base, every linear layer but the head packed to 4 bits "
                       "and frozen; the sparse methods train beside it (QLIFT), lora and dora are QLoRA and QDoRA")
    group.add_argument("--bnb-4bit-quant-type", default="nf4", choices=("nf4", "fp4"),
                       help="the 4-bit data type (with --load-in-4bit)")
    group.add_argument("--use-bnb-nested-quant", action="store_true",
                       help="quantize the 4-bit base's constants too, about 0.4 bits per weight less (with "
                       "--load-in-4bit)")


class DefaultsShown(argparse.HelpFormatter):
    """Help that ends each option's text with its default, unless the text names one already, there is none, or
    the option is a switch (which takes no value)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings
                or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)"


# LiftConfig's fields that are flags of the same name (filter_rank: --filter-rank).
_LIFT_FLAG_FIELDS = ("rank", "density", "filter_rank", "update_interval", "svd", "target_modules", "bias_correction",
                     "block_size")
_LEADING_FIELD = re.compile(rf"^({'|'.join(_LIFT_FLAG_FIELDS)})(?= must )")


class lift_fields_as_flags(contextlib.ContextDecorator):
    """Re-raise a ValueError or TypeError that begins with a LiftConfig field (``filter_rank must be >= 1``, as the
    library says it) naming the flag that sets it (``--filter-rank must be >= 1``); for the commands that build a
    LiftConfig from their flags."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind in (ValueError, TypeError) and _LEADING_FIELD.match(str(error)):
            text = _LEADING_FIELD.sub(lambda m: "--" + m.group(1).replace("_", "-"), str(error), count=1)
            raise kind(text) from error
        return False
