"""Peak memory as `liftft bench` reports it: CUDA's allocator peak on a GPU, the process's max RSS on the CPU."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory(device: torch.device) -> int:
    """Bytes at the peak since the last reset: ``torch.cuda.max_memory_allocated`` on CUDA, else :func:`max_rss`."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else max_rss()


def max_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB, macOS bytes); it cannot be reset."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
