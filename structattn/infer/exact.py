"""Plain-PyTorch exact objectives for per-query alignments (no Pyro bookkeeping)."""

from __future__ import annotations

import torch
from torch.distributions import kl_divergence

__all__ = ["marginal_log_likelihood", "exact_elbo", "posterior"]


def _check(dist, emission: torch.Tensor, name: str = "emission_log_prob") -> None:
    if emission.shape[-1] != dist.attention.shape[-1]:
        raise ValueError(
            f"{name} must be (..., queries, keys) with keys={dist.attention.shape[-1]}; "
            f"got {tuple(emission.shape)}"
        )


def marginal_log_likelihood(
    prior, emission_log_prob: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact ``log p(y_t | x) = log sum_z p(z_t = z) p(y_t | z)`` per query.

    Args:
        prior: alignment distribution with ``logits`` ``(..., queries, keys)``.
        emission_log_prob: ``log p(y_t | z_t = k)``, ``(..., queries, keys)``.
        mask: boolean ``(..., queries)``; padded queries give 0.

    Returns:
        ``(..., queries)`` log marginal likelihoods.
    """
    _check(prior, emission_log_prob)
    value = (prior.logits + emission_log_prob).logsumexp(-1)
    return value if mask is None else value.masked_fill(~mask, 0.0)


def posterior(prior, emission_log_prob: torch.Tensor) -> torch.Tensor:
    """Exact posterior ``p(z_t | x, y) ``, ``(..., queries, keys)``."""
    _check(prior, emission_log_prob)
    return (prior.logits + emission_log_prob).softmax(-1)


def exact_elbo(
    guide, prior, emission_log_prob: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact ``E_q[log p(y | z)] - KL(q || p)`` per query, ``(..., queries)``.

    Args:
        guide: inference-network alignment ``q(z | x, y)``.
        prior: prior alignment ``p(z | x)``.
        emission_log_prob: ``(..., queries, keys)``.
        mask: boolean ``(..., queries)``; padded queries give 0.
    """
    _check(guide, emission_log_prob)
    probs = guide.attention
    expected = (probs * emission_log_prob.masked_fill(probs == 0, 0.0)).sum(-1)
    value = expected - kl_divergence(guide, prior)
    return value if mask is None else value.masked_fill(~mask, 0.0)
