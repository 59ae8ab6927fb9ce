"""`--config FILE`: a YAML or JSON file of a command's settings, keyed by its flag names, under the command line.

The file's settings become command-line words placed before the real ones,
so argparse checks each value as it checks a typed flag, and a flag given on
the command line, coming later, wins. ``lr: 1e-4`` and ``learning-rate: 1e-4``
are ``--lr 1e-4``; a switch takes true or false (``merge: true`` is
``--merge``, ``bf16: false`` is ``--no-bf16``); a list is the values of a
flag taking several (``data: [a.json, b.json]``) or one comma-separated value
(``target-modules: [q_proj, v_proj]``); a mapping is ``KEY=VALUE,...``
(``columns: {instruction: question}``); null leaves the flag's default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CONFIG_FLAG = "--config"


def read_config_first(parser: argparse.ArgumentParser, alternatives: tuple[tuple[str, str], ...] = ()) -> None:
    """Add ``--config FILE`` to ``parser``, whose parsing then reads the file's settings before the command line.

    ``alternatives`` are pairs of flag destinations of which a run gives one
    (``("epochs", "max_steps")``): a command line that gives one of a pair
    drops the other from the file, so it overrides the file there too. A bad
    file, an unknown key (named, with the known flags) or a value of the wrong
    kind is an argparse error: exit code 2 with one line naming it.
    """
    parser.add_argument(CONFIG_FLAG, metavar="FILE", default=None,
                        help="a YAML (.yaml/.yml) or JSON file of settings keyed by this command's flag names, "
                        "dashes or underscores (lr: 1e-4, grad-accum: 16, data: [a.json, b.json], merge: true); "
                        "flags on the command line override it")
    parse_known_args = parser.parse_known_args

    def with_config(args=None, namespace=None):
        words = list(sys.argv[1:] if args is None else args)
        found, _ = _config_only().parse_known_args(words)
        if found.config is not None:
            try:
                settings = load_settings(Path(found.config))
                replaced = _replaced_alternatives(parser, words, alternatives)
                words = config_words(parser, settings, skip=replaced) + words
            except (OSError, ValueError) as err:
                parser.error(str(err))
        return parse_known_args(words, namespace)

    # argparse parses a subcommand through its parser's parse_known_args, so this sees the subcommand's words.
    parser.parse_known_args = with_config


def _config_only() -> argparse.ArgumentParser:
    only = argparse.ArgumentParser(add_help=False)
    only.add_argument(CONFIG_FLAG)
    return only


def load_settings(path: Path) -> dict:
    """The mapping of settings in the YAML or JSON file ``path`` (by extension; YAML when it has neither)."""
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            settings = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--config {path} is not valid JSON: {err}") from None
    else:
        import yaml

        try:
            settings = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"--config {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ValueError(f"--config {path} must hold a mapping of flag names to values, not a "
                         f"{type(settings).__name__}")
    return settings


def config_words(parser: argparse.ArgumentParser, settings: dict, skip: set[str] = frozenset()) -> list[str]:
    """The command-line words that say what ``settings`` (flag name: value) say, for ``parser``'s flags, leaving
    out the settings whose destination is in ``skip``."""
    flags = _flags(parser)
    words = []
    for key, value in settings.items():
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        if flag not in flags:
            raise ValueError(f"--config: unknown setting {key!r}; known: "
                             f"{', '.join(sorted(f.removeprefix('--') for f in flags))}")
        if value is not None and flags[flag].dest not in skip:
            words += _words(flag, flags[flag], value, key)
    return words


def _replaced_alternatives(parser: argparse.ArgumentParser, words: list[str], alternatives) -> set[str]:
    """The destinations whose alternative the command line ``words`` give (by any of its flags, an alias too)."""
    flags = _flags(parser)
    given = {flags[word.partition("=")[0]].dest for word in words if word.partition("=")[0] in flags}
    return {other for pair in alternatives for one, other in (pair, pair[::-1]) if one in given}


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every long flag of ``parser`` a config may set, with its action: not --help, not --config itself."""
    return {flag: action for action in parser._actions for flag in action.option_strings
            if flag.startswith("--") and flag not in ("--help", CONFIG_FLAG)}


def _words(flag: str, action: argparse.Action, value, key) -> list[str]:
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise ValueError(f"--config: {key} is a switch: give true or false, not {value!r}")
        if value:
            return [flag]
        # false: the flag's negation where it has one (--bf16 / --no-bf16), else nothing, as a switch left off
        negations = action.option_strings if isinstance(action, argparse.BooleanOptionalAction) else []
        return [other for other in negations if other != flag]
    if isinstance(value, dict):
        value = ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        several = action.nargs in ("+", "*") or isinstance(action.nargs, int)
        return [flag, *map(str, value)] if several else [flag, ",".join(map(str, value))]
    return [flag, str(value)]
