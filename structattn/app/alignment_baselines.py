"""Alignment baselines scored next to the attention modes on the same verses.

A baseline is fitted on the training pairs and then links each test pair; the comparison
judges its links exactly like a mode's (same verses, same linked target positions, same AER).
Register one from any code with :func:`register_alignment_baseline`::

    @register_alignment_baseline("mine")
    class Mine(AlignmentBaseline):
        def align(self, example): ...
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "ALIGNMENT_BASELINES",
    "AlignmentBaseline",
    "DiagonalBaseline",
    "register_alignment_baseline",
]

Link = tuple[int, int]


class AlignmentBaseline(abc.ABC):
    """Links ``(source_index, target_index)`` for a sentence pair, without attention."""

    def fit(self, train: Sequence[Any]) -> None:  # noqa: B027 - fitting is optional
        """Learn from training pairs (objects with ``source`` and ``target`` tokens)."""

    @abc.abstractmethod
    def align(self, example: Any) -> set[Link]:
        """One link per target position (or any set of links) of ``example``."""


#: baseline name -> class; the comparison fits and scores every entry on the Bible task
ALIGNMENT_BASELINES: dict[str, type[AlignmentBaseline]] = {}


def register_alignment_baseline(
    name: str,
) -> Callable[[type[AlignmentBaseline]], type[AlignmentBaseline]]:
    """Class decorator: add an :class:`AlignmentBaseline` subclass under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")

    def add(cls: type[AlignmentBaseline]) -> type[AlignmentBaseline]:
        if not (isinstance(cls, type) and issubclass(cls, AlignmentBaseline)):
            raise ValueError(f"register_alignment_baseline({name!r}) needs an "
                             f"AlignmentBaseline subclass, got {cls!r}")
        ALIGNMENT_BASELINES[name] = cls
        return cls

    return add


@register_alignment_baseline("diagonal")
class DiagonalBaseline(AlignmentBaseline):
    """Target word ``t`` of ``T`` links the source word at the same relative position.

    Source index ``floor((t + 1/2) * S / T)`` (clipped to ``S - 1``): the straight line from the
    first to the last word of both sentences, the prior every translation model starts from.
    """

    def align(self, example: Any) -> set[Link]:
        source, target = len(example.source), len(example.target)
        if source == 0 or target == 0:
            return set()
        return {(min(source - 1, math.floor((t + 0.5) * source / target)), t)
                for t in range(target)}


# IBM Model 1 and the HMM aligner (structattn.models.word_alignment) register here, each as an
# AlignmentBaseline subclass whose fit() trains the model on the training verses and whose
# align() returns its Viterbi links: @register_alignment_baseline("ibm1"), ("hmm").
