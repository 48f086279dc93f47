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

from structattn._validation import check_broadcasts_to, validation_enabled
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

    def impossible(self) -> bool:
        """Whether ``log p(y | x) = -inf`` somewhere (the posterior is undefined there)."""
        return bool((self.log_marginal == -torch.inf).any())


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

    def impossible(self) -> bool:
        # (the posterior's partition alone: the prior's is finite)
        return bool((self.posterior.log_partition == -torch.inf).any())


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


def _require_shape(table: torch.Tensor, tail: tuple[int, ...], prior) -> None:
    if tuple(table.shape[-len(tail):]) != tail:
        raise ValueError(
            f"emission_log_prob must be shaped like the attention of {type(prior).__name__}, "
            f"ending in {tail}; got {tuple(table.shape)}"
        )


@register_conditioner(CategoricalAlignment)
def _condition_per_query(prior, table):
    _require_shape(table, (prior.logits.shape[-1],), prior)
    return _PerQuery(prior.logits + table)


@register_conditioner(LinearChainCRF)
def _condition_chain(prior, table):
    _require_shape(table, (prior.log_potentials.shape[-3] + 1, prior.num_states), prior)
    edges = prior.log_potentials + table[..., 1:, :].unsqueeze(-1)
    initial = prior.initial_potentials + table[..., 0, :]
    return _ThroughDistribution(
        prior, LinearChainCRF(edges, prior.lengths, initial, validate_args=False)
    )


@register_conditioner(MonotonicAlignment)
def _condition_monotonic(prior, table):
    _require_shape(table, tuple(prior.alignment_logits.shape[-2:]), prior)
    # the prior rebuilds itself, so a subclass keeps its own moves (e.g. JumpAlignment's jumps)
    return _ThroughDistribution(prior, prior.with_emissions(prior.emission_log_likelihoods + table))


@register_conditioner(_DependencyCRF)
def _condition_tree(prior, table):
    _require_shape(table, tuple(prior.arc_scores.shape[-2:]), prior)
    posterior = type(prior)(
        prior.arc_scores + table.transpose(-1, -2),
        prior.lengths,
        multiroot=prior.multiroot,
        validate_args=False,
    )
    return _ThroughDistribution(prior, posterior)


def _checked_table(table, mask: torch.Tensor | None) -> torch.Tensor:
    """The emission table with padded queries zeroed, after checking it (a floating tensor,
    no NaN or +inf where a query is real; -inf rules a key out) and ``mask``."""
    if not isinstance(table, torch.Tensor) or not table.is_floating_point():
        kind = table.dtype if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"emission_log_prob must be a floating-point tensor, got {kind}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError("mask must be a boolean tensor (True = real query)")
        if mask.dim() >= table.dim():
            raise ValueError(
                f"mask {tuple(mask.shape)} must cover the queries of emission_log_prob "
                f"{tuple(table.shape)} (one dim fewer)"
            )
        check_broadcasts_to(mask.shape, table.shape[:-1], "mask",
                            "the queries of emission_log_prob,")
        # padded queries: a zero emission leaves the prior's marginal there untouched
        table = masked(table, mask.reshape(mask.shape + (1,) * (table.dim() - mask.dim())))
    if validation_enabled() and bool((table.isnan() | (table == torch.inf)).any()):
        raise ValueError("emission_log_prob contains NaN or +inf (log-probabilities are finite, "
                         "or -inf for an impossible emission)")
    return table


def condition(prior, emission_log_prob: torch.Tensor,
              mask: torch.Tensor | None = None) -> Conditioned:
    """The prior conditioned on ``emission_log_prob`` (shaped like ``prior.attention``)."""
    return _conditioner(prior, _checked_table(emission_log_prob, mask))


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
    """Exact posterior marginals ``p(z_t = k | x, y)``, shaped like ``prior.attention``.

    Raises:
        ValueError: besides bad arguments, when the emissions rule out every alignment that
            the prior allows for some query or structure (``log p(y | x) = -inf``): the
            posterior is undefined there.
    """
    conditioned = condition(prior, emission_log_prob, mask)
    attention = conditioned.attention
    if validation_enabled() and (bool(attention.isnan().any()) or conditioned.impossible()):
        raise ValueError("emission_log_prob rules out every alignment the prior allows for some "
                         "query (log p(y | x) = -inf): the posterior is undefined there")
    return attention


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
    table = _checked_table(emission_log_prob, mask)
    attention = guide.attention
    event_dims = len(guide.event_shape) + 1
    _require_shape(table, tuple(attention.shape[-event_dims:]), guide)
    kl = analytic_kl(guide, prior)
    if kl is None:
        raise ValueError(
            f"exact_elbo needs a closed-form KL between {type(guide).__name__} and "
            f"{type(prior).__name__}"
        )
    value = expectation(attention, table).sum(tuple(range(-event_dims, 0))) - kl
    return value if mask is None or not per_query else masked(value, mask)
