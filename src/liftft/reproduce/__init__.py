"""`liftft reproduce`: the paper's Tables 1 (math) and 2 (commonsense) by the authors' protocol, beside its numbers.

:mod:`~liftft.reproduce.protocol` reads protocol.json (the protocol, the
hyperparameters of each paper model and the numbers the authors reported, with
their sources); :mod:`~liftft.reproduce.run` trains and evaluates each method
through `liftft train` and `liftft eval`; :mod:`~liftft.reproduce.report`
writes results.json, results.md and results.png.
"""

from liftft.reproduce.protocol import Row, choose_row, load_protocol, table_names
from liftft.reproduce.run import DEFAULT_METHODS, ReproduceArgs, reproduce

__all__ = ["DEFAULT_METHODS", "ReproduceArgs", "Row", "choose_row", "load_protocol", "reproduce", "table_names"]
