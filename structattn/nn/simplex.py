"""Module forms of the simplex maps in :mod:`structattn.functional`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from structattn.functional import entmax15, entmax_bisect, sparsemax

__all__ = ["Sparsemax", "Entmax15", "EntmaxBisect"]


class Sparsemax(nn.Module):
    """Sparsemax along ``dim`` (Martins & Astudillo 2016).

    See :func:`structattn.functional.sparsemax`.

    ``forward(scores: (..., keys, ...), mask=None) -> (..., keys, ...)`` with ``keys`` along
    ``dim`` and ``mask`` boolean (True = valid key), broadcastable to ``scores``.
    """

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, scores: Tensor, mask: Tensor | None = None) -> Tensor:
        return sparsemax(scores, dim=self.dim, mask=mask)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Entmax15(nn.Module):
    """1.5-entmax along ``dim`` (Peters et al. 2019); see :func:`~structattn.functional.entmax15`.

    ``forward(scores: (..., keys, ...), mask=None) -> (..., keys, ...)`` with ``keys`` along
    ``dim`` and ``mask`` boolean (True = valid key), broadcastable to ``scores``.
    """

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, scores: Tensor, mask: Tensor | None = None) -> Tensor:
        return entmax15(scores, dim=self.dim, mask=mask)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class EntmaxBisect(nn.Module):
    """alpha-entmax along ``dim``; see :func:`~structattn.functional.entmax_bisect`.

    ``alpha`` is a number >= 1 or a tensor broadcastable to the scores with ``dim`` of size 1
    (a learnable ``nn.Parameter`` is allowed; keep it >= 1, e.g. as ``1 + softplus(raw)``).
    ``forward(scores: (..., keys, ...), mask=None) -> (..., keys, ...)``.
    """

    def __init__(
        self,
        alpha: float | Tensor = 1.5,
        dim: int = -1,
        n_iter: int = 50,
        tol: float | None = None,
    ):
        super().__init__()
        self.alpha = alpha
        self.dim = dim
        self.n_iter = n_iter
        self.tol = tol

    def forward(self, scores: Tensor, mask: Tensor | None = None) -> Tensor:
        return entmax_bisect(
            scores, alpha=self.alpha, dim=self.dim, mask=mask, n_iter=self.n_iter, tol=self.tol
        )

    def extra_repr(self) -> str:
        alpha = self.alpha
        if isinstance(alpha, torch.Tensor):
            alpha = f"tensor{tuple(alpha.shape)}"
        return f"alpha={alpha}, dim={self.dim}, n_iter={self.n_iter}"
