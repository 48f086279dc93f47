"""A fused Triton forward kernel for :func:`structattn.functional.entmax_bisect`.

One program per row loads the row once, finds the threshold on chip with a fixed number of
passes (bisection, then safeguarded Newton steps) and writes the renormalised probabilities:
one kernel launch and no host synchronisation, where the general path launches several
compiled passes and syncs with the host after each.  The backward pass is the general path's
(:class:`structattn.functional._EntmaxBisectFunction`), fed with the same saved tensors;
the autograd Function around this kernel lives in :mod:`structattn.functional`.

The threshold is parameterised as ``tau = -1 + (alpha - 1) u`` (``x = (alpha - 1)(z - max)``
as in the general path), so that ``gap = x - tau = 1 + (alpha - 1)(y - u)`` with
``y = z - max``, and ``p = exp(log1p((alpha - 1)(y - u)) / (alpha - 1))``.  Written this way
nothing is rounded against 1 next to alpha = 1 (where the exponent ``1 / (alpha - 1)`` is
huge), and ``alpha = 1`` is the limit ``p = exp(y - u)``: softmax, with ``u`` the
log-sum-exp.  ``P(u) = sum p`` decreases in ``u``; ``P(0) >= 1`` (the maximum has gap 1) and
``P(min(log n, 1 / (alpha - 1))) <= 1`` (every gap is then at most ``n^-(alpha - 1)``), which
brackets the root for ``n`` valid keys.  The gap is formed as ``fma(-(alpha - 1), u,
1 + (alpha - 1) y)`` (rounded once), which keeps it accurate relative to itself next to the
threshold, where ``p`` is steepest for alpha > 2.

Accuracy in float32 against float64 (Triton's interpreter, N(0, s^2) scores, s = 1, 30, 100,
up to 600 keys): within about 1.5e-7 absolute for alpha in [1, 2.5], like the general path;
about 2e-5 at alpha = 4 for a key within 1e-8 of the threshold.

This module imports Triton at import time; :mod:`structattn.functional` imports it lazily and
only for CUDA inputs.  CPU tensors run Triton's interpreter (used by the tests).
"""

import contextlib
import functools
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["MAX_KEYS", "entmax_bisect_rows"]

#: The longest row the kernel takes (it holds a whole row in registers); longer rows use the
#: general path.
MAX_KEYS: int = 8192
# Bisection passes shrink the bracket (at most log(8192) ~ 9 wide) to below 0.003, from where
# Newton's steps on the convex P (alpha <= 2) converge monotonically to float32 resolution in
# 3-5 passes; the spare ones only polish.  For alpha > 2, P is not convex and Newton's steps
# could stall next to a key's breakpoint (where the slope is infinite), so those rows take
# bracketed regula falsi steps (Illinois) instead, superlinear once the bracket holds no
# breakpoint; every refining step that would leave the bracket bisects.
BISECT_STEPS: int = 12
REFINE_STEPS: int = 12


def _forward_kernel(
    z_ptr,
    alpha_ptr,
    probs_ptr,
    shift_ptr,
    slack_ptr,
    tau_ptr,
    keys,
    BLOCK: tl.constexpr,
    BISECT_STEPS: tl.constexpr,
    REFINE_STEPS: tl.constexpr,
):
    """One row of alpha-entmax: ``z: (rows, keys)`` with masked keys at -inf and
    ``alpha: (rows,)``; writes ``probs: (rows, keys)``, the row maximum ``shift: (rows,)``
    (0 for an all -inf row, whose probabilities are 0) and, in float64 for the backward pass,
    ``slack = alpha - 1`` and the threshold ``tau = -1 + slack * u``, both ``(rows,)``."""
    row = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    in_row = offsets < keys
    start = row.to(tl.int64) * keys
    z = tl.load(z_ptr + start + offsets, mask=in_row, other=float("-inf")).to(tl.float32)
    slack = tl.load(alpha_ptr + row).to(tl.float32) - 1.0
    valid = z > float("-inf")
    row_max = tl.max(z, axis=0)
    shift = tl.where(row_max > float("-inf"), row_max, 0.0)
    # Masked keys get y = 0 here and are excluded by ``valid`` below (no inf or NaN anywhere).
    y = tl.where(valid, z - shift, 0.0)
    count = tl.sum(valid.to(tl.float32), axis=0)
    positive_slack = slack > 0.0
    inverse_slack = 1.0 / tl.where(positive_slack, slack, 1.0)
    upper = tl.log(tl.maximum(count, 1.0))
    upper = tl.where(positive_slack, tl.minimum(upper, inverse_slack), upper)
    lower = upper * 0.0
    # P(u) - 1 at the bracket's ends, for the regula falsi steps (alpha > 2).  P(upper) is
    # not known until evaluated: -1 (its least value) keeps the first step inside anyway.
    lower_value = lower + 1.0
    upper_value = lower - 1.0
    lower_moved = lower > 0.0
    upper_moved = lower > 0.0
    # 1 + (alpha - 1) y, rounded once: near the threshold for alpha > 2 the gap below is then
    # accurate relative to itself (it is the difference of this and (alpha - 1) u).
    base = tl.fma(slack, y, 1.0)
    u = lower
    for step in range(BISECT_STEPS + REFINE_STEPS):
        d = y - u
        v = slack * d
        w = tl.fma(-slack, u, base)
        keep = valid & (w > 0.0)
        # log1p(v) from log(w), w ~ 1 + v (Goldberg's correction: accurate for v near 0,
        # which alpha near 1 needs; log(w) / (w - 1) varies slowly, so w's rounding is harmless).
        w_minus_one = w - 1.0
        exact = w_minus_one == 0.0
        log1p = tl.log(tl.where(keep, w, 1.0)) * (v / tl.where(exact, 1.0, w_minus_one))
        log1p = tl.where(exact, v, log1p)
        exponent = tl.where(positive_slack, log1p * inverse_slack, d)
        p = tl.where(keep, tl.exp(exponent), 0.0)
        total = tl.sum(p, axis=0)
        # -dP/du = sum p / gap, the Newton slope.
        slope = tl.sum(p / tl.where(keep, w, 1.0), axis=0)
        value = total - 1.0
        above = value >= 0.0
        # Illinois: an end kept twice in a row has its value halved, so that the regula falsi
        # steps do not stall against it.
        upper_value = tl.where(above & lower_moved, 0.5 * upper_value, upper_value)
        lower_value = tl.where(~above & upper_moved, 0.5 * lower_value, lower_value)
        lower_moved = above
        upper_moved = ~above
        lower = tl.where(above, u, lower)
        upper = tl.where(above, upper, u)
        lower_value = tl.where(above, value, lower_value)
        upper_value = tl.where(above, upper_value, value)
        newton = u + value / tl.where(slope > 0.0, slope, 1.0)
        # lower_value >= 0 > upper_value: the step lies in [lower, upper).
        secant = lower + (upper - lower) * (lower_value / (lower_value - upper_value))
        trial = tl.where(slack <= 1.0, newton, secant)
        # A converged row's step may land on an end of the bracket: it stays there.
        accept = (step >= BISECT_STEPS) & ((slope > 0.0) | (slack > 1.0))
        accept = accept & (trial >= lower) & (trial <= upper)
        u = tl.where(accept, trial, 0.5 * (lower + upper))
    # The probability pass at the final u, renormalised.
    d = y - u
    v = slack * d
    w = tl.fma(-slack, u, base)
    keep = valid & (w > 0.0)
    w_minus_one = w - 1.0
    exact = w_minus_one == 0.0
    log1p = tl.log(tl.where(keep, w, 1.0)) * (v / tl.where(exact, 1.0, w_minus_one))
    log1p = tl.where(exact, v, log1p)
    exponent = tl.where(positive_slack, log1p * inverse_slack, d)
    p = tl.where(keep, tl.exp(exponent), 0.0)
    total = tl.sum(p, axis=0)
    p = p / tl.where(total > 0.0, total, 1.0)
    tl.store(probs_ptr + start + offsets, p.to(probs_ptr.dtype.element_ty), mask=in_row)
    tl.store(shift_ptr + row, shift.to(shift_ptr.dtype.element_ty))
    slack64 = slack.to(tl.float64)
    tl.store(slack_ptr + row, slack64)
    tl.store(tau_ptr + row, slack64 * u.to(tl.float64) - 1.0)


@functools.cache
def _kernel(interpreted: bool) -> Any:
    """The kernel compiled for the GPU, or run by Triton's interpreter (for CPU tensors).
    Built explicitly rather than by ``triton.jit``, whose choice follows ``TRITON_INTERPRET``
    at decoration time: one process may run both."""
    if interpreted:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_forward_kernel)
    return triton.runtime.jit.JITFunction(_forward_kernel)


def _num_warps(block: int) -> int:
    # About 8 keys per thread (16 at 8192 keys, without spilling registers on sm_90); one warp
    # on short rows, whose many rows fill the GPU by themselves.
    return min(16, max(1, block // 256))


def entmax_bisect_rows(
    z: Tensor, alpha: Tensor, bisect_steps: int = BISECT_STEPS, refine_steps: int = REFINE_STEPS
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """alpha-entmax of rows by the fused kernel, computed in float32.

    Args:
        z: ``(rows, keys)`` scores, masked keys at -inf, ``0 < keys <= MAX_KEYS``.
        alpha: ``(rows, 1)`` values >= 1 (1 = softmax), not validated here.
        bisect_steps, refine_steps: the kernel's fixed pass counts.

    Returns:
        ``(probs, shift, slack, tau)``: ``probs: (rows, keys)`` in z's dtype, the row maximum
        ``shift: (rows, 1)`` in z's dtype, and float64 ``slack = alpha - 1`` and threshold
        ``tau: (rows, 1)``: the tensors that the general path's backward pass reads.
    """
    rows, keys = z.shape
    if not 0 < keys <= MAX_KEYS:
        raise ValueError(f"z must have between 1 and {MAX_KEYS} keys, got {keys}")
    z = z.contiguous()
    alpha = alpha.reshape(-1).contiguous()
    if alpha.shape[0] != rows:
        raise ValueError(f"alpha must have one value per row ({rows}), got {alpha.shape[0]}")
    probs = torch.empty_like(z)
    shift = torch.empty(rows, 1, dtype=z.dtype, device=z.device)
    slack = torch.empty(rows, 1, dtype=torch.float64, device=z.device)
    tau = torch.empty(rows, 1, dtype=torch.float64, device=z.device)
    if rows > 0:
        block = max(16, triton.next_power_of_2(keys))
        kernel = _kernel(z.device.type == "cpu")
        # Triton launches on the current CUDA device, which need not be z's.
        with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
            kernel[(rows,)](
                z, alpha, probs, shift, slack, tau, keys,
                BLOCK=block, BISECT_STEPS=bisect_steps, REFINE_STEPS=refine_steps,
                num_warps=_num_warps(block),
            )
    return probs, shift, slack, tau
