"""Argument checks shared by every public entry point.

Checks follow Pyro's ``validate_args`` convention: they run while
``torch.distributions.Distribution`` validation is on (the default, also toggled by
``pyro.enable_validation``) and can be switched off for speed.  Every failure is a
``ValueError`` that names the argument and says what is wrong with it.
"""

from __future__ import annotations

import numbers

import torch
from torch.distributions import Distribution


def validation_enabled() -> bool:
    """Whether argument validation is on (``pyro.enable_validation`` toggles it)."""
    return bool(Distribution._validate_args)


def refuse_jit_tracing(what: str) -> None:
    """Raise while ``torch.jit.trace`` records (also under Pyro's ``Jit*`` ELBOs): ``what``
    chooses its computation from the values of its inputs, which a trace would freeze and then
    replay, silently, on inputs it does not suit."""
    if torch.jit.is_tracing():
        raise RuntimeError(
            f"{what} cannot be recorded by torch.jit.trace (nor by Pyro's JitTrace_ELBO, "
            "JitTraceGraph_ELBO or JitTraceEnum_ELBO): its dynamic programs choose their steps "
            "from the input values, which a trace would freeze. Use Trace_ELBO, "
            "TraceGraph_ELBO or TraceEnum_ELBO (or torch.compile) instead."
        )


def normalize_dim(tensor: torch.Tensor, dim: int, name: str = "dim") -> int:
    """Return ``dim`` as a non-negative index into ``tensor``'s shape, or raise."""
    if not isinstance(dim, int):
        raise ValueError(f"{name} must be an int, got {type(dim).__name__}")
    if tensor.dim() == 0:
        raise ValueError(f"{name}={dim} is invalid for a 0-dimensional tensor")
    if not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(
            f"{name}={dim} is out of range for a tensor of shape {tuple(tensor.shape)}"
        )
    return dim % tensor.dim()


def check_nonempty(tensor: torch.Tensor, dim: int, name: str) -> None:
    """Raise when ``tensor`` has size zero along ``dim``."""
    if tensor.shape[dim] == 0:
        raise ValueError(
            f"{name} has an empty dimension {dim} (shape {tuple(tensor.shape)}): "
            "there is nothing to attend to"
        )


def check_broadcasts_to(
    shape: tuple[int, ...], target: tuple[int, ...], name: str, target_name: str = "shape"
) -> None:
    """Raise unless a tensor of ``shape`` broadcasts to ``target`` without enlarging it."""
    target = torch.Size(target)
    try:
        full = torch.broadcast_shapes(shape, target)
    except RuntimeError:
        full = None
    if full is None:
        raise ValueError(
            f"{name} of shape {tuple(shape)} does not broadcast to {target_name} {tuple(target)}"
        )
    if full != target:
        raise ValueError(
            f"{name} of shape {tuple(shape)} would enlarge {target_name} {tuple(target)} "
            f"to {tuple(full)}; it must broadcast to it"
        )


def broadcast_mask(
    mask: torch.Tensor | None, shape: torch.Size, name: str = "mask"
) -> torch.Tensor | None:
    """Check that a boolean ``mask`` (True = valid) broadcasts to ``shape``; return it as bool.

    The mask may have fewer dims than ``shape`` (aligned on the right, numpy style) but may
    never enlarge ``shape``.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(f"{name} must be a boolean (or 0/1 integer) tensor, got {mask.dtype}")
        mask = mask != 0
    check_broadcasts_to(mask.shape, shape, name)
    return mask


def check_finite(
    tensor: torch.Tensor, name: str, mask: torch.Tensor | None = None
) -> None:
    """Raise when ``tensor`` holds NaN or +-inf (only at positions where ``mask`` is True)."""
    bad = ~torch.isfinite(tensor)
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):
        kind = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
        raise ValueError(
            f"{name} contains {kind} values; pass finite scores and exclude positions with "
            "a boolean mask instead of -inf"
        )


def check_some_valid(mask: torch.Tensor | None, dim: int, name: str = "mask") -> None:
    """Raise when some slice of ``mask`` along ``dim`` has no True entry."""
    if mask is None or mask.shape[dim] == 0:
        return
    if not bool(mask.any(dim).all()):
        raise ValueError(
            f"{name} masks every key of at least one query (all False along dim {dim}); "
            "each query needs at least one valid key"
        )


def check_real_number(value: object, name: str) -> float:
    """Return ``value`` as a float when it is a real number (Python or NumPy; not a bool, a
    string or a tensor), else raise a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` when it is an int >= 1 (not a bool), else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_vectors(tensor: object, name: str, size: int, layout: str = "(..., length, size)"
                  ) -> None:
    """Raise unless ``tensor`` is a floating-point tensor of at least two dims whose last one
    is ``size`` (vectors of that size along a sequence); ``layout`` names the dims."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a floating-point tensor {layout}, got {kind}")
    if tensor.dim() < 2 or tensor.shape[-1] != size:
        raise ValueError(f"{name} must be {layout} with size={size}, got shape "
                         f"{tuple(tensor.shape)}")
