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
