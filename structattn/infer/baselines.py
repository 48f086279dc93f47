"""Control variates for score-function (REINFORCE) estimators of alignment gradients.

A baseline ``b`` is subtracted from the reward ``r`` of each sampled alignment before it
multiplies the score ``grad log q(z)``; the estimator stays unbiased as long as ``b`` does not
depend on the sample it corrects.  Every baseline here returns a tensor shaped like the reward,
``(num_samples, *site_batch)`` (e.g. ``(K, batch, queries)`` for per-query alignments), and the
estimator multiplies the advantage by the query mask, so padded queries never leak gradient
(Pyro's ``ScoreParts`` does not mask the score function; pitfall P6 of the Pyro notes).

Baselines:

- :class:`NoBaseline`: ``b = 0``.
- :class:`RunningMeanBaseline`: one scalar exponential moving average of the reward per valid
  query; independent of batch size and padded length (Pyro's decaying average is stored per
  ``(batch, position)`` slot and crashes when shapes change, P5).
- :class:`LearnedBaseline`: a small network on per-query features, trained by squared error to
  the reward; its parameters live under the module name ``baseline`` (``baseline.*`` in
  ``named_parameters``), so they train and can get their own learning rate (P7).
- :class:`SoftAttentionBaseline`: the log-likelihood of the target under the *soft* context
  (expected alignment), as in Deng et al. 2018, "Latent Alignment and Variational Attention".
- :class:`LeaveOneOutBaseline`: for ``K >= 2`` samples per query, the mean reward of the other
  ``K - 1`` samples (RLOO, Kool et al. 2019; the per-query analogue of VIMCO, Mnih & Rezende
  2016).
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from structattn.infer._arguments import (
    Registry,
    check_positive_int,
    check_real,
    check_unit_interval,
)
from structattn.infer._surrogate import leave_one_out_baseline

__all__ = [
    "BASELINES",
    "Baseline",
    "LearnedBaseline",
    "LeaveOneOutBaseline",
    "NoBaseline",
    "RunningMeanBaseline",
    "SoftAttentionBaseline",
    "make_baseline",
    "register_baseline",
]

#: every baseline by name; add your own with :func:`register_baseline`
BASELINES = Registry("baseline", "baseline")


def register_baseline(name: str):
    """Class decorator: ``@register_baseline("mine")`` makes ``baseline="mine"`` work in every
    score-function estimator, exactly like the built-ins."""
    return BASELINES.register(name)


class Baseline(nn.Module, abc.ABC):
    """Base class: ``forward(reward, mask, soft_log_likelihood, features) -> baseline``.

    Args of ``forward``:
        reward: detached rewards ``(K, *site_batch)``.
        mask: boolean ``site_batch`` (True = real query) or None.
        soft_log_likelihood: ``site_batch`` log-likelihood under the soft context, or None.
        features: ``site_batch + (F,)`` per-query features, or None.

    Returns a baseline broadcastable to ``reward``; it is detached by the estimator.
    :meth:`loss` is an auxiliary loss that trains the baseline (0 for parameter-free ones).
    """

    @abc.abstractmethod
    def forward(
        self,
        reward: torch.Tensor,
        mask: torch.Tensor | None = None,
        soft_log_likelihood: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The baseline, broadcastable to ``reward``."""

    def loss(
        self, reward: torch.Tensor, baseline: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Auxiliary training loss of the baseline (a scalar); 0 when it has no parameters."""
        return reward.new_zeros(())


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values (K, *site_batch)`` over valid queries (all samples); a scalar."""
    if mask is None:
        return values.mean()
    mask = mask.expand(values.shape[1:])
    count = mask.sum() * values.shape[0]
    return torch.where(mask, values, 0.0).sum() / count.clamp_min(1)


@register_baseline("none")
class NoBaseline(Baseline):
    """The plain score-function estimator: ``b = 0``."""

    def forward(self, reward, mask=None, soft_log_likelihood=None, features=None):
        return reward.new_zeros(())


@register_baseline("mean")
class RunningMeanBaseline(Baseline):
    """A scalar exponential moving average of the reward of valid queries.

    The baseline used for a batch is the average of *earlier* batches, so it is independent of
    the current samples (unbiased).  It is a scalar, so batches of any size and padded length
    can follow each other.

    Args:
        beta: decay, in ``[0, 1)``: ``mean <- beta * mean + (1 - beta) * batch_mean``.
    """

    def __init__(self, beta: float = 0.9) -> None:
        super().__init__()
        self.beta = check_unit_interval(beta, "beta")
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, reward, mask=None, soft_log_likelihood=None, features=None):
        current = self.mean.to(reward).clone()
        if self.training:
            batch_mean = _masked_mean(reward.detach(), mask).to(self.mean)
            if int(self.steps) == 0:
                self.mean.copy_(batch_mean)
            else:
                self.mean.mul_(self.beta).add_((1.0 - self.beta) * batch_mean)
            self.steps += 1
        # before the first batch there is no history: b = 0 keeps the estimator unbiased
        return current if int(self.steps) > 1 or not self.training else reward.new_zeros(())


@register_baseline("learned")
class LearnedBaseline(Baseline):
    """``b = MLP(features)`` per query, regressed onto the reward by squared error.

    The features are detached (the baseline must not train the network that produced them,
    pitfall P17).  The module holds its network as ``self.net``; inside an estimator it is
    registered as ``baseline``, so parameter names start with ``baseline.``.

    Args:
        in_features: size ``F`` of the per-query features ``(*site_batch, F)``.
        hidden: hidden units of the MLP.
    """

    def __init__(self, in_features: int, hidden: int = 64) -> None:
        super().__init__()
        in_features = check_positive_int(in_features, "in_features")
        hidden = check_positive_int(hidden, "hidden")
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, reward, mask=None, soft_log_likelihood=None, features=None):
        if features is None:
            raise ValueError("features must be given (per-query inputs of the learned baseline)")
        if features.shape[:-1] != reward.shape[1:]:
            raise ValueError(
                f"features must be {tuple(reward.shape[1:])} + (F,), got {tuple(features.shape)}"
            )
        return self.net(features.detach().to(self.net[0].weight.dtype)).squeeze(-1).to(
            reward.dtype
        )

    def loss(self, reward, baseline, mask):
        return _masked_mean((reward.detach() - baseline) ** 2, mask)


@register_baseline("soft")
class SoftAttentionBaseline(Baseline):
    """``b = log p(y_t | soft context)``: the reward the soft-attention model would get.

    Deng et al. (2018) use this for variational attention: the soft context is cheap (one
    emission per query) and tracks the reward of a hard sample closely.  The caller passes
    ``soft_log_likelihood`` (``site_batch``), e.g. from the guide's or the prior's attention
    weights; add any reward term that is not a log-likelihood through ``offset``.

    Args:
        offset: a constant added to the soft log-likelihood.
    """

    def __init__(self, offset: float = 0.0) -> None:
        super().__init__()
        self.offset = check_real(offset, "offset")

    def forward(self, reward, mask=None, soft_log_likelihood=None, features=None):
        if soft_log_likelihood is None:
            raise ValueError(
                "soft_log_likelihood must be given (log p(y | soft context) per query)"
            )
        if soft_log_likelihood.shape != reward.shape[1:]:
            raise ValueError(
                f"soft_log_likelihood must have shape {tuple(reward.shape[1:])}, got "
                f"{tuple(soft_log_likelihood.shape)}"
            )
        return soft_log_likelihood.detach() + self.offset


@register_baseline("loo")
class LeaveOneOutBaseline(Baseline):
    """``b_k = mean_{j != k} r_j`` over the ``K >= 2`` samples of the same query (RLOO)."""

    def forward(self, reward, mask=None, soft_log_likelihood=None, features=None):
        return leave_one_out_baseline(reward, dim=0)


def make_baseline(name: str | Baseline | None, **kwargs) -> Baseline:
    """Build a baseline by its registered name (``"none"``, ``"mean"``, ``"learned"``,
    ``"soft"``, ``"loo"`` or one added with :func:`register_baseline`).

    ``kwargs`` go to the class (``beta`` for ``"mean"``; ``in_features``, ``hidden`` for
    ``"learned"``; ``offset`` for ``"soft"``); one it does not take is a ``ValueError`` naming
    it.  A :class:`Baseline` instance is returned as is (with no ``kwargs``); ``None`` means
    ``"none"``.
    """
    if isinstance(name, Baseline):
        if kwargs:
            raise ValueError(
                f"baseline options {sorted(kwargs)} apply only to a baseline given by name"
            )
        return name
    return BASELINES.build("none" if name is None else name, kwargs)
