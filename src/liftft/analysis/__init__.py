"""Analyses that show why Principal Weights matter: perturbation sensitivity, the
spectra of fine-tunes, and how LIFT's selection overlaps its alternatives.

Plots live in :mod:`liftft.analysis.plots`, imported on demand since matplotlib is slow to load.
"""

from liftft.analysis.perturbation import pack_records, perplexity, perturb, perturbed
from liftft.analysis.selection_overlap import jaccard, overlap
from liftft.analysis.spectral import effective_rank, matrix_spectrum, spectrum, stable_rank, subspace_alignment

__all__ = [
    "effective_rank",
    "jaccard",
    "matrix_spectrum",
    "overlap",
    "pack_records",
    "perplexity",
    "perturb",
    "perturbed",
    "spectrum",
    "stable_rank",
    "subspace_alignment",
]
