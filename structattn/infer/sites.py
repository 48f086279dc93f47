"""One call that issues the ``pyro.sample`` of an alignment with the right settings."""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
import torch

from structattn.infer.estimators import ESTIMATORS

__all__ = ["sample_alignment", "ESTIMATOR_KEY"]

#: the ``infer`` key under which the chosen estimator is recorded for structattn's ELBOs
ESTIMATOR_KEY = "alignment_estimator"


def sample_alignment(
    name: str,
    dist,
    estimator: str | None = "enum",
    mask: torch.Tensor | None = None,
    baseline: dict | None = None,
    temperature: float = 1.0,
    obs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample (or enumerate) an alignment site inside a Pyro model or guide.

    Args:
        name: the Pyro site name.
        dist: an alignment distribution with batch shape ``(..., queries)``.
        estimator: how the site is treated by Pyro's ELBOs: a name registered in
            :data:`~structattn.infer.ESTIMATORS` (its class's ``site_settings`` decides), or
            ``None``:

            - ``"enum"``: exact enumeration (``infer={"enumerate": "parallel"}``); use with
              ``TraceEnum_ELBO``. In the model alone it sums the alignment out (exact
              marginal likelihood); in the guide it gives the exact ELBO.
            - ``"score"``: a sampled value with score-function gradients (Trace_ELBO,
              TraceGraph_ELBO); ``baseline`` is passed on to TraceGraph_ELBO, with any
              ``baseline_value`` multiplied by ``mask`` so padded queries leak no gradient.
            - ``"rloo"``: a sampled value for :class:`~structattn.infer.RLOO_ELBO` (score
              function with a leave-one-out baseline over vectorised samples); Pyro's own
              ELBOs treat it like ``"score"`` without a baseline.
            - ``"sparse"``: exact enumeration of a sparse alignment
              (:class:`~structattn.SparsemaxAlignment`), whose ``enumerate_support`` lists
              only keys in the support; use with ``TraceEnum_ELBO`` or
              :class:`~structattn.infer.ExactELBO`.
            - ``"st"``: a straight-through Gumbel-softmax sample; a
              :class:`CategoricalAlignment` is turned into a :class:`RelaxedAlignment` with
              ``temperature``.  The value is a one-hot ``(..., queries, keys)`` tensor; read it
              with :func:`~structattn.infer.gather`.
            - ``None``: a plain site with no settings, e.g. the model side of an alignment
              that the guide enumerates or samples.
        mask: boolean ``(..., queries)``, True for real (non-padded) queries; padded queries
            contribute nothing to the ELBO (``poutine.mask``).
        baseline: TraceGraph_ELBO baseline options (``"score"`` only).
        temperature: relaxation temperature (``"st"`` only).
        obs: an observed alignment, if any.

    Returns:
        The sampled or enumerated value: integer ``(..., queries)`` (enumerated values carry
        extra leading dims), or one-hot ``(..., queries, keys)`` for ``"st"``.
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be a string (the Pyro site name), got {name!r}")
    if not isinstance(dist, torch.distributions.Distribution):
        raise ValueError(f"dist must be an alignment distribution, got {type(dist).__name__}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a boolean tensor, got {getattr(mask, 'dtype', mask)!r}")
        try:
            torch.broadcast_shapes(mask.shape, dist.batch_shape)
        except RuntimeError as error:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast with the "
                             f"alignment's batch shape {tuple(dist.batch_shape)} (..., "
                             "queries)") from error
    if estimator is None:
        if baseline is not None:
            raise ValueError("baseline= only applies to estimator='score'")
        infer: dict = {}
    else:
        if not isinstance(estimator, str) or estimator not in ESTIMATORS:
            raise ValueError(
                f"estimator must be one of {(*ESTIMATORS, None)}, got {estimator!r}"
            )
        dist, infer = ESTIMATORS[estimator].site_settings(
            dist, mask=mask, baseline=baseline, temperature=temperature
        )
        infer[ESTIMATOR_KEY] = estimator
    if mask is None:
        return pyro.sample(name, dist, obs=obs, infer=infer)
    with poutine.mask(mask=mask):
        return pyro.sample(name, dist, obs=obs, infer=infer)
