"""The settings that define a run, recorded in every checkpoint and compared on resume.

Resuming with another learning rate, seed, model class or experiment setting silently changes
the run; the trainer refuses it, listing every difference, unless the caller allows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from structattn.app.training.checkpoint import to_checkpoint_data
from structattn.app.training.errors import SettingsMismatchError

__all__ = [
    "check_same_settings",
    "describe_differences",
    "differing_settings",
    "run_settings",
    "scheduler_settings",
]

# Optimizer group entries that are not settings: the parameters themselves, and what an LR
# scheduler adds.
_NOT_SETTINGS = {"params", "param_names", "initial_lr"}
_ABSENT = "(absent)"
# Scheduler state entries that record progress, not configuration.
_SCHEDULER_PROGRESS = {"last_epoch", "_step_count", "_is_initial", "_get_lr_called_within_step",
                       "_last_lr", "base_lrs", "verbose"}
_SCALARS = (bool, int, float, str, type(None))


def scheduler_settings(scheduler: Any) -> dict[str, Any]:
    """A scheduler's configuration: the scalar entries of its state that are not progress."""
    if scheduler is None or not callable(getattr(scheduler, "state_dict", None)):
        return {}
    return {name: value for name, value in scheduler.state_dict().items()
            if name not in _SCHEDULER_PROGRESS and isinstance(value, _SCALARS)}


def run_settings(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Any,
    grad_clip: float | None,
    seed: int,
    config: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """A flat ``name -> plain value`` record of what defines a run.

    Call it before any step, so scheduled values (the learning rate) are the initial ones.
    The caller's ``config`` entries appear as ``config.<name>``.
    """
    settings: dict[str, Any] = {
        "model_class": _qualified_name(type(model)),
        "optimizer": _qualified_name(type(optimizer)),
        "scheduler": None if scheduler is None else _qualified_name(type(scheduler)),
        "grad_clip": grad_clip,
        "seed": seed,
    }
    for key, value in scheduler_settings(scheduler).items():
        settings[f"scheduler.{key}"] = value
    groups = optimizer.param_groups
    for index, group in enumerate(groups):
        prefix = "optimizer." if len(groups) == 1 else f"optimizer[{index}]."
        for key, value in group.items():
            if key not in _NOT_SETTINGS:
                settings[prefix + key] = _plain(value)
    for key, value in (config or {}).items():
        if not isinstance(key, str):
            raise ValueError(f"config names must be strings, got {key!r}")
        settings[f"config.{key}"] = to_checkpoint_data(value, f"config[{key!r}]")
    return settings


def differing_settings(
    recorded: Mapping[str, Any], current: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """``(name, recorded, current)`` for every setting that differs or exists on one side."""
    differences = []
    for name in sorted(set(recorded) | set(current)):
        old = recorded.get(name, _ABSENT)
        new = current.get(name, _ABSENT)
        if not _same(old, new):
            differences.append((name, old, new))
    return differences


def check_same_settings(
    recorded: Mapping[str, Any], current: Mapping[str, Any], path: Any
) -> list[tuple[str, Any, Any]]:
    """Raise :class:`SettingsMismatchError` listing every difference (one line), if any."""
    differences = differing_settings(recorded, current)
    if differences:
        raise SettingsMismatchError(
            f"checkpoint {path} was written with other settings "
            f"({describe_differences(differences)}); resume with the "
            "same settings, or allow the change (allow_config_change=True, "
            "--allow-config-change)",
            differences,
        )
    return differences


def describe_differences(differences: list[tuple[str, Any, Any]]) -> str:
    """``"name: recorded -> current; ..."`` on one line."""
    return "; ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in differences)


def _qualified_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return to_checkpoint_data(value, "an optimizer setting")


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, torch.Tensor) or isinstance(new, torch.Tensor):
        return (isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor)
                and old.shape == new.shape and bool(torch.equal(old.cpu(), new.cpu())))
    if type(old) is not type(new) and not (
        isinstance(old, (int, float)) and isinstance(new, (int, float))
        and not isinstance(old, bool) and not isinstance(new, bool)
    ):
        return False
    try:
        return bool(old == new)
    except (RuntimeError, ValueError):  # containers of tensors compare element-wise
        return repr(old) == repr(new)

