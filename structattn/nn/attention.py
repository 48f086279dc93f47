"""LatentAttention: a scorer and a normalizer that return an alignment distribution."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from structattn._validation import check_vectors
from structattn.nn.normalizers import Normalizer, make_normalizer
from structattn.nn.scorers import make_scorer

__all__ = ["LatentAttention"]


class LatentAttention(nn.Module):
    """Attention whose output is a distribution over alignments, not a context vector.

    ``forward(query: (..., queries, query_dim), keys: (..., keys, key_dim),
    key_mask: (..., keys) bool | None)`` returns the normalizer's alignment distribution (its
    ``.attention`` is ``(..., queries, keys)``; with the ``"multihead"`` scorer
    ``(..., heads, queries, keys)``).  Read a context with :func:`structattn.infer.readout`
    (soft, sample, argmax) or sample it in a Pyro model with
    :func:`structattn.infer.sample_alignment` and :func:`structattn.infer.gather`.

    Args:
        query_dim: size of query vectors.
        key_dim: size of key vectors.
        score: a scorer name (:data:`structattn.nn.scorers.SCORERS`: ``"dot"``,
            ``"bilinear"``, ``"additive"``, ``"multihead"``).
        normalizer: a registered normalizer name (:data:`structattn.nn.NORMALIZERS`:
            softmax, sparsemax, entmax15, entmax, relaxed, segmentation, tree, monotonic, or
            one of your own) or a :class:`~structattn.nn.Normalizer` object.
        scorer_kwargs: extra arguments of the scorer (``hidden``, ``heads``, ``head_dim``).
        **normalizer_kwargs: options of a normalizer given by name (``temperature``,
            ``alpha``, ``learnable``, ``scale``, ``projective``, ``max_jump``, ...).
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        score: str = "bilinear",
        normalizer: str | Normalizer = "softmax",
        scorer_kwargs: dict[str, Any] | None = None,
        **normalizer_kwargs: Any,
    ) -> None:
        super().__init__()
        self.normalizer = make_normalizer(normalizer, **normalizer_kwargs)
        self.scorer = make_scorer(score, query_dim, key_dim, **(scorer_kwargs or {}))
        self.multihead = score == "multihead"
        self.query_dim, self.key_dim = query_dim, key_dim

    def scores(
        self, query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw scores ``(..., queries, keys)`` and the key mask broadcast to them."""
        check_vectors(query, "query", self.query_dim, "(..., queries, query_dim)")
        check_vectors(keys, "keys", self.key_dim, "(..., keys, key_dim)")
        try:
            torch.broadcast_shapes(query.shape[:-2], keys.shape[:-2])
        except RuntimeError as error:
            raise ValueError(f"query {tuple(query.shape)} and keys {tuple(keys.shape)} must have "
                             "broadcastable batch dims") from error
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
        """The alignment distribution (batch ``(..., queries)`` for per-query normalizers)."""
        return self.normalizer(*self.scores(query, keys, key_mask))

    def weights(
        self, query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Soft attention weights ``(..., queries, keys)`` (the normalizer's fast path)."""
        return self.normalizer.weights(*self.scores(query, keys, key_mask))
