"""The authors' protocol, per-model hyperparameters and reported numbers (protocol.json), and the row a model gets."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from liftft.engine.methods import METHODS, SPARSE_SELECTORS

PROTOCOL_FILE = Path(__file__).with_name("protocol.json")
# The paper's ablations run LIFT's engine with another selector, at LIFT's settings.
LIFT_ENGINE = tuple(SPARSE_SELECTORS)


@functools.cache
def load_protocol() -> dict:
    """protocol.json: the training and evaluation protocol, notes, and per table its rows (one per paper model)."""
    return json.loads(PROTOCOL_FILE.read_text(encoding="utf-8"))


def table_names() -> tuple[str, ...]:
    """The paper's tables that `liftft reproduce` runs: math and commonsense."""
    return tuple(load_protocol()["tables"])


@dataclass(frozen=True)
class Row:
    """One model's row of a table: its hyperparameters per method and the numbers the authors reported for it.

    ``how`` says why this row: "matched" (the model's name), "chosen"
    (``--row``) or "default" (a model the paper did not use). The reported
    numbers belong to the run's model only when the row was not a default.
    """

    table: str
    name: str
    how: str
    methods: dict
    reported: tuple

    @property
    def reports_this_model(self) -> bool:
        return self.how != "default"


def _table(table: str) -> dict:
    tables = load_protocol()["tables"]
    if table not in tables:
        raise ValueError(f"unknown table {table!r}; allowed: {', '.join(tables)}")
    return tables[table]


def _squashed(text: str) -> str:
    """Lower case without separators, so that Meta-Llama-3-8B, llama_3_8b and llama3-8b compare equal."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def choose_row(table: str, model: str, row: str | None = None) -> Row:
    """The row of ``table`` for ``model``: ``row`` when given, else the one whose name is in the model's last path
    component (a hub id's repo name or a local directory's name), else the table's default row."""
    rows = _table(table)["rows"]
    if row is not None:
        names = {_squashed(name): name for name in rows}
        if _squashed(row) not in names:
            raise ValueError(f"unknown --row {row!r} for table {table}; allowed: {', '.join(rows)}")
        return _row(table, names[_squashed(row)], "chosen")
    name = _squashed(Path(model.rstrip("/")).name)
    for candidate, entry in rows.items():
        if any(_squashed(alias) in name for alias in entry["match"]):
            return _row(table, candidate, "matched")
    return _row(table, _table(table)["default_row"], "default")


def _row(table: str, name: str, how: str) -> Row:
    entry = _table(table)["rows"][name]
    return Row(table, name, how, entry["methods"], tuple(entry["reported"]))


def check_methods(methods) -> list[str]:
    """``methods`` as a list without repeats, after refusing an unknown one or none."""
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))} in --methods; "
                         f"allowed: {', '.join(METHODS)}")
    if not methods:
        raise ValueError("--methods names no method")
    return methods


def method_settings(row: Row, method: str) -> dict:
    """The row's hyperparameters of ``method`` (lr, rank, filter_rank, ...): LIFT's for the other sparse selectors,
    without a refresh interval for ``gradient``, which selects once."""
    if method in row.methods:
        return dict(row.methods[method])
    if method == "gradient":
        return {**row.methods["lift"], "update_interval": None}
    if method in LIFT_ENGINE:
        return dict(row.methods["lift"])
    raise ValueError(f"the {row.table} table has no settings for method {method!r}")


def reported_averages(row: Row) -> dict:
    """The first report's averages per method, or {} when the row is a default (the paper did not run this model)."""
    return dict(row.reported[0]["average"]) if row.reports_this_model and row.reported else {}
