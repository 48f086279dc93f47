"""Plain-PyTorch gradient estimators for alignment sites: one surrogate loss per estimator.

A model gives, for one batch, an :class:`AlignmentTerms`: the prior ``p(z | x)`` (an alignment
distribution with batch shape ``site_batch``, e.g. ``(batch, queries)``), the emission
log-likelihood ``log p(y | z)`` and a query mask.  The log-likelihood is either

- a table ``(..., *site_batch, keys)`` of ``log p(y_t | z_t = k)`` for every key (per-query
  alignments, when evaluating every key is affordable), or
- a callable ``log_likelihood(z) -> (n, *site_batch)`` for alignments ``z`` of shape
  ``(n, *site_batch)`` (integer keys; ``(n, *site_batch, *event)`` for structured alignments;
  one-hot floats ``(n, *site_batch, keys)`` for straight-through), so that sampling and
  sparse estimators evaluate the emission at the alignments they need and nowhere else.

An estimator turns these (and optionally a guide ``q(z | x, y)`` with the same batch shape) into
a scalar **surrogate loss**: its value is minus the estimate of the objective summed over valid
queries, and its gradient is the estimator's gradient for model, prior and guide parameters
alike.  The objective is the exact marginal log-likelihood ``log p(y | x)`` (``enum``/``sparse``
without a guide), the ELBO ``E_q[log p(y | z)] - KL(q || p)`` (any estimator with a guide), or
the hard-attention bound ``E_p[log p(y | z)]`` (sampling estimators without a guide).

Every estimator is a class registered by name in :data:`ESTIMATORS` (the one list of
estimator names, shared with :func:`~structattn.infer.sample_alignment`); a user adds one with
:func:`register_estimator`.  The math lives in :mod:`structattn.infer._surrogate`, shared with
the Pyro ELBOs.  Padded queries (``mask`` False) contribute exactly zero value and gradient
whatever the log-likelihood holds there (``-inf``, NaN); NaN at a real query is a
``ValueError``.

Use an estimator directly (``estimator.loss(terms, guide)``) or as
``loss = estimator(model, guide, batch)`` with ``model(batch) -> AlignmentTerms`` and
``guide(batch) -> distribution``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from structattn._validation import check_broadcasts_to
from structattn.infer._arguments import (
    Registry,
    check_choice,
    check_positive_int,
    check_positive_real,
)
from structattn.infer._surrogate import (
    analytic_kl,
    categorical_kl,
    check_real_queries,
    expectation,
    masked,
    masked_sum,
    relaxed_alignment,
    score_function_term,
    sparse_support,
    sum_out,
)
from structattn.infer.baselines import Baseline, LeaveOneOutBaseline, make_baseline
from structattn.infer.exact import exact_elbo, marginal_log_likelihood

__all__ = [
    "ESTIMATORS",
    "ESTIMATOR_NAMES",
    "AlignmentTerms",
    "Estimator",
    "ExactEstimator",
    "RLOOEstimator",
    "ScoreFunctionEstimator",
    "SparseEstimator",
    "StraightThroughEstimator",
    "evaluate_log_likelihood",
    "likelihood_table",
    "make_estimator",
    "register_estimator",
]

#: every estimator class by name; add your own with :func:`register_estimator`
ESTIMATORS = Registry("estimator", "name")

#: the registered names, a live view of :data:`ESTIMATORS`
ESTIMATOR_NAMES = ESTIMATORS.keys()

LogLikelihood = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def register_estimator(name: str):
    """Class decorator: ``@register_estimator("mine")`` makes ``make_estimator("mine")`` and
    ``sample_alignment(..., estimator="mine")`` work, exactly like the built-ins."""
    return ESTIMATORS.register(name)


@dataclass
class AlignmentTerms:
    """What a model contributes to an alignment objective for one batch.

    Attributes:
        prior: alignment distribution ``p(z | x)``, batch shape ``site_batch``.
        log_likelihood: table ``(..., *site_batch, keys)`` or callable
            ``z (n, *site_batch[, *event]) -> (n, *site_batch)`` (see the module docstring);
            for a structured prior under ``enum``, a table shaped like ``prior.attention``.
        mask: boolean ``site_batch``, True for real queries; padded ones contribute nothing.
        soft_log_likelihood: ``site_batch`` log-likelihood under the soft context, for the
            soft-attention baseline.
        features: ``site_batch + (F,)`` per-query features, for the learned baseline.
    """

    prior: Any
    log_likelihood: LogLikelihood
    mask: torch.Tensor | None = None
    soft_log_likelihood: torch.Tensor | None = None
    features: torch.Tensor | None = None


def _check_mask(mask: torch.Tensor | None, batch_shape: torch.Size) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError("mask must be a boolean tensor (True = real query)")
    if mask.shape != batch_shape:
        raise ValueError(
            f"mask must have the alignment's batch shape {tuple(batch_shape)}, got "
            f"{tuple(mask.shape)}"
        )
    return mask


def _guard_log_likelihood(log_likelihood: LogLikelihood, mask: torch.Tensor | None,
                          trailing_dims: int) -> LogLikelihood:
    """The log-likelihood with padded queries zeroed (value and gradient) and NaN at real
    queries refused, for a table ``(..., *site_batch, *trailing)`` or a callable."""
    if callable(log_likelihood):

        def guarded(z: torch.Tensor) -> torch.Tensor:
            if mask is not None and z.is_floating_point():
                # one-hot weights are zeroed at padded queries: whatever the callable does
                # with them there (0 * -inf), no gradient flows back through them
                z = masked(z, mask.reshape(mask.shape + (1,) * (z.dim() - 1 - mask.dim())))
            value = log_likelihood(z)
            if not isinstance(value, torch.Tensor):
                raise ValueError("log_likelihood(z) must return a tensor")
            check_real_queries(value, mask, "log_likelihood(z)")
            return value if mask is None else masked(value, mask)

        return guarded
    if not isinstance(log_likelihood, torch.Tensor):
        raise ValueError("log_likelihood must be a tensor table or a callable")
    query_mask = None if mask is None else mask.reshape(mask.shape + (1,) * trailing_dims)
    if query_mask is not None and log_likelihood.dim() < query_mask.dim():
        raise ValueError(
            f"log_likelihood table of shape {tuple(log_likelihood.shape)} is too small for "
            f"the mask {tuple(mask.shape)}"
        )
    check_real_queries(log_likelihood, query_mask, "log_likelihood")
    return masked(log_likelihood, query_mask)


def evaluate_log_likelihood(
    log_likelihood: LogLikelihood, z: torch.Tensor, batch_shape: torch.Size
) -> torch.Tensor:
    """``log p(y | z)`` at alignments ``z``; returns ``(n, *batch_shape)``.

    Args:
        log_likelihood: a table ``(..., *batch_shape, keys)`` (then ``z`` holds integer keys
            ``(n, *batch_shape)`` or one-hot weights ``(n, *batch_shape, keys)``) or a callable.
        z: alignments with a leading sample dim ``n``.
        batch_shape: the alignment's batch shape.
    """
    leading = z.shape[:1]
    expected = leading + batch_shape
    if callable(log_likelihood):
        value = log_likelihood(z)
        if not isinstance(value, torch.Tensor):
            raise ValueError("log_likelihood(z) must return a tensor")
        check_broadcasts_to(value.shape, expected, "log_likelihood(z)", "the expected shape")
        return value.expand(expected)
    table = log_likelihood
    if not isinstance(table, torch.Tensor):
        raise ValueError("log_likelihood must be a tensor table or a callable")
    if table.shape[-1 - len(batch_shape) : -1] != batch_shape:
        raise ValueError(
            f"log_likelihood table must be (..., {', '.join(map(str, batch_shape))}, keys), "
            f"got {tuple(table.shape)}"
        )
    if z.is_floating_point():
        return (z * table).sum(-1)
    keys = table.shape[-1]
    index = z.unsqueeze(-1)
    shape = torch.broadcast_shapes(table.shape[:-1], z.shape)
    return table.expand(shape + (keys,)).gather(-1, index.expand(shape + (1,))).squeeze(-1)


def likelihood_table(
    log_likelihood: LogLikelihood,
    batch_shape: torch.Size,
    num_keys: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The full table ``(*batch_shape, keys)`` of a per-query log-likelihood.

    A callable is evaluated once at ``z = arange(keys)`` shaped ``(keys, 1, ..., 1)``, i.e.
    broadcast over the batch, the same layout as Pyro's parallel enumeration.
    """
    if not callable(log_likelihood):
        if log_likelihood.shape[-1] != num_keys:
            raise ValueError(
                f"log_likelihood table must end in keys={num_keys}, got "
                f"{tuple(log_likelihood.shape)}"
            )
        return log_likelihood
    keys = torch.arange(num_keys, device=device).reshape((num_keys,) + (1,) * len(batch_shape))
    value = log_likelihood(keys)
    expected = torch.Size((num_keys,)) + batch_shape
    check_broadcasts_to(value.shape, expected, "log_likelihood(z)", "the expected shape")
    return value.expand(expected).movedim(0, -1)


def _draw(dist, num_samples: int) -> torch.Tensor:
    """``num_samples`` draws, ``(num_samples, *batch, *event)``.

    Drawn from the distribution expanded to ``(num_samples, *batch)``, the same random stream
    as a Pyro site inside a vectorised particle plate, so Pyro and plain-torch estimators give
    the same numbers under the same seed.
    """
    expanded = dist.expand(torch.Size((num_samples,)) + dist.batch_shape)
    return expanded.sample()


def _registered_name(cls: type) -> str:
    return next((name for name, value in ESTIMATORS.items() if value is cls), cls.__name__)


def _check_discrete(dist, cls: type) -> None:
    """Score-function sites need a discrete (not reparameterised) alignment."""
    if dist.has_rsample:
        raise ValueError(
            f"estimator={_registered_name(cls)!r} needs a discrete alignment; got a "
            f"reparameterised {type(dist).__name__} (use estimator='st')"
        )


def _per_query_categorical(dist, name: str, attribute: str) -> None:
    if dist.event_shape != torch.Size() or not isinstance(
        getattr(dist, attribute, None), torch.Tensor
    ):
        raise ValueError(
            f"estimator {name!r} needs a per-query alignment (event shape (), {attribute}); "
            f"got {type(dist).__name__}"
        )


class Estimator(nn.Module, abc.ABC):
    """Base class.  ``forward(model, guide, batch)`` returns the surrogate loss.

    ``model(batch)`` must return an :class:`AlignmentTerms`; ``guide`` is ``None`` or a
    callable ``guide(batch) -> distribution`` with the prior's batch shape.  Subclasses
    implement :meth:`loss` and, for Pyro, may override :meth:`site_settings`.  After each
    call, :attr:`stats` holds diagnostics of the last batch as floats or detached 0-dim
    tensors, e.g. ``objective``: the estimate of the objective.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, float | torch.Tensor] = {}

    def forward(self, model: Callable[[Any], AlignmentTerms], guide, batch) -> torch.Tensor:
        terms = model(batch)
        if not isinstance(terms, AlignmentTerms):
            raise ValueError(
                f"model(batch) must return an AlignmentTerms, got {type(terms).__name__}"
            )
        guide_dist = None if guide is None else guide(batch)
        return self.loss(terms, guide_dist)

    @abc.abstractmethod
    def loss(self, terms: AlignmentTerms, guide=None) -> torch.Tensor:
        """Scalar surrogate loss: value ``-objective``, gradient the estimator's gradient."""

    @classmethod
    def site_settings(
        cls,
        dist,
        mask: torch.Tensor | None = None,
        baseline: dict | None = None,
        temperature: float = 1.0,
    ) -> tuple[Any, dict]:
        """How :func:`~structattn.infer.sample_alignment` issues a Pyro site for this
        estimator: ``(site distribution, infer settings)``; ``mask`` is the site's query mask.

        The default is a sampled discrete site with score-function gradients and no
        TraceGraph_ELBO baseline.
        """
        _check_discrete(dist, cls)
        if baseline is not None:
            raise ValueError("baseline= only applies to estimator='score'")
        return dist, {}

    def _prepare(self, terms: AlignmentTerms, guide):
        """``(prior, mask, guarded log-likelihood)`` after checking shapes."""
        prior = terms.prior
        for role, dist in (("prior", prior), ("guide", guide)):
            if dist is not None and not isinstance(dist, torch.distributions.Distribution):
                raise ValueError(
                    f"{role} must be an alignment distribution, got {type(dist).__name__}"
                )
        mask = _check_mask(terms.mask, prior.batch_shape)
        if guide is not None and guide.batch_shape != prior.batch_shape:
            raise ValueError(
                f"guide batch shape {tuple(guide.batch_shape)} differs from the prior's "
                f"{tuple(prior.batch_shape)}"
            )
        # a table has one trailing dim (keys) past a per-query site, one more per event dim
        trailing = len(prior.event_shape) + 1
        return prior, mask, _guard_log_likelihood(terms.log_likelihood, mask, trailing)

    def _finish(self, objective: torch.Tensor, mask, extra: torch.Tensor | None = None):
        total = masked_sum(objective, mask)
        self.stats["objective"] = total.detach()
        loss = -total
        return loss if extra is None else loss + extra


@register_estimator("enum")
class ExactEstimator(Estimator):
    """``enum``: exact enumeration.

    Per-query alignments: without a guide the objective is the marginal log-likelihood
    ``sum_t log sum_k p(z_t = k) p(y_t | k)`` (model-side enumeration); with a guide, the exact
    ELBO ``sum_t sum_k q_k (log p(y_t | k) + log p_k - log q_k)`` (guide-side enumeration).
    Cost: one emission per key and query.  Structured alignments (e.g. a linear chain or a
    monotonic alignment) take a table shaped like their ``.attention`` and are summed out by
    their own dynamic program (see :func:`~structattn.infer.marginal_log_likelihood`).
    """

    @classmethod
    def site_settings(cls, dist, mask=None, baseline=None, temperature=1.0):
        if baseline is not None:
            raise ValueError("baseline= only applies to estimator='score'")
        if not getattr(dist, "has_enumerate_support", False):
            raise ValueError(
                f"estimator='enum' needs an enumerable alignment; {type(dist).__name__} is not"
            )
        return dist, {"enumerate": "parallel"}

    def loss(self, terms: AlignmentTerms, guide=None) -> torch.Tensor:
        prior, mask, log_likelihood = self._prepare(terms, guide)
        if prior.event_shape != torch.Size():
            if callable(log_likelihood):
                raise ValueError(
                    "estimator 'enum' on a structured alignment needs log_likelihood as a "
                    "table shaped like its attention"
                )
            table = log_likelihood
        else:
            attention = prior.attention
            table = likelihood_table(log_likelihood, prior.batch_shape, attention.shape[-1],
                                     attention.device)
        if guide is None:
            objective = marginal_log_likelihood(prior, table)
        else:
            objective = exact_elbo(guide, prior, table)
        self.stats["evaluations_per_query"] = float(table.shape[-1])
        return self._finish(objective, mask)


@register_estimator("score")
class ScoreFunctionEstimator(Estimator):
    """``score``: REINFORCE with a baseline, ``num_samples`` draws per query.

    With draws ``z_1..z_K`` from ``q`` (the guide, or the prior when there is none), rewards
    ``r_k`` and baselines ``b_k``, the surrogate objective is

    .. math::
        \\frac{1}{K} \\sum_k \\Big[ f_k + (r_k - b_k)\\,(\\log q(z_k) - \\mathrm{sg}[\\log q(z_k)])
        \\Big] - \\mathrm{KL}

    whose value is the Monte Carlo objective and whose gradient is the score-function
    gradient plus the pathwise gradient of ``f_k`` (model parameters through the emission).
    With ``kl="analytic"`` (default, when ``kl_divergence(q, p)`` is registered) the reward is
    ``log p(y | z)`` and the KL is exact; with ``kl="sampled"`` (or no registered KL) the
    reward is ``log p(y | z) + log p(z) - log q(z)`` as in Pyro's ``Trace_ELBO``.  Rewards are
    per site-batch element (per query, or per sequence for structured alignments), i.e.
    Rao-Blackwellised over independent queries; advantages are zero at padded queries.

    Works for any distribution with ``sample`` and ``log_prob`` (structured alignments with an
    event shape included).

    Args:
        baseline: a registered baseline name (``"none"``, ``"mean"``, ``"learned"``,
            ``"soft"``, ``"loo"``, or one added with
            :func:`~structattn.infer.register_baseline`) or a
            :class:`~structattn.infer.baselines.Baseline`; registered as ``self.baseline``
            (parameter names ``baseline.*``: pass ``estimator.parameters()`` to the optimizer,
            possibly with its own learning rate).  The baseline's regression loss is part of
            the surrogate's gradient but not of its value.
        num_samples: draws per query ``K`` (``"loo"`` needs ``K >= 2``).
        kl: ``"analytic"`` or ``"sampled"`` (only used with a guide).
        baseline_kwargs: passed to :func:`~structattn.infer.baselines.make_baseline`.
    """

    def __init__(
        self,
        baseline: str | Baseline | None = "none",
        num_samples: int = 1,
        kl: str = "analytic",
        **baseline_kwargs,
    ) -> None:
        super().__init__()
        self.num_samples = check_positive_int(num_samples, "num_samples")
        self.kl = check_choice(kl, "kl", ("analytic", "sampled"))
        self.baseline = make_baseline(baseline, **baseline_kwargs)
        if isinstance(self.baseline, LeaveOneOutBaseline) and num_samples < 2:
            raise ValueError("num_samples must be >= 2 for the leave-one-out baseline")

    @classmethod
    def site_settings(cls, dist, mask=None, baseline=None, temperature=1.0):
        _check_discrete(dist, cls)
        infer: dict = {}
        if baseline is not None:
            if not isinstance(baseline, dict):
                raise ValueError(f"baseline must be a dict of TraceGraph_ELBO options, got "
                                 f"{type(baseline).__name__}")
            baseline = dict(baseline)
            # padded queries must leak no gradient through TraceGraph_ELBO's baseline either
            if mask is not None and "baseline_value" in baseline:
                baseline["baseline_value"] = masked(baseline["baseline_value"], mask)
            infer["baseline"] = baseline
        return dist, infer

    def loss(self, terms: AlignmentTerms, guide=None) -> torch.Tensor:
        prior, mask, log_likelihood = self._prepare(terms, guide)
        proposal = prior if guide is None else guide
        z = _draw(proposal, self.num_samples)
        log_q = proposal.log_prob(z)
        log_lik = evaluate_log_likelihood(log_likelihood, z, proposal.batch_shape)
        kl = None
        if guide is not None and self.kl == "analytic":
            kl = analytic_kl(guide, prior)
        if guide is None or kl is not None:
            reward = log_lik
        else:
            reward = log_lik + prior.log_prob(z) - log_q
        objective = reward if kl is None else reward - kl
        reward = masked(reward.detach(), mask)
        soft, features = terms.soft_log_likelihood, terms.features
        if mask is not None:
            # a learned baseline's weight gradient is input * 0: keep the input finite too
            soft = None if soft is None else masked(soft, mask)
            features = None if features is None else masked(features, mask.unsqueeze(-1))
        baseline = self.baseline(reward, mask, soft, features)
        surrogate = objective + score_function_term(reward - baseline.detach(), log_q, mask)
        baseline_loss = self.baseline.loss(reward, baseline, mask)
        self.stats["baseline_loss"] = baseline_loss.detach()
        # the baseline's own loss enters with value 0: the loss value stays -objective
        return self._finish(surrogate.mean(0), mask, baseline_loss - baseline_loss.detach())


@register_estimator("rloo")
class RLOOEstimator(ScoreFunctionEstimator):
    """``rloo``: the score function with the leave-one-out baseline over ``num_samples >= 2``
    draws per query (Kool et al. 2019); the plain-torch twin of
    :class:`~structattn.infer.RLOO_ELBO`.

    Args:
        num_samples: draws per query ``K >= 2`` (default 4).
        kl: ``"analytic"`` or ``"sampled"``.
    """

    def __init__(self, num_samples: int = 4, kl: str = "analytic") -> None:
        check_positive_int(num_samples, "num_samples", minimum=2)
        super().__init__("loo", num_samples=num_samples, kl=kl)

    @classmethod
    def site_settings(cls, dist, mask=None, baseline=None, temperature=1.0):
        # TraceGraph_ELBO baselines do not apply: the baseline is leave-one-out
        _check_discrete(dist, cls)
        if baseline is not None:
            raise ValueError("baseline= only applies to estimator='score'")
        return dist, {}


@register_estimator("st")
class StraightThroughEstimator(Estimator):
    """``st``: straight-through Gumbel-softmax for the emission, with the analytic KL.

    The emission is evaluated at a one-hot alignment whose gradient is that of the relaxed
    (Gumbel-softmax, temperature ``temperature``) sample (Jang et al. 2017); the KL term is
    the exact categorical ``KL(q || p)``, never a relaxed density ratio (relaxed ratios are
    unbounded and diverge in training).  The gradient is **biased**.  The log-likelihood
    must accept one-hot float alignments ``(n, *site_batch, keys)`` (a table is contracted
    with them; :func:`~structattn.infer.gather` reads values at them).

    Args:
        temperature: Gumbel-softmax temperature (> 0).
        num_samples: relaxed draws per query.
    """

    def __init__(self, temperature: float = 1.0, num_samples: int = 1) -> None:
        super().__init__()
        self.temperature = check_positive_real(temperature, "temperature")
        self.num_samples = check_positive_int(num_samples, "num_samples")

    @classmethod
    def site_settings(cls, dist, mask=None, baseline=None, temperature=1.0):
        if baseline is not None:
            raise ValueError("baseline= only applies to estimator='score'")
        if not isinstance(temperature, torch.Tensor):
            check_positive_real(temperature, "temperature")
        return relaxed_alignment(dist, temperature), {}

    def loss(self, terms: AlignmentTerms, guide=None) -> torch.Tensor:
        prior, mask, log_likelihood = self._prepare(terms, guide)
        proposal = prior if guide is None else guide
        _per_query_categorical(proposal, "st", "logits")
        z = relaxed_alignment(proposal, self.temperature).rsample((self.num_samples,))
        log_lik = evaluate_log_likelihood(log_likelihood, z, proposal.batch_shape)
        objective = log_lik.mean(0)
        if guide is not None:
            objective = objective - categorical_kl(guide, prior)
        return self._finish(objective, mask)


@register_estimator("sparse")
class SparseEstimator(Estimator):
    """``sparse``: exact sum over the support of a sparse alignment only.

    For a :class:`~structattn.SparsemaxAlignment` (sparsemax or entmax probabilities with exact
    zeros) the marginal likelihood ``log sum_{k: p_k > 0} p_k p(y | k)`` (no guide) or the ELBO
    ``sum_{k: q_k > 0} q_k (log p(y | k) + log p_k - log q_k)`` (sparse guide) is exact, and so
    is its gradient: the sparse maps' Jacobians vanish off the support (Correia et al. 2020,
    "Efficient Marginalization of Discrete and Structured Latent Variables via Sparsity").
    The emission is evaluated only at the ``M`` most probable keys of every query, ``M`` the
    largest support size in the batch; queries with a smaller support pad with weight 0.

    After each call, ``stats["evaluations_per_query"] = M`` and ``stats["mean_support"]`` (the
    average support size over valid queries) say what it cost.  A guide that puts mass where
    the prior has none gives an ELBO of ``-inf`` (KL is infinite): use a sparse guide or a
    smoothed prior.
    """

    @classmethod
    def site_settings(cls, dist, mask=None, baseline=None, temperature=1.0):
        site_dist, infer = ExactEstimator.site_settings(dist, mask, baseline, temperature)
        if not hasattr(dist, "support_size"):
            raise ValueError(
                "estimator='sparse' needs a sparse alignment with support_size() "
                f"(e.g. SparsemaxAlignment), got {type(dist).__name__}"
            )
        return site_dist, infer

    def loss(self, terms: AlignmentTerms, guide=None) -> torch.Tensor:
        prior, mask, log_likelihood = self._prepare(terms, guide)
        proposal = prior if guide is None else guide
        _per_query_categorical(proposal, "sparse", "probs")
        keys, in_support, width, mean_support = sparse_support(proposal.probs, mask)
        log_lik = evaluate_log_likelihood(log_likelihood, keys.movedim(-1, 0),
                                          proposal.batch_shape).movedim(0, -1)
        prior_probs = prior.probs.gather(-1, keys)
        log_prior = torch.where(prior_probs > 0, prior.logits.gather(-1, keys), -torch.inf)
        if guide is None:
            objective = sum_out(torch.where(in_support, log_prior + log_lik, -torch.inf))
        else:
            weight = torch.where(in_support, guide.probs.gather(-1, keys), 0.0)
            log_guide = guide.logits.gather(-1, keys)
            objective = expectation(weight, log_lik + log_prior - log_guide).sum(-1)
        self.stats["evaluations_per_query"] = float(width)
        self.stats["mean_support"] = mean_support
        return self._finish(objective, mask)


def make_estimator(name: str, **kwargs) -> Estimator:
    """Build a registered estimator by name; ``kwargs`` go to its class.

    - ``"enum"``: :class:`ExactEstimator`;
    - ``"score"``: :class:`ScoreFunctionEstimator` (``baseline=``, ``num_samples=``, ``kl=``,
      baseline options);
    - ``"rloo"``: :class:`RLOOEstimator` (``num_samples=`` (default 4), ``kl=``);
    - ``"st"``: :class:`StraightThroughEstimator` (``temperature=``, ``num_samples=``);
    - ``"sparse"``: :class:`SparseEstimator`;
    - any name added with :func:`register_estimator`.

    An unknown name, or an argument the class does not take, is a ``ValueError`` naming it.
    """
    return ESTIMATORS.build(name, kwargs)
