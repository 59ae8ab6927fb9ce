"""Selecting and training principal weights on a loaded model: config, targets, selectors, the compact index
layout, optimizer state, the functional step and its kernels, sampled gradients, `LiftAdamW`, the loss, and the
methods compared at the same budget. Nothing here knows of the CLI or of a run directory."""
