"""Where `liftft train` reports its scalars besides DIR/train_log.jsonl: nowhere, TensorBoard or Weights & Biases.

Each logged record of the training loop (a step's ``loss``, ``lr``,
``grad_norm`` and tokens/s; an evaluation's ``eval_loss``) goes to a
:class:`Reporter` under the names Trainer users know (``train/loss``,
``eval/loss``, ...; :func:`scalars`). Rank 0 alone reports. The libraries
are optional extras, imported when a run starts; :func:`check_report_to`
names the extra to install before any work.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

REPORT_TO = ("none", "tensorboard", "wandb")
# The module each destination imports; the extra of the same name installs it.
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}
TENSORBOARD_DIR = "tensorboard"
# A record's fields that are reported, and the name each is reported under.
_TRAIN_FIELDS = ("loss", "lr", "grad_norm", "tokens_per_s", "cumulative_tokens_per_s")
_EVAL_FIELDS = {"eval_loss": "eval/loss"}


def check_report_to(report_to: str) -> None:
    """Raise ValueError for a destination outside :data:`REPORT_TO`, or one whose library is not installed."""
    if report_to not in REPORT_TO:
        raise ValueError(f"unknown --report-to {report_to!r}; allowed: {', '.join(REPORT_TO)}")
    module = _MODULES.get(report_to)
    if module is not None and importlib.util.find_spec(module) is None:
        raise ValueError(f"--report-to {report_to} needs the {module} package, which is not installed: "
                         f"pip install 'liftft[{report_to}]'")


def scalars(record: dict) -> dict[str, float]:
    """The reported values of one train_log.jsonl ``record``, by reported name; fields that are None are left out."""
    named = {f"train/{name}": record.get(name) for name in _TRAIN_FIELDS}
    named.update({reported: record.get(name) for name, reported in _EVAL_FIELDS.items()})
    return {name: float(value) for name, value in named.items() if value is not None}


class Reporter:
    """Reports nothing: ``--report-to none``, and every rank but 0. Subclasses send :func:`scalars` somewhere."""

    def log(self, record: dict) -> None:
        """Report the scalars of one train_log.jsonl ``record`` at its ``step``."""

    def close(self, failed: bool = False) -> None:
        """Flush and release what the destination holds; ``failed`` when the run stopped with an error."""

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=kind is not None)


class TensorBoardReporter(Reporter):
    """Event files in ``log_dir`` (``tensorboard --logdir DIR/tensorboard``); the settings as a text summary."""

    def __init__(self, log_dir: Path, settings: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.writer.add_text("settings", f"```\n{json.dumps(settings, indent=1, default=str)}\n```")

    def log(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    """One W&B run per `liftft train` process, the settings as its config.

    wandb's own variables choose the rest: WANDB_MODE (``offline`` writes
    the run locally, for ``wandb sync`` later), WANDB_PROJECT (default
    ``liftft``), WANDB_DIR (default: the output dir).
    """

    def __init__(self, output: Path, settings: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "liftft"), name=output.name, config=settings,
                              dir=os.environ.get("WANDB_DIR", str(output)))

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # W&B shows a diverged or interrupted run as failed


def open_reporter(report_to: str, output: Path, settings: dict) -> Reporter:
    """The :class:`Reporter` of ``report_to`` for the run in ``output`` with ``settings`` (recorded beside the scalars)."""
    check_report_to(report_to)
    if report_to == "tensorboard":
        return TensorBoardReporter(output / TENSORBOARD_DIR, settings)
    if report_to == "wandb":
        return WandbReporter(output, settings)
    return Reporter()
