"""Checkpoint files: plain-data payloads, atomic checksummed writes, verified weights-only reads.

A checkpoint is the zip file ``torch.save`` writes, with the SHA-256 of those bytes stored in
the zip's trailing comment (``structattn-sha256:<hex>``).  A zip comment is legal zip, so
``torch.load`` still opens the file, while :func:`read_checkpoint` recomputes the digest and
refuses any file whose bytes changed (torch does not check the zip's CRCs on load).

Only data the weights-only loader can rebuild is written: NumPy scalars and arrays and paths
are converted to plain Python at save time, anything else is refused at save time, so a
checkpoint that was written can always be read back.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import pickle
import re
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any, BinaryIO

import numpy as np
import torch

from structattn.app.training.errors import CheckpointError, CheckpointWriteError
from structattn.app.training.rng import check_rng_state

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "CHECKPOINT_VERSION",
    "TEMPORARY_PATTERN",
    "read_checkpoint",
    "to_checkpoint_data",
    "write_checkpoint",
]

CHECKPOINT_FORMAT = "structattn.checkpoint"
CHECKPOINT_VERSION = 2  # 2: SHA-256 in the zip comment, recorded run settings
CHECKPOINT_NAME = "checkpoint.pt"

# Temporary files are ``.<target name>.partial-<random>.tmp`` beside the target; the run
# directory removes stale ones (left by a killed run) matching exactly this pattern.
_TEMPORARY_INFIX = ".partial-"
TEMPORARY_PATTERN = re.compile(r"^\..+\.partial-[a-z0-9_]+\.tmp$")

_DIGEST_TAG = b"structattn-sha256:"
_DIGEST_LENGTH = len(_DIGEST_TAG) + 64  # tag + hex digest
_END_OF_ZIP = b"PK\x05\x06"
_END_OF_ZIP_SIZE = 22  # the end-of-central-directory record without its comment
_CHUNK = 1 << 20

# Plain values the weights-only unpickler rebuilds as they are.
_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, bytearray,
                  torch.Size, torch.dtype, torch.device)

_REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": Mapping,
    "optimizer": Mapping,
    "scheduler": (Mapping, type(None)),
    "step": int,
    "epoch": int,
    "batch_in_epoch": int,
    "seed": int,
    "world_size": int,
    "rng": list,
    "extra": Mapping,
    "settings": Mapping,
    "model_class": str,
}


def to_checkpoint_data(value: Any, where: str = "value") -> Any:
    """``value`` as data the weights-only loader reads back unchanged.

    NumPy scalars become Python numbers, NumPy arrays nested lists, paths strings, and
    mappings other than ``dict``/``OrderedDict`` plain dicts.  Tensors, ``None``, numbers,
    strings, bytes, ``torch.Size``/``dtype``/``device``, lists, tuples, sets and dicts are kept.

    Raises:
        CheckpointError: anything else (a custom object, a namedtuple, a range, ...), naming
            where it sits, e.g. ``extra['history'][3]``.
    """
    kind = type(value)
    if kind is bytes and not value:
        # torch pickles b"" as a call to bytes(), a global the weights-only loader refuses.
        raise CheckpointError(
            f"{where} is empty bytes, which a weights-only checkpoint cannot hold; store "
            "None or bytearray() instead"
        )
    if kind in _PLAIN_SCALARS:
        return value
    if kind in (torch.Tensor, torch.nn.Parameter):
        return value
    # NumPy values become Python ones, checked again (a datetime64 becomes a datetime, which
    # is refused).
    if isinstance(value, np.generic) and not isinstance(value, np.object_):
        return to_checkpoint_data(value.item(), where)
    if isinstance(value, np.ndarray) and value.dtype != object:
        return to_checkpoint_data(value.tolist(), where)
    if isinstance(value, PurePath):
        return str(value)
    if kind is list:
        return [to_checkpoint_data(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if kind is tuple:
        return tuple(to_checkpoint_data(item, f"{where}[{i}]") for i, item in enumerate(value))
    if kind is set:
        return {to_checkpoint_data(item, f"{where} element") for item in value}
    if isinstance(value, Mapping):
        rebuilt = collections.OrderedDict() if kind is collections.OrderedDict else {}
        for key, item in value.items():
            plain_key = to_checkpoint_data(key, f"{where} key {key!r}")
            rebuilt[plain_key] = to_checkpoint_data(item, f"{where}[{key!r}]")
        return rebuilt
    raise CheckpointError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}, which a weights-only checkpoint "
        "cannot hold; store plain data (numbers, strings, lists, dicts, tensors) instead"
    )


def write_checkpoint(payload: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``payload`` to ``path`` atomically, with its SHA-256.

    ``torch.save`` writes a temporary file in the same directory; its digest is appended as
    the zip comment, the file is flushed to disk, then renamed over ``path``.  A crash or a
    failed write leaves the previous file intact and the temporary removed (a killed process
    leaves it for :class:`~structattn.app.training.rundir.RunDirectory` to sweep).

    Raises:
        CheckpointError: the payload holds a value the weights-only loader cannot read.
        CheckpointWriteError: the directory is missing or not writable, the disk is full, ...
    """
    target = Path(path)
    try:
        plain = {key: to_checkpoint_data(value, str(key)) for key, value in payload.items()}
    except CheckpointError as err:
        raise CheckpointError(f"cannot write checkpoint {target}: {err}") from err
    temporary = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}{_TEMPORARY_INFIX}", suffix=".tmp"
        )
        with os.fdopen(descriptor, "w+b") as handle:
            torch.save(plain, handle)
            handle.flush()
            _append_digest(handle, target)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except (OSError, RuntimeError) as err:
        # torch reports a full disk as "RuntimeError: [enforce fail at inline_container.cc]"
        _remove_quietly(temporary)
        raise CheckpointWriteError(
            f"cannot write checkpoint {target}: {_reason(err)}; the previous checkpoint, if "
            "any, is unchanged"
        ) from err
    except BaseException:
        _remove_quietly(temporary)
        raise
    # Make the rename itself durable; some file systems cannot fsync a directory.
    with contextlib.suppress(OSError):
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load, verify and validate a structattn checkpoint (``torch.load(weights_only=True)``).

    Returns:
        The checkpoint dict: ``model`` (state dict), ``model_class``, ``optimizer``,
        ``scheduler``, ``step``, ``epoch``, ``batch_in_epoch``, ``seed``, ``world_size``,
        ``rng`` (one state per process), ``settings``, ``extra``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: (a ``ValueError``) ``path`` is a directory; the file is truncated,
            altered (checksum mismatch) or not a structattn checkpoint; it holds Python
            objects; a field is missing or damaged.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as handle:
            _verify_digest(handle, path)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {_reason(err)}") from err
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} is not a structattn checkpoint: it holds Python objects that a "
            f"weights-only load refuses ({_refusal(err)})"
        ) from err
    except Exception as err:  # the digest matched, so the writer itself produced bad bytes
        raise CheckpointError(f"{path} is not a readable checkpoint: {_reason(err)}") from err
    _validate(state, path)
    return dict(state)


# ---------------------------------------------------------------------- the file format


def _hash(handle: BinaryIO, length: int, tail: bytes = b"") -> str:
    """SHA-256 of the first ``length`` bytes of ``handle`` followed by ``tail``."""
    digest = hashlib.sha256()
    handle.seek(0)
    remaining = length
    while remaining > 0:
        chunk = handle.read(min(_CHUNK, remaining))
        if not chunk:
            break
        digest.update(chunk)
        remaining -= len(chunk)
    digest.update(tail)
    return digest.hexdigest()


def _append_digest(handle: BinaryIO, target: Path) -> None:
    """Store the SHA-256 of what ``torch.save`` wrote as the zip's comment."""
    size = handle.seek(0, os.SEEK_END)
    handle.seek(size - _END_OF_ZIP_SIZE)
    end = handle.read(_END_OF_ZIP_SIZE)
    if not (end.startswith(_END_OF_ZIP) and end[-2:] == b"\x00\x00"):
        raise CheckpointWriteError(
            f"cannot write checkpoint {target}: torch.save wrote an unexpected zip layout"
        )
    digest = _DIGEST_TAG + _hash(handle, size).encode("ascii")
    handle.seek(size - 2)
    handle.write(struct.pack("<H", len(digest)) + digest)


def _verify_digest(handle: BinaryIO, path: Path) -> None:
    """Raise unless the stored digest matches the bytes ``torch.save`` wrote."""
    size = handle.seek(0, os.SEEK_END)
    record = size - _DIGEST_LENGTH - _END_OF_ZIP_SIZE
    if record >= 0:
        handle.seek(record)
        header = handle.read(_END_OF_ZIP_SIZE)
        stored = handle.read(_DIGEST_LENGTH)
    if record < 0 or not stored.startswith(_DIGEST_TAG):
        handle.seek(0)
        start = handle.read(4)
        handle.seek(max(0, size - _END_OF_ZIP_SIZE))
        if start == b"PK\x03\x04" and handle.read(4) == _END_OF_ZIP:
            raise CheckpointError(
                f"{path} is not a structattn checkpoint (no SHA-256 in it): a plain "
                "torch.save file or a checkpoint of an older structattn cannot be verified"
            )
        raise CheckpointError(
            f"{path} is not a readable checkpoint (corrupt or truncated file, or not a "
            "structattn checkpoint)"
        )
    damaged = CheckpointError(f"checkpoint {path} is damaged: its SHA-256 does not match "
                              "its contents")
    if header[:4] != _END_OF_ZIP or header[-2:] != struct.pack("<H", _DIGEST_LENGTH):
        raise damaged
    # torch wrote an empty comment: hash the file as it was, comment length 0, no comment.
    actual = _hash(handle, record + _END_OF_ZIP_SIZE - 2, b"\x00\x00")
    if stored[len(_DIGEST_TAG):] != actual.encode("ascii"):
        raise damaged


def _validate(state: Any, path: Path) -> None:
    marker = state.get("format") if isinstance(state, Mapping) else None
    if not (isinstance(marker, str) and marker == CHECKPOINT_FORMAT):
        raise CheckpointError(
            f"{path} is not a structattn checkpoint (no '{CHECKPOINT_FORMAT}' format marker); "
            "it may be a bare state_dict or another program's file"
        )
    version = state.get("version")
    if not (type(version) is int and version == CHECKPOINT_VERSION):
        raise CheckpointError(
            f"{path} has checkpoint version {state.get('version')!r}; this structattn reads "
            f"version {CHECKPOINT_VERSION}"
        )
    unknown = sorted(set(state) - set(_REQUIRED_FIELDS) - {"format", "version"}, key=str)
    if unknown:
        raise CheckpointError(f"{path} is a damaged structattn checkpoint: unknown fields "
                              f"{', '.join(map(repr, unknown))}")
    for key, kind in _REQUIRED_FIELDS.items():
        value = state.get(key)
        if key not in state or not isinstance(value, kind) or (
            kind is int and isinstance(value, bool)
        ):
            raise CheckpointError(
                f"{path} is a damaged structattn checkpoint: field {key!r} is "
                + ("missing" if key not in state else f"a {type(value).__name__}")
            )
    for key in ("step", "epoch", "batch_in_epoch"):
        if state[key] < 0:
            raise CheckpointError(f"{path} is a damaged structattn checkpoint: field {key!r} "
                                  f"is negative ({state[key]})")
    if state["world_size"] < 1 or len(state["rng"]) != state["world_size"]:
        raise CheckpointError(
            f"{path} is a damaged structattn checkpoint: field 'rng' holds {len(state['rng'])} "
            f"random states for world_size {state['world_size']}"
        )
    for rank, rng in enumerate(state["rng"]):
        problem = check_rng_state(rng)
        if problem is not None:
            raise CheckpointError(
                f"{path} is a damaged structattn checkpoint: field 'rng' (process {rank}): "
                f"{problem}"
            )
    # Modules may keep plain data under "<prefix>_extra_state"; every other entry is a tensor.
    bad = [name for name, value in state["model"].items()
           if not isinstance(name, str)
           or not (isinstance(value, torch.Tensor) or name.endswith("_extra_state"))]
    if bad:
        raise CheckpointError(f"{path} is a damaged structattn checkpoint: field 'model' has "
                              f"non-tensor entries {bad[:3]!r}")
    if not {"state", "param_groups"} <= set(state["optimizer"]):
        raise CheckpointError(f"{path} is a damaged structattn checkpoint: field 'optimizer' "
                              "lacks 'state' or 'param_groups'")
    if not all(isinstance(name, str) for name in state["settings"]):
        raise CheckpointError(f"{path} is a damaged structattn checkpoint: field 'settings' "
                              "has non-string names")


def _reason(err: BaseException) -> str:
    """The first line of an error, without its traceback-like continuation."""
    text = str(err).strip().splitlines()
    first = text[0] if text else type(err).__name__
    if isinstance(err, OSError) and err.strerror:
        first = err.strerror  # "No space left on device" without the repeated path
    return first


def _refusal(err: pickle.UnpicklingError) -> str:
    """The line of torch's long weights-only message that says what was refused."""
    for line in str(err).splitlines():
        if "Unsupported" in line or "Unsupported global" in line:
            return line.replace("WeightsUnpickler error:", "").strip().split(". Please")[0]
    return _reason(err)


def _remove_quietly(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)
