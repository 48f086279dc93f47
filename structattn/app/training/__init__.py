"""The trainer, one job per module.

- ``loop``: :class:`Trainer`, the training loop (steps, logging, evaluation, resume).
- ``checkpoint``: checkpoint files (plain data, atomic checksummed writes, verified reads).
- ``restore``: a checkpoint's state put back into model, optimizer and scheduler.
- ``rundir``: the run directory (a lock against a second run, stale temporaries removed).
- ``settings``: the settings recorded in a checkpoint and compared on resume.
- ``rng``: every random stream's state.
- ``distributed``: device and data-parallel set-up.
- ``errors``: the error types, each naming its file or directory in one line.
"""

from structattn.app.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    read_checkpoint,
    to_checkpoint_data,
    write_checkpoint,
)
from structattn.app.training.errors import (
    CheckpointError,
    CheckpointWriteError,
    RunDirectoryError,
    RunExistsError,
    RunLockedError,
    SettingsMismatchError,
)
from structattn.app.training.loop import Trainer, TrainSummary
from structattn.app.training.rundir import RunDirectory

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "CheckpointWriteError",
    "RunDirectory",
    "RunDirectoryError",
    "RunExistsError",
    "RunLockedError",
    "SettingsMismatchError",
    "TrainSummary",
    "Trainer",
    "read_checkpoint",
    "to_checkpoint_data",
    "write_checkpoint",
]
