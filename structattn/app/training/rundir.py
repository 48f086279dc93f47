"""A run directory: created on first use, held by one live process at a time, swept of the
temporary checkpoint files a killed run leaves behind.

The hold is an exclusive ``fcntl.flock`` on ``.structattn.lock`` in the directory.  The kernel
drops it when the holder exits, however it exits (kill -9 included), so a lock is never stale:
a lock file with no live holder is simply taken.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from structattn.app.training.checkpoint import TEMPORARY_PATTERN
from structattn.app.training.errors import RunDirectoryError, RunLockedError

__all__ = ["LOCK_NAME", "RunDirectory"]

LOCK_NAME = ".structattn.lock"


class RunDirectory:
    """Hold ``path`` for one run: ``with RunDirectory(path) as run: ...``.

    Args:
        path: the run directory (created with its parents when missing).

    Attributes:
        removed: stale temporary checkpoint files removed when the directory was taken.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.removed: list[Path] = []
        self._descriptor: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the directory now."""
        return self._descriptor is not None

    def acquire(self) -> RunDirectory:
        """Create the directory if needed, take its lock, remove stale temporaries.

        Raises:
            RunDirectoryError: ``path`` is a file, or the directory cannot be created or
                written.
            RunLockedError: another live process holds the directory.
        """
        if self.held:
            return self
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(
                f"run directory {self.path} is a file; give a directory (new or existing)"
            )
        lock_path = self.path / LOCK_NAME
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirectoryError(
                f"cannot use run directory {self.path}: {err.strerror or err}"
            ) from err
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(
                    f"run directory {self.path} is in use by another run"
                    + (f" (process {holder})" if holder else "")
                    + "; wait for it to finish or choose another output directory"
                ) from err
            raise RunDirectoryError(
                f"cannot lock run directory {self.path}: {err.strerror or err}"
            ) from err
        self._descriptor = descriptor
        _write_holder(descriptor)
        self.removed = self._remove_stale_temporaries()
        return self

    def release(self) -> None:
        """Let go of the directory (the lock file stays: deleting it would race a newcomer)."""
        if self._descriptor is None:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
        os.close(self._descriptor)
        self._descriptor = None

    def __enter__(self) -> RunDirectory:
        return self.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def _remove_stale_temporaries(self) -> list[Path]:
        # Holding the lock means no live run of this directory is writing, so every
        # temporary of ours here is a leftover of a killed run.
        removed = []
        for entry in self.path.iterdir():
            if TEMPORARY_PATTERN.match(entry.name) and entry.is_file():
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry)
        return removed


def _write_holder(descriptor: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)


def _read_holder(descriptor: int) -> str:
    try:
        text = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""
