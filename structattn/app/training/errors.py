"""The trainer's error types: each names the file or directory it is about, in one line.

``ValueError`` subclasses mean "this input cannot be used" (a damaged checkpoint, different
settings); ``OSError`` subclasses mean "the run directory cannot be used" (taken by another run,
not a directory, not writable, disk full).  The command line turns both into ``error: ...`` and
exit status 2.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "RunDirectoryError",
    "RunLockedError",
    "SettingsMismatchError",
]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or trusted, or a payload that cannot be saved."""


class SettingsMismatchError(ValueError):
    """Resuming a run whose recorded settings differ from this run's.

    Attributes:
        differences: ``(name, recorded, current)`` for every differing setting.
    """

    def __init__(self, message: str, differences: Sequence[tuple[str, object, object]]) -> None:
        super().__init__(message)
        self.differences = list(differences)


class RunDirectoryError(OSError):
    """The run directory cannot be used (not a directory, not writable, ...)."""


class RunLockedError(RunDirectoryError):
    """Another live process trains in the same run directory."""


class RunExistsError(RunDirectoryError):
    """The directory holds the results of an earlier run that a new one would replace
    (resume it, allow the overwrite, or choose another directory)."""


class CheckpointWriteError(RunDirectoryError):
    """Writing a checkpoint failed (read-only file system, full disk, ...); the previous
    checkpoint is left as it was."""
