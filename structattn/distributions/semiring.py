"""Semirings shared by the dynamic programs of the structured distributions.

A dynamic program written once against a semiring answers several questions: in the log
semiring (``logsumexp``, ``+``) its value is the log partition function and its gradient the
marginals; in the max semiring (``max``, ``+``) its value is the score of the best structure and
its gradient the one-hot best structure (Goodman 1999, "Semiring parsing"; Eisner 2016,
"Inside-outside and forward-backward algorithms are just backprop").

Every semiring here works on log-space scores, so ``times`` is ``+`` for both and only the
reduction differs.
"""

from __future__ import annotations

import torch


class LogSemiring:
    """Sum-product in log space: ``sum`` is ``logsumexp``; gradients of the result are marginals."""

    name = "log"

    @staticmethod
    def sum(scores: torch.Tensor, dim: int) -> torch.Tensor:
        """Reduce ``scores`` along ``dim`` with ``logsumexp`` (one shift per output entry)."""
        return torch.logsumexp(scores, dim)


class MaxSemiring:
    """Max-product in log space: ``sum`` is ``max``; the gradient is the one-hot argmax structure.

    ``Tensor.max(dim)`` sends the whole gradient to one index on ties (``amax`` would split it),
    so the gradient of a max-semiring program is always a single structure.
    """

    name = "max"

    @staticmethod
    def sum(scores: torch.Tensor, dim: int) -> torch.Tensor:
        """Reduce ``scores`` along ``dim`` with ``max``."""
        return scores.max(dim).values


def sample_categorical(logits: torch.Tensor) -> torch.Tensor:
    """Draw one index per row from unnormalized ``logits: (..., K)``; returns ``(...,)`` int64.

    Uses the Gumbel-max trick, which needs no normalization and is exact.
    """
    uniform = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)
    gumbel = -torch.log(-torch.log(uniform))
    return (logits + gumbel).argmax(-1)


def computation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a dynamic program runs in: float64 stays, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
