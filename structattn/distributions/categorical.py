"""Per-query alignment distributions: one categorical choice of key for every query.

All three classes have batch shape ``(..., queries)``; the key axis is the last axis of the
scores.  :class:`CategoricalAlignment` and :class:`SparsemaxAlignment` have event shape ``()``
and integer values in ``{0, ..., keys - 1}``, so Pyro can enumerate them, mask them per query
and Rao-Blackwellise them per query.  :class:`RelaxedAlignment` has event shape ``(keys,)``
and one-hot (or relaxed) values, for pathwise gradients.

Padding of keys is handled inside the distribution by a boolean ``mask`` (True = valid key).
The valid logits of each query are first shifted so that their maximum is 0, and only then do
masked keys get a large *finite* negative logit (:func:`mask_value`), never ``-inf`` (so that
relaxed samples, entropies and KL terms stay free of NaN).  Because the best valid key sits at
0, a masked key's probability underflows to exactly 0 whatever the magnitude of the real
scores and whatever the dtype: the mask never has to win against the scores.
"""

from __future__ import annotations

import math
import numbers

import pyro.distributions as pdist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints, transforms
from torch.distributions.constraint_registry import biject_to, transform_to
from torch.distributions.kl import register_kl

from structattn._validation import (
    broadcast_mask,
    check_broadcasts_to,
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


def _masked_logits(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``logits: (..., keys)`` with the valid maximum of each query moved to 0 and masked keys
    at :func:`mask_value`; the result has ``logits``' dtype.

    The shift is detached: a softmax does not depend on it, so its gradient would be zero in
    exact arithmetic anyway.  Half precision is shifted in float32 (a difference of two
    float16 scores can overflow) and clamped to the dtype's range.  Masked entries of
    ``logits`` may hold anything, NaN included: they never enter the result or its gradient.
    """
    if mask is None:
        return logits
    mask = mask.expand(logits.shape)
    work = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    valid = torch.where(mask, work, torch.full_like(work, -math.inf))
    shift = valid.detach().amax(-1, keepdim=True)
    # A query with no valid key (validation off) keeps shift 0 instead of -inf.
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    finfo = torch.finfo(logits.dtype)
    shifted = (torch.where(mask, work, torch.zeros_like(work)) - shift).clamp(min=finfo.min)
    return torch.where(mask, shifted, torch.full_like(shifted, mask_value(logits.dtype))).to(
        logits.dtype
    )


def _is_number(value: object) -> bool:
    """A real Python or NumPy number (not a bool, not a string, not a tensor)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _constructor_validation(scores: torch.Tensor, validate_args: bool | None) -> bool | None:
    """``validate_args`` for torch's constructor: False for an empty batch, which its checks
    cannot reshape (there is nothing to check in it anyway)."""
    return False if scores.shape[:-1].numel() == 0 else validate_args


def _restore_validation(dist: TorchDistribution, validate_args: bool | None) -> None:
    """Undo :func:`_constructor_validation`: samples and log-probabilities of an empty batch
    are still checked as the caller asked."""
    if validate_args is None:
        dist.__dict__.pop("_validate_args", None)
    else:
        dist._validate_args = validate_args


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
            super().__init__(
                logits=_masked_logits(logits, mask),
                validate_args=_constructor_validation(logits, validate_args),
            )
        else:
            mask = _prepare_scores(probs, mask, "probs", validate)
            if validate and bool((probs < 0).any()):
                raise ValueError("probs must be non-negative")
            if mask is not None:
                probs = probs.masked_fill(~mask, 0.0)
            if validate and bool((probs.sum(-1) <= 0).any()):
                raise ValueError("probs put no mass on any valid key of some query")
            super().__init__(
                probs=probs, validate_args=_constructor_validation(probs, validate_args)
            )

        _restore_validation(self, validate_args)

    @classmethod
    def infer_shapes(cls, logits=None, probs=None, mask=None, **kwargs):
        """``(batch_shape, event_shape)`` for scores of shape ``(..., queries, keys)``.

        The mask only has to broadcast to the scores, so it does not change the shapes.
        """
        return _per_query_shapes(logits=logits, probs=probs)

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


def _per_query_shapes(**scores_shapes) -> tuple[torch.Size, torch.Size]:
    """Shapes of a per-query alignment from the one given scores-like argument's shape."""
    given = {name: shape for name, shape in scores_shapes.items() if shape is not None}
    if len(given) != 1:
        raise ValueError(f"pass exactly one of {' or '.join(scores_shapes)} to infer_shapes")
    (name, shape), = given.items()
    shape = torch.Size(shape)
    if len(shape) < 1:
        raise ValueError(f"{name} must have a key dimension; got shape {tuple(shape)}")
    return shape[:-1], torch.Size()


@register_kl(CategoricalAlignment, CategoricalAlignment)
def _kl_alignment_alignment(p: CategoricalAlignment, q: CategoricalAlignment) -> torch.Tensor:
    """KL(p || q) per query, ``(..., queries)``: ``+inf`` where p puts mass on a key q forbids.

    A key is forbidden by q when its probability is exactly zero by construction (masked,
    outside a sparse support, or a zero in ``probs=``), never because a softmax probability
    underflowed: such a key's logit is finite and more than ``log(tiny)`` below the query's
    best, which no constructed zero is (their logits are the mask value, or ``log(eps)`` from
    ``probs=``), and the KL reads it from the logits.
    """
    p_probs, q_probs, q_logits = p.probs, q.probs, q.logits
    terms = torch.where(p_probs > 0, p_probs * (p.logits - q_logits), torch.zeros_like(p_probs))
    log_tiny = math.log(torch.finfo(q_probs.dtype).tiny)
    underflowed = (q_logits > mask_value(q_logits.dtype)) & (
        q_logits - q_logits.amax(-1, keepdim=True) < log_tiny)
    forbidden = (p_probs > 0) & (q_probs == 0) & ~underflowed
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
        alpha: entmax parameter, ``> 1`` (2 = sparsemax, 1.5 = entmax15); a tensor (e.g. a
            learned alpha) broadcasts against ``scores`` and receives its exact gradient.
        smoothing: weight ``eps`` in ``[0, 1)`` of the uniform mixture (see above).
        logits: log-probabilities instead of scores (used by Pyro when it rebuilds a site,
            e.g. ``compute_marginals``); then no sparse map is applied.

    Batch shape ``(..., queries)``, event shape ``()``.
    """

    def __init__(
        self,
        scores: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        alpha: float | torch.Tensor = 2.0,
        smoothing: float = 0.0,
        logits: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if (scores is None) == (logits is None):
            raise ValueError("pass exactly one of scores= or logits=")
        if logits is not None:
            super().__init__(logits=logits, mask=mask, validate_args=validate_args)
            return
        if not _is_number(smoothing) or not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be a number in [0, 1), got {smoothing!r}")
        if isinstance(alpha, torch.Tensor):
            # a learned alpha: broadcast against scores with the key dim of size one
            if alpha.is_floating_point() and not bool(((alpha > 1) & alpha.isfinite()).all()):
                raise ValueError(f"alpha must be finite and > 1 (sparse), got {alpha!r}")
            if not alpha.is_floating_point():
                raise ValueError(f"alpha must be a floating tensor, got dtype {alpha.dtype}")
        elif not _is_number(alpha) or not 1.0 < alpha < math.inf:
            raise ValueError(f"alpha must be a finite number > 1 (sparse), got {alpha!r}")
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
        pdist.Categorical.__init__(
            self, logits=logits, validate_args=_constructor_validation(logits, validate_args)
        )
        _restore_validation(self, validate_args)
        self.probs = probs

    @classmethod
    def infer_shapes(cls, scores=None, mask=None, logits=None, **kwargs):
        """``(batch_shape, event_shape)`` for scores of shape ``(..., queries, keys)``."""
        return _per_query_shapes(scores=scores, logits=logits)

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


def _entmax(
    scores: torch.Tensor, alpha: float | torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    from structattn import functional

    # A tensor alpha may be learned: only the bisection path carries its gradient, so the exact
    # closed forms are taken for plain numbers only.
    if isinstance(alpha, torch.Tensor):
        return functional.entmax_bisect(scores, alpha=alpha, dim=-1, mask=mask)
    if alpha == 2.0:
        return functional.sparsemax(scores, dim=-1, mask=mask)
    if alpha == 1.5:
        return functional.entmax15(scores, dim=-1, mask=mask)
    return functional.entmax_bisect(scores, alpha=alpha, dim=-1, mask=mask)


class _ToleratedSimplex(constraints._Simplex):
    """The probability simplex, with the tolerance on ``sum = 1`` scaled to the value's dtype.

    torch's ``simplex`` allows ``1e-6``, which a float16 or bfloat16 sample cannot meet
    (one rounding of each coordinate already costs ``eps / 2`` of the sum).
    """

    def check(self, value: torch.Tensor) -> torch.Tensor:
        tolerance = max(1e-6, 4 * torch.finfo(value.dtype).eps)
        total = value.sum(-1, dtype=torch.float64)
        return torch.all(value >= 0, dim=-1) & ((total - 1).abs() < tolerance)


biject_to.register(_ToleratedSimplex, lambda constraint: transforms.StickBreakingTransform())
transform_to.register(_ToleratedSimplex, lambda constraint: transforms.SoftmaxTransform())


class RelaxedAlignment(TorchDistribution):
    r"""Gumbel-softmax (Concrete) alignment, optionally straight-through.

    A sample is ``softmax((logits + g) / temperature)`` over the valid keys, with Gumbel
    noise ``g`` (Jang et al. 2017; Maddison et al. 2017); masked keys are excluded before the
    softmax, so they get exactly 0 and the sample lies on the valid keys' face of the simplex
    (Pyro's stock straight-through class fails its own support check with padded keys).  With
    ``straight_through=True`` the sample is the exact one-hot of the argmax in the forward
    pass and carries the gradient of the relaxed sample.

    :meth:`log_prob` is the Concrete density on the face of the simplex spanned by the valid
    keys (evaluated at the relaxed sample for straight-through values).  For training, do
    *not* use relaxed log-densities in a KL: use :meth:`categorical` and the analytic
    categorical KL (relaxed density ratios are unbounded and diverge in training).

    The key mask is :attr:`key_mask`; ``mask(...)`` is Pyro's method that masks whole
    log-probability terms, as on every Pyro distribution.

    Args:
        logits: ``(..., queries, keys)`` alignment scores.
        temperature: positive number or tensor broadcastable to ``(..., queries)``.
        mask: boolean, broadcastable to ``logits``; True marks a valid key.
        straight_through: return hard one-hot samples with relaxed gradients.

    Batch shape ``(..., queries)``, event shape ``(keys,)``.
    """

    arg_constraints = {"logits": constraints.real_vector, "temperature": constraints.positive}
    support = _ToleratedSimplex()
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
        temperature = _check_temperature(temperature, logits, validate)
        logits = _masked_logits(logits, mask)
        if mask is None:
            mask = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        self.logits = logits - logits.logsumexp(-1, keepdim=True)
        self._key_mask = mask.expand(logits.shape)
        self.temperature = temperature
        self.straight_through = straight_through
        super().__init__(
            logits.shape[:-1],
            logits.shape[-1:],
            validate_args=_constructor_validation(logits, validate_args),
        )
        _restore_validation(self, validate_args)

    @classmethod
    def infer_shapes(cls, logits, temperature=(), mask=None, **kwargs):
        """``(batch_shape, event_shape)`` for ``logits`` of shape ``(..., queries, keys)``."""
        logits = torch.Size(logits)
        if len(logits) < 1:
            raise ValueError(f"logits must have a key dimension; got shape {tuple(logits)}")
        return logits[:-1], logits[-1:]

    @property
    def key_mask(self) -> torch.Tensor:
        """Boolean ``(..., queries, keys)``, True at valid keys."""
        return self._key_mask

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
        new._key_mask = self._key_mask.expand(shape)
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
        noisy = (self.logits + gumbel) / self._temperature()
        # Masked keys leave the softmax altogether (-inf), so they get exactly 0 and no
        # gradient; every query has a valid key, so the softmax stays finite.
        soft = torch.where(self._key_mask, noisy, torch.full_like(noisy, -math.inf)).softmax(-1)
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
        out_dtype = value.dtype
        # lgamma and the log-density's sums lose too much in half precision.
        work = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
        value = value.to(work)
        mask = self._key_mask
        count = mask.sum(-1).to(work)
        temperature = self._temperature().to(work)
        logits = self.logits.to(work)
        log_value = value.clamp_min(torch.finfo(work).tiny).log()
        zero = torch.zeros_like(log_value)
        weighted = torch.where(mask, logits - temperature * log_value, zero - math.inf)
        density = torch.where(mask, logits - (1 + temperature) * log_value, zero).sum(-1)
        log_temperature = temperature.log().squeeze(-1) if temperature.dim() else temperature.log()
        result = (
            torch.lgamma(count)
            + (count - 1) * log_temperature
            + density
            - count * weighted.logsumexp(-1)
        )
        return result.to(out_dtype)

    def entropy(self) -> torch.Tensor:
        """Entropy of the underlying categorical, ``(..., queries)`` (not of the relaxation)."""
        return self.categorical().entropy()


def _check_temperature(
    temperature: float | torch.Tensor, logits: torch.Tensor, validate: bool
) -> torch.Tensor:
    """``temperature`` as a tensor of ``logits``' dtype, checked against the batch shape."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, torch.Tensor)):
        raise ValueError(
            f"temperature must be a positive number or tensor, got {type(temperature).__name__}"
        )
    if isinstance(temperature, torch.Tensor) and not temperature.is_floating_point():
        raise ValueError(f"temperature must be a floating-point tensor, got {temperature.dtype}")
    temperature = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
    check_broadcasts_to(temperature.shape, logits.shape[:-1], "temperature", "the batch shape")
    if validate and not bool((temperature > 0).all()):
        raise ValueError(f"temperature must be positive (and not NaN), got {temperature}")
    return temperature
