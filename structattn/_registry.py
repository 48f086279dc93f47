"""The one class-registration helper behind every ``register_*`` decorator.

Normalizers, seq2seq and Transformer modes, positional encodings, head readouts, estimators,
baselines, aligners, tasks and architectures are each a dict of classes by name that user code
extends with a decorator; this module holds the checks they share.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, TypeVar

T = TypeVar("T", bound=type)

__all__ = ["class_decorator"]


def class_decorator(
    registry: MutableMapping[str, Any],
    name: str,
    base: type | None = None,
    *,
    set_name: bool = False,
    instantiate: bool = False,
) -> Callable[[T], T]:
    """A class decorator that adds the decorated class to ``registry`` under ``name``.

    Args:
        registry: the dict the class (or an instance of it) is stored in.
        name: its key, a non-empty string.
        base: the class every entry must subclass (``None``: any class).
        set_name: also set ``cls.name = name``.
        instantiate: store ``cls()`` rather than the class.

    Raises:
        ValueError: an empty or non-string ``name``, or a class outside ``base``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")

    def decorate(cls: T) -> T:
        if not isinstance(cls, type) or (base is not None and not issubclass(cls, base)):
            wanted = "a class" if base is None else f"a {base.__name__} subclass"
            raise ValueError(f"registering {name!r} needs {wanted}, got {cls!r}")
        if set_name:
            cls.name = name
        registry[name] = cls() if instantiate else cls
        return cls

    return decorate
