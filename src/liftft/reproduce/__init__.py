"""The paper's Tables 1 (math) and 2 (commonsense): its protocol and numbers, and the report beside them.

:mod:`~liftft.reproduce.protocol` reads protocol.json (the protocol, the
hyperparameters of each paper model and the numbers the authors reported, with
their sources); :mod:`~liftft.reproduce.report` writes results.json,
results.md and results.png. `liftft reproduce` (:mod:`liftft.commands.reproduce`)
trains and evaluates each method through `liftft train` and `liftft eval`.
"""

from liftft.reproduce.protocol import Row, choose_row, load_protocol, table_names

__all__ = ["Row", "choose_row", "load_protocol", "table_names"]
