"""Per-query alignment distributions: one categorical choice of key for every query.

All three classes have batch shape ``(..., queries)``; the key axis is the last axis of the
scores.  :class:`CategoricalAlignment` and :class:`SparsemaxAlignment` have event shape ``()``
and integer values in ``{0, ..., keys - 1}``, so Pyro can enumerate them, mask them per query
and Rao-Blackwellise them per query.  :class:`RelaxedAlignment` has event shape ``(keys,)``
and one-hot (or relaxed) values, for pathwise gradients.

Padding of keys is handled inside the distribution by a boolean ``mask`` (True = valid key);
masked keys get a large *finite* negative logit (:func:`mask_value`), never ``-inf``, so that
relaxed samples, entropies and KL terms stay free of NaN.
"""

from __future__ import annotations

import math

import pyro.distributions as pdist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints
from torch.distributions.kl import register_kl

from structattn._validation import (
    broadcast_mask,
    check_finite,
    check_nonempty,
    check_some_valid,
    validation_enabled,
)

__all__ = [
    "CategoricalAlignment",
    "SparsemaxAlignment",
    "RelaxedAlignment",
    "mask_value",
]


def mask_value(dtype: torch.dtype) -> float:
    """The finite logit given to masked keys: ``exp`` of it is exactly 0 next to any real score.

    ``-1e9`` for float32/float64/bf16, and the most negative value that keeps headroom in
    float16 (where ``-1e9`` does not exist).
    """
    return max(-1e9, torch.finfo(dtype).min / 16)


def _should_validate(validate_args: bool | None) -> bool:
    return validation_enabled() if validate_args is None else bool(validate_args)


def _prepare_scores(
    scores: torch.Tensor, mask: torch.Tensor | None, name: str, validate: bool
) -> torch.Tensor | None:
    """Check ``scores: (..., keys)`` and its mask; return the mask as bool (or None)."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() < 1:
        raise ValueError(f"{name} must have a key dimension; got a 0-dimensional tensor")
    if not scores.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor, got {scores.dtype}")
    mask = broadcast_mask(mask, scores.shape) if mask is not None or validate else None
    if validate:
        check_nonempty(scores, -1, name)
        check_finite(scores, name, mask)
        if mask is not None:
            check_some_valid(mask.expand(scores.shape), -1, "mask")
    return mask


class CategoricalAlignment(pdist.Categorical):
    r"""Hard attention: each query picks one key, :math:`z \sim \mathrm{Cat}(\mathrm{softmax}(s))`.

    The soft attention of the same scores is the expectation of the one-hot alignment,
    :math:`\mathbb{E}[\mathrm{onehot}(z)] = \mathrm{softmax}(s)`, available as
    :attr:`attention`.  This is a :class:`pyro.distributions.Categorical`, so it enters
    ``pyro.sample`` and works with ``Trace_ELBO``, ``TraceGraph_ELBO``, ``TraceEnum_ELBO``
    (model- and guide-side enumeration), ``infer_discrete`` and ``compute_marginals``.

    Args:
        logits: alignment scores, ``(..., queries, keys)``.
        probs: alternatively, alignment probabilities ``(..., queries, keys)``.
        mask: boolean ``(..., queries, keys)`` or anything broadcastable to it; True marks a
            valid key.  Masked keys get probability exactly 0.
        validate_args: as in :mod:`torch.distributions`; ``None`` follows the global switch
            (``pyro.enable_validation``).

    Batch shape ``(..., queries)``, event shape ``()``, support ``{0, ..., keys - 1}``.

    Raises:
        ValueError: NaN/inf scores at valid keys, an empty key axis, a mask that does not
            broadcast, or a query with no valid key (while validation is on).
    """

    arg_constraints = {"probs": constraints.simplex, "logits": constraints.real_vector}

    def __init__(
        self,
        logits: torch.Tensor | None = None,
        probs: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if (logits is None) == (probs is None):
            raise ValueError("pass exactly one of logits= or probs=")
        validate = _should_validate(validate_args)
        if logits is not None:
            mask = _prepare_scores(logits, mask, "logits", validate)
            if mask is not None:
                logits = logits.masked_fill(~mask, mask_value(logits.dtype))
            super().__init__(logits=logits, validate_args=validate_args)
        else:
            mask = _prepare_scores(probs, mask, "probs", validate)
            if validate and bool((probs < 0).any()):
                raise ValueError("probs must be non-negative")
            if mask is not None:
                probs = probs.masked_fill(~mask, 0.0)
            if validate and bool((probs.sum(-1) <= 0).any()):
                raise ValueError("probs put no mass on any valid key of some query")
            super().__init__(probs=probs, validate_args=validate_args)

    @property
    def attention(self) -> torch.Tensor:
        """Soft attention weights ``E[one_hot(z)]``, ``(..., queries, keys)``."""
        return self.probs

    @property
    def num_keys(self) -> int:
        """Number of keys (size of the support, padding included)."""
        return self._num_events

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(type(self), _instance)
        return super().expand(batch_shape, _instance=new)


@register_kl(CategoricalAlignment, CategoricalAlignment)
def _kl_alignment_alignment(p: CategoricalAlignment, q: CategoricalAlignment) -> torch.Tensor:
    """KL(p || q) per query, ``(..., queries)``: ``+inf`` where p puts mass on a key q forbids."""
    p_probs, q_probs = p.probs, q.probs
    terms = torch.where(p_probs > 0, p_probs * (p.logits - q.logits), torch.zeros_like(p_probs))
    forbidden = (p_probs > 0) & (q_probs == 0)
    terms = torch.where(forbidden, torch.full_like(terms, math.inf), terms)
    return terms.sum(-1)


class SparsemaxAlignment(CategoricalAlignment):
    r"""Sparse hard attention: ``z ~ Cat(entmax_alpha(scores))`` with exact zeros.

    With ``alpha=2`` (default) the probabilities are ``sparsemax(scores)`` (Martins & Astudillo
    2016); ``alpha=1.5`` gives entmax15 and other ``alpha > 1`` bisection entmax (Peters et
    al. 2019).  Keys outside the support have probability exactly 0, and
    :meth:`enumerate_support` lists only keys that are in the support of some query of the
    batch, so exact enumeration (``TraceEnum_ELBO``) costs the support size, not the number
    of keys.

    **Sparse prior, dense guide.**  ``KL(q || p)`` is ``+inf`` whenever a guide ``q`` puts mass
    on a key outside the prior's support, which is almost always for a dense guide.  Three
    answers, in order of preference: (1) make the guide sparse too and enumerate it (the ELBO
    then only visits keys the guide can choose); (2) train by the exact marginal likelihood
    (model-side enumeration, no guide); (3) pass ``smoothing=eps`` to mix the prior with
    ``eps`` times the uniform distribution over valid keys, which bounds the KL by
    ``log(keys / eps)`` at the price of dense (no longer exactly sparse) probabilities.

    Args:
        scores: ``(..., queries, keys)`` alignment scores.
        mask: boolean, broadcastable to ``scores``; True marks a valid key.
        alpha: entmax parameter, ``> 1`` (2 = sparsemax, 1.5 = entmax15).
        smoothing: weight ``eps`` in ``[0, 1)`` of the uniform mixture (see above).
        logits: log-probabilities instead of scores (used by Pyro when it rebuilds a site,
            e.g. ``compute_marginals``); then no sparse map is applied.

    Batch shape ``(..., queries)``, event shape ``()``.
    """

    def __init__(
        self,
        scores: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        alpha: float = 2.0,
        smoothing: float = 0.0,
        logits: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if (scores is None) == (logits is None):
            raise ValueError("pass exactly one of scores= or logits=")
        if logits is not None:
            super().__init__(logits=logits, mask=mask, validate_args=validate_args)
            return
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must lie in [0, 1), got {smoothing}")
        if not alpha > 1.0:
            raise ValueError(f"alpha must be > 1 for a sparse alignment, got {alpha}")
        validate = _should_validate(validate_args)
        mask = _prepare_scores(scores, mask, "scores", validate)
        probs = _entmax(scores, alpha, mask)
        if smoothing > 0.0:
            valid = torch.ones_like(probs) if mask is None else mask.expand_as(probs).to(probs)
            uniform = valid / valid.sum(-1, keepdim=True)
            probs = (1.0 - smoothing) * probs + smoothing * uniform
        logits = torch.where(
            probs > 0,
            probs.clamp_min(torch.finfo(probs.dtype).tiny).log(),
            torch.full_like(probs, mask_value(probs.dtype)),
        )
        # The sparse map already normalised and masked; skip a second validation pass.
        pdist.Categorical.__init__(self, logits=logits, validate_args=validate_args)
        self.probs = probs

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        """Keys in the support of at least one query, shape ``(K,) + (1,) * len(batch_shape)``.

        Keys with zero probability for every query in the batch are left out, so an
        enumerated sum over them is exact.  With ``expand=True`` the result is expanded to
        ``(K,) + batch_shape``.
        """
        in_support = (self.probs > 0).reshape(-1, self._num_events).any(0)
        keys = in_support.nonzero().squeeze(-1)
        values = keys.reshape((-1,) + (1,) * len(self.batch_shape))
        if expand:
            values = values.expand((-1,) + self.batch_shape)
        return values

    def support_size(self) -> torch.Tensor:
        """Number of keys with non-zero probability per query, ``(..., queries)``."""
        return (self.probs > 0).sum(-1)


def _entmax(scores: torch.Tensor, alpha: float, mask: torch.Tensor | None) -> torch.Tensor:
    from structattn import functional

    if alpha == 2.0:
        return functional.sparsemax(scores, dim=-1, mask=mask)
    if alpha == 1.5:
        return functional.entmax15(scores, dim=-1, mask=mask)
    return functional.entmax_bisect(scores, alpha=alpha, dim=-1, mask=mask)


class RelaxedAlignment(TorchDistribution):
    r"""Gumbel-softmax (Concrete) alignment, optionally straight-through.

    A sample is ``softmax((logits + g) / temperature)`` with Gumbel noise ``g`` (Jang et al.
    2017; Maddison et al. 2017), renormalised after clamping so that it stays on the simplex
    within float rounding even with padded keys (Pyro's stock straight-through class fails
    its own support check there).  With ``straight_through=True`` the sample is the exact
    one-hot of the argmax in the forward pass and carries the gradient of the relaxed sample.

    :meth:`log_prob` is the Concrete density on the face of the simplex spanned by the valid
    keys (evaluated at the relaxed sample for straight-through values).  For training, do
    *not* use relaxed log-densities in a KL: use :meth:`categorical` and the analytic
    categorical KL (relaxed density ratios are unbounded and diverge in training).

    Args:
        logits: ``(..., queries, keys)`` alignment scores.
        temperature: positive float or tensor broadcastable to ``(..., queries)``.
        mask: boolean, broadcastable to ``logits``; True marks a valid key.
        straight_through: return hard one-hot samples with relaxed gradients.

    Batch shape ``(..., queries)``, event shape ``(keys,)``.
    """

    arg_constraints = {"logits": constraints.real_vector, "temperature": constraints.positive}
    support = constraints.simplex
    has_rsample = True

    def __init__(
        self,
        logits: torch.Tensor,
        temperature: float | torch.Tensor = 1.0,
        mask: torch.Tensor | None = None,
        straight_through: bool = True,
        validate_args: bool | None = None,
    ) -> None:
        validate = _should_validate(validate_args)
        mask = _prepare_scores(logits, mask, "logits", validate)
        temperature = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
        if validate and bool((temperature <= 0).any()):
            raise ValueError(f"temperature must be positive, got {temperature}")
        if mask is None:
            mask = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        else:
            logits = logits.masked_fill(~mask, mask_value(logits.dtype))
            mask = mask.expand(logits.shape)
        self.logits = logits - logits.logsumexp(-1, keepdim=True)
        self.mask = mask
        self.temperature = temperature
        self.straight_through = straight_through
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    @property
    def attention(self) -> torch.Tensor:
        """Soft attention weights (the categorical probabilities), ``(..., queries, keys)``."""
        return self.logits.softmax(-1)

    def categorical(self) -> CategoricalAlignment:
        """The categorical alignment with the same logits (for the analytic KL)."""
        return CategoricalAlignment(logits=self.logits, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(RelaxedAlignment, _instance)
        batch_shape = torch.Size(batch_shape)
        shape = batch_shape + self.event_shape
        new.logits = self.logits.expand(shape)
        new.mask = self.mask.expand(shape)
        new.temperature = self.temperature
        new.straight_through = self.straight_through
        TorchDistribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _temperature(self) -> torch.Tensor:
        temperature = self.temperature
        return temperature.unsqueeze(-1) if temperature.dim() > 0 else temperature

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        tiny = torch.finfo(self.logits.dtype).tiny
        uniform = torch.rand(shape, dtype=self.logits.dtype, device=self.logits.device)
        gumbel = -(-uniform.clamp(tiny, 1.0).log()).clamp_min(tiny).log()
        soft = ((self.logits + gumbel) / self._temperature()).softmax(-1)
        soft = soft.masked_fill(~self.mask, 0.0)
        soft = soft / soft.sum(-1, keepdim=True)
        if not self.straight_through:
            return soft
        index = soft.argmax(-1, keepdim=True)
        hard = torch.zeros_like(soft).scatter_(-1, index, 1.0)
        value = hard + (soft - soft.detach())
        value._relaxed = soft
        return value

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Concrete log-density on the valid keys' face, ``(sample..., ..., queries)``."""
        value = getattr(value, "_relaxed", value)
        if self._validate_args:
            self._validate_sample(value)
        mask = self.mask
        count = mask.sum(-1).to(value.dtype)
        temperature = self._temperature().to(value.dtype)
        log_value = value.clamp_min(torch.finfo(value.dtype).tiny).log()
        zero = torch.zeros_like(log_value)
        weighted = torch.where(mask, self.logits - temperature * log_value, zero - math.inf)
        density = torch.where(mask, self.logits - (1 + temperature) * log_value, zero).sum(-1)
        log_temperature = temperature.log().squeeze(-1) if temperature.dim() else temperature.log()
        return (
            torch.lgamma(count)
            + (count - 1) * log_temperature
            + density
            - count * weighted.logsumexp(-1)
        )

    def entropy(self) -> torch.Tensor:
        """Entropy of the underlying categorical, ``(..., queries)`` (not of the relaxation)."""
        return self.categorical().entropy()
