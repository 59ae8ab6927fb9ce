"""One module per `liftft` subcommand, each with register(subparsers); shared argument parsers below."""

import argparse


def comma_list(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated flag value; none at all is an error."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def target_modules_arg(text: str) -> str | list[str]:
    """--target-modules: a comma makes a list of module-name suffixes; otherwise a preset or a regex."""
    return comma_list(text) if "," in text else text


def add_progress_flag(parser) -> None:
    """``--no-progress``, which every command takes: it hides liftft's and transformers' progress bars."""
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide progress bars (liftft's and transformers')")


class DefaultsShown(argparse.HelpFormatter):
    """Help that ends each option's text with its default, unless the text names one already, there is none, or
    the option is a switch (which takes no value)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings
                or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)"
