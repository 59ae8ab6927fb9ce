"""Every liftft progress bar: one rule for training, evaluation, the demo, the analyses and `liftft reproduce`.

:func:`progress_bar` makes them. On a terminal it is a tqdm bar, redrawn in place. Where stderr is not a terminal (a
file, a pipe, a CI log, nohup), redraws joined by carriage returns would fill the log, so the bar is
:class:`LineProgress`: one plain line every :data:`PERCENT_STEP` percent of the work or every :data:`INTERVAL_S`
seconds, whichever comes first, and one at the end, each with the count, the postfix (loss, tokens/s), the rate and
the ETA, as the transformers Trainer logs. The CLI runs every command inside :func:`progress_shown`: with
``--no-progress`` no bar shows, liftft's or those of transformers, the hub and datasets, even those of an evaluation
that a command runs in-process; without a terminal, the other libraries' bars do not show either.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

# A plain line every this many percent of the total, and at least every this many seconds.
PERCENT_STEP = 10
INTERVAL_S = 30.0

_hidden = 0  # how many progress_shown(False) blocks are open


def progress_bar(iterable=None, *, total: float | None = None, desc: str | None = None, unit: str = "it",
                 initial: int = 0, disable: bool = False, file=None):
    """A progress bar over ``iterable`` (or updated by hand up to ``total``), with tqdm's ``update``,
    ``set_postfix``, ``write`` and ``close``: tqdm's own on a terminal (or in a notebook), a
    :class:`LineProgress` elsewhere, a silent tqdm bar when ``disable`` or inside ``progress_shown(False)``."""
    from tqdm import std
    from tqdm.auto import tqdm

    stream = sys.stderr if file is None else file
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if disable or _hidden:
        return std.tqdm(iterable, total=total, disable=True)
    if _redraws_shown(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=file)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """A progress bar for logs: a plain line, never a carriage return, when the count crosses each
    :data:`PERCENT_STEP` percent of ``total``, when :data:`INTERVAL_S` seconds have passed since the last line, and
    at :meth:`close` (unless the last line already showed the final count). A line reads
    ``train lift: 40/200 steps (20%), loss=2.3456, tokens_per_s=1,234 | 3.10 steps/s, elapsed 0:13, ETA 0:52``."""

    def __init__(self, iterable=None, *, total=None, desc=None, unit="it", initial=0, file=None,
                 percent_step: float = PERCENT_STEP, interval_s: float = INTERVAL_S, clock=time.monotonic):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = initial
        self.file = sys.stderr if file is None else file
        self.percent_step, self.interval_s, self.clock = percent_step, interval_s, clock
        self.postfix = ""
        self.start = self.last_time = clock()
        self.last_n = initial
        self.next_percent = self._after(initial)
        self.closed = False

    def _after(self, n) -> float | None:
        """The next percentage, a multiple of percent_step, above where ``n`` stands; None without a total."""
        if not self.total:
            return None
        done = 100.0 * n / self.total
        return (done // self.percent_step + 1) * self.percent_step

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self):
        return int(self.total or 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        crossed = self.next_percent is not None and 100.0 * self.n / self.total >= self.next_percent - 1e-9
        if crossed or now - self.last_time >= self.interval_s:
            self._line(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{key}={value}" for key, value in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc

    def write(self, s: str, file=None, end: str = "\n", nolock: bool = False) -> None:
        stream = self.file if file is None else file
        stream.write(s + end)
        stream.flush()

    def refresh(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.n != self.last_n:
            self._line(self.clock())

    def _line(self, now: float) -> None:
        self.last_time, self.last_n = now, self.n
        self.next_percent = self._after(self.n)
        elapsed = now - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else None
        count = f"{self.n}/{self.total:g}" if self.total else f"{self.n}"
        count += f" {self.unit}s" if self.unit else ""
        if self.total:
            count += f" ({100.0 * self.n / self.total:.0f}%)"
        speed = None if not rate else f"{rate:.2f} {self.unit}s/s" if rate >= 1 else f"{1 / rate:.2f} s/{self.unit}"
        timing = [speed, f"elapsed {_clock(elapsed)}"]
        if self.total and rate:
            timing.append(f"ETA {_clock(max(self.total - self.n, 0) / rate)}")
        head = f"{self.desc}: " if self.desc else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        self.write(f"{head}{count}{postfix} | {', '.join(t for t in timing if t)}")


def _clock(seconds: float) -> str:
    """H:MM:SS, or M:SS under an hour."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@contextmanager
def progress_shown(shown: bool):
    """Inside the block, liftft's bars show as :func:`progress_bar` says if ``shown``, and none otherwise. The bars
    of transformers, huggingface_hub and datasets (loading and saving weights, downloads, dataset maps) have no
    plain-line form: they show only if ``shown`` and stderr is a terminal or a notebook's. ``TQDM_DISABLE`` tells
    the processes started inside when nothing shows."""
    global _hidden
    if shown and _redraws_shown(sys.stderr):
        yield
        return
    from transformers.utils import logging as hf_logging

    environ = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}  # read by datasets when imported inside
    if not shown:
        environ["TQDM_DISABLE"] = "1"
    before = {name: os.environ.get(name) for name in environ}
    os.environ.update(environ)
    datasets = sys.modules.get("datasets")
    datasets_bars = datasets is not None and not datasets.are_progress_bars_disabled()
    if datasets_bars:
        datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()  # and huggingface_hub's
    _hidden += not shown
    try:
        yield
    finally:
        _hidden -= not shown
        hf_logging.enable_progress_bar()
        if datasets_bars:
            datasets.enable_progress_bars()
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _redraws_shown(stream) -> bool:
    """Whether a bar redrawn in place reads well on ``stream``: a terminal, or a notebook's output."""
    from tqdm import std
    from tqdm.autonotebook import tqdm as chosen  # a notebook's widget bar in Jupyter, else std.tqdm

    return chosen is not std.tqdm or _is_terminal(stream)
