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
from torch.distributions import kl_divergence

from structattn._validation import check_broadcasts_to
from structattn.infer.baselines import Baseline, LeaveOneOutBaseline, make_baseline
from structattn.infer.exact import exact_elbo, marginal_log_likelihood

__all__ = [
    "ESTIMATOR_NAMES",
    "AlignmentTerms",
    "Estimator",
    "ExactEstimator",
    "ScoreFunctionEstimator",
    "SparseEstimator",
    "StraightThroughEstimator",
    "evaluate_log_likelihood",
    "likelihood_table",
    "make_estimator",
]

ESTIMATOR_NAMES = ("enum", "score", "rloo", "st", "sparse")

LogLikelihood = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


@dataclass
class AlignmentTerms:
    """What a model contributes to an alignment objective for one batch.

    Attributes:
        prior: alignment distribution ``p(z | x)``, batch shape ``site_batch``.
        log_likelihood: table ``(..., *site_batch, keys)`` or callable
            ``z (n, *site_batch[, *event]) -> (n, *site_batch)`` (see the module docstring).
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


def _masked_sum(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return values.sum() if mask is None else torch.where(mask, values, 0.0).sum()


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


def _analytic_kl(guide, prior) -> torch.Tensor | None:
    try:
        return kl_divergence(guide, prior)
    except NotImplementedError:
        return None


class Estimator(nn.Module, abc.ABC):
    """Base class.  ``forward(model, guide, batch)`` returns the surrogate loss.

    ``model(batch)`` must return an :class:`AlignmentTerms`; ``guide`` is ``None`` or a
    callable ``guide(batch) -> distribution`` with the prior's batch shape.  Subclasses
    implement :meth:`loss`.  After each call, :attr:`stats` holds diagnostics of the last
    batch as floats or detached 0-dim tensors (no device sync), e.g. ``objective``: the
    estimate of the objective.
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

    def _prepare(self, terms: AlignmentTerms, guide):
        prior = terms.prior
        mask = _check_mask(terms.mask, prior.batch_shape)
        if guide is not None and guide.batch_shape != prior.batch_shape:
            raise ValueError(
                f"guide batch shape {tuple(guide.batch_shape)} differs from the prior's "
                f"{tuple(prior.batch_shape)}"
            )
        return prior, mask

    def _finish(self, objective: torch.Tensor, mask, extra: torch.Tensor | None = None):
        total = _masked_sum(objective, mask)
        self.stats["objective"] = total.detach()
        loss = -total
        return loss if extra is None else loss + extra


class ExactEstimator(Estimator):
    """``enum``: exact enumeration over all keys of a per-query alignment.

    Without a guide the objective is the marginal log-likelihood
    ``sum_t log sum_k p(z_t = k) p(y_t | k)`` (model-side enumeration); with a guide, the exact
    ELBO ``sum_t sum_k q_k (log p(y_t | k) + log p_k - log q_k)`` (guide-side enumeration).
    Cost: one emission per key and query.
    """

    def loss(self, terms: AlignmentTerms, guide=None) -> torch.Tensor:
        prior, mask = self._prepare(terms, guide)
        if prior.event_shape != torch.Size():
            raise ValueError("estimator 'enum' needs a per-query alignment (event shape ())")
        logits = prior.logits
        table = likelihood_table(terms.log_likelihood, prior.batch_shape, logits.shape[-1],
                                 logits.device)
        if guide is None:
            objective = marginal_log_likelihood(prior, table)
        else:
            objective = exact_elbo(guide, prior, table)
        self.stats["evaluations_per_query"] = float(table.shape[-1])
        return self._finish(objective, mask)


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
    ``log p(y | z)`` and the KL is exact; with ``kl="sampled"`` the reward is
    ``log p(y | z) + log p(z) - log q(z)`` as in Pyro's ``Trace_ELBO``.  Rewards are per
    site-batch element (per query, or per sequence for structured alignments), i.e.
    Rao-Blackwellised over independent queries; advantages are zero at padded queries.

    Works for any distribution with ``sample`` and ``log_prob`` (structured alignments with an
    event shape included).

    Args:
        baseline: ``"none"``, ``"mean"``, ``"learned"``, ``"soft"``, ``"loo"`` or a
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
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if kl not in ("analytic", "sampled"):
            raise ValueError(f"kl must be 'analytic' or 'sampled', got {kl!r}")
        self.baseline = make_baseline(baseline, **baseline_kwargs)
        if isinstance(self.baseline, LeaveOneOutBaseline) and num_samples < 2:
            raise ValueError("num_samples must be >= 2 for the leave-one-out baseline")
        self.num_samples = num_samples
        self.kl = kl

    def loss(self, terms: AlignmentTerms, guide=None) -> torch.Tensor:
        prior, mask = self._prepare(terms, guide)
        proposal = prior if guide is None else guide
        z = _draw(proposal, self.num_samples)
        log_q = proposal.log_prob(z)
        log_lik = evaluate_log_likelihood(terms.log_likelihood, z, proposal.batch_shape)
        kl = None
        if guide is not None and self.kl == "analytic":
            kl = _analytic_kl(guide, prior)
        if guide is None:
            reward = log_lik
            objective = log_lik
        elif kl is not None:
            reward = log_lik
            objective = log_lik - kl
        else:
            reward = log_lik + prior.log_prob(z) - log_q
            objective = reward
        reward = reward.detach()
        baseline = self.baseline(reward, mask, terms.soft_log_likelihood, terms.features)
        advantage = reward - baseline.detach()
        if mask is not None:
            advantage = torch.where(mask, advantage, 0.0)
        surrogate = objective + advantage * (log_q - log_q.detach())
        baseline_loss = self.baseline.loss(reward, baseline, mask)
        self.stats["baseline_loss"] = baseline_loss.detach()
        # the baseline's own loss enters with value 0: the loss value stays -objective
        return self._finish(surrogate.mean(0), mask, baseline_loss - baseline_loss.detach())


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
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        self.temperature = temperature
        self.num_samples = num_samples

    def loss(self, terms: AlignmentTerms, guide=None) -> torch.Tensor:
        from structattn.distributions.categorical import RelaxedAlignment, mask_value

        prior, mask = self._prepare(terms, guide)
        proposal = prior if guide is None else guide
        if proposal.event_shape != torch.Size() or not hasattr(proposal, "logits"):
            raise ValueError("estimator 'st' needs a per-query categorical alignment")
        logits = proposal.logits
        valid = logits > mask_value(logits.dtype) / 2
        relaxed = RelaxedAlignment(
            logits=logits, temperature=self.temperature, mask=valid, straight_through=True,
            validate_args=False,
        )
        z = relaxed.rsample((self.num_samples,))
        log_lik = evaluate_log_likelihood(terms.log_likelihood, z, proposal.batch_shape)
        objective = log_lik.mean(0)
        if guide is not None:
            objective = objective - kl_divergence(guide, prior)
        return self._finish(objective, mask)


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

    def loss(self, terms: AlignmentTerms, guide=None) -> torch.Tensor:
        prior, mask = self._prepare(terms, guide)
        proposal = prior if guide is None else guide
        if proposal.event_shape != torch.Size() or not hasattr(proposal, "probs"):
            raise ValueError("estimator 'sparse' needs a per-query alignment with probs")
        probs = proposal.probs
        support = probs > 0
        counts = support.sum(-1)
        valid_counts = counts if mask is None else counts[mask]
        width = int(valid_counts.max()) if valid_counts.numel() else 1
        top, keys = probs.detach().topk(max(width, 1), dim=-1)
        in_support = top > 0
        z = keys.movedim(-1, 0)
        log_lik = evaluate_log_likelihood(terms.log_likelihood, z, proposal.batch_shape)
        log_lik = log_lik.movedim(0, -1)
        prior_logits = prior.logits.gather(-1, keys)
        prior_probs = prior.probs.gather(-1, keys)
        log_prior = torch.where(prior_probs > 0, prior_logits, -torch.inf)
        if guide is None:
            joint = torch.where(in_support, log_prior + log_lik, -torch.inf)
            objective = joint.logsumexp(-1)
        else:
            weight = guide.probs.gather(-1, keys)
            log_guide = guide.logits.gather(-1, keys)
            inner = torch.where(in_support, log_lik + log_prior - log_guide, 0.0)
            objective = (torch.where(in_support, weight, 0.0) * inner).sum(-1)
        self.stats["evaluations_per_query"] = float(width)
        self.stats["mean_support"] = (
            float(valid_counts.float().mean()) if valid_counts.numel() else 0.0
        )
        return self._finish(objective, mask)


def make_estimator(name: str, **kwargs) -> Estimator:
    """Build an estimator by name.

    - ``"enum"``: :class:`ExactEstimator`;
    - ``"score"``: :class:`ScoreFunctionEstimator` (``baseline=``, ``num_samples=``, ``kl=``);
    - ``"rloo"``: the score function with the leave-one-out baseline, ``num_samples`` (default
      4) draws per query;
    - ``"st"``: :class:`StraightThroughEstimator` (``temperature=``, ``num_samples=``);
    - ``"sparse"``: :class:`SparseEstimator`.
    """
    if name == "enum":
        return ExactEstimator(**kwargs)
    if name == "score":
        return ScoreFunctionEstimator(**kwargs)
    if name == "rloo":
        if "baseline" in kwargs:
            raise ValueError("baseline is fixed to 'loo' for estimator 'rloo'")
        kwargs.setdefault("num_samples", 4)
        return ScoreFunctionEstimator(baseline="loo", **kwargs)
    if name == "st":
        return StraightThroughEstimator(**kwargs)
    if name == "sparse":
        return SparseEstimator(**kwargs)
    raise ValueError(f"name must be one of {ESTIMATOR_NAMES}, got {name!r}")
