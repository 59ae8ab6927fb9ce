"""Kept so that `liftft.evaluate` imports keep working; the code lives in liftft.eval."""

from liftft.eval import *  # noqa: F403  (liftft.eval's __all__ is exactly what this module made public)
from liftft.eval import __all__  # noqa: F401
