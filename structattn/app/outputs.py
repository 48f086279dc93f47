"""Output folders of the comparisons: one run at a time, an earlier run's results kept unless
replaced on purpose, and result files written whole or not at all.

A comparison holds its folder with :func:`claim_output` (the run-directory lock of
:mod:`structattn.app.training.rundir`, so a second run into the folder is refused while the
first is alive) and refuses a folder that holds an earlier comparison's ``results.json``
unless ``overwrite``; :func:`write_json` writes through a temporary file and a rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from structattn.app.training import RunDirectory, RunExistsError

__all__ = ["RESULTS_NAME", "claim_output", "write_json"]

#: the file a comparison's results go to, and whose presence marks a finished comparison
RESULTS_NAME = "results.json"


@contextlib.contextmanager
def claim_output(out: str | os.PathLike | None, overwrite: bool = False) -> Iterator[None]:
    """Hold the folder ``out`` (created if missing) while the block runs; ``None`` holds
    nothing.

    Raises:
        RunLockedError: another live run holds ``out``.
        RunExistsError: ``out`` holds an earlier comparison's results and not ``overwrite``.
    """
    if out is None:
        yield
        return
    with RunDirectory(out) as held:
        if (held.path / RESULTS_NAME).exists() and not overwrite:
            raise RunExistsError(
                f"{held.path} already holds the results of an earlier comparison; replace "
                "them (--overwrite) or choose another --out"
            )
        yield


def write_json(path: str | os.PathLike, data: Any, indent: int = 1) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (a crash leaves the old file or none,
    never half of one); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # (named like a checkpoint's temporary, so that a killed run's leftover is swept too)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent,
                                             prefix=f".{target.name}.partial-", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(data, handle, indent=indent)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return target
