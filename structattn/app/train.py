"""The trainer's public names (kept at this path; the code lives in
:mod:`structattn.app.training`, one job per module)."""

from structattn.app.training import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    CheckpointError,
    CheckpointWriteError,
    RunDirectoryError,
    RunLockedError,
    SettingsMismatchError,
    Trainer,
    TrainSummary,
    read_checkpoint,
    write_checkpoint,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "CheckpointWriteError",
    "RunDirectoryError",
    "RunLockedError",
    "SettingsMismatchError",
    "TrainSummary",
    "Trainer",
    "read_checkpoint",
    "write_checkpoint",
]
