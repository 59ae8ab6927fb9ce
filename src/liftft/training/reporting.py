"""Where `liftft train` reports its scalars besides DIR/train_log.jsonl: nowhere, TensorBoard or Weights & Biases.

Each logged record of the training loop (a step's ``loss``, ``lr``,
``grad_norm`` and tokens/s; an evaluation's ``eval_loss``) goes to a
:class:`Reporter` under the names Trainer users know (``train/loss``,
``eval/loss``, ...; :func:`scalars`). Rank 0 alone reports. The libraries
are optional extras, imported when a run starts; :func:`check_report_to`
names the extra to install before any work.

A resumed run continues where the checkpoint left off: TensorBoard drops the
events logged after it (the steps between the checkpoint and the interruption,
which the resumed run logs again), and W&B continues the same run, whose id
the run dir keeps in :data:`WANDB_RUN_FILE`.
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
# The id of the run's W&B run, kept in the output dir so that --resume continues that run.
WANDB_RUN_FILE = "wandb_run.json"
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
    """Event files in ``log_dir`` (``tensorboard --logdir DIR/tensorboard``); the settings as a text summary.

    A run resumed at step ``resumed_at`` purges the events of later steps that
    earlier attempts logged (``SummaryWriter``'s ``purge_step``), so that no
    step shows twice; its settings are added at that step.
    """

    def __init__(self, log_dir: Path, settings: dict, resumed_at: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)
        self.writer.add_text("settings", f"```\n{json.dumps(settings, indent=1, default=str)}\n```",
                             global_step=resumed_at)

    def log(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    """One W&B run per `liftft train` run, the settings as its config.

    wandb's own variables choose the rest: WANDB_MODE (``offline`` writes
    the run locally, for ``wandb sync`` later), WANDB_PROJECT (default
    ``liftft``), WANDB_DIR (default: the output dir). The run's id is kept in
    ``output``/:data:`WANDB_RUN_FILE`; a resumption (``resumed_at`` not None)
    continues that W&B run (``resume="allow"``), its config updated to the
    settings it runs with.
    """

    def __init__(self, output: Path, settings: dict, resumed_at: int | None = None):
        import wandb

        from liftft.utils.atomic import write_json_atomic

        project = os.environ.get("WANDB_PROJECT", "liftft")
        previous = _wandb_run(output) if resumed_at is not None else None
        kept = {"id": previous["id"], "resume": "allow", "allow_val_change": True} if previous else {}
        self.run = wandb.init(project=previous.get("project", project) if previous else project, name=output.name,
                              config=settings, dir=os.environ.get("WANDB_DIR", str(output)), **kept)
        if getattr(self.run, "id", None):  # wandb's disabled mode gives a run without one
            write_json_atomic(output / WANDB_RUN_FILE, {"id": self.run.id,
                                                        "project": getattr(self.run, "project", None) or project})

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # W&B shows a diverged or interrupted run as failed


def _wandb_run(output: Path) -> dict | None:
    """What ``output``/:data:`WANDB_RUN_FILE` says of the run's W&B run (``id``, ``project``), or None."""
    try:
        kept = json.loads((output / WANDB_RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return kept if isinstance(kept, dict) and isinstance(kept.get("id"), str) else None


def open_reporter(report_to: str, output: Path, settings: dict, resumed_at: int | None = None) -> Reporter:
    """The :class:`Reporter` of ``report_to`` for the run in ``output`` with ``settings`` (recorded beside the
    scalars); ``resumed_at``, for a resumed run, is the step it continues from (0 without a checkpoint)."""
    check_report_to(report_to)
    if report_to == "tensorboard":
        return TensorBoardReporter(output / TENSORBOARD_DIR, settings, resumed_at)
    if report_to == "wandb":
        return WandbReporter(output, settings, resumed_at)
    return Reporter()
