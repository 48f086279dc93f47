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

from structattn._registry import class_decorator

__all__ = [
    "ALIGNMENT_BASELINES",
    "AlignmentBaseline",
    "DiagonalBaseline",
    "HMMBaseline",
    "IBM1Baseline",
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

    def align_many(self, examples: Sequence[Any]) -> list[set[Link]]:
        """Links of every example (override to batch the work)."""
        return [self.align(example) for example in examples]


#: baseline name -> class; the comparison fits and scores every entry on the Bible task
ALIGNMENT_BASELINES: dict[str, type[AlignmentBaseline]] = {}


def register_alignment_baseline(
    name: str,
) -> Callable[[type[AlignmentBaseline]], type[AlignmentBaseline]]:
    """Class decorator: add an :class:`AlignmentBaseline` subclass under ``name``."""
    return class_decorator(ALIGNMENT_BASELINES, name, AlignmentBaseline)


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


def _pairs(examples: Sequence[Any]) -> list[tuple[list[str], list[str]]]:
    """``(source, target)`` token lists, lowercased (the aligners' vocabulary is not the
    attention models' capped one: every training word gets a translation-table row)."""
    return [([w.lower() for w in ex.source], [w.lower() for w in ex.target]) for ex in examples]


class _WordAlignerBaseline(AlignmentBaseline):
    """A :mod:`structattn.models.word_alignment` aligner trained by EM on the training
    verses; links are the posterior links (probability >= ``threshold``)."""

    epochs = 5
    threshold = 0.5

    def __init__(self) -> None:
        self.aligner = None

    @abc.abstractmethod
    def train(self, pairs: list[tuple[list[str], list[str]]]) -> Any:
        """The fitted aligner."""

    def fit(self, train: Sequence[Any]) -> None:
        self.aligner = self.train(_pairs(train))

    def align(self, example: Any) -> set[Link]:
        return self.align_many([example])[0]

    def align_many(self, examples: Sequence[Any]) -> list[set[Link]]:
        if self.aligner is None:
            raise ValueError(f"{type(self).__name__}: call fit() before align()")
        return self.aligner.align(_pairs(examples), decoding="posterior",
                                  threshold=self.threshold)


@register_alignment_baseline("ibm1")
class IBM1Baseline(_WordAlignerBaseline):
    """IBM Model 1 (Brown et al. 1993) with a NULL word, 5 EM epochs."""

    def train(self, pairs):
        from structattn.models.word_alignment import IBM1Aligner

        return IBM1Aligner().fit(pairs, self.epochs)


@register_alignment_baseline("hmm")
class HMMBaseline(_WordAlignerBaseline):
    """The HMM aligner (Vogel et al. 1996; NULL states after Och & Ney 2003), started from
    5 epochs of IBM Model 1, then 5 of its own."""

    def train(self, pairs):
        from structattn.models.word_alignment import HMMAligner, IBM1Aligner

        ibm1 = IBM1Aligner().fit(pairs, self.epochs)
        hmm = HMMAligner()
        hmm.source_vocab, hmm.target_vocab, hmm.log_t = (
            ibm1.source_vocab, ibm1.target_vocab, ibm1.log_t)
        return hmm.fit(pairs, self.epochs)
