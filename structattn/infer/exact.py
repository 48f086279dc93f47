"""Exact objectives (no Pyro bookkeeping): marginal likelihood, posterior and exact ELBO.

The emission is a per-query log-likelihood table shaped like the alignment's ``.attention``:
``(..., queries, keys)`` with entry ``log p(y_t | z_t = k)``.  How a prior is conditioned on
such a table depends on its family, so each family registers a *conditioner* with
:func:`register_conditioner` (user code can add its own):

- per-query alignments (:class:`~structattn.CategoricalAlignment` and its sparse subclass):
  the joint ``log p(z_t = k) + log p(y_t | k)`` summed over keys;
- a :class:`~structattn.LinearChainCRF` (and so segmentation attention): the table is a node
  potential, added to the chain's potentials; the same dynamic program gives the marginal
  likelihood (a ratio of partition functions) and the posterior node marginals;
- a :class:`~structattn.MonotonicAlignment`: the table is added to its emissions;
- the dependency CRFs: a table ``(..., dependent, head)`` is arc-factored, so it is added to
  the arc scores (transposed to ``[head, dependent]``).

A distribution with no conditioner (e.g. a relaxed, continuous alignment) gives a
``ValueError`` naming its class.
"""

from __future__ import annotations

import abc
import functools

import torch

from structattn.distributions.categorical import CategoricalAlignment
from structattn.distributions.chain import LinearChainCRF
from structattn.distributions.monotonic import MonotonicAlignment
from structattn.distributions.tree import _DependencyCRF
from structattn.infer._surrogate import analytic_kl, expectation, masked, sum_out

__all__ = [
    "Conditioned",
    "condition",
    "exact_elbo",
    "marginal_log_likelihood",
    "posterior",
    "register_conditioner",
]


class Conditioned(abc.ABC):
    """A prior conditioned on an emission table: ``p(z | x, y)`` and ``log p(y | x)``."""

    @property
    @abc.abstractmethod
    def log_marginal(self) -> torch.Tensor:
        """``log p(y | x)``, the prior's batch shape."""

    @property
    @abc.abstractmethod
    def attention(self) -> torch.Tensor:
        """Posterior marginals, shaped like the prior's ``.attention``."""


class _PerQuery(Conditioned):
    def __init__(self, joint: torch.Tensor) -> None:
        self.joint = joint

    @property
    def log_marginal(self) -> torch.Tensor:
        return sum_out(self.joint, -1)

    @property
    def attention(self) -> torch.Tensor:
        return self.joint.softmax(-1)


class _ThroughDistribution(Conditioned):
    """The posterior is a distribution of the prior's family; ``log p(y | x)`` is its log
    partition minus the prior's."""

    def __init__(self, prior, posterior) -> None:
        self.prior = prior
        self.posterior = posterior

    @property
    def log_marginal(self) -> torch.Tensor:
        return self.posterior.log_partition - self.prior.log_partition

    @property
    def attention(self) -> torch.Tensor:
        return self.posterior.attention


@functools.singledispatch
def _conditioner(prior, table: torch.Tensor) -> Conditioned:
    raise ValueError(
        f"exact inference is not defined for {type(prior).__name__}: no conditioner is "
        "registered for it (see structattn.infer.exact.register_conditioner)"
    )


def register_conditioner(cls: type):
    """Decorator: ``@register_conditioner(MyAlignment)`` on ``fn(prior, table) ->
    Conditioned`` makes :func:`marginal_log_likelihood` and :func:`posterior` accept
    ``MyAlignment`` (and its subclasses)."""
    return _conditioner.register(cls)


@register_conditioner(CategoricalAlignment)
def _condition_per_query(prior, table):
    return _PerQuery(prior.logits + table)


@register_conditioner(LinearChainCRF)
def _condition_chain(prior, table):
    edges = prior.log_potentials + table[..., 1:, :].unsqueeze(-1)
    initial = prior.initial_potentials + table[..., 0, :]
    return _ThroughDistribution(
        prior, LinearChainCRF(edges, prior.lengths, initial, validate_args=False)
    )


@register_conditioner(MonotonicAlignment)
def _condition_monotonic(prior, table):
    posterior = MonotonicAlignment(
        prior.alignment_logits,
        prior.emission_log_likelihoods + table,
        prior.target_lengths,
        prior.source_lengths,
        prior.max_jump,
        validate_args=False,
    )
    return _ThroughDistribution(prior, posterior)


@register_conditioner(_DependencyCRF)
def _condition_tree(prior, table):
    posterior = type(prior)(
        prior.arc_scores + table.transpose(-1, -2),
        prior.lengths,
        multiroot=prior.multiroot,
        validate_args=False,
    )
    return _ThroughDistribution(prior, posterior)


def _checked_table(prior, table, name: str, mask: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(table, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(table).__name__}")
    event_dims = len(prior.event_shape) + 1
    expected = prior.batch_shape + _attention_event_shape(prior)
    if table.shape[-event_dims:] != expected[-event_dims:]:
        raise ValueError(
            f"{name} must be shaped like the alignment's attention, ending in "
            f"{tuple(expected[-event_dims:])}; got {tuple(table.shape)}"
        )
    if mask is None:
        return table
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError("mask must be a boolean tensor (True = real query)")
    # padded queries: a zero emission leaves the prior's marginal there untouched
    return masked(table, mask.reshape(mask.shape + (1,) * (table.dim() - mask.dim())))


def _attention_event_shape(prior) -> torch.Size:
    """The trailing ``.attention`` dims beyond the batch shape, without computing it."""
    if prior.event_shape == torch.Size():
        logits = getattr(prior, "logits", None)
        if isinstance(logits, torch.Tensor):
            return logits.shape[-1:]
    return prior.attention.shape[len(prior.batch_shape):]


def condition(prior, emission_log_prob: torch.Tensor,
              mask: torch.Tensor | None = None) -> Conditioned:
    """The prior conditioned on ``emission_log_prob`` (shaped like ``prior.attention``)."""
    table = _checked_table(prior, emission_log_prob, "emission_log_prob", mask)
    return _conditioner(prior, table)


def marginal_log_likelihood(
    prior, emission_log_prob: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact ``log p(y | x)`` with the alignment summed out.

    Args:
        prior: an alignment distribution with a registered conditioner.
        emission_log_prob: ``log p(y_t | z_t = k)``, shaped like ``prior.attention``:
            ``(..., queries, keys)``.
        mask: boolean.  Per-query alignments: ``(..., queries)``, padded queries give 0.
            Structured ones: ``(..., queries)`` positions whose emission is ignored.

    Returns:
        The prior's batch shape: ``(..., queries)`` per-query log marginal likelihoods for
        per-query alignments, one per structure otherwise.
    """
    value = condition(prior, emission_log_prob, mask).log_marginal
    if mask is None or prior.event_shape != torch.Size():
        return value
    return masked(value, mask)


def posterior(prior, emission_log_prob: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact posterior marginals ``p(z_t = k | x, y)``, shaped like ``prior.attention``."""
    return condition(prior, emission_log_prob, mask).attention


def exact_elbo(
    guide, prior, emission_log_prob: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact ``E_q[log p(y | z)] - KL(q || p)``, the guide's batch shape.

    The expectation is over the guide's marginals (exact for per-query alignments and for
    emissions that factor over queries in a structure); the KL is the registered closed form.

    Args:
        guide: inference-network alignment ``q(z | x, y)``.
        prior: prior alignment ``p(z | x)``.
        emission_log_prob: shaped like ``guide.attention``, ``(..., queries, keys)``.
        mask: boolean ``(..., queries)`` for per-query alignments; padded queries give 0.
    """
    per_query = guide.event_shape == torch.Size()
    table = _checked_table(guide, emission_log_prob, "emission_log_prob", mask)
    kl = analytic_kl(guide, prior)
    if kl is None:
        raise ValueError(
            f"exact_elbo needs a closed-form KL between {type(guide).__name__} and "
            f"{type(prior).__name__}"
        )
    weighted = expectation(guide.attention, table)
    trailing = tuple(range(-(len(guide.event_shape) + 1), 0))
    value = weighted.sum(trailing) - kl
    return value if mask is None or not per_query else masked(value, mask)
