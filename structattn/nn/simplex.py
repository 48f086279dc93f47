"""Module forms of the simplex maps in :mod:`structattn.functional`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from structattn._validation import check_positive_int, check_real_number
from structattn.functional import entmax15, entmax_bisect, sparsemax

__all__ = ["Sparsemax", "Entmax15", "EntmaxBisect"]


def _check_dim(dim: object) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"dim must be an int, got {dim!r}")
    return dim


class _SimplexMap(nn.Module):
    """A simplex map of :mod:`structattn.functional` along ``dim``, as a module.

    ``forward(scores: (..., keys, ...), mask=None) -> (..., keys, ...)`` with ``keys`` along
    ``dim`` and ``mask`` boolean (True = valid key), broadcastable to ``scores``.
    """

    #: the function of :mod:`structattn.functional` applied
    function: Callable[..., Tensor]

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = _check_dim(dim)

    def forward(self, scores: Tensor, mask: Tensor | None = None) -> Tensor:
        return type(self).function(scores, dim=self.dim, mask=mask)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Sparsemax(_SimplexMap):
    """Sparsemax along ``dim`` (Martins & Astudillo 2016); see
    :func:`~structattn.functional.sparsemax`.

    ``forward(scores: (..., keys, ...), mask=None) -> (..., keys, ...)`` with ``keys`` along
    ``dim`` and ``mask`` boolean (True = valid key), broadcastable to ``scores``.
    """

    function = staticmethod(sparsemax)


class Entmax15(_SimplexMap):
    """1.5-entmax along ``dim`` (Peters et al. 2019); see :func:`~structattn.functional.entmax15`.

    ``forward(scores: (..., keys, ...), mask=None) -> (..., keys, ...)`` with ``keys`` along
    ``dim`` and ``mask`` boolean (True = valid key), broadcastable to ``scores``.
    """

    function = staticmethod(entmax15)


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
        if not isinstance(alpha, Tensor):
            alpha = check_real_number(alpha, "alpha")
            if not 1.0 <= alpha < float("inf"):
                raise ValueError(f"alpha must be a finite number >= 1, got {alpha!r}")
        elif not alpha.is_floating_point():
            raise ValueError(f"alpha must be a float or a floating-point tensor, got {alpha.dtype}")
        if tol is not None and not check_real_number(tol, "tol") > 0:
            raise ValueError(f"tol must be positive, got {tol!r}")
        self.alpha = alpha
        self.dim = _check_dim(dim)
        self.n_iter = check_positive_int(n_iter, "n_iter")
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
