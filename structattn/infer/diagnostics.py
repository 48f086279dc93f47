"""Gradient-variance and bias of an estimator against the exact gradient, at fixed parameters.

The measurement follows the Pyro notes (section 5.3): parameters are held fixed (typically
after some exact-ELBO training), one batch is fixed, the estimator's surrogate loss is drawn
``num_draws`` times and differentiated with respect to the parameters of interest (usually
the guide's), and the draws are compared with the exact gradient ``g*``:

- total variance: the sum over coordinates of the per-coordinate variance of the draws;
- relative variance: total variance / ``||g*||^2`` (a scale-free number; 0 for exact);
- relative bias: ``||mean - g*|| / ||g*||``, next to its Monte Carlo noise floor
  ``sqrt(total variance / num_draws) / ||g*||`` -- a bias at the floor is indistinguishable
  from zero, a bias many times the floor is real (e.g. straight-through).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from structattn.infer._arguments import check_positive_int

__all__ = ["GradientVarianceReport", "flat_gradient", "gradient_variance"]


@dataclass
class GradientVarianceReport:
    """Result of :func:`gradient_variance` (all floats except the gradients).

    Attributes:
        num_draws: number of gradient draws ``N``.
        total_variance: sum over coordinates of the sample variance of the draws.
        exact_norm: ``||g*||``.
        relative_variance: ``total_variance / ||g*||^2``.
        relative_bias: ``||mean - g*|| / ||g*||``.
        noise_floor: ``sqrt(total_variance / N) / ||g*||``, the relative bias an unbiased
            estimator shows on average (up to sampling error).
        ms_per_draw: median wall time of one draw (surrogate loss and its gradient), ms.
        mean_gradient: the mean of the draws, flat ``(P,)``.
        exact_gradient: ``g*``, flat ``(P,)``.
    """

    num_draws: int
    total_variance: float
    exact_norm: float
    relative_variance: float
    relative_bias: float
    noise_floor: float
    ms_per_draw: float
    mean_gradient: torch.Tensor
    exact_gradient: torch.Tensor


def flat_gradient(loss: torch.Tensor, parameters: Sequence[torch.Tensor]) -> torch.Tensor:
    """``d loss / d parameters`` flattened into one vector ``(P,)``; unused parameters give 0."""
    grads = torch.autograd.grad(loss, list(parameters), allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1).detach()
            for p, g in zip(parameters, grads, strict=True)
        ]
    )


def gradient_variance(
    estimate: Callable[[], torch.Tensor],
    exact: Callable[[], torch.Tensor] | torch.Tensor,
    parameters: Sequence[torch.Tensor],
    num_draws: int = 100,
) -> GradientVarianceReport:
    """Variance and bias of an estimator's gradient over ``num_draws`` independent draws.

    Args:
        estimate: returns a fresh surrogate loss (scalar) at every call, e.g.
            ``lambda: estimator.loss(terms_fn(), guide_fn())``; anything random must be
            redrawn inside.
        exact: returns the exact loss (scalar) whose gradient is the reference ``g*``, or
            ``g*`` itself as a flat tensor ``(P,)``.
        parameters: the tensors to differentiate (e.g. ``guide.parameters()``).
        num_draws: ``N >= 2``.

    Returns:
        A :class:`GradientVarianceReport`.
    """
    if not callable(estimate):
        raise ValueError(f"estimate must be a callable returning a loss, got {estimate!r}")
    if not (callable(exact) or isinstance(exact, torch.Tensor)):
        raise ValueError(f"exact must be a callable or a flat gradient tensor, got {exact!r}")
    parameters = [p for p in parameters]
    if not parameters:
        raise ValueError("parameters must hold at least one tensor")
    if not all(isinstance(p, torch.Tensor) and p.requires_grad for p in parameters):
        raise ValueError("parameters must all be tensors that require grad")
    num_draws = check_positive_int(num_draws, "num_draws", minimum=2)
    if isinstance(exact, torch.Tensor):
        exact_gradient = exact.detach().reshape(-1)
    else:
        exact_gradient = flat_gradient(exact(), parameters)
    size = sum(p.numel() for p in parameters)
    if exact_gradient.numel() != size:
        raise ValueError(
            f"exact gradient has {exact_gradient.numel()} entries, parameters have {size}"
        )
    draws = []
    times = []
    for _ in range(num_draws):
        start = time.perf_counter()
        draws.append(flat_gradient(estimate(), parameters))
        times.append(time.perf_counter() - start)
    stacked = torch.stack(draws).to(torch.float64)
    exact64 = exact_gradient.to(torch.float64)
    mean = stacked.mean(0)
    total_variance = float(stacked.var(0, unbiased=True).sum())
    norm = float(exact64.norm())
    scale = norm if norm > 0 else math.nan
    times.sort()
    return GradientVarianceReport(
        num_draws=num_draws,
        total_variance=total_variance,
        exact_norm=norm,
        relative_variance=total_variance / scale**2,
        relative_bias=float((mean - exact64).norm()) / scale,
        noise_floor=math.sqrt(total_variance / num_draws) / scale,
        ms_per_draw=1000.0 * times[len(times) // 2],
        mean_gradient=mean,
        exact_gradient=exact64,
    )
