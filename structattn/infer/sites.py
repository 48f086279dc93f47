"""One call that issues the ``pyro.sample`` of an alignment with the right settings."""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
import torch

from structattn.distributions.categorical import CategoricalAlignment, RelaxedAlignment

__all__ = ["sample_alignment", "ESTIMATORS", "ESTIMATOR_KEY"]

ESTIMATORS = ("enum", "score", "rloo", "sparse", "st", None)

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
        estimator: how the site is treated by Pyro's ELBOs:

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
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    infer: dict = {} if estimator is None else {ESTIMATOR_KEY: estimator}
    if estimator in ("enum", "sparse"):
        if not getattr(dist, "has_enumerate_support", False):
            raise ValueError(
                f"estimator={estimator!r} needs an enumerable alignment; "
                f"{type(dist).__name__} is not"
            )
        if estimator == "sparse" and not hasattr(dist, "support_size"):
            raise ValueError(
                "estimator='sparse' needs a sparse alignment with support_size() "
                f"(e.g. SparsemaxAlignment), got {type(dist).__name__}"
            )
        infer["enumerate"] = "parallel"
    elif estimator is None:
        pass
    elif estimator in ("score", "rloo"):
        if dist.has_rsample:
            raise ValueError(
                f"estimator={estimator!r} needs a discrete alignment; got a reparameterised "
                f"{type(dist).__name__} (use estimator='st')"
            )
        if baseline is not None and estimator == "score":
            baseline = dict(baseline)
            if mask is not None and "baseline_value" in baseline:
                baseline["baseline_value"] = baseline["baseline_value"] * mask
            infer["baseline"] = baseline
    else:
        if isinstance(dist, CategoricalAlignment):
            dist = RelaxedAlignment(logits=dist.logits, temperature=temperature)
        elif not isinstance(dist, RelaxedAlignment):
            raise ValueError(
                "estimator='st' needs a CategoricalAlignment or RelaxedAlignment, "
                f"got {type(dist).__name__}"
            )
    if baseline is not None and estimator != "score":
        raise ValueError("baseline= only applies to estimator='score'")
    if mask is None:
        return pyro.sample(name, dist, obs=obs, infer=infer)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a boolean tensor, got {mask.dtype}")
    with poutine.mask(mask=mask):
        return pyro.sample(name, dist, obs=obs, infer=infer)
