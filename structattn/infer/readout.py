"""Reading value vectors at alignments: the step from an alignment to a context vector."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from structattn._validation import validation_enabled
from structattn.distributions.categorical import RelaxedAlignment
from structattn.distributions.segmentation import SegmentationAlignment

__all__ = ["READOUT_MODES", "gather", "readout", "register_readout"]


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
        if not values.is_floating_point():
            # weights cast to an integer dtype truncate to zero: a silent wrong answer
            raise ValueError(
                f"values must be floating to be contracted with float alignment weights z; "
                f"got values of dtype {values.dtype}"
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


def _lookup(table: dict[type, Callable], dist) -> Callable | None:
    for cls in type(dist).__mro__:
        if cls in table:
            return table[cls]
    return None


#: how a value of a distribution type becomes weights ``(..., queries, keys)`` (types not
#: listed hold integer key indices per query, read by :func:`gather`)
_VALUE_WEIGHTS: dict[type, Callable[[Any, torch.Tensor], torch.Tensor]] = {
    SegmentationAlignment: lambda dist, value: dist.weights_of(value),
}
#: the most likely value of a distribution type that has no ``mode``
_MAP_VALUE: dict[type, Callable[[Any], torch.Tensor]] = {
    RelaxedAlignment: lambda dist: dist.attention.argmax(-1),
}


def register_readout(
    dist_type: type,
    weights_of_value: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    map_value: Callable[[Any], torch.Tensor] | None = None,
) -> None:
    """Teach :func:`readout` a distribution type whose values are not key indices per query.

    Args:
        dist_type: the distribution class (subclasses inherit the entry).
        weights_of_value: ``(dist, value) -> (..., queries, keys)`` weights of a sample or
            argmax value (e.g. a binary selection rescaled).
        map_value: ``dist -> value``, the most likely value, when ``dist.mode`` is undefined.
    """
    if not isinstance(dist_type, type):
        raise ValueError(f"dist_type must be a class, got {dist_type!r}")
    if weights_of_value is not None:
        _VALUE_WEIGHTS[dist_type] = weights_of_value
    if map_value is not None:
        _MAP_VALUE[dist_type] = map_value


def _read_value(dist, value: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    to_weights = _lookup(_VALUE_WEIGHTS, dist)
    return gather(values, value if to_weights is None else to_weights(dist, value))


def _soft(dist, values: torch.Tensor) -> torch.Tensor:
    return gather(values, dist.attention)


def _sample(dist, values: torch.Tensor) -> torch.Tensor:
    z = dist.rsample() if dist.has_rsample else dist.sample()
    return _read_value(dist, z, values)


def _argmax(dist, values: torch.Tensor) -> torch.Tensor:
    map_value = _lookup(_MAP_VALUE, dist)
    if map_value is not None:
        return _read_value(dist, map_value(dist), values)
    try:
        value = dist.mode
    except NotImplementedError as err:
        raise ValueError(
            f"readout mode 'argmax' is not defined for {type(dist).__name__} (it has no mode); "
            "register one with register_readout(..., map_value=...)"
        ) from err
    return _read_value(dist, value, values)


def _enum(dist, values: torch.Tensor) -> torch.Tensor:
    if not dist.has_enumerate_support:
        raise ValueError(
            f"readout mode 'enum' needs a distribution with enumerable support; "
            f"{type(dist).__name__} has none (use 'soft', 'sample' or 'argmax')"
        )
    return _read_value(dist, dist.enumerate_support(expand=False), values)


#: readout modes by name: ``(dist, values) -> contexts``
READOUT_MODES: dict[str, Callable[[Any, torch.Tensor], torch.Tensor]] = {
    "soft": _soft,
    "sample": _sample,
    "argmax": _argmax,
    "enum": _enum,
}


def readout(dist, values: torch.Tensor, mode: str = "soft") -> torch.Tensor:
    """Context vectors ``(..., queries, dim)`` from an alignment distribution.

    Args:
        dist: an alignment distribution with ``attention`` ``(..., queries, keys)``: every
            distribution of :mod:`structattn.distributions` (categorical, sparse, relaxed,
            segmentation, chain CRF, dependency trees, monotonic) or one of your own.
        values: ``(..., keys, dim)``.
        mode: ``"soft"`` (expectation: ``attention @ values``), ``"sample"`` (a sampled
            alignment; pathwise for relaxed distributions) or ``"argmax"`` (the most likely
            alignment: the key for per-query alignments, the best structure for structured
            ones), or ``"enum"``: the context of every value of the support, with the support
            as a new leading dim, ``(K, ..., 1, dim)`` (distributions with enumerable support;
            the sum over it with the probabilities is exact enumeration).  Inside a Pyro
            model, call :func:`~structattn.infer.sample_alignment` with ``estimator="enum"``
            and :func:`gather` its value instead.

    Raises:
        ValueError: an unknown mode, or a distribution for which the mode is not defined
            (the message names its class).
    """
    if mode not in READOUT_MODES:
        raise ValueError(f"mode must be one of {sorted(READOUT_MODES)}, got {mode!r}")
    if not isinstance(getattr(type(dist), "attention", None), property):
        raise ValueError(
            f"readout needs an alignment distribution with an .attention property; "
            f"{type(dist).__name__} has none"
        )
    return READOUT_MODES[mode](dist, values)
