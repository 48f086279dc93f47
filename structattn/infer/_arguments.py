"""Argument checks and name registries shared by estimators, baselines and ELBOs.

Every bad setting raises a ``ValueError`` that names the argument, including settings that
would otherwise surface as a ``TypeError`` (an unknown keyword, ``None`` where a number is
due, a string where a number is due).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from numbers import Integral, Real
from typing import Any, TypeVar

from structattn._registry import class_decorator

__all__ = [
    "Registry",
    "check_choice",
    "check_non_negative_int",
    "check_optional_bool",
    "check_positive_int",
    "check_positive_real",
    "check_real",
    "check_unit_interval",
]

T = TypeVar("T")


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``, else a ``ValueError`` naming ``name``."""
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_non_negative_int(value: Any, name: str) -> int:
    """``value`` as an int ``>= 0``."""
    return check_positive_int(value, name, minimum=0)


def check_real(value: Any, name: str) -> float:
    """``value`` as a finite float."""
    if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def check_positive_real(value: Any, name: str) -> float:
    """``value`` as a finite float ``> 0``."""
    if not _is_real(value) or not math.isfinite(value) or not value > 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_unit_interval(value: Any, name: str) -> float:
    """``value`` as a float in ``[0, 1)``."""
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    return float(value)


def check_optional_bool(value: Any, name: str) -> bool | None:
    """``value`` as ``None`` or a bool."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool or None, got {value!r}")
    return value


def check_choice(value: Any, name: str, choices: Iterable[str]) -> str:
    """``value`` when it is one of ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class Registry(dict[str, type]):
    """Classes by name, extensible from user code with :meth:`register`.

    :meth:`build` constructs a registered class from keyword arguments, turning an unknown or
    missing keyword into a ``ValueError`` naming it instead of Python's ``TypeError``.

    Args:
        kind: what the registry holds, for messages (``"estimator"``).
        argument: the name of the argument that selects an entry, for messages (``"name"``).
    """

    def __init__(self, kind: str, argument: str) -> None:
        super().__init__()
        self.kind = kind
        self.argument = argument

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@REGISTRY.register("mine")`` makes ``"mine"`` buildable."""
        return class_decorator(self, name)

    def lookup(self, name: Any) -> type:
        """The class registered as ``name``."""
        if not isinstance(name, str) or name not in self:
            raise ValueError(f"{self.argument} must be one of {tuple(self)}, got {name!r}")
        return self[name]

    def build(self, name: Any, kwargs: dict[str, Any]) -> Any:
        """``cls(**kwargs)`` for the class registered as ``name``, arguments checked first."""
        cls = self.lookup(name)
        check_keywords(cls, kwargs, f"{self.kind} {name!r}")
        return cls(**kwargs)


def check_keywords(cls: type, kwargs: dict[str, Any], what: str) -> None:
    """Raise a ``ValueError`` naming the argument when ``cls(**kwargs)`` cannot bind."""
    owner = next(klass for klass in cls.__mro__ if "__init__" in vars(klass))
    if owner is object or owner.__module__.startswith("torch."):
        # no constructor of its own: torch's Module.__init__ accepts nothing useful
        parameters = {}
    else:
        try:
            parameters = dict(inspect.signature(cls).parameters)
        except (TypeError, ValueError):  # no introspectable signature: let the call decide
            return
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if not takes_any:
        for key in kwargs:
            if key not in parameters or parameters[key].kind in (
                inspect.Parameter.POSITIONAL_ONLY,
                inspect.Parameter.VAR_POSITIONAL,
            ):
                accepted = [
                    p for p, spec in parameters.items()
                    if spec.kind in (spec.POSITIONAL_OR_KEYWORD, spec.KEYWORD_ONLY)
                ]
                raise ValueError(
                    f"{what} takes no argument {key!r} (it accepts {accepted or 'none'})"
                )
    for key, spec in parameters.items():
        if (
            spec.default is inspect.Parameter.empty
            and spec.kind in (spec.POSITIONAL_OR_KEYWORD, spec.KEYWORD_ONLY)
            and key not in kwargs
        ):
            raise ValueError(f"{what} needs the argument {key!r}")
