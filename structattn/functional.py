"""Maps from scores to the probability simplex: softmax, sparsemax, 1.5-entmax and alpha-entmax.

Every map takes ``scores: (..., keys, ...)`` and normalises along ``dim``; an optional boolean
``mask`` (True = valid key, broadcastable to ``scores``) gives masked keys exactly zero
probability and exactly zero gradient.  Half-precision inputs are computed in float32 and
returned in their own dtype.

``sparsemax`` and ``entmax15`` find their threshold ``tau`` by a few vectorised threshold
iterations (fused into one loop nest by ``torch.compile`` where it is available), then *prove*
the result exact: a threshold is accepted only when the support it induces is the support it
was computed from.  Unproven rows (about 1% of N(0, 1) rows of 4096 keys) continue iterating in
a call on those rows alone; rows still unproven after that (ties at the threshold) are solved
by the sort-based algorithm in float64.  ``entmax_bisect`` has no closed form for general alpha
and stops at a tolerance instead, with its threshold carried in float64; each pass costs one
log and one exp per key, about three softmax forwards on CPU.  For alpha in [1.1, 2] with the
default tolerance its forward is one compiled call (a start from a binned model of each row,
one root-finding pass, then the probability pass, which checks convergence on the device): two
passes where it took three or four, and one host synchronisation instead of one per pass.

Inputs of at least ``COMPILE_MIN_NUMEL`` elements go through the compiled kernels; set the
environment variable ``STRUCTATTN_COMPILE=0`` (or ``structattn.functional.COMPILE = False``) to
run the plain eager kernels everywhere.  Compilation falls back to them by itself when it fails.

float32 rows on the CPU with alpha in [1.1, 2] and the default tolerance take the C++ kernel of
:mod:`structattn._native` instead (built on first use; 2-4x faster than the compiled path, and
its backward too): it packs the keys that can be in the support and runs the passes over those
alone, with powers from polynomials rather than a log and an exp per key.  Rows outside that
range, float64, other devices and an explicit ``tol`` keep the general path described above.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from structattn import _native
from structattn._validation import (
    broadcast_mask,
    check_broadcasts_to,
    check_finite,
    check_nonempty,
    check_positive_int,
    check_real_number,
    check_some_valid,
    normalize_dim,
    validation_enabled,
)

__all__ = ["masked_softmax", "sparsemax", "entmax15", "entmax_bisect"]

#: Whether the threshold kernels go through ``torch.compile`` (read once from the environment).
COMPILE: bool = os.environ.get("STRUCTATTN_COMPILE", "1").strip().lower() not in (
    "0",
    "false",
    "no",
    "off",
)
#: Inputs with fewer elements run eager until a larger input has compiled the kernel: compiling
#: (seconds, once) would not pay off for them alone.
COMPILE_MIN_NUMEL: int = 16384

# Threshold iterations fused into one compiled kernel before the exactness proof; the rows left
# unproven continue from where they stopped in further calls on those rows only (which costs
# about as much as two more steps for everyone).  On N(0, 1) scores, 5 Michelot steps prove
# 99-100% of rows of 64-4096 keys; the quadratic steps of entmax15 prove 99-100% after 5 steps,
# and after 4 on rows of up to 128 keys.
_MICHELOT_STEPS = 5
_QUADRATIC_STEPS = 5
_QUADRATIC_STEPS_SHORT_ROWS = 4
_SHORT_ROW_KEYS = 128
# Further kernel calls, on the unproven rows only, before sorting them.
_CONTINUATION_ROUNDS = 3
# entmax_bisect: the offsets (in units of (alpha - 1)(z - max)) at which the start counts keys
# for its lower bound on the threshold; then root-finding passes until at most
# _FAR_ROWS_FRACTION of the rows are further than _NEAR_ROOT from sum p = 1, then the
# probability pass, which checks convergence (the rows it cannot prove continue alone).
_START_OFFSETS = (-0.5, -0.25)
_NEAR_ROOT = 1e-1
_FAR_ROWS_FRACTION = 0.1
# Rows with alpha - 1 in [_PLAIN_MIN_SLACK, 1] start with the cheaper plain passes.
_PLAIN_MIN_SLACK = 0.1
# entmax_bisect's fused path (every alpha - 1 in [_PLAIN_MIN_SLACK, 1], default tolerance): one
# compiled call starts from a binned model of each row (cumulative key counts and sums above
# -1/B, -2/B, ..., -1 in units of x, B = _START_BINS, and _START_NEWTON_STEPS Newton steps on
# the model), takes _FUSED_PASSES plain Halley passes (one more in float64) and ends with the
# probability pass, which checks convergence on the device.  On N(0, 1) rows the start is
# within 1-3% of sum p = 1, where one Halley step reaches float32's tolerance on every row at
# alpha 1.3 and on 95-99% at alpha 1.7; the others continue alone.  Rows of at most
# _SHORT_ROW_KEYS keys count at half as many boundaries: there the counts cost as much as a
# pass, and the few more rows left unproven cost less.
_START_BINS = 16
_START_BINS_SHORT_ROWS = 8
_START_NEWTON_STEPS = 2
_FUSED_PASSES = 1
# Rows left unproven continue, gathered, by this many precise passes and a probability pass
# per call: from where the fused call leaves them, the first pass reaches the tolerance and
# the second proves it (which the kernel itself must do for alpha > 2).
_CONTINUATION_PASSES = 2

_HALF_DTYPES = (torch.float16, torch.bfloat16)


class _MaybeCompiled:
    """Call ``fn`` through ``torch.compile(dynamic=True)``, falling back to eager for good.

    The compiled callable is built once and shared by every shape (dynamic shapes), so a
    changing batch or key length does not recompile.  A failure (no C compiler, an unsupported
    device, a backend error) is reported once per device type, then that device runs eager.
    """

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.compiled: Callable[..., Any] | None = None
        self.failed_devices: set[str] = set()

    def __call__(self, *args: Any, size_hint: int | None = None) -> Any:
        """``size_hint``: the number of elements that decides whether compiling pays off, when
        this call is part of the work on a larger input (the rows a first call left over)."""
        device = args[0].device.type
        size = args[0].numel() if size_hint is None else size_hint
        if (
            not COMPILE
            or (self.compiled is None and size < COMPILE_MIN_NUMEL)
            or device in self.failed_devices
            or torch.compiler.is_compiling()
            or torch.jit.is_tracing()
            or torch.jit.is_scripting()
            # a backward pass under create_graph=True: autograd records it, and compiled
            # graphs do not support double backward
            or (torch.is_grad_enabled()
                and any(isinstance(a, Tensor) and a.requires_grad for a in args))
        ):
            return self.fn(*args)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, dynamic=True)
            return self.compiled(*args)
        except Exception as err:  # any backend failure: the eager kernel gives the same answer
            self.failed_devices.add(device)
            warnings.warn(
                f"torch.compile of structattn.functional.{self.fn.__name__} failed on "
                f"{device} ({type(err).__name__}: {err}); using the eager kernel",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.fn(*args)


# --------------------------------------------------------------------------------------------
# Threshold kernels.  Each takes rows ``z: (rows, keys)`` in a float work dtype with masked keys
# set to -inf, and handles all -inf rows (fully masked, validation off) by returning zeros.
# --------------------------------------------------------------------------------------------


def _shift_by_row_max(z: Tensor) -> Tensor:
    """``z - max(z)`` per row, with all -inf rows left at -inf instead of NaN."""
    row_max = z.amax(-1, keepdim=True)
    return z - torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)


@_MaybeCompiled
def _sparsemax_kernel(z: Tensor, tau: Tensor, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """Michelot's threshold iteration for sparsemax, with an exactness proof.

    ``x = z - max``.  Started below the optimum (``tau = -1`` is ``max - 1``, so ``{x > tau}``
    contains the support), ``tau <- (sum of x over {x > tau} - 1) / |{x > tau}|`` increases
    monotonically and stops changing exactly when ``{x > tau}`` is the support.  Returns
    ``(probs, tau, exact)``; ``exact: (rows, 1)`` says the final threshold reproduced the set
    it was computed from, otherwise ``tau`` is a lower bound to continue from.
    """
    x = _shift_by_row_max(z)
    count = torch.ones_like(tau)
    for _ in range(steps):
        # Statistics of the clamped gap, counted in the float dtype, keep the loop fused and
        # vectorised (int64 counts or a separate boolean mask were several times slower).
        gap = (x - tau).clamp(min=0.0)
        count = (gap > 0).to(x.dtype).sum(-1, keepdim=True)
        tau = tau + (gap.sum(-1, keepdim=True) - 1.0) / count.clamp(min=1.0)
    probs = (x - tau).clamp(min=0.0)
    exact = (x > tau).to(x.dtype).sum(-1, keepdim=True) == count
    return probs, tau, exact


@_MaybeCompiled
def _entmax15_kernel(z: Tensor, tau: Tensor, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """The analogue of Michelot's iteration for 1.5-entmax, with an exactness proof.

    ``x = (z - max) / 2`` and the threshold solves ``sum [x - tau]_+^2 = 1``.  Each step takes
    ``S = {x > tau}`` and moves ``tau`` to the smaller root of the quadratic
    ``sum_S (x - t)^2 = 1``, written relative to the current ``tau`` so that it does not cancel
    (when the quadratic has no real root, to its vertex).  A threshold is exact when the set it
    induces is the set it came from and the root was real, which is checked; on N(0, 1) scores
    this settles in 3-4 steps where Newton's method needs 5-7.  Returns ``(probs, tau, exact)``
    as :func:`_sparsemax_kernel` does.
    """
    x = _shift_by_row_max(z) * 0.5
    count = torch.ones_like(tau)
    real_root = torch.ones_like(tau, dtype=torch.bool)
    for _ in range(steps):
        # Deriving every statistic from the clamped gap keeps the loop fused; a separate
        # boolean (x > tau) was materialised by inductor and made this kernel 15x slower.
        gap = (x - tau).clamp(min=0.0)
        gap_sum = gap.sum(-1, keepdim=True)
        excess = (gap * gap).sum(-1, keepdim=True) - 1.0
        count = (gap > 0).to(x.dtype).sum(-1, keepdim=True)
        discriminant = gap_sum * gap_sum - count * excess
        real_root = discriminant >= 0
        tau = tau + excess / (gap_sum + discriminant.clamp(min=0.0).sqrt()).clamp(min=1e-30)
    probs = (x - tau).clamp(min=0.0)
    exact = real_root & ((x > tau).to(x.dtype).sum(-1, keepdim=True) == count)
    return probs * probs, tau, exact


def _sparsemax_sort(z: Tensor) -> Tensor:
    """Sort-based sparsemax (Martins & Astudillo 2016, Algorithm 1) in float64; rows of ``z``."""
    x = _shift_by_row_max(z.double())
    ordered = x.sort(-1, descending=True).values
    valid = ordered > float("-inf")
    ordered = torch.where(valid, ordered, 0.0)
    cumulative = ordered.cumsum(-1)
    ranks = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    in_support = valid & (1.0 + ranks * ordered > cumulative)
    size = in_support.sum(-1, keepdim=True).clamp(min=1)
    tau = (cumulative.gather(-1, size - 1) - 1.0) / size.to(x.dtype)
    return (x - tau).clamp(min=0.0).to(z.dtype)


def _entmax15_sort(z: Tensor) -> Tensor:
    """Sort-based 1.5-entmax (Peters, Niculae & Martins 2019, Algorithm 2) in float64."""
    x = _shift_by_row_max(z.double()) * 0.5
    ordered = x.sort(-1, descending=True).values
    valid = ordered > float("-inf")
    ordered = torch.where(valid, ordered, 0.0)
    ranks = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    mean = ordered.cumsum(-1) / ranks
    mean_square = (ordered * ordered).cumsum(-1) / ranks
    spread = ranks * (mean_square - mean * mean)
    tau_by_size = mean - ((1.0 - spread) / ranks).clamp(min=0.0).sqrt()
    size = (valid & (tau_by_size <= ordered)).sum(-1, keepdim=True).clamp(min=1)
    tau = tau_by_size.gather(-1, size - 1)
    probs = (x - tau).clamp(min=0.0)
    return (probs * probs).to(z.dtype)


def _unproven_rows(exact: Tensor) -> Tensor:
    """Indices of the rows with ``exact`` False, at least two of them (a repeated index) so
    that a single row does not make ``torch.compile`` specialise on a batch of size 1."""
    rows = (~exact).squeeze(-1).nonzero().squeeze(-1)
    return rows.repeat(2) if rows.numel() == 1 else rows


def _exact_threshold_map(
    kernel: _MaybeCompiled, fallback: Callable[[Tensor], Tensor], z: Tensor, steps: int
) -> Tensor:
    """Run a proven-exact threshold kernel, continue the rows it could not prove yet from
    their lower bound, and re-solve any left after that by sorting."""
    probs, tau, exact = kernel(z, torch.full_like(z[:, :1], -1.0), steps)
    if bool(exact.all()):
        return probs
    for _ in range(_CONTINUATION_ROUNDS):
        rows = _unproven_rows(exact)
        row_probs, row_tau, row_exact = kernel(
            z.index_select(0, rows), tau.index_select(0, rows), steps
        )
        probs = probs.index_copy(0, rows, row_probs)
        tau = tau.index_copy(0, rows, row_tau)
        exact = exact.index_copy(0, rows, row_exact)
        if bool(exact.all()):
            return probs
    rows = (~exact).squeeze(-1).nonzero().squeeze(-1)
    return probs.index_copy(0, rows, fallback(z.index_select(0, rows)))


def _split_threshold(threshold: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A float64 per-row threshold as a pair ``(high, low)`` in ``dtype`` with
    ``high + low`` equal to it to about twice ``dtype``'s precision."""
    high = threshold.to(dtype)
    return high, (threshold - high.to(threshold.dtype)).to(dtype)


def _gap(x: Tensor, tau: Tensor) -> Tensor:
    """``x - tau`` for a float64 ``tau: (rows, 1)`` subtracted as a high + low pair."""
    tau_high, tau_low = _split_threshold(tau, x.dtype)
    return (x - tau_high) - tau_low


def _log_gap(x: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(gap, log gap, gap > 0)`` for ``gap = x - tau``, accurate where it matters.

    ``tau`` is float64 (rows, 1) and is subtracted as a high + low pair, so ``gap`` keeps
    relative accuracy next to the threshold (where ``p = gap^(1/(alpha-1))`` is steepest for
    alpha > 2); where ``gap`` is near 1 (alpha near 1, where the exponent is huge) its log is
    taken as ``log1p(gap - 1)`` with ``gap - 1`` formed from ``tau + 1`` the same way, so that
    ``(alpha - 1) z`` is not rounded against 1.
    """
    gap = _gap(x, tau)
    shift_high, shift_low = _split_threshold(tau + 1.0, x.dtype)
    gap_minus_one = (x - shift_high) - shift_low
    positive = gap > 0
    near_one = gap > 0.5
    base = torch.where(near_one, 1.0 + gap_minus_one, torch.where(positive, gap, 1.0))
    # log1p(h) = log(1 + h) - (rounding of 1 + h) / (1 + h) to first order; the division by
    # 1 + h is left out, which changes the log by a few eps times |h| only (that is, by
    # nothing where it matters: alpha near 1, where 1 + h is near 1).
    correction = torch.where(near_one, (base - 1.0) - gap_minus_one, 0.0)
    return gap, torch.log(base) - correction, positive


def _power_of_gap(
    x: Tensor, slack: Tensor, tau: Tensor, precise: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """``(gap, [gap]_+^(1/slack), gap > 0)`` for ``gap = x - tau``.

    ``precise`` takes the gap and its log as :func:`_log_gap` does; otherwise ``tau`` is
    rounded to ``x``'s dtype and the log taken plainly, which is a quarter cheaper and good to
    about ``eps / (alpha - 1)`` relative: enough for the root-finding passes far from the
    root, which only choose the next threshold (the probability pass checks the last one).
    Powers below the dtype's smallest normal number are set to 0: computing them (even in
    the lanes a ``where`` discards) produces subnormals, which made whole passes 2.5x slower
    on CPU; they are below any probability that can be represented next to 1 anyway.
    """
    if precise:
        gap, log_gap, positive = _log_gap(x, tau)
    else:
        gap = x - tau.to(x.dtype)
        positive = gap > 0
        log_gap = torch.log(torch.where(positive, gap, 1.0))
    argument = (1.0 / slack).to(x.dtype) * log_gap
    floor = math.log(torch.finfo(x.dtype).tiny)
    powered = torch.exp(argument.clamp(min=floor))
    return gap, torch.where(positive & (argument > floor), powered, 0.0), positive


def _row_shift(z: Tensor) -> Tensor:
    """The row maximum ``(rows, 1)``, 0 for all -inf rows (which then stay -inf, not NaN)."""
    row_max = z.amax(-1, keepdim=True)
    return torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)


def _scaled(z: Tensor, shift: Tensor, slack: Tensor) -> Tensor:
    """``x = (alpha - 1)(z - max)``, recomputed by every pass from ``z`` and the row shift:
    two operations per key are cheaper than writing and reading back a tensor of ``x``
    (a fresh large allocation also page-faults on first touch)."""
    return (z - shift) * slack.to(z.dtype)


@_MaybeCompiled
def _bisect_start(z: Tensor, slack: Tensor) -> tuple[Tensor, Tensor]:
    """The row shift (see :func:`_scaled`) and a lower bound on the threshold, ``(rows, 1)``
    float64, from key counts alone (no powers).

    If ``n`` keys have ``x >= c``, then at ``t = c - n^-(alpha - 1)`` each of them has
    ``[x - t]_+^(1/(alpha - 1)) >= 1/n``, so ``P(t) >= 1`` and ``t`` is at most the threshold.
    The best such bound over a few offsets ``c`` starts Halley's method where its first step
    lands about ten times closer to the root than from the generic ``-1`` (the bound for
    ``c = 0``, ``n = 1``), which saves a pass.
    """
    shift = _row_shift(z)
    x = _scaled(z, shift, slack)
    lower = torch.full_like(slack, -1.0)
    for offset in _START_OFFSETS:
        count = (x >= offset).to(x.dtype).sum(-1, keepdim=True).to(slack.dtype)
        bound = offset - torch.exp(-slack * torch.log(count.clamp(min=1.0)))
        lower = torch.maximum(lower, bound)
    return shift, lower


def _halley_pass(
    z: Tensor,
    shift: Tensor,
    slack: Tensor,
    lower: Tensor,
    upper: Tensor,
    tau: Tensor,
    done: Tensor,
    tolerance: Tensor,
    precise: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One safeguarded root-finding step for the threshold ``tau``: one pass over the keys.

    ``x = (alpha - 1)(z - max)`` are the scaled rows ``z: (rows, keys)`` (see
    :func:`_scaled`), ``slack = alpha - 1`` and the float64 ``(rows, 1)`` state
    ``[lower, upper]`` brackets the root of
    ``F(tau) = P(tau)^(alpha - 1) - 1`` with ``P = sum [x - tau]_+^(1/(alpha - 1))``
    (Blondel, Martins & Niculae 2020 bisect ``P - 1``).  ``P^(alpha-1)`` is a norm of the
    gaps, convex in ``tau`` for alpha <= 2 and close to linear, so Halley's step on it,
    started from a lower bound, takes 2-3 steps on dense rows where Newton's on ``P - 1``
    takes 6-9; for alpha > 2 Newton's step is used.  A step leaving the bracket is replaced
    by the midpoint.  A row is done once ``|P - 1| <= tolerance`` (after one last step from
    there, which only polishes) or its step stalls at float64 resolution; done rows do not
    move.  Returns ``(lower, upper, tau, done, residual)`` with ``residual = |P - 1|`` at the
    threshold this step started from (0 for rows that were done).  Without ``precise`` (see
    :func:`_power_of_gap`) the pass declares no row done: its sums are not accurate to the
    tolerance.
    """
    exponent64 = 1.0 / slack
    gap, powered, positive = _power_of_gap(_scaled(z, shift, slack), slack, tau, precise)
    inverse_gap = torch.where(positive, 1.0 / torch.where(positive, gap, 1.0), 0.0)
    over_gap = powered * inverse_gap
    if precise:
        total = powered.sum(-1, keepdim=True).to(tau.dtype)
    else:
        # The same sum read through p / gap (1 ulp off per key, enough to choose the next
        # threshold): summing the powers themselves made inductor store them and read them
        # back in a second loop, 3-7% of a pass.
        total = (over_gap * torch.where(positive, gap, 0.0)).sum(-1, keepdim=True).to(tau.dtype)
    first = over_gap.sum(-1, keepdim=True).to(tau.dtype)
    second = (over_gap * inverse_gap).sum(-1, keepdim=True).to(tau.dtype)
    log_total = torch.log(total)
    value = torch.expm1(slack * log_total)
    lower = torch.where(done | (value < 0), lower, tau)
    upper = torch.where(done | (value >= 0), upper, tau)
    # F' = -P^(s-1) Q and F'' = P^(s-1) ((s-1) e Q^2 / P + (e-1) R), s = alpha - 1,
    # e = 1/s, Q = sum gap^(e-1), R = sum gap^(e-2).
    scale = torch.exp((slack - 1.0) * log_total)
    slope = -scale * first
    curvature = scale * (
        (slack - 1.0) * exponent64 * first * first / total + (exponent64 - 1.0) * second
    )
    newton = -value / slope
    halley_denominator = 2.0 * slope * slope - value * curvature
    halley = -2.0 * value * slope / halley_denominator
    use_halley = (value >= 0) & (halley_denominator > 0) & (slack <= 1.0)
    trial = tau + torch.where(use_halley, halley, newton)
    # Unconverged rows must land strictly inside the bracket, or it would not shrink (a step
    # that does not move, or that returns to an end, cycles); a converged row's last
    # polishing step may be zero.
    residual = (total - 1.0).abs()
    unconverged = residual > tolerance
    inside = ((trial > lower) & (trial < upper)) | (
        ~unconverged & (trial >= lower) & (trial <= upper)
    )
    new_tau = torch.where(inside, trial, 0.5 * (lower + upper))
    # A stalled step proves convergence only where F is convex (alpha <= 2): for alpha > 2
    # the slope is unbounded next to each breakpoint, so tiny Newton steps happen far from
    # the root; there only the bracket's collapse does.
    resolution = 1e-15 * tau.abs()
    converged = (
        ~unconverged
        | (((new_tau - tau).abs() <= resolution) & (slack <= 1.0))
        | (upper - lower <= resolution)
    )
    residual = torch.where(done, 0.0, residual)
    new_done = done | converged if precise else done
    return lower, upper, torch.where(done, tau, new_tau), new_done, residual


def _probability_pass(
    z: Tensor, shift: Tensor, slack: Tensor, tau: Tensor, done: Tensor, tolerance: Tensor
) -> tuple[Tensor, Tensor]:
    """``p = [x - tau]_+^(1/(alpha-1))`` renormalised, and ``done`` updated with the rows
    this pass proves converged.  (The backward weight ``p / gap`` is formed in the backward
    pass from ``z``, ``tau`` and ``p``: writing it here cost more than recomputing the gap.)

    The pass proves a row where ``|sum - 1| <= tolerance`` and the last step was Halley's
    (cubic, alpha <= 2); for alpha > 2 the kernel's own test, which adds one polishing step,
    must say so (without it float32 errors reach 1e-6).
    """
    _, powered, _ = _power_of_gap(_scaled(z, shift, slack), slack, tau)
    total = powered.sum(-1, keepdim=True)
    probs = powered / torch.where(total > 0, total, 1.0)
    settled = ((total.to(tolerance.dtype) - 1.0).abs() <= tolerance) & (slack <= 1.0)
    return probs, done | settled


#: One root-finding pass (:func:`_halley_pass`) and the probability pass, each compiled alone.
_bisect_kernel = _MaybeCompiled(_halley_pass)
_bisect_probs = _MaybeCompiled(_probability_pass)


def _solve_threshold(
    z: Tensor,
    shift: Tensor,
    slack: Tensor,
    state: tuple[Tensor, Tensor, Tensor, Tensor],
    tolerance: Tensor,
    steps: int,
    precise: bool,
    size_hint: int | None = None,
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Tensor, int]:
    """Root-finding passes, then the probability pass, on rows ``z`` from ``state =
    (lower, upper, tau, done)``, with at most ``steps`` root-finding passes.

    Each pass costs about as much as the probability pass, so the probability pass (which
    doubles as the convergence check) comes as soon as it is likely to succeed: when at most
    ``_FAR_ROWS_FRACTION`` of the rows had ``|P - 1| > _NEAR_ROOT`` before the last step
    (Halley's cubic convergence takes the others below the tolerance); the rows it does not
    prove continue alone.  Returns ``(state, probs, steps used)``.
    """
    lower, upper, tau, done = state
    used = 0
    while used < steps:
        lower, upper, tau, done, residual = _bisect_kernel(
            z, shift, slack, lower, upper, tau, done, tolerance, precise, size_hint=size_hint
        )
        used += 1
        far = (residual > _NEAR_ROOT).to(residual.dtype).mean()
        if float(far) <= _FAR_ROWS_FRACTION:
            break
    probs, done = _bisect_probs(z, shift, slack, tau, done, tolerance, size_hint=size_hint)
    return (lower, upper, tau, done), probs, used


def _binned_start(x: Tensor, slack: Tensor, bins: int) -> Tensor:
    """A start for the threshold of rows ``x = (alpha - 1)(z - max): (rows, keys)`` with
    ``slack = alpha - 1 <= 1``, ``(rows, 1)`` float64, from a model of each row in ``bins``
    bins (no power of a key).

    The keys in ``[-(j+1)/bins, -j/bins)`` are replaced by ``n_j`` keys at their mean
    ``m_j``: ``M(t) = sum_j n_j [m_j - t]_+^(1/(alpha-1))``.  For alpha <= 2 the power is
    convex, so ``M <= P`` (Jensen) and the model's root is at most the threshold; and the
    same holds for the keys above each boundary taken together, which gives the first point
    (the best of those lower bounds), from where Newton's steps on the convex ``M^(alpha-1)``
    stay below the model's root.  The thresholds lie in ``[-1, 0]``, so the bins cover them.
    """
    s = slack.to(x.dtype)
    counts, sums = [], []
    for j in range(bins):
        above = x >= -(j + 1) / bins
        counts.append(above.to(x.dtype).sum(-1, keepdim=True))
        sums.append(torch.where(above, x, 0.0).sum(-1, keepdim=True))
    # (rows, 1) tensors kept apart rather than concatenated: the per-row arithmetic below then
    # vectorises across rows (concatenated, inductor ran it element by element, 4x slower).
    tau = torch.full_like(s, -1.0)
    for count, total in zip(counts, sums, strict=True):
        at_least_one = count.clamp(min=1.0)
        tau = torch.maximum(tau, total / at_least_one - torch.exp(-s * torch.log(at_least_one)))
    bins_below = []
    previous_count, previous_total = torch.zeros_like(s), torch.zeros_like(s)
    for count, total in zip(counts, sums, strict=True):
        bin_count = count - previous_count
        # An empty bin sits at -2, below every threshold, where it adds nothing.
        mean = torch.where(bin_count > 0, (total - previous_total) / bin_count.clamp(min=1.0), -2.0)
        bins_below.append((bin_count, mean))
        previous_count, previous_total = count, total
    exponent = 1.0 / s
    for _ in range(_START_NEWTON_STEPS):
        value = torch.zeros_like(s)
        slope = torch.zeros_like(s)
        for bin_count, mean in bins_below:
            gap = mean - tau
            positive = gap > 0
            safe_gap = torch.where(positive, gap, 1.0)
            power = bin_count * torch.exp(exponent * torch.log(safe_gap))
            power = torch.where(positive, power, 0.0)
            value = value + power
            slope = slope + power / safe_gap
        # Newton on M^s - 1, whose derivative is -M^(s-1) sum n_j gap_j^(1/s - 1).
        step = (value - torch.exp((1.0 - s) * torch.log(value))) / slope
        tau = tau + torch.where(slope > 0, step, 0.0)
    return tau.to(slack.dtype)


@_MaybeCompiled
def _bisect_fused(
    z: Tensor, slack: Tensor, tolerance: Tensor, bins: int, passes: int
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The start (:func:`_binned_start`), ``passes`` plain Halley passes and the probability
    pass in one compiled call, without a host synchronisation: ``(probs, shift, state)`` with
    ``state = (lower, upper, tau, done)`` as :func:`_solve_threshold` takes it.

    The start is not used as the bracket's lower end (rounding could put it a hair above the
    root, and a bracket that misses the root never closes): that is -1, where the row
    maximum alone gives ``P >= 1``; the first pass moves it up to the start when it is below.
    """
    shift = _row_shift(z)
    tau = _binned_start(_scaled(z, shift, slack), slack, bins)
    lower = torch.full_like(slack, -1.0)
    upper = torch.zeros_like(slack)
    done = torch.zeros_like(slack, dtype=torch.bool)
    for _ in range(passes):
        lower, upper, tau, done, _ = _halley_pass(
            z, shift, slack, lower, upper, tau, done, tolerance, False
        )
    probs, done = _probability_pass(z, shift, slack, tau, done, tolerance)
    return probs, shift, (lower, upper, tau, done)


@_MaybeCompiled
def _bisect_continue(
    z: Tensor,
    shift: Tensor,
    slack: Tensor,
    state: tuple[Tensor, Tensor, Tensor, Tensor],
    tolerance: Tensor,
    rows: Tensor,
    passes: int,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The rows ``rows`` of ``z`` continued from their ``state`` by ``passes`` precise
    root-finding passes and the probability pass, gathered and computed in one compiled
    call: ``(probs, state)`` of those rows.  (As separate calls with a host synchronisation
    between them, the leftover rows of a 4096 x 64 input cost two softmaxes.)"""
    z, shift, slack = (whole.index_select(0, rows) for whole in (z, shift, slack))
    lower, upper, tau, done = (whole.index_select(0, rows) for whole in state)
    for _ in range(passes):
        lower, upper, tau, done, _ = _halley_pass(
            z, shift, slack, lower, upper, tau, done, tolerance, True
        )
    probs, done = _probability_pass(z, shift, slack, tau, done, tolerance)
    return probs, (lower, upper, tau, done)


def _entmax_bisect_rows(
    z: Tensor, slack: Tensor, n_iter: int, tol: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """alpha-entmax of rows ``z: (rows, keys)`` with ``slack = alpha - 1: (rows, 1)``, float64
    and positive (rows at alpha = 1 are solved at alpha = 2 here and replaced by the caller).

    Returns ``(probs, shift, tau)``: the threshold ``tau`` and row shift (see :func:`_scaled`)
    let the backward pass form its weight ``p / gap``.  The probability pass doubles as the
    convergence check: rows whose sum is not yet 1 within the tolerance continue, alone, from
    where they stopped, with precise passes.
    """
    tolerance = torch.tensor(
        16 * torch.finfo(z.dtype).eps if tol is None else tol, dtype=torch.float64,
        device=z.device,
    )
    # The plain passes lose about eps / (alpha - 1) (relative) next to alpha = 1 and are too
    # coarse next to the threshold above alpha = 2, where the kernel itself must prove rows;
    # the binned start needs alpha <= 2.
    plain = bool(((slack >= _PLAIN_MIN_SLACK) & (slack <= 1.0)).all()) and tol is None
    # float64's tolerance is 1e8 times tighter: one more cubic step.
    passes = _FUSED_PASSES + (z.dtype == torch.float64)
    if plain and n_iter > passes:
        bins = _START_BINS_SHORT_ROWS if z.shape[-1] <= _SHORT_ROW_KEYS else _START_BINS
        probs, shift, state = _bisect_fused(z, slack, tolerance, bins, passes)
        used = passes
    else:
        shift, lower = _bisect_start(z, slack)
        # F(lower) >= 0 by construction, F(0) = -1; tau starts as a copy of lower (an
        # argument aliasing another makes torch.compile recompile).
        state = (
            lower, torch.zeros_like(slack), lower.clone(),
            torch.zeros_like(slack, dtype=torch.bool),
        )
        state, probs, used = _solve_threshold(
            z, shift, slack, state, tolerance, n_iter, not plain
        )
    while used < n_iter and not bool(state[3].all()):
        rows = _unproven_rows(state[3])
        passes = min(_CONTINUATION_PASSES, n_iter - used)
        # Compiled as part of the work on all of z, however few the rows.
        part_probs, part_state = _bisect_continue(
            z, shift, slack, state, tolerance, rows, passes, size_hint=z.numel()
        )
        used += passes
        state = tuple(
            whole.index_copy(0, rows, part) for whole, part in zip(state, part_state, strict=True)
        )
        # In place: probs is this function's own, and a copy would cost as much as a pass
        # (a fresh large tensor page-faults on first touch).
        probs.index_copy_(0, rows, part_probs)
    return probs, shift, state[2]


# --------------------------------------------------------------------------------------------
# Backward kernels: every map here has Jacobian diag(w) - w w^T / sum(w) for a weight w >= 0
# that vanishes off the support, so the vector-Jacobian product is w * (g - <g, w> / sum w).
# --------------------------------------------------------------------------------------------


def _weighted_centering(weight: Tensor, grad: Tensor) -> Tensor:
    total = weight.sum(-1, keepdim=True)
    centre = (grad * weight).sum(-1, keepdim=True) / torch.where(total > 0, total, 1.0)
    return weight * (grad - centre)


@_MaybeCompiled
def _sparsemax_backward(probs: Tensor, grad: Tensor) -> Tensor:
    return _weighted_centering((probs > 0).to(grad.dtype), grad)


@_MaybeCompiled
def _entmax15_backward(probs: Tensor, grad: Tensor) -> Tensor:
    # sqrt taken only where p > 0: its derivative there is finite, and a second derivative
    # (create_graph=True) is then exact instead of inf * 0 = NaN off the support
    positive = probs > 0
    return _weighted_centering(torch.where(positive, torch.where(positive, probs, 1.0).sqrt(),
                                           0.0), grad)


def _log_probs(probs: Tensor) -> Tensor:
    """``log p`` where ``p > 0``, 0 elsewhere."""
    positive = probs > 0
    return torch.where(positive, torch.log(torch.where(positive, probs, 1.0)), 0.0)


def _alpha_gradient_terms(
    probs: Tensor, log_p: Tensor, power: Tensor, slack: Tensor, grad: Tensor
) -> Tensor:
    """``sum_i grad_i dp_i/dalpha`` per row, ``(rows, 1)``, for ``slack = alpha - 1 >= 0``,
    from ``log_p = log p`` and ``power = p^(1 - slack)`` (both read only where ``p > 0``).

    Differentiating ``sum p = 1`` implicitly gives ``dp/dalpha`` as a difference of two
    terms of order ``alpha - 1`` divided by ``(alpha - 1)^2``, which cancels catastrophically
    near alpha = 1 (float32 at alpha = 1.00001 was off by 40x).  Written with ``l = log p``,
    ``t = (alpha - 1) l`` and ``gamma = l^2 psi(t)``, ``psi(t) = (expm1(-t) + t) / t^2``
    (a series for small ``t``), the cancellation is done analytically:
    ``dp_i/dalpha = p_i ((gbar - gamma_i) - s (l_i gbar - gamma_i lbar)) / D`` with
    ``lbar = <p, l>``, ``gbar = <p, gamma>`` and ``D = 1 - s lbar + s^2 gbar``; at alpha = 1
    it is the softmax limit ``p_i (<p, l^2> - l_i^2) / 2``.
    """
    positive = probs > 0
    t = slack * log_p
    small = t.abs() < 0.1
    series = 0.5 - t / 6.0 + t * t / 24.0 - t * t * t / 120.0
    # p * gamma: for larger |t| as (p e^{-t} - p + p t) / s^2 with p e^{-t} = p^(1 - s),
    # which cannot overflow as e^{-t} alone would next to the threshold.
    safe_slack = torch.where(slack > 0, slack, 1.0)
    direct = (power - probs + probs * t) / (safe_slack * safe_slack)
    p_gamma = torch.where(positive, torch.where(small, probs * log_p * log_p * series, direct), 0.0)
    # sum_i g_i dp_i/dalpha expanded into row sums that one pass over the keys gives (the
    # per-key form needs lbar and gbar first, a second pass and three stored tensors).
    mean_log = (probs * log_p).sum(-1, keepdim=True)
    mean_gamma = p_gamma.sum(-1, keepdim=True)
    grad_p = (grad * probs).sum(-1, keepdim=True)
    grad_p_log = (grad * probs * log_p).sum(-1, keepdim=True)
    grad_p_gamma = (grad * p_gamma).sum(-1, keepdim=True)
    centred = mean_gamma * grad_p - grad_p_gamma
    cross = mean_gamma * grad_p_log - mean_log * grad_p_gamma
    denominator = 1.0 - slack * mean_log + slack * slack * mean_gamma
    return (centred - slack * cross) / denominator


@_MaybeCompiled
def _alpha_gradient(probs: Tensor, slack: Tensor, grad: Tensor) -> Tensor:
    """See :func:`_alpha_gradient_terms`; ``p^(1 - slack)`` is taken as a power here."""
    log_p = _log_probs(probs)
    return _alpha_gradient_terms(probs, log_p, torch.exp(log_p - slack * log_p), slack, grad)


def _bisect_weight(
    z: Tensor, probs: Tensor, shift: Tensor, slack: Tensor, tau: Tensor
) -> Tensor:
    """alpha-entmax's backward weight ``p / gap``, proportional to ``p^(2 - alpha)``, from
    the forward's threshold (no power needed); ``p`` itself on softmax rows (``slack = 0``)."""
    gap = _gap(_scaled(z, shift, torch.where(slack > 0, slack, 1.0)), tau)
    positive = gap > 0
    ratio = torch.where(positive, probs / torch.where(positive, gap, 1.0), 0.0)
    return torch.where(slack > 0, ratio, probs)


def _differentiable_bisect_backward(
    probs: Tensor, alpha: Tensor, grad: Tensor, need_z: bool, need_alpha: bool
) -> tuple[Tensor | None, Tensor | None]:
    """alpha-entmax's vector-Jacobian products ``(dz, dalpha)`` from ``probs`` and ``alpha``
    alone, in plain torch operations, for a backward pass that autograd differentiates again
    (``create_graph=True``: Hessian-vector products, gradient penalties).  The fast backward
    reads the forward's threshold, a constant to autograd, and so would drop that part of
    the second derivative.  ``p^(2 - alpha)`` is the weight ``p / gap``."""
    slack = (alpha - 1.0).to(probs.dtype)
    log_p = _log_probs(probs)
    weight = torch.where(probs > 0, torch.exp((1.0 - slack) * log_p), 0.0)
    grad_z = _weighted_centering(weight, grad) if need_z else None
    grad_alpha = (_alpha_gradient_terms(probs, log_p, weight, slack, grad).to(alpha.dtype)
                  if need_alpha else None)
    return grad_z, grad_alpha


def _recorded_bisect_backward(
    ctx: Any, probs: Tensor, alpha: Tensor, grad: Tensor
) -> tuple[Tensor | None, Tensor | None, None, None]:
    """The backward of an ``entmax_bisect`` Function ``(z, alpha, n_iter, tol-like)`` by
    :func:`_differentiable_bisect_backward`: for ``create_graph=True`` and ``torch.func``."""
    return (*_differentiable_bisect_backward(probs, alpha, grad, *ctx.needs_input_grad[:2]),
            None, None)


@_MaybeCompiled
def _bisect_backward(
    z: Tensor, probs: Tensor, shift: Tensor, slack: Tensor, tau: Tensor, grad: Tensor
) -> Tensor:
    """The vector-Jacobian product of alpha-entmax with respect to the scores."""
    return _weighted_centering(_bisect_weight(z, probs, shift, slack, tau), grad)


@_MaybeCompiled
def _bisect_backward_with_alpha(
    z: Tensor, probs: Tensor, shift: Tensor, slack: Tensor, tau: Tensor, grad: Tensor
) -> tuple[Tensor, Tensor]:
    """Both gradients of alpha-entmax, ``(dz, dalpha)``, in one compiled call: they read the
    same ``probs`` and ``grad``, so one kernel reads them once."""
    weight = _bisect_weight(z, probs, shift, slack, tau)
    s = slack.to(probs.dtype)
    # p^(1 - s) without a power per key: p^s = gap / T^s on every key of a row (T the sum
    # before renormalising) and the row maximum's gap is -tau, so p^(1 - s) is the weight
    # p / gap times (-tau) p_max^(-s), one power per row.  (Softmax rows, s = 0, read the
    # series instead.)
    p_max = probs.amax(-1, keepdim=True)
    log_p_max = torch.log(torch.where(p_max > 0, p_max, 1.0))
    power = weight * ((-tau).to(probs.dtype) * torch.exp(-s * log_p_max))
    alpha_terms = _alpha_gradient_terms(probs, _log_probs(probs), power, s, grad)
    return _weighted_centering(weight, grad), alpha_terms


# --------------------------------------------------------------------------------------------
# autograd Functions on rows ``z: (rows, keys)``
# --------------------------------------------------------------------------------------------


def _fold_rows(z: Tensor, dim: int | None) -> Tensor:
    """A ``torch.func.vmap`` batch at ``dim`` of rows ``(rows, keys)`` folded into more rows:
    ``(batch * rows, keys)`` (the maps work row by row)."""
    if dim is None:
        return z
    moved = z.movedim(dim, 0)
    return moved.reshape(-1, moved.shape[-1])


class _SparsemaxFunction(torch.autograd.Function):
    """sparsemax of rows, Jacobian ``diag(s) - s s^T / |S|``.  Under ``torch.func.vmap`` the
    batch is folded into rows, so ``vmap``, ``grad``, ``jacrev`` (and ``jacrev`` of
    ``jacrev``) work; forward mode (``jvp``, ``jacfwd``) is refused by torch: a ``jvp`` rule
    that reads the saved output loses the outer tangent of nested forward mode, which gave
    a zero second derivative silently."""

    @staticmethod
    def forward(z: Tensor) -> Tensor:
        return _exact_threshold_map(_sparsemax_kernel, _sparsemax_sort, z, _MICHELOT_STEPS)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (probs,) = ctx.saved_tensors
        return _sparsemax_backward(probs, grad)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, z: Tensor) -> tuple[Tensor, int | None]:
        rows = _SparsemaxFunction.apply(_fold_rows(z, in_dims[0]))
        return (rows, None) if in_dims[0] is None else (rows.reshape(
            info.batch_size, -1, rows.shape[-1]), 0)


class _Entmax15Function(torch.autograd.Function):
    """1.5-entmax of rows, Jacobian ``diag(w) - w w^T / sum w`` with ``w = sqrt(p)`` (see
    :class:`_SparsemaxFunction` for the ``torch.func`` transforms)."""

    @staticmethod
    def forward(z: Tensor) -> Tensor:
        short = z.shape[-1] <= _SHORT_ROW_KEYS
        steps = _QUADRATIC_STEPS_SHORT_ROWS if short else _QUADRATIC_STEPS
        return _exact_threshold_map(_entmax15_kernel, _entmax15_sort, z, steps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (probs,) = ctx.saved_tensors
        return _entmax15_backward(probs, grad)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, z: Tensor) -> tuple[Tensor, int | None]:
        rows = _Entmax15Function.apply(_fold_rows(z, in_dims[0]))
        return (rows, None) if in_dims[0] is None else (rows.reshape(
            info.batch_size, -1, rows.shape[-1]), 0)


def _native_applies(z: Tensor, tol: float | None) -> bool:
    """Whether the CPU kernel of :mod:`structattn._native` can take rows ``z``: float32 on the
    CPU, the default tolerance, outside ``torch.compile`` and the kernel built."""
    return (
        z.device.type == "cpu"
        and z.dtype == torch.float32
        and tol is None
        and z.numel() > 0
        and not torch.compiler.is_compiling()
        and _native.library() is not None
    )


def _native_covers(
    z: Tensor, alpha: Tensor | float, tol: float | None,
    extremes: tuple[float, float] | None = None,
) -> bool:
    """Whether the CPU kernel takes every row of ``z`` at ``alpha`` (a number or ``(rows, 1)``,
    whose ``(min, max)`` are ``extremes`` when known)."""
    if not _native_applies(z, tol):
        return False
    if isinstance(alpha, float):
        return _native.in_range(alpha - 1.0)
    if extremes is None:
        extremes = tuple(float(v) for v in torch.aminmax(alpha.detach()))
    low, high = extremes
    return _native.in_range(low - 1.0) and _native.in_range(high - 1.0)


class _NativeResult(NamedTuple):
    probs: Tensor
    shift: Tensor
    slack: Tensor
    tau: Tensor


def _native_forward(z: Tensor, alpha: Tensor, n_iter: int, check_values: bool) -> _NativeResult:
    """The CPU kernel's forward on rows ``z`` at ``alpha: (rows, 1)`` or ``(1, 1)``;
    ``check_values``: raise on NaN or infinite scores, which the kernel counts as it reads them
    (cheaper than a separate check; the scores carry no mask)."""
    slack = alpha.detach().to(torch.float64) - 1.0
    result = _native.forward(z.detach(), slack, n_iter)
    if check_values and result.nonfinite:
        check_finite(z, "scores")
    return _NativeResult(result.probs, result.shift, slack, result.tau)


class _NativeEntmaxBisectFunction(torch.autograd.Function):
    """alpha-entmax of rows ``z: (rows, keys)`` by the CPU kernel, ``alpha: (rows, 1)`` or
    ``(1, 1)`` (one alpha for every row) with ``alpha - 1`` in the kernel's range."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, alpha: Tensor, n_iter: int, check_values: bool) -> Tensor:
        result = _native_forward(z, alpha, n_iter, check_values)
        ctx.save_for_backward(z.detach(), result.probs, result.shift, result.slack, result.tau,
                              alpha)
        return result.probs

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        z, probs, shift, slack, tau, alpha = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a backward autograd differentiates again
            return _recorded_bisect_backward(ctx, probs, alpha, grad)
        grad_z, grad_alpha = _native.backward(
            z, probs, shift, slack, tau, grad, bool(ctx.needs_input_grad[1]))
        return (grad_z if ctx.needs_input_grad[0] else None), grad_alpha, None, None


def _native_rows(z: Tensor, slack: Tensor, tol: float | None) -> Tensor | None:
    """The rows of ``z`` that the CPU kernel of :mod:`structattn._native` solves, given
    ``slack = alpha - 1: (rows, 1)``, or None for none of them."""
    if not _native_applies(z, tol):
        return None
    rows = _native.in_range(slack).reshape(-1)
    if slack.shape[0] != z.shape[0]:
        rows = rows.expand(z.shape[0])
    return rows if bool(rows.any()) else None


def _solve_rows(
    z: Tensor, slack: Tensor, n_iter: int, tol: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """alpha-entmax of rows ``z`` with ``slack = alpha - 1 > 0: (rows, 1)`` float64:
    ``(probs, shift, tau)``, the rows in the CPU kernel's range by the kernel and the others by
    :func:`_entmax_bisect_rows` (both give the threshold and row shift in the form the general
    backward reads).  (Inputs whose rows are all in range take the kernel's own Function.)"""
    native = _native_rows(z, slack, tol)
    if native is None:
        return _entmax_bisect_rows(z, slack, n_iter, tol)
    inside, outside = native.nonzero().squeeze(1), (~native).nonzero().squeeze(1)
    slack = slack.expand(z.shape[0], 1)
    probs, shift, tau, *_ = _native.forward(z[inside], slack[inside], n_iter)
    rest = _entmax_bisect_rows(z[outside], slack[outside], n_iter, tol)
    merged = []
    for part, other in zip((probs, shift, tau), rest, strict=True):
        whole = part.new_empty((z.shape[0], *part.shape[1:]))
        merged.append(whole.index_copy_(0, inside, part).index_copy_(0, outside, other))
    return merged[0], merged[1], merged[2]


def _bisect_forward_rows(
    z: Tensor, alpha: Tensor, n_iter: int, tol: float | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """alpha-entmax of rows ``z: (rows, keys)`` at ``alpha: (rows, 1)`` (alpha = 1 rows by
    softmax): ``(probs, shift, slack, tau)``, what the backward passes read."""
    # Detached, so that the compiled kernels see the same requires_grad with and without
    # autograd (a mismatch recompiles them).
    z = z.detach()
    slack = (alpha.detach() - 1.0).to(torch.float64)
    softmax_rows = slack == 0
    probs, shift, tau = _solve_rows(z, torch.where(softmax_rows, 1.0, slack), n_iter, tol)
    if bool(softmax_rows.any()):
        dense = torch.softmax(z.masked_fill(z.isinf().all(-1, keepdim=True), 0.0), -1)
        dense = torch.where(z > float("-inf"), dense, 0.0)
        probs = torch.where(softmax_rows, dense, probs)
    return probs, shift, slack, tau


class _EntmaxBisectFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor, alpha: Tensor, n_iter: int, tol: float | None) -> Tensor:
        probs, shift, slack, tau = _bisect_forward_rows(z, alpha, n_iter, tol)
        ctx.save_for_backward(z.detach(), probs, shift, slack, tau, alpha)
        return probs

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        z, probs, shift, slack, tau, alpha = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a backward autograd differentiates again
            return _recorded_bisect_backward(ctx, probs, alpha, grad)
        grad_z = grad_alpha = None
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
            grad_z, grad_alpha = _bisect_backward_with_alpha(z, probs, shift, slack, tau, grad)
        elif ctx.needs_input_grad[0]:
            grad_z = _bisect_backward(z, probs, shift, slack, tau, grad)
        elif ctx.needs_input_grad[1]:
            grad_alpha = _alpha_gradient(probs, alpha - 1.0, grad)
        if grad_alpha is not None:
            grad_alpha = grad_alpha.to(alpha.dtype)
        return grad_z, grad_alpha, None, None


class _TritonEntmaxBisectFunction(torch.autograd.Function):
    """alpha-entmax of rows ``z: (rows, keys)`` with ``alpha: (rows, 1)`` by the fused Triton
    forward kernel of :mod:`structattn._triton_entmax` (one launch); the backward pass is the
    general path's."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, alpha: Tensor) -> Tensor:
        from structattn import _triton_entmax  # (Triton is optional: imported on first use)

        z = z.detach()
        probs, shift, slack, tau = _triton_entmax.entmax_bisect_rows(z, alpha.detach())
        ctx.save_for_backward(z, probs, shift, slack, tau, alpha)
        return probs

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        grad_z, grad_alpha, _, _ = _EntmaxBisectFunction.backward(ctx, grad)
        return grad_z, grad_alpha


class _FuncEntmaxBisectFunction(torch.autograd.Function):
    """alpha-entmax of rows for ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``):
    the same forward, the backward in torch operations from ``probs`` and ``alpha``
    (:func:`_differentiable_bisect_backward`), and ``vmap`` folding the batch into rows."""

    @staticmethod
    def forward(z: Tensor, alpha: Tensor, n_iter: int, tol: float | None) -> Tensor:
        return _bisect_forward_rows(z, alpha, n_iter, tol)[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(output, inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        probs, alpha = ctx.saved_tensors
        return _recorded_bisect_backward(ctx, probs, alpha, grad)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, z: Tensor, alpha: Tensor, n_iter: int,
             tol: float | None) -> tuple[Tensor, int | None]:
        z_dim, alpha_dim = in_dims[0], in_dims[1]
        if z_dim is None and alpha_dim is None:
            return _FuncEntmaxBisectFunction.apply(z, alpha, n_iter, tol), None
        z = z.movedim(z_dim, 0) if z_dim is not None else z.expand(info.batch_size, *z.shape)
        rows, keys = z.shape[-2], z.shape[-1]
        alpha = (alpha.movedim(alpha_dim, 0) if alpha_dim is not None
                 else alpha.expand(info.batch_size, *alpha.shape))
        alpha = alpha.expand(info.batch_size, rows, 1)
        probs = _FuncEntmaxBisectFunction.apply(z.reshape(-1, keys), alpha.reshape(-1, 1),
                                                n_iter, tol)
        return probs.reshape(info.batch_size, rows, keys), 0


# --------------------------------------------------------------------------------------------
# Shared plumbing: validation, moving ``dim`` last, masking, dtype
# --------------------------------------------------------------------------------------------


def _check_finite_scores(scores: Tensor, mask: Tensor | None) -> None:
    """Raise on NaN or infinite valid scores.  A finite sum proves there are none, and costs
    a tenth of an elementwise check; only a non-finite sum pays for the exact check."""
    with torch.no_grad():
        valid = scores if mask is None else torch.where(mask, scores, 0.0)
        total = valid.sum(dtype=torch.float32 if scores.dtype in _HALF_DTYPES else None)
        finite = bool(torch.isfinite(total))
    if not finite:
        check_finite(scores, "scores", mask)


def _transformed(*tensors: Tensor | None) -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ...) wraps any of
    ``tensors``: Python cannot branch on their values under ``vmap``, so the checks of values
    (NaN, infinite scores, fully masked rows, alpha's range) are skipped there."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return wrapped is not None and any(
        isinstance(t, Tensor) and wrapped(t) for t in tensors)


def _prepare(
    scores: Tensor, dim: int, mask: Tensor | None, check_values: bool = True
) -> tuple[int, Tensor | None]:
    """Validate (when enabled) and return ``(dim as a non-negative index, bool mask)``;
    ``check_values=False`` leaves the check for NaN and infinite scores to the caller."""
    if not isinstance(scores, Tensor):
        raise ValueError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if validation_enabled():
        if not scores.is_floating_point():
            raise ValueError(f"scores must be a floating-point tensor, got {scores.dtype}")
        dim = normalize_dim(scores, dim)
        check_nonempty(scores, dim, "scores")
        mask = broadcast_mask(mask, scores.shape)
        values = not _transformed(scores, mask)
        if mask is not None and values:
            check_some_valid(mask.expand(scores.shape), dim)
        if check_values and values:
            _check_finite_scores(scores, mask)
        return dim, mask
    dim = dim % scores.dim()
    if mask is not None and mask.dtype != torch.bool:
        mask = mask != 0
    return dim, mask


def _to_rows(scores: Tensor, dim: int, mask: Tensor | None) -> Tensor:
    """``scores`` as ``(rows, keys)`` in the work dtype, masked keys set to -inf."""
    # (Each reshape is an autograd node for scores that require grad: only where needed.)
    z = scores if dim == scores.dim() - 1 else scores.movedim(dim, -1)
    if mask is not None:
        z = z.masked_fill(~mask.expand(scores.shape).movedim(dim, -1), float("-inf"))
    if z.dtype in _HALF_DTYPES:
        z = z.float()
    return z if z.dim() == 2 else z.reshape(-1, z.shape[-1])


def _from_rows(probs: Tensor, scores: Tensor, dim: int) -> Tensor:
    """Inverse of :func:`_to_rows`: back to ``scores``' shape, layout of ``dim`` and dtype."""
    if scores.dim() != 2 or dim != 1:
        shape = scores.movedim(dim, -1).shape
        probs = probs.reshape(shape).movedim(-1, dim)
    return probs if probs.dtype == scores.dtype else probs.to(scores.dtype)


# --------------------------------------------------------------------------------------------
# Public maps
# --------------------------------------------------------------------------------------------


def masked_softmax(scores: Tensor, dim: int = -1, mask: Tensor | None = None) -> Tensor:
    """Softmax along ``dim`` with masked keys at exactly zero probability and gradient.

    Args:
        scores: ``(..., keys, ...)`` real scores; ``keys`` is the size along ``dim``.
        dim: the dimension that is normalised.
        mask: boolean, True = valid key, broadcastable to ``scores``; None = all valid.

    Returns:
        ``(..., keys, ...)`` probabilities, same dtype as ``scores`` (half precision is
        computed in float32).  With validation off, a query with no valid key gets all zeros.
    """
    dim, mask = _prepare(scores, dim, mask)
    work_dtype = torch.float32 if scores.dtype in _HALF_DTYPES else None
    if mask is None:
        return torch.softmax(scores, dim, dtype=work_dtype).to(scores.dtype)
    mask = mask.expand(scores.shape)
    # A row with no valid key is filled with 0 rather than -inf, so that softmax stays finite
    # (uniform) and the final where() zeroes it without NaN in the forward or backward pass.
    fill = torch.where(mask.any(dim, keepdim=True), float("-inf"), 0.0).to(scores.dtype)
    probs = torch.softmax(torch.where(mask, scores, fill), dim, dtype=work_dtype)
    return torch.where(mask, probs, 0.0).to(scores.dtype)


def sparsemax(scores: Tensor, dim: int = -1, mask: Tensor | None = None) -> Tensor:
    """Sparsemax: the Euclidean projection of ``scores`` onto the simplex along ``dim``.

    ``p = argmin_{p in simplex} ||p - z||^2``, i.e. ``p = [z - tau]_+`` with ``tau`` such that
    ``sum p = 1`` (Martins & Astudillo 2016, "From Softmax to Sparsemax").  The threshold is
    found by Michelot's iteration (Michelot 1986) and proven exact, falling back to the sort
    algorithm of Martins & Astudillo for rows it cannot prove; the backward pass is the closed
    form ``dz = s * (g - mean_S g)`` on the support ``S``.

    Args:
        scores: ``(..., keys, ...)`` real scores; ``keys`` is the size along ``dim``.
        dim: the dimension that is normalised.
        mask: boolean, True = valid key, broadcastable to ``scores``; None = all valid.

    Returns:
        ``(..., keys, ...)`` sparse probabilities, same dtype as ``scores``.
    """
    dim, mask = _prepare(scores, dim, mask)
    probs = _SparsemaxFunction.apply(_to_rows(scores, dim, mask))
    return _from_rows(probs, scores, dim)


def entmax15(scores: Tensor, dim: int = -1, mask: Tensor | None = None) -> Tensor:
    """1.5-entmax: ``p = [z/2 - tau]_+^2`` with ``tau`` such that ``sum p = 1``.

    The Tsallis alpha=1.5 regularised argmax (Peters, Niculae & Martins 2019, "Sparse
    Sequence-to-Sequence Models").  The threshold is found by Newton's method with an exact
    closed-form last step that is proven correct, falling back to the paper's sort algorithm
    for rows it cannot prove; the backward pass is the closed form
    ``dz = sqrt(p) * (g - <g, sqrt p> / sum sqrt p)``.

    Args:
        scores: ``(..., keys, ...)`` real scores; ``keys`` is the size along ``dim``.
        dim: the dimension that is normalised.
        mask: boolean, True = valid key, broadcastable to ``scores``; None = all valid.

    Returns:
        ``(..., keys, ...)`` sparse probabilities, same dtype as ``scores``.
    """
    dim, mask = _prepare(scores, dim, mask)
    probs = _Entmax15Function.apply(_to_rows(scores, dim, mask))
    return _from_rows(probs, scores, dim)


def _alpha_rows(
    alpha: float | Tensor, scores: Tensor, dim: int
) -> tuple[Tensor | float, tuple[float, float] | None]:
    """Validate ``alpha`` and return it as a float or as ``(rows, 1)`` in the work dtype, with
    its ``(min, max)`` when validation computed them (else None)."""
    checking = validation_enabled()
    if not isinstance(alpha, Tensor):
        # Checked even with validation off: float("1.5") would silently accept a string.
        alpha = check_real_number(alpha, "alpha")
        if checking and not alpha >= 1.0:
            raise ValueError(f"alpha must be >= 1 (1 = softmax, 2 = sparsemax), got {alpha}")
        if checking and alpha == float("inf"):
            raise ValueError("alpha must be finite, got inf")
        return alpha, (alpha, alpha)
    reduced = list(scores.shape)
    reduced[dim] = 1
    extremes = None
    if checking:
        if not alpha.is_floating_point():
            raise ValueError(f"alpha must be a float or a floating-point tensor, got {alpha.dtype}")
        if list(alpha.shape) != reduced:
            check_broadcasts_to(alpha.shape, reduced, "alpha",
                                f"the scores' shape with dim {dim} reduced to 1,")
        if alpha.numel() > 0 and not _transformed(alpha):
            # One reduction for both checks (NaN propagates into it).
            with torch.no_grad():
                low, high = (float(v) for v in torch.aminmax(alpha.detach()))
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError("alpha contains NaN or infinite values")
            if not low >= 1:
                raise ValueError(
                    f"alpha must be >= 1 everywhere (1 = softmax, 2 = sparsemax), got minimum "
                    f"{low}"
                )
            extremes = (low, high)
    work_dtype = torch.float32 if scores.dtype in _HALF_DTYPES else scores.dtype
    # (Each reshape below would be an autograd node for a learned alpha: only where needed.)
    rows = alpha if alpha.dtype == work_dtype else alpha.to(work_dtype)
    if list(rows.shape) != reduced:
        rows = rows.expand(reduced)
    if dim != scores.dim() - 1:
        rows = rows.movedim(dim, -1)
    if rows.dim() != 2:
        rows = rows.reshape(-1, 1)
    return rows, extremes


def entmax_bisect(
    scores: Tensor,
    alpha: float | Tensor = 1.5,
    dim: int = -1,
    mask: Tensor | None = None,
    n_iter: int = 50,
    tol: float | None = None,
) -> Tensor:
    """alpha-entmax: ``p = [(alpha - 1) z - tau]_+^(1 / (alpha - 1))`` with ``sum p = 1``.

    The Tsallis-regularised argmax of Peters, Niculae & Martins 2019; alpha = 1 is softmax,
    alpha = 2 is sparsemax.  ``tau`` lies in ``[max - 1, max]`` (Blondel, Martins & Niculae
    2020, "Learning with Fenchel-Young Losses", find it by bisection there); here it is found
    by Halley's method on ``P(tau)^(alpha - 1) - 1``, ``P = sum [x - tau]_+^(1/(alpha-1))``,
    which is convex and nearly linear for alpha <= 2, with Newton's steps for alpha > 2 and a
    bisection safeguard.  For alpha in [1.1, 2] and the default tolerance it starts from a
    binned model of each row, within a few percent of ``sum p = 1``, from where one pass
    reaches float32's tolerance (on every N(0, 1) row at alpha 1.3, on 95-99% at 1.7; the
    others continue alone); elsewhere from a lower bound counted from the keys.  Each pass
    costs one log and one exp per key.  The last,
    probability pass carries the threshold in float64, subtracted as a high + low pair, and
    takes ``log(gap)`` as ``log1p(gap - 1)`` where the gap is near 1, so float32 results are
    within a few float32 eps of float64 at every alpha (next to the threshold for alpha > 2,
    and next to alpha = 1).  It stops when ``|sum p - 1| <= tol`` (the probability pass is
    the check; rows it cannot prove continue alone) and renormalises.  For a
    plain number alpha of 1, 1.5 or 2 the exact maps :func:`masked_softmax`,
    :func:`entmax15` and :func:`sparsemax` are used instead.  float32 CPU rows with alpha in
    [1.1, 2] and the default tolerance run the C++ kernel of :mod:`structattn._native` (same
    answers to a few float32 eps; ``STRUCTATTN_NATIVE=0`` turns it off).

    Args:
        scores: ``(..., keys, ...)`` real scores; ``keys`` is the size along ``dim``.
        alpha: a number >= 1, or a tensor of values >= 1 broadcastable to ``scores`` with
            ``dim`` of size 1 (one alpha per query); a tensor alpha may require grad.
        dim: the dimension that is normalised.
        mask: boolean, True = valid key, broadcastable to ``scores``; None = all valid.
        n_iter: the most threshold iterations per query (>= 1).
        tol: tolerance on ``|sum p - 1|`` before renormalising; default ``16 * eps`` of the
            work dtype.

    Returns:
        ``(..., keys, ...)`` probabilities, same dtype as ``scores``.  The gradient with
        respect to a tensor ``alpha`` is exact for every alpha >= 1, alpha = 1 included (the
        softmax limit ``dp_i/dalpha = p_i (<p, log^2 p> - log^2 p_i) / 2``), and free of the
        cancellation that the textbook formula suffers next to alpha = 1.

    Raises:
        ValueError: naming the argument, for scores that are not a floating tensor, NaN or
            infinite valid scores, a bad ``dim`` or ``mask``, a query with no valid key, an
            ``alpha`` that is not a real number >= 1 or a floating tensor of them that
            broadcasts, ``n_iter`` not a positive int, ``tol`` not a positive number.
    """
    dim, mask = _prepare(scores, dim, mask, check_values=False)
    checking = validation_enabled()
    if checking:
        check_positive_int(n_iter, "n_iter")
        if tol is not None and not check_real_number(tol, "tol") > 0:
            raise ValueError(f"tol must be positive, got {tol!r}")
    alpha_rows, extremes = _alpha_rows(alpha, scores, dim)
    if isinstance(alpha_rows, float):
        if alpha_rows == 1.0:
            return masked_softmax(scores, dim, mask)
        if alpha_rows == 1.5:
            return entmax15(scores, dim, mask)
        if alpha_rows == 2.0:
            return sparsemax(scores, dim, mask)
    z = _to_rows(scores, dim, mask)
    if _transformed(z, alpha_rows):  # torch.func: a Function with a vmap rule, torch backward
        if isinstance(alpha_rows, float):
            alpha_rows = torch.full_like(z[:, :1], alpha_rows)
        probs = _FuncEntmaxBisectFunction.apply(z, alpha_rows, n_iter, tol)
        return _from_rows(probs, scores, dim)
    use_triton = _use_triton(z, tol)
    # (Whether a tensor alpha suits the CPU kernel depends on its values, which a torch.jit
    # trace would freeze: traced, it takes the general Function, which splits rows itself.)
    native = (not use_triton and not (torch.jit.is_tracing() and isinstance(alpha_rows, Tensor))
              and _native_covers(z, alpha_rows, tol, extremes))
    # The CPU kernel counts non-finite scores as it reads them; with a mask (masked keys are
    # -inf by then) or on any other path, the check runs first.
    if checking and not (native and mask is None):
        _check_finite_scores(scores, mask)
    if native:
        if isinstance(alpha_rows, float):
            alpha_rows = torch.full((1, 1), alpha_rows, dtype=z.dtype)
        check_values = checking and mask is None
        # A torch.jit trace records the Function (replayed on new inputs), not the kernel call.
        if (torch.is_grad_enabled() and (z.requires_grad or alpha_rows.requires_grad)
                or torch.jit.is_tracing()):
            probs = _NativeEntmaxBisectFunction.apply(z, alpha_rows, n_iter, check_values)
        else:  # (no graph to build: the kernel alone, without an autograd Function's cost)
            probs = _native_forward(z, alpha_rows, n_iter, check_values).probs
        return _from_rows(probs, scores, dim)
    if isinstance(alpha_rows, float):
        alpha_rows = torch.full_like(z[:, :1], alpha_rows)
    if use_triton:
        probs = _TritonEntmaxBisectFunction.apply(z, alpha_rows)
    else:
        probs = _EntmaxBisectFunction.apply(z, alpha_rows, n_iter, tol)
    return _from_rows(probs, scores, dim)


#: Device types on which ``entmax_bisect`` runs the fused Triton kernel of
#: :mod:`structattn._triton_entmax` (the tests add "cpu", where Triton's interpreter runs it).
#: Opt-in for now: the kernel passes its tests under Triton's interpreter and compiles for
#: sm_90 without spills, but has not yet run on a GPU, so CUDA takes it only when the
#: environment variable ``STRUCTATTN_TRITON`` is "1" at import (and never when it is "0").
TRITON_DEVICES: tuple[str, ...] = (
    ("cuda",) if os.environ.get("STRUCTATTN_TRITON", "").strip() == "1" else ())


def _use_triton(z: Tensor, tol: float | None) -> bool:
    """Whether rows ``z`` take the fused kernel: on a device in ``TRITON_DEVICES``, float32
    work dtype, the default tolerance, rows the kernel holds, Triton importable and the
    environment variable ``STRUCTATTN_TRITON`` not "0"; its threshold takes a fixed number of
    passes (``n_iter`` does not apply)."""
    if (
        z.device.type not in TRITON_DEVICES
        or z.dtype != torch.float32
        or tol is not None
        or os.environ.get("STRUCTATTN_TRITON", "1").strip() == "0"
        # Inside torch.compile the general path's own kernels are traced instead.
        or torch.compiler.is_compiling()
    ):
        return False
    try:
        from structattn._triton_entmax import MAX_KEYS
    except ImportError:
        return False
    return 0 < z.shape[-1] <= MAX_KEYS
