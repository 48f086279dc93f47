"""Normalizers: ``(scores, mask) -> alignment distribution``, found by name in a registry.

A normalizer turns attention scores ``(..., queries, keys)`` and a boolean key mask (True =
valid, broadcastable to the scores) into an alignment distribution whose ``.attention`` holds
the soft weights ``(..., queries, keys)``: a categorical over keys (softmax), a sparse one
(sparsemax, entmax), a relaxed one (Gumbel-softmax), or a structure whose marginals are the
weights (segmentation chain, dependency tree, monotonic alignment).

Users add their own from their code::

    @register_normalizer("scaled-softmax")
    class ScaledSoftmax(Normalizer):
        def forward(self, scores, mask=None):
            return sa.CategoricalAlignment(logits=2 * scores, mask=mask)

and then ``LatentAttention(..., normalizer="scaled-softmax")`` works like the built-ins.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from structattn import functional
from structattn._registry import class_decorator
from structattn._validation import broadcast_mask
from structattn.distributions.categorical import (
    CategoricalAlignment,
    RelaxedAlignment,
    SparsemaxAlignment,
)
from structattn.distributions.jump import JumpAlignment
from structattn.distributions.monotonic import MonotonicAlignment
from structattn.distributions.segmentation import SegmentationAlignment
from structattn.distributions.tree import NonProjectiveDependencyCRF, ProjectiveDependencyCRF

__all__ = [
    "NORMALIZERS",
    "EntmaxNormalizer",
    "Entmax15Normalizer",
    "JumpNormalizer",
    "MonotonicNormalizer",
    "Normalizer",
    "RelaxedNormalizer",
    "SegmentationNormalizer",
    "SoftmaxNormalizer",
    "SparsemaxNormalizer",
    "TreeNormalizer",
    "make_normalizer",
    "register_normalizer",
]

#: normalizer classes by name; add to it with :func:`register_normalizer`
NORMALIZERS: dict[str, type[Normalizer]] = {}


def register_normalizer(name: str) -> Callable[[type[Normalizer]], type[Normalizer]]:
    """Class decorator: make a :class:`Normalizer` subclass available by ``name``."""
    return class_decorator(NORMALIZERS, name, Normalizer, set_name=True)


def make_normalizer(normalizer: str | Normalizer, **kwargs: Any) -> Normalizer:
    """A normalizer from its registered name (built with ``kwargs``) or an instance (as is)."""
    if isinstance(normalizer, Normalizer):
        if kwargs:
            raise ValueError(
                f"normalizer options {sorted(kwargs)} given with a normalizer object; "
                "configure the object instead"
            )
        return normalizer
    if not isinstance(normalizer, str) or normalizer not in NORMALIZERS:
        raise ValueError(
            f"normalizer must be a Normalizer or one of {sorted(NORMALIZERS)}, got {normalizer!r}"
        )
    try:
        return NORMALIZERS[normalizer](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad options {sorted(kwargs)} for normalizer {normalizer!r}: {err}") \
            from err


class Normalizer(nn.Module, abc.ABC):
    """Base class: ``forward(scores, mask) -> alignment distribution`` with ``.attention``.

    Shapes: ``scores (..., queries, keys)``; ``mask`` boolean broadcastable to the scores,
    True = valid key, or None.

    Class attributes (declared capabilities):
        self_attention: the queries are the keys themselves (a tree over one sentence), so a
            masked key is also a padded query.
    """

    name: str = ""
    self_attention: bool = False

    @abc.abstractmethod
    def forward(self, scores: torch.Tensor, mask: torch.Tensor | None = None) -> Any:
        """The alignment distribution of ``scores (..., queries, keys)``."""

    def weights(self, scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Soft weights ``(..., queries, keys)`` (the distribution's ``.attention``)."""
        return self(scores, mask).attention

    @property
    def attention_mass(self) -> float:
        """What the attention of every valid query sums to over the keys."""
        return 1.0


@register_normalizer("softmax")
class SoftmaxNormalizer(Normalizer):
    """Softmax: :class:`~structattn.CategoricalAlignment`, weights ``softmax(scores)``."""

    def forward(self, scores, mask=None) -> CategoricalAlignment:
        return CategoricalAlignment(logits=scores, mask=mask)

    def weights(self, scores, mask=None) -> torch.Tensor:
        return functional.masked_softmax(scores, dim=-1, mask=mask)


class _EntmaxFamily(Normalizer):
    """alpha-entmax probabilities as a :class:`~structattn.SparsemaxAlignment`."""

    @abc.abstractmethod
    def _alpha(self) -> float | torch.Tensor:
        """alpha > 1 (2 = sparsemax, 1.5 = entmax15)."""

    def forward(self, scores, mask=None) -> SparsemaxAlignment:
        return SparsemaxAlignment(scores=scores, mask=mask, alpha=self._alpha())


@register_normalizer("sparsemax")
class SparsemaxNormalizer(_EntmaxFamily):
    """Sparsemax (Martins & Astudillo 2016): exact zeros, closed-form backward."""

    def _alpha(self) -> float:
        return 2.0

    def weights(self, scores, mask=None) -> torch.Tensor:
        return functional.sparsemax(scores, dim=-1, mask=mask)


@register_normalizer("entmax15")
class Entmax15Normalizer(_EntmaxFamily):
    """1.5-entmax (Peters et al. 2019), exact sort-based algorithm."""

    def _alpha(self) -> float:
        return 1.5

    def weights(self, scores, mask=None) -> torch.Tensor:
        return functional.entmax15(scores, dim=-1, mask=mask)


@register_normalizer("entmax")
class EntmaxNormalizer(_EntmaxFamily):
    """alpha-entmax by bisection, with a fixed or learnable ``alpha > 1``.

    Args:
        alpha: the value of alpha (the initial value when learnable).
        learnable: train alpha, parametrised as ``1 + softplus(raw)`` so it stays above 1
            (Correia et al. 2019, "Adaptively Sparse Transformers").
    """

    def __init__(self, alpha: float = 1.5, learnable: bool = False) -> None:
        super().__init__()
        if not alpha > 1.0:
            raise ValueError(f"alpha must be > 1, got {alpha!r}")
        self.learnable = learnable
        if learnable:
            raw = math.log(math.expm1(alpha - 1.0))
            self.raw_alpha = nn.Parameter(torch.tensor(raw))
        else:
            self.fixed_alpha = float(alpha)

    def _alpha(self) -> float | torch.Tensor:
        if self.learnable:
            return 1.0 + nn.functional.softplus(self.raw_alpha)
        return self.fixed_alpha

    @property
    def alpha(self) -> float | torch.Tensor:
        """The current alpha (a tensor when learnable)."""
        return self._alpha()

    def weights(self, scores, mask=None) -> torch.Tensor:
        alpha = self._alpha()
        if isinstance(alpha, torch.Tensor):
            alpha = alpha.to(scores.dtype)
        return functional.entmax_bisect(scores, alpha=alpha, dim=-1, mask=mask)


@register_normalizer("relaxed")
class RelaxedNormalizer(Normalizer):
    """Gumbel-softmax alignment (:class:`~structattn.RelaxedAlignment`).

    Args:
        temperature: positive relaxation temperature.
        straight_through: samples are one-hot with relaxed gradients.
    """

    def __init__(self, temperature: float = 1.0, straight_through: bool = True) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        self.temperature = float(temperature)
        self.straight_through = straight_through

    def forward(self, scores, mask=None) -> RelaxedAlignment:
        return RelaxedAlignment(logits=scores, temperature=self.temperature, mask=mask,
                                straight_through=self.straight_through)

    def weights(self, scores, mask=None) -> torch.Tensor:
        return functional.masked_softmax(scores, dim=-1, mask=mask)


@register_normalizer("segmentation")
class SegmentationNormalizer(Normalizer):
    """Segmentation attention (Kim et al. 2017): :class:`~structattn.distributions.segmentation.
    SegmentationAlignment`, a binary chain CRF over each query's keys.

    Args:
        transition: a fixed ``(2, 2)`` pairwise table ``[z_next, z_prev]``; by default it is a
            learned parameter (the paper's four extra parameters), initialised at zero.
        scale: the paper's ``lambda``: the weights are the "selected" marginals rescaled to sum
            to it (2 in Kim et al.'s NMT experiments).
    """

    def __init__(self, transition: torch.Tensor | None = None, scale: float = 2.0) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        self.scale = float(scale)
        if transition is None:
            self.transition = nn.Parameter(torch.zeros(2, 2))
        else:
            transition = torch.as_tensor(transition, dtype=torch.get_default_dtype())
            if transition.shape != (2, 2):
                raise ValueError(f"transition must be (2, 2), got {tuple(transition.shape)}")
            self.register_buffer("transition", transition)

    def forward(self, scores, mask=None) -> SegmentationAlignment:
        return SegmentationAlignment(scores, mask, self.transition.to(scores.dtype), self.scale)

    @property
    def attention_mass(self) -> float:
        return self.scale


def _prefix_lengths(mask: torch.Tensor | None, scores: torch.Tensor, name: str) -> torch.Tensor:
    """Lengths ``(...,)`` of a key mask that must be a prefix mask (padding after the keys)."""
    keys = scores.shape[-1]
    if mask is None:
        return torch.full(scores.shape[:-2], keys, dtype=torch.long, device=scores.device)
    mask = broadcast_mask(mask, scores.shape)
    key_mask = mask.expand(scores.shape)[..., 0, :]
    lengths = key_mask.sum(-1)
    prefix = torch.arange(keys, device=scores.device) < lengths.unsqueeze(-1)
    if not torch.equal(prefix, key_mask) or not bool(
        (mask.expand(scores.shape) == key_mask.unsqueeze(-2)).all()
    ):
        raise ValueError(
            f"mask of the {name} normalizer must be the same key-prefix mask for every query "
            "(valid keys first, padding after)"
        )
    if bool((lengths == 0).any()):
        raise ValueError("mask masks every key of at least one sequence")
    return lengths


@register_normalizer("tree")
class TreeNormalizer(Normalizer):
    """Syntactic self-attention: each word attends to its head in a latent dependency tree.

    ``scores (..., words, words)`` are read as ``[dependent (query), head (key)]`` with the
    root score of word ``j`` on the diagonal; the result is a
    :class:`~structattn.NonProjectiveDependencyCRF` (or projective, Eisner) whose
    ``.attention`` is each word's marginal distribution over its heads (Kim et al. 2017).
    The mask is a key-prefix mask: padded words are neither heads nor dependents.

    Args:
        projective: Eisner's projective trees instead of all spanning trees.
        multiroot: allow several words attached to the root.
    """

    self_attention = True

    def __init__(self, projective: bool = False, multiroot: bool = False) -> None:
        super().__init__()
        self.projective = projective
        self.multiroot = multiroot

    def forward(self, scores, mask=None):
        if scores.shape[-1] != scores.shape[-2]:
            raise ValueError(
                f"scores of the tree normalizer must be square (..., words, words), got "
                f"{tuple(scores.shape)}"
            )
        lengths = _prefix_lengths(mask, scores, "tree")
        crf = ProjectiveDependencyCRF if self.projective else NonProjectiveDependencyCRF
        return crf(scores.transpose(-1, -2), lengths=lengths, multiroot=self.multiroot)


@register_normalizer("monotonic")
class MonotonicNormalizer(Normalizer):
    """Hard monotonic attention (Wu & Cotterell 2019) without emissions: the prior chain.

    ``scores (..., targets, sources)`` score moves; query ``t`` may stay or move forward by at
    most ``max_jump`` keys from ``z_{t-1}``. The result is a
    :class:`~structattn.MonotonicAlignment` whose ``.attention`` is ``p(z_t = s)``.

    Args:
        max_jump: largest forward move per query (None: unbounded).
    """

    def __init__(self, max_jump: int | None = None) -> None:
        super().__init__()
        if max_jump is not None and (not isinstance(max_jump, int) or max_jump < 1):
            raise ValueError(f"max_jump must be a positive int or None, got {max_jump!r}")
        self.max_jump = max_jump

    def forward(self, scores, mask=None) -> MonotonicAlignment:
        lengths = _prefix_lengths(mask, scores, "monotonic")
        # with emissions that are all zero the posterior chain is the prior p(z | x)
        return MonotonicAlignment(scores, torch.zeros_like(scores), source_lengths=lengths,
                                  max_jump=self.max_jump)


@register_normalizer("jump")
class JumpNormalizer(Normalizer):
    """Neural HMM attention (Wang et al. 2018) without emissions: the prior chain.

    ``scores (..., targets, sources)`` score where each query moves; a learned score of the
    jump width ``z_t - z_{t-1}`` (either way; ``2 * max_jump + 1`` buckets, wider jumps share
    the end ones) is added. The result is a :class:`~structattn.JumpAlignment` whose
    ``.attention`` is ``p(z_t = s)``.

    Args:
        max_jump: jumps wider than this share the end buckets.
        jump_scores: initial ``(2 * max_jump + 1,)`` scores (default zeros: the moves are the
            attention scores alone).
    """

    def __init__(self, max_jump: int = 7, jump_scores: torch.Tensor | None = None) -> None:
        super().__init__()
        if isinstance(max_jump, bool) or not isinstance(max_jump, int) or max_jump < 0:
            raise ValueError(f"max_jump must be a non-negative int, got {max_jump!r}")
        if jump_scores is None:
            jump_scores = torch.zeros(2 * max_jump + 1)
        elif tuple(jump_scores.shape) != (2 * max_jump + 1,):
            raise ValueError(f"jump_scores must have shape ({2 * max_jump + 1},), got "
                             f"{tuple(jump_scores.shape)}")
        self.jump_scores = nn.Parameter(jump_scores.detach().clone().float())

    def forward(self, scores, mask=None) -> JumpAlignment:
        lengths = _prefix_lengths(mask, scores, "jump")
        return JumpAlignment(scores, self.jump_scores.to(scores.dtype), torch.zeros_like(scores),
                             source_lengths=lengths)
