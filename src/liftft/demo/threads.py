"""How many threads the demo's CPU work gets.

torch's default is one thread per core, and its OpenMP threads spin while they wait for each other. When
another busy process holds one of the cores, a step waits at every operation for a thread that is not
running: on 2 shared cores, with a second torch process running, a demo training step took 6 to 7 s with
2 threads against 0.6 s with 1 (docs/demo.md). The demo's model is small, so a thread fewer costs it little
and a thread too many costs it ten times.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system says, else every core)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def free_cores(cores: int, load: float) -> int:
    """The threads to use on ``cores`` usable cores when the 1-minute load average is ``load``: a core for each
    one other work leaves idle, rounded to the nearest, and always at least one."""
    return max(1, min(cores, round(cores - load)))


def free_cores_now() -> int:
    """:func:`free_cores` of this process's usable cores at the current 1-minute load average."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return free_cores(usable_cores(), load)


def demo_threads() -> int:
    """Threads for the demo: what ``OMP_NUM_THREADS`` says when set (the user has chosen), else the free cores."""
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return free_cores_now()


@contextmanager
def torch_threads(count: int):
    """Run the block with ``count`` torch CPU threads, restoring the number before it after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(before)
