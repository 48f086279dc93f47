"""Train/dev/test containers and a hash that assigns items to splits stably across runs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Splits", "stable_fraction"]

ExampleT = TypeVar("ExampleT")


def stable_fraction(key: str, salt: str = "") -> float:
    """A number in ``[0, 1)`` fixed by ``key`` alone (BLAKE2b), unlike the salted ``hash()``."""
    if not isinstance(key, str):
        raise ValueError(f"key must be a string, got {type(key).__name__}")
    digest = hashlib.blake2b(f"{salt}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass(frozen=True)
class Splits(Generic[ExampleT]):
    """The three splits of a corpus, each a sequence of examples."""

    train: Sequence[ExampleT]
    dev: Sequence[ExampleT]
    test: Sequence[ExampleT]

    @property
    def sizes(self) -> dict[str, int]:
        """``{"train": n, "dev": n, "test": n}``."""
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}

    def __getitem__(self, name: str) -> Sequence[ExampleT]:
        if name not in ("train", "dev", "test"):
            raise ValueError(f"split must be 'train', 'dev' or 'test', got {name!r}")
        return getattr(self, name)
