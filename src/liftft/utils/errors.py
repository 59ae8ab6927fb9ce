"""The ways a run stops on its own, each with one line saying why; the CLI exits with code 1 for them."""


class RunStopped(RuntimeError):
    """A run stopped for a reason its message names in one line."""


class TrainingDiverged(RunStopped):
    """The loss or the trained values became NaN or inf."""


class CollectiveTimeout(RunStopped):
    """A collective waited longer than the process group's timeout: another rank stopped or hung."""
