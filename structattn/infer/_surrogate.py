"""The estimator core: the math of every alignment estimator, written once.

Both front ends call these functions: the plain-torch estimators of
:mod:`structattn.infer.estimators` (tensors in, surrogate loss out) and the Pyro ELBOs of
:mod:`structattn.infer.elbo` (the same tensors read off Pyro traces).  Tests pin the two front
ends to the same numbers under the same seed, which holds because neither carries its own copy
of a formula.

Conventions: ``mask`` is boolean, True at real queries, and broadcastable to the tensor it
masks; a padded query contributes exactly zero value and exactly zero gradient, whatever the
tensors hold there (``torch.where`` rather than multiplication, so ``-inf`` or NaN at a padded
position never becomes ``0 * inf``).
"""

from __future__ import annotations

import torch
from torch.distributions import kl_divergence

__all__ = [
    "analytic_kl",
    "categorical_kl",
    "check_real_queries",
    "expectation",
    "leave_one_out_baseline",
    "masked",
    "masked_sum",
    "relaxed_alignment",
    "score_function_term",
    "sparse_support",
    "sum_out",
]


def masked(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``values`` with padded queries (``mask`` False) set to exactly 0, gradient 0 there."""
    if mask is None:
        return values
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_sum(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum of ``values`` over real queries (a scalar)."""
    return masked(values, mask).sum()


def check_real_queries(values: torch.Tensor, mask: torch.Tensor | None, name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` when ``values`` holds NaN at a real query.

    ``mask`` broadcasts against ``values`` (e.g. ``(B, T, 1)`` against a ``(B, T, S)`` table).
    ``-inf`` is allowed (an impossible emission); NaN is never a log-likelihood.
    """
    bad = torch.isnan(values)
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):
        raise ValueError(
            f"{name} holds NaN at a real (unmasked) query; NaN is allowed only at padded "
            "queries (mask False)"
        )


def leave_one_out_baseline(reward: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``b_k = mean_{j != k} r_j`` over the ``K >= 2`` draws along ``dim`` (RLOO).

    Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"; the per-query
    analogue of VIMCO (Mnih & Rezende 2016).
    """
    num_samples = reward.shape[dim]
    if num_samples < 2:
        raise ValueError(f"the leave-one-out baseline needs num_samples >= 2, got {num_samples}")
    return (reward.sum(dim, keepdim=True) - reward) / (num_samples - 1)


def score_function_term(
    cost: torch.Tensor, log_q: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """REINFORCE surrogate ``sg[cost] * (log q - sg[log q])``: value 0, gradient
    ``cost * grad log q``.

    ``cost`` is the advantage (reward minus baseline); it is detached here and zeroed at padded
    queries, so they leak no gradient (Pyro's ``ScoreParts`` does not mask it).
    """
    return masked(cost.detach(), mask) * (log_q - log_q.detach())


def analytic_kl(guide, prior) -> torch.Tensor | None:
    """``KL(q || p)`` per site element where it is registered in closed form, else ``None``.

    Callers fall back to the sampled ``log p(z) - log q(z)`` inside the reward on ``None``.
    """
    try:
        return kl_divergence(guide, prior)
    except NotImplementedError:
        return None


def _as_categorical(dist):
    """The categorical alignment behind a relaxed one (its KL is the categorical KL)."""
    from structattn.distributions.categorical import RelaxedAlignment

    return dist.categorical() if isinstance(dist, RelaxedAlignment) else dist


def categorical_kl(guide, prior) -> torch.Tensor:
    """Exact categorical ``KL(q || p)`` for straight-through sites, never a relaxed density ratio.

    Relaxed (Gumbel-softmax) alignments are replaced by the categorical they relax: relaxed
    density ratios are unbounded and diverge in training.
    """
    kl = analytic_kl(_as_categorical(guide), _as_categorical(prior))
    if kl is None:
        raise ValueError(
            "straight-through needs a categorical KL: guide and prior must be "
            "CategoricalAlignment or RelaxedAlignment, got "
            f"{type(guide).__name__} and {type(prior).__name__}"
        )
    return kl


def relaxed_alignment(dist, temperature):
    """The straight-through Gumbel-softmax relaxation of a per-query categorical alignment.

    Keys with the categorical's mask value stay masked, so a relaxed draw never picks them.
    """
    from structattn.distributions.categorical import RelaxedAlignment, mask_value

    if isinstance(dist, RelaxedAlignment):
        return dist
    logits = getattr(dist, "logits", None)
    if dist.event_shape != torch.Size() or not isinstance(logits, torch.Tensor):
        raise ValueError(
            "straight-through needs a per-query categorical alignment (event shape (), "
            f"logits), got {type(dist).__name__}"
        )
    valid = logits > mask_value(logits.dtype) / 2
    return RelaxedAlignment(
        logits=logits, temperature=temperature, mask=valid, straight_through=True,
        validate_args=False,
    )


def expectation(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``weights * values`` with the product exactly 0 where the weight is 0.

    A zero weight (a key outside a sparse support, a padded key) makes any value irrelevant,
    including ``-inf``: this is how an exact ELBO ``sum_k q_k f_k`` stays finite.  Sum the
    result over the enumerated dim.
    """
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(weights == 0, zero, weights * torch.where(weights == 0, zero, values))


def sum_out(joint: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """``log sum_k exp joint_k`` along the enumerated ``dim``: the exact marginal likelihood."""
    return joint.logsumexp(dim, keepdim=keepdim)


def sparse_support(
    probs: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """The keys a sparse marginalisation evaluates, for ``probs (..., queries, keys)``.

    Returns ``(keys, in_support, width, mean_support)``: the ``width`` most probable keys of
    every query ``(..., queries, width)`` (``width`` = the largest support among real
    queries), whether each is in the support, and the mean support size over real queries.
    Correia et al. 2020, "Efficient Marginalization of Discrete and Structured Latent
    Variables via Sparsity": the sum over the support is exact, and so is its gradient, since
    the sparse maps' Jacobians vanish off the support.
    """
    counts = (probs > 0).sum(-1)
    real = counts if mask is None else counts[mask.expand(counts.shape)]
    width = max(int(real.max()), 1) if real.numel() else 1
    top, keys = probs.detach().topk(min(width, probs.shape[-1]), dim=-1)
    mean = float(real.float().mean()) if real.numel() else 0.0
    return keys, top > 0, width, mean
