"""Attention scorers: ``(query, keys) -> scores``, broadcast-safe over leading dims."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "SCORERS",
    "AdditiveScorer",
    "BilinearScorer",
    "DotScorer",
    "MultiHeadScorer",
    "make_scorer",
]


class DotScorer(nn.Module):
    """Scaled dot product ``q . k / sqrt(dim)``.

    ``forward(query: (..., queries, dim), keys: (..., keys, dim)) -> (..., queries, keys)``.
    """

    def __init__(self, scale: bool = True) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if query.shape[-1] != keys.shape[-1]:
            raise ValueError(
                f"dot scores need equal query and key sizes, got {query.shape[-1]} and "
                f"{keys.shape[-1]}"
            )
        scores = torch.matmul(query, keys.transpose(-1, -2))
        return scores / math.sqrt(query.shape[-1]) if self.scale else scores


class BilinearScorer(nn.Module):
    """Bilinear ``q^T W k`` (Luong et al. 2015 "general").

    ``forward(query: (..., queries, query_dim), keys: (..., keys, key_dim))
    -> (..., queries, keys)``.
    """

    def __init__(self, query_dim: int, key_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(query_dim, key_dim, bias=False)

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.proj(query), keys.transpose(-1, -2))


class AdditiveScorer(nn.Module):
    """Additive ``v^T tanh(W_q q + W_k k)`` (Bahdanau et al. 2015).

    ``forward(query: (..., queries, query_dim), keys: (..., keys, key_dim))
    -> (..., queries, keys)``; memory grows as queries x keys x hidden.
    """

    def __init__(self, query_dim: int, key_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or key_dim
        self.query_proj = nn.Linear(query_dim, hidden, bias=False)
        self.key_proj = nn.Linear(key_dim, hidden)
        self.out = nn.Linear(hidden, 1, bias=False)

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        q = self.query_proj(query).unsqueeze(-2)
        k = self.key_proj(keys).unsqueeze(-3)
        return self.out(torch.tanh(q + k)).squeeze(-1)


class MultiHeadScorer(nn.Module):
    """Scaled dot products in ``heads`` projected subspaces.

    ``forward(query: (..., queries, query_dim), keys: (..., keys, key_dim))
    -> (..., heads, queries, keys)``.
    """

    def __init__(self, query_dim: int, key_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.query_proj = nn.Linear(query_dim, heads * head_dim, bias=False)
        self.key_proj = nn.Linear(key_dim, heads * head_dim, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[:-1] + (self.heads, self.head_dim))
        return x.transpose(-2, -3)

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        q = self._split(self.query_proj(query))
        k = self._split(self.key_proj(keys))
        return torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)


#: scorer builders by name: ``(query_dim, key_dim, **kwargs) -> module``; add your own
SCORERS: dict[str, Callable[..., nn.Module]] = {
    "dot": lambda query_dim, key_dim, **kwargs: DotScorer(**kwargs),
    "bilinear": BilinearScorer,
    "additive": AdditiveScorer,
    "multihead": MultiHeadScorer,
}


def make_scorer(score: str, query_dim: int, key_dim: int, **kwargs) -> nn.Module:
    """Build a scorer by name (a key of :data:`SCORERS`)."""
    if score not in SCORERS:
        raise ValueError(f"score must be one of {sorted(SCORERS)}, got {score!r}")
    return SCORERS[score](query_dim, key_dim, **kwargs)
