"""Reading value vectors at alignments: the step from an alignment to a context vector."""

from __future__ import annotations

import torch

from structattn._validation import validation_enabled

__all__ = ["gather", "readout"]


def gather(values: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Read ``values`` at the alignment ``z``; safe under Pyro's enumeration dims.

    Args:
        values: ``(..., keys, dim)`` value vectors (e.g. encoder states ``(batch, keys, dim)``).
        z: either integer key indices ``(..., queries)`` -- sampled ``(batch, queries)`` or
            enumerated by Pyro with extra leading dims such as ``(keys, 1, 1)`` -- or float
            alignment weights ``(..., queries, keys)`` (one-hot or relaxed samples, or soft
            attention), which are contracted with ``values``.

    Returns:
        ``(..., queries, dim)``, where ``...`` is the broadcast of ``values.shape[:-2]`` and
        ``z.shape[:-1]`` (respectively ``z.shape[:-2]``).  Batch dims are aligned on the right,
        so the result is correct even when the batch size equals the number of queries
        (where naive ``values[arange(batch), z]`` silently indexes the wrong axis).

    Raises:
        ValueError: ``values`` with fewer than 2 dims, batch dims that do not broadcast, or
            (while validation is on) indices outside ``[0, keys)``.
    """
    if values.dim() < 2:
        raise ValueError(f"values must be (..., keys, dim); got shape {tuple(values.shape)}")
    keys = values.shape[-2]
    if z.is_floating_point():
        if z.dim() < 2 or z.shape[-1] != keys:
            raise ValueError(
                f"float alignment z must be (..., queries, keys={keys}); got {tuple(z.shape)}"
            )
        return torch.matmul(z.to(values.dtype), values)
    if z.dtype == torch.bool or z.is_complex():
        raise ValueError(f"z must hold integer key indices or float weights, got {z.dtype}")
    if z.dim() < 1:
        raise ValueError("z must have a query dimension; got a 0-dimensional tensor")
    if _is_enumerated_support(z, values):
        # Pyro's enumeration of every key: ``z = arange(keys)`` shaped ``(keys, 1, ..., 1)``,
        # so reading values at it is a transpose, no gather (and a cheap backward)
        extra = z.dim() - values.dim()
        moved = values.movedim(-2, 0)
        return moved.reshape((keys,) + (1,) * extra + moved.shape[1:-1] + (1,)
                             + values.shape[-1:])
    if validation_enabled() and z.numel() and bool(((z < 0) | (z >= keys)).any()):
        raise ValueError(f"z holds key indices outside [0, {keys})")
    try:
        batch = torch.broadcast_shapes(values.shape[:-2], z.shape[:-1])
    except RuntimeError as err:
        raise ValueError(
            f"batch dims of values {tuple(values.shape[:-2])} and z {tuple(z.shape[:-1])} "
            "do not broadcast (values is (..., keys, dim), z is (..., queries))"
        ) from err
    table = values.expand(batch + values.shape[-2:])
    index = z.expand(batch + z.shape[-1:]).unsqueeze(-1)
    index = index.expand(batch + z.shape[-1:] + values.shape[-1:])
    return torch.gather(table, -2, index)


def _is_enumerated_support(z: torch.Tensor, values: torch.Tensor) -> bool:
    """True when ``z`` is the full enumerated support Pyro built for a categorical site."""
    if not getattr(z, "_pyro_categorical_support", None):
        return False
    keys = values.shape[-2]
    return (
        z.shape[0] == keys
        and all(size == 1 for size in z.shape[1:])
        and z.dim() >= values.dim()
    )


def readout(dist, values: torch.Tensor, mode: str = "soft") -> torch.Tensor:
    """Context vectors ``(..., queries, dim)`` from an alignment distribution.

    Args:
        dist: an alignment distribution with ``attention`` ``(..., queries, keys)``
            (:class:`~structattn.CategoricalAlignment` and friends).
        values: ``(..., keys, dim)``.
        mode: ``"soft"`` (expectation: ``attention @ values``), ``"sample"`` (a sampled
            alignment; pathwise for relaxed distributions) or ``"argmax"`` (the most likely
            key).  For exact enumeration, call :func:`~structattn.infer.sample_alignment`
            with ``estimator="enum"`` inside a Pyro model and :func:`gather` its value, or use
            :func:`~structattn.infer.marginal_log_likelihood`.
    """
    if mode == "soft":
        return gather(values, dist.attention)
    if mode == "sample":
        z = dist.rsample() if dist.has_rsample else dist.sample()
        return gather(values, z)
    if mode == "argmax":
        return gather(values, dist.attention.argmax(-1))
    raise ValueError(f"mode must be 'soft', 'sample' or 'argmax', got {mode!r}")
