"""LatentAttention: a scorer and a normaliser that return an alignment distribution."""

from __future__ import annotations

import torch
from torch import nn

from structattn.distributions.categorical import (
    CategoricalAlignment,
    RelaxedAlignment,
    SparsemaxAlignment,
)
from structattn.nn.scorers import make_scorer

__all__ = ["LatentAttention", "NORMALIZERS"]

NORMALIZERS = ("softmax", "sparsemax", "entmax15", "relaxed")


class LatentAttention(nn.Module):
    """Attention whose output is a distribution over alignments, not a context vector.

    ``forward(query: (..., queries, query_dim), keys: (..., keys, key_dim),
    key_mask: (..., keys) bool | None)`` returns a
    :class:`~structattn.CategoricalAlignment` (``normalizer="softmax"``),
    :class:`~structattn.SparsemaxAlignment` (``"sparsemax"``, ``"entmax15"``) or
    :class:`~structattn.RelaxedAlignment` (``"relaxed"``) with batch shape
    ``(..., queries)`` over ``keys``.  Read a context with
    :func:`structattn.infer.readout` (soft, sample, argmax) or sample it in a Pyro model with
    :func:`structattn.infer.sample_alignment` and :func:`structattn.infer.gather`.

    Args:
        query_dim: size of query vectors.
        key_dim: size of key vectors.
        score: ``"dot"``, ``"bilinear"``, ``"additive"`` or ``"multihead"`` (then the batch
            shape is ``(..., heads, queries)``).
        normalizer: one of ``"softmax"``, ``"sparsemax"``, ``"entmax15"``, ``"relaxed"``.
        temperature: temperature of the ``"relaxed"`` normaliser.
        scorer_kwargs: extra arguments of the scorer (``hidden``, ``heads``, ``head_dim``).
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        score: str = "bilinear",
        normalizer: str = "softmax",
        temperature: float = 1.0,
        **scorer_kwargs,
    ) -> None:
        super().__init__()
        if normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
        self.scorer = make_scorer(score, query_dim, key_dim, **scorer_kwargs)
        self.normalizer = normalizer
        self.temperature = temperature
        self.multihead = score == "multihead"

    def scores(
        self, query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw scores ``(..., queries, keys)`` and the key mask broadcast to them."""
        scores = self.scorer(query, keys)
        mask = None
        if key_mask is not None:
            if key_mask.shape[-1] != keys.shape[-2]:
                raise ValueError(
                    f"key_mask must be (..., keys={keys.shape[-2]}), got {tuple(key_mask.shape)}"
                )
            mask = key_mask.unsqueeze(-2)
            if self.multihead:
                mask = mask.unsqueeze(-3)
        return scores, mask

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None = None
    ):
        scores, mask = self.scores(query, keys, key_mask)
        if self.normalizer == "softmax":
            return CategoricalAlignment(logits=scores, mask=mask)
        if self.normalizer == "relaxed":
            return RelaxedAlignment(logits=scores, temperature=self.temperature, mask=mask)
        alpha = 2.0 if self.normalizer == "sparsemax" else 1.5
        return SparsemaxAlignment(scores=scores, mask=mask, alpha=alpha)
