"""Putting a checkpoint's state back into a model, optimizer and scheduler.

torch's ``load_state_dict`` methods accept some damaged states and fail only at the next step
(an optimizer moment of the wrong shape, a scheduler step size of 0 or ``None``), and report
mismatches over several lines.  Here every mismatch is one :class:`CheckpointError` naming the
file, raised before training resumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from structattn.app.training.errors import CheckpointError
from structattn.app.training.settings import scheduler_settings

__all__ = ["restore_objects"]


def restore_objects(
    state: Mapping[str, Any],
    path: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
) -> None:
    """Load ``state["model"]``, ``["optimizer"]`` and ``["scheduler"]`` (a checkpoint read by
    :func:`~structattn.app.training.checkpoint.read_checkpoint`) into the objects.

    The scheduler's configuration (step size, factor, ...) stays the one in force now, which
    differs from the recorded one only when the caller allowed a settings change.

    Raises:
        CheckpointError: a state does not fit its object, or is damaged.
    """
    try:
        model.load_state_dict(state["model"])
    except Exception as err:  # torch raises several types for a mismatched state
        raise CheckpointError(
            f"checkpoint {path} does not match the model: {_one_line(err)}"
        ) from err
    try:
        optimizer.load_state_dict(state["optimizer"])
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path} does not match the optimizer: {_one_line(err)}"
        ) from err
    _check_optimizer_state(optimizer, path)
    if scheduler is None or state["scheduler"] is None:
        return
    loaded = dict(state["scheduler"])
    _check_same_kinds(scheduler.state_dict(), loaded, "scheduler", path)
    for name, value in scheduler_settings(scheduler).items():
        recorded = state["settings"].get(f"scheduler.{name}", value)
        if name in loaded and loaded[name] != recorded:
            raise CheckpointError(
                f"checkpoint {path} has a damaged scheduler state: {name!r} is "
                f"{loaded[name]!r} where its settings record {recorded!r}"
            )
        loaded[name] = value
    try:
        scheduler.load_state_dict(loaded)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path} does not match the scheduler: {_one_line(err)}"
        ) from err


def _check_optimizer_state(optimizer: torch.optim.Optimizer, path: Any) -> None:
    """Refuse per-parameter state that would only fail at the next step: every entry must be
    a number or a tensor shaped like its parameter (or a scalar)."""
    for parameter, entries in optimizer.state.items():
        if not isinstance(entries, Mapping):
            raise CheckpointError(f"checkpoint {path} has a damaged optimizer state")
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                fits = value.dim() == 0 or value.shape == parameter.shape
            else:
                fits = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not fits:
                raise CheckpointError(
                    f"checkpoint {path} has a damaged optimizer state: {name!r} is "
                    f"{_describe(value)} for a parameter of shape {tuple(parameter.shape)}"
                )


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "sequence"
    return type(value).__name__


def _check_same_kinds(fresh: Mapping[str, Any], loaded: Mapping[str, Any], what: str,
                      path: Any) -> None:
    """Refuse a state whose entries are not of the kinds a freshly built object holds
    (``None`` in the fresh state accepts anything: it is filled in later)."""
    for name, value in loaded.items():
        if name not in fresh:
            raise CheckpointError(f"checkpoint {path} has a damaged {what} state: unknown "
                                  f"entry {name!r}")
        expected = fresh[name]
        if expected is None:
            continue
        same = _kind(value) == _kind(expected)
        if same and _kind(value) == "sequence" and len(expected) and len(value):
            same = all(_kind(item) == _kind(expected[0]) for item in value)
        if not same:
            raise CheckpointError(
                f"checkpoint {path} has a damaged {what} state: {name!r} is "
                f"{_describe(value)} where {_describe(expected)} belongs"
            )


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _one_line(err: BaseException) -> str:
    """torch's multi-line load_state_dict report, folded onto one line."""
    parts = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(parts) if parts else type(err).__name__


