"""Dependency-tree CRFs: projective (Eisner's inside algorithm) and non-projective (matrix-tree).

Both take torch-struct's arc convention: ``arc_scores[..., head, dependent]`` scores the arc
``head -> dependent`` and the diagonal ``arc_scores[..., j, j]`` scores attaching word ``j`` to
the root. A value is a head vector ``heads: (..., N)`` with ``heads[j] = j`` for a word attached
to the root (the diagonal convention again), so ``score = sum_j arc_scores[heads[j], j]``.

Both default to a single root (exactly one word attached to the root, as in most treebanks);
``multiroot=True`` allows several. The flag lives on the instance, never on the class.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributions import constraints

from structattn._backend import computation_dtype

from .semiring import LogSemiring, MaxSemiring
from .structured import (
    StructuredDistribution,
    check_lengths,
    check_potentials,
    gradient_of_log_partition,
    resolve_validation,
)

#: added to the scores of forbidden arcs while sampling; exp() of it is zero in float32/64
_FORBIDDEN = 1e5


def _word_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, N)`` True for real words."""
    return torch.arange(size, device=lengths.device) < lengths.unsqueeze(-1)


# --------------------------------------------------------------------------- matrix-tree
#: a word-to-word weight below ``exp(-700)`` times its dependent's best weight is raised to it:
#: float64's ``exp`` underflows near -745 and a zero could leave no spanning tree. Exact (to
#: rounding) while no dependent's incoming word scores spread wider than 700 nats; beyond
#: that (scores of scale ~150 and up) log Z stays finite but trees that need such arcs gain weight
_LOG_WEIGHT_FLOOR = -700.0

#: the LU (Koo et al.) result of a sentence is kept when float64's machine epsilon times the
#: condition estimate ``||A||_1 ||A^{-1}||_1`` stays under this; the rounding of the
#: Laplacian's diagonal then moves log Z and the marginals by less than about this much.
#: Peaked scores (scale 30 and up, n = 5) fail it and go to the elimination below
_FLOAT64_CONDITION = 1e-10

#: iterations of the 1-norm estimator of ``A^{-1}`` (Hager's method converges in 2-5)
_NORM_ESTIMATE_STEPS = 4


def _kirchhoff(
    arc_scores: torch.Tensor, lengths: torch.Tensor, multiroot: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The matrix whose determinant counts the trees (Koo et al. 2007, Tutte 1984).

    Every column (dependent) is shifted by its largest score before ``exp``: each word has
    exactly one head, so the shift moves ``log Z`` by the sum of the column shifts and nothing
    else, and no weight can overflow. Padded words get an identity row and column.
    Differentiable (the shift is a constant).

    Returns ``(matrix (B, N, N), arc weights (B, N, N) zero on the diagonal, root weights
    (B, N), log Z offset (B,))``.
    """
    size = arc_scores.shape[-1]
    words = _word_mask(lengths, size)
    padded = bool((lengths < size).any())
    if padded:
        valid = words.unsqueeze(-1) & words.unsqueeze(-2)
        arc_scores = arc_scores.masked_fill(~valid, float("-inf"))
    shift = arc_scores.amax(-2).detach()
    # a column with no possible head at all (sampling forbids arcs) has no tree either
    shift = shift.masked_fill(~torch.isfinite(shift), 0.0)
    weights = torch.exp(arc_scores - shift.unsqueeze(-2))
    root = torch.diagonal(weights, dim1=-2, dim2=-1)
    arcs = weights * (1.0 - torch.eye(size, dtype=weights.dtype, device=weights.device))
    diagonal = arcs.sum(-2)
    if multiroot:
        diagonal = diagonal + root
    if padded:
        diagonal = diagonal + (~words).to(weights.dtype)
    matrix = torch.diag_embed(diagonal) - arcs
    if not multiroot:
        # Koo et al.: replace the first row by the root weights; single-root trees only
        # (word 0 is never padding: lengths are at least 1)
        matrix = torch.cat([root.unsqueeze(-2), matrix[..., 1:, :]], -2)
    return matrix, arcs, root, shift.sum(-1)


def _well_conditioned(
    matrix: torch.Tensor, inverse: torch.Tensor, info: torch.Tensor
) -> torch.Tensor:
    """``(B,)`` True where the float64 LU result of ``matrix`` can be trusted."""
    with torch.no_grad():
        condition = matrix.abs().sum(-2).amax(-1) * inverse.abs().sum(-2).amax(-1)
        limit = _FLOAT64_CONDITION / torch.finfo(torch.float64).eps
        return info.eq(0) & torch.isfinite(condition) & (condition <= limit)


def _well_conditioned_lu(
    matrix: torch.Tensor, factors: torch.Tensor, pivots: torch.Tensor, info: torch.Tensor
) -> torch.Tensor:
    """``_well_conditioned`` from LU factors, with ``||A^{-1}||_1`` estimated by a few solves
    (Hager 1984, Higham 1988) instead of an explicit inverse: ``O(N^2)`` per sentence."""
    size = matrix.shape[-1]
    probe = matrix.new_full(matrix.shape[:-1] + (1,), 1.0 / size)
    estimate = matrix.new_zeros(matrix.shape[:-2])
    for _ in range(_NORM_ESTIMATE_STEPS):
        image = torch.linalg.lu_solve(factors, pivots, probe)
        estimate = torch.maximum(estimate, image.abs().sum((-2, -1)))
        # the column of A^{-1} to try next: where the dual vector's largest entry sits
        dual = torch.linalg.lu_solve(factors, pivots, torch.sign(image), adjoint=True)
        probe = torch.zeros_like(probe).scatter_(-2, dual.abs().argmax(-2, keepdim=True), 1.0)
    condition = matrix.abs().sum(-2).amax(-1) * estimate
    limit = _FLOAT64_CONDITION / torch.finfo(torch.float64).eps
    return info.eq(0) & torch.isfinite(condition) & (condition <= limit)


def _marginals_from_inverse(
    inverse_t: torch.Tensor, arcs: torch.Tensor, root: torch.Tensor, multiroot: bool
) -> torch.Tensor:
    """Arc marginals ``(B, N, N)`` from ``A^{-T}``, the gradient of ``log det A`` (Koo et al.).

    Out of place while autograd records (second derivatives of log Z), in place otherwise.
    """
    size = inverse_t.shape[-1]
    diagonal = torch.diagonal(inverse_t, dim1=-2, dim2=-1)
    if multiroot:
        # arc h -> d adds w to A[d, d] and -w to A[h, d]; root arc adds r to A[d, d]
        marginals = diagonal.unsqueeze(-2) - inverse_t
        root_marginals = root * diagonal
    else:
        # row 0 holds the root weights, so arcs into or out of word 0 lose that term
        first = torch.arange(size, device=inverse_t.device) == 0
        from_dependent = diagonal.masked_fill(first, 0.0)
        marginals = torch.where(
            first.unsqueeze(-1),
            from_dependent.unsqueeze(-2),
            from_dependent.unsqueeze(-2) - inverse_t,
        )
        root_marginals = root * inverse_t[..., 0, :]
    eye = torch.eye(size, dtype=torch.bool, device=inverse_t.device)
    if torch.is_grad_enabled() and inverse_t.requires_grad:
        return torch.where(eye, root_marginals.unsqueeze(-2), marginals * arcs)
    # no graph: in place, two passes fewer
    marginals.mul_(arcs)
    torch.diagonal(marginals, dim1=-2, dim2=-1).copy_(root_marginals)
    return marginals


# ------------------------------------------------------- elimination without subtraction
def _elimination_weights(
    arc_scores: torch.Tensor, lengths: torch.Tensor, multiroot: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled word weights ``(B, N, N)`` (zero on the diagonal and on padding), log root
    weights ``(B, N)`` and per-dependent log scales ``(B, N)``: ``w[h, d] = weights[h, d] *
    exp(scale[d])``. Differentiable."""
    size = arc_scores.shape[-1]
    words = _word_mask(lengths, size)
    eye = torch.eye(size, dtype=torch.bool, device=arc_scores.device)
    valid = words.unsqueeze(-1) & words.unsqueeze(-2) & ~eye
    arcs = arc_scores.masked_fill(~valid, -torch.inf)
    root = torch.diagonal(arc_scores, dim1=-2, dim2=-1).masked_fill(~words, 0.0)
    scale = arcs.amax(-2).detach()
    scale = torch.where(multiroot.unsqueeze(-1), torch.maximum(scale, root.detach()), scale)
    scale = scale.masked_fill(~torch.isfinite(scale), 0.0)
    relative = (arcs - scale.unsqueeze(-2)).clamp(min=_LOG_WEIGHT_FLOOR)
    weights = relative.exp().masked_fill(arcs == -torch.inf, 0.0)
    return weights, root, scale


def _log_add(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``log(exp(first) + exp(second))`` whose second derivative stays finite however far
    apart the two are (``torch.logaddexp``'s is NaN beyond ~709 nats)."""
    top = torch.maximum(first, second).detach()
    top = top.masked_fill(~torch.isfinite(top), 0.0)
    return top + ((first - top).exp() + (second - top).exp()).log()


def _eliminate(
    weights: torch.Tensor,
    root: torch.Tensor,
    scale: torch.Tensor,
    lengths: torch.Tensor,
    multiroot: torch.Tensor,
    tape: list | None = None,
) -> torch.Tensor:
    """log Z ``(B,)`` by Gaussian elimination of the Laplacian kept as its parts (GTH).

    The Laplacian of weights ``w`` with root weights ``r`` has off-diagonal ``-w[h, d]`` and
    columns summing to ``r[d]``. Eliminating word ``k`` leaves a matrix of the same form with
    ``w[h, d] += w[h, k] w[k, d] / p_k`` and ``r[d] += r[k] w[k, d] / p_k``, where the pivot
    ``p_k = r[k] + sum_h w[h, k]`` is built from its parts instead of being read off a
    diagonal: nothing is ever subtracted, so every pivot keeps full relative precision however
    close to singular the matrix is (Grassmann, Taksar & Heyman 1985; the determinant is the
    product of the pivots). A single root is the coefficient of ``t`` in ``det(L + t r)``:
    pivots without the root weights, and the last word's root weight as the last pivot.

    Word weights stay scaled per dependent (updates only mix a column with itself, through
    ``w[h, k] / p_k <= 1``); root weights are kept as logs. Out of place, so autograd can
    differentiate it, unless ``tape`` (a list) is given: then ``weights`` is overwritten and
    the tape receives what ``_eliminate_marginals`` replays.
    """
    last = lengths - 1
    log_z = root.new_zeros(root.shape[0])
    for k in range(int(lengths.max())):
        column, row = weights[:, 1:, 0], weights[:, 0, 1:]
        log_root = root[:, 0]
        # -inf never enters logaddexp: its second derivative would be NaN
        total = column.sum(-1)
        has_column = total > 0
        log_column = torch.where(has_column, total, 1.0).log() + scale[:, k]
        with_root = torch.where(multiroot, _log_add(log_column, log_root), log_column)
        without_column = torch.where(multiroot, log_root, -torch.inf)
        log_pivot = torch.where(has_column, with_root, without_column)
        counted = torch.where(multiroot, k < lengths, k < last)
        log_z = log_z + torch.where(counted, log_pivot, 0.0)
        log_z = log_z + torch.where(~multiroot & (k == last), log_root, 0.0)
        # an empty pivot (padding, or a single root's last word) divides nothing real
        log_pivot = torch.where(torch.isfinite(log_pivot), log_pivot, scale[:, k])
        share = column * (scale[:, k] - log_pivot).exp().unsqueeze(-1)
        reachable = row > 0
        through_k = (
            (log_root - log_pivot).unsqueeze(-1)
            + torch.where(reachable, row, 1.0).log()
            + scale[:, k + 1 :]
        )
        new_root = torch.where(reachable, _log_add(root[:, 1:], through_k), root[:, 1:])
        if tape is not None:
            tape.append((column, row, log_root, log_pivot, root[:, 1:], new_root))
        if tape is None:
            weights = weights[:, 1:, 1:] + share.unsqueeze(-1) * row.unsqueeze(-2)
        else:
            # the replay reads eliminated rows and columns, which later steps never touch
            weights = weights[:, 1:, 1:].addcmul_(share.unsqueeze(-1), row.unsqueeze(-2))
        root = new_root
    return log_z


def _eliminate_marginals(
    arc_scores: torch.Tensor, lengths: torch.Tensor, multiroot: torch.Tensor
) -> torch.Tensor:
    """Arc marginals ``(B, N, N)`` (float64, no graph) by ``_eliminate`` and its reverse pass.

    The reverse pass is written out so that it needs only the eliminated rows and columns
    (``O(N^2)`` memory, where autograd would keep every intermediate matrix, ``O(N^3)``).
    Adjoints of word weights pass unchanged through the updates that do not consume them;
    adjoints of the log root weights are carried as ``d log Z / d log r``.
    """
    size = arc_scores.shape[-1]
    with torch.no_grad():
        weights, root, scale = _elimination_weights(arc_scores, lengths, multiroot)
        tape: list = []
        _eliminate(weights.clone(), root, scale, lengths, multiroot, tape)
        last = lengths - 1
        adjoint = torch.zeros_like(weights)
        root_adjoint = torch.zeros_like(root)
        for k in range(len(tape) - 1, -1, -1):
            column, row, log_root, log_pivot, root_before, root_after = tape[k]
            counted = torch.where(multiroot, k < lengths, k < last)
            share_scale = (scale[:, k] - log_pivot).exp()
            share = column * share_scale.unsqueeze(-1)
            later = root_adjoint[:, k + 1 :].clone()
            # r'[d] = logaddexp(r[d], through_k[d]): the two arguments' shares of r'[d]
            kept = (root_before - root_after).exp().nan_to_num(1.0)
            per_row_weight = (
                ((log_root - log_pivot).unsqueeze(-1) + scale[:, k + 1 :] - root_after)
                .exp()
                .nan_to_num(0.0)
            )
            through = per_row_weight * row * later
            root_adjoint[:, k + 1 :] = kept * later
            block = adjoint[:, k + 1 :, k + 1 :]
            adjoint[:, k, k + 1 :] = (share.unsqueeze(-2) @ block).squeeze(
                -2
            ) + per_row_weight * later
            share_adjoint = (block @ row.unsqueeze(-1)).squeeze(-1)
            pivot_adjoint = (
                counted.to(scale.dtype) - through.sum(-1) - (share_adjoint * share).sum(-1)
            )
            adjoint[:, k + 1 :, k] = (
                share_adjoint + pivot_adjoint.unsqueeze(-1)
            ) * share_scale.unsqueeze(-1)
            root_share = torch.where(multiroot, (log_root - log_pivot).exp(), 0.0)
            root_adjoint[:, k] = (
                through.sum(-1)
                + pivot_adjoint * root_share
                + (~multiroot & (k == last)).to(scale.dtype)
            )
        marginals = weights * adjoint
        words = _word_mask(lengths, size)
        marginals = marginals + torch.diag_embed(root_adjoint * words)
    return marginals


def _elimination_log_partition(
    arc_scores: torch.Tensor, lengths: torch.Tensor, multiroot: torch.Tensor
) -> torch.Tensor:
    """Differentiable log Z ``(B,)`` by ``_eliminate`` (autograd keeps ``O(N^3)``).

    Beyond ~700 nats of spread per dependent, weights reach the float64 floor and a second
    derivative (training through the marginals) can meet ``1 / x**2`` overflow; such entries
    contribute nothing rather than NaN, consistent with the floor applied to the weights.
    """
    weights, root, scale = _elimination_weights(arc_scores, lengths, multiroot)
    for tensor in (weights, root):
        if tensor.requires_grad:
            tensor.register_hook(_finite_gradient)
    return _eliminate(weights, root, scale, lengths, multiroot)


def _finite_gradient(grad: torch.Tensor | None) -> torch.Tensor | None:
    if grad is None:  # no gradient flows here in this backward pass
        return None
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


# ------------------------------------------------------------------ the dispatching layer
def _as_flags(multiroot: bool | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(multiroot, torch.Tensor):
        return multiroot
    return torch.full((batch,), bool(multiroot), dtype=torch.bool, device=device)


def _groups(multiroot: torch.Tensor):
    """``(flag, indices)`` for each root mode present in a batch (``indices`` is a full slice
    when the batch has one mode, so that nothing is copied)."""
    if multiroot.numel() and bool((multiroot == multiroot[0]).all()):
        yield bool(multiroot[0]), slice(None)
        return
    for flag in (False, True):
        indices = (multiroot == flag).nonzero().squeeze(-1)
        if indices.numel():
            yield flag, indices


def _matrix_tree_log_partition_no_grad(
    arc_scores: torch.Tensor,
    lengths: torch.Tensor,
    multiroot: torch.Tensor,
    inverses: list | None = None,
) -> torch.Tensor:
    """log Z ``(B,)`` in float64: pivoted LU where it is well conditioned, else elimination.

    ``inverses`` (a list) receives each root mode's ``(A^{-T}, well conditioned)``, which
    ``_matrix_tree_marginals_no_grad`` can reuse for the gradient.
    """
    scores = arc_scores.detach().double()
    log_z = scores.new_empty(scores.shape[0])
    for flag, indices in _groups(multiroot):
        part, part_lengths = scores[indices], lengths[indices]
        matrix, _, _, offset = _kirchhoff(part, part_lengths, flag)
        factors, pivots, info = torch.linalg.lu_factor_ex(matrix)
        if inverses is None:
            good = _well_conditioned_lu(matrix, factors, pivots, info)
        else:
            eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
            inverse = torch.linalg.lu_solve(factors, pivots, eye.expand_as(matrix))
            good = _well_conditioned(matrix, inverse, info)
            inverses.append((inverse.mT, good))
        values = torch.diagonal(factors, dim1=-2, dim2=-1).abs().log().sum(-1) + offset
        bad = (~good).nonzero().squeeze(-1)
        if bad.numel():
            values[bad] = _elimination_log_partition(
                part[bad], part_lengths[bad], multiroot[indices][bad]
            )
        log_z[indices] = values
    return log_z


def _laplacian_no_grad(
    arc_scores: torch.Tensor, lengths: torch.Tensor, multiroot: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_kirchhoff``'s matrix, arc and root weights in float64, built in place (no graph)."""
    size = arc_scores.shape[-1]
    words, scores = None, arc_scores
    if bool((lengths < size).any()):
        words = _word_mask(lengths, size)
        scores = arc_scores.masked_fill(~(words.unsqueeze(-1) & words.unsqueeze(-2)), -torch.inf)
    shift = scores.amax(-2, keepdim=True)
    shift.masked_fill_(~torch.isfinite(shift), 0.0)
    return _shifted_laplacian(scores, shift, words, multiroot, torch.float64)


def _matrix_tree_marginals_no_grad(
    arc_scores: torch.Tensor,
    lengths: torch.Tensor,
    multiroot: torch.Tensor,
    inverses: list | None = None,
) -> torch.Tensor:
    """Marginals ``(B, N, N)`` in float64 without a graph: the closed form where the matrix is
    well conditioned (LU), the subtraction-free elimination elsewhere. ``inverses``: what
    ``_matrix_tree_log_partition_no_grad`` stored for the same arguments, if anything."""
    scores = arc_scores.detach().double()
    marginals = torch.empty_like(scores)
    for group, (flag, indices) in enumerate(_groups(multiroot)):
        part, part_lengths = scores[indices], lengths[indices]
        matrix, arcs, root = _laplacian_no_grad(part, part_lengths, flag)
        if inverses:
            inverse_t, good = inverses[group]
        else:
            inverse_t, info = torch.linalg.inv_ex(matrix.mT)
            good = _well_conditioned(matrix, inverse_t, info)
        values = _marginals_from_inverse(inverse_t, arcs, root, flag)
        bad = (~good).nonzero().squeeze(-1)
        if bad.numel():
            values[bad] = _eliminate_marginals(
                part[bad], part_lengths[bad], multiroot[indices][bad]
            )
        marginals[indices] = values
    return marginals


def _matrix_tree_marginals_with_grad(
    arc_scores: torch.Tensor, lengths: torch.Tensor, multiroot: torch.Tensor
) -> torch.Tensor:
    """Differentiable marginals ``(B, N, N)`` in float64 (a loss on them trains the scores)."""
    scores = arc_scores.double()
    marginals = None
    for flag, indices in _groups(multiroot):
        part, part_lengths = scores[indices], lengths[indices]
        matrix, arcs, root, _ = _kirchhoff(part, part_lengths, flag)
        inverse_t, info = torch.linalg.inv_ex(matrix.mT)
        good = _well_conditioned(matrix, inverse_t, info)
        if not bool(good.all()):
            # identity in place of the ill-conditioned matrices, so that their (replaced)
            # entries send no NaN back through the inverse
            eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
            safe = torch.where(good.view(-1, 1, 1), matrix, eye)
            inverse_t = torch.linalg.inv_ex(safe.mT)[0]
        values = _marginals_from_inverse(inverse_t, arcs, root, flag)
        bad = (~good).nonzero().squeeze(-1)
        if bad.numel():
            with torch.enable_grad():
                leaf = part[bad]
                if not leaf.requires_grad:
                    leaf = leaf.detach().requires_grad_(True)
                log_z = _elimination_log_partition(leaf, part_lengths[bad], multiroot[indices][bad])
                (grad,) = torch.autograd.grad(log_z.sum(), leaf, create_graph=True)
            values = values.index_put((bad,), grad)
        if isinstance(indices, slice):
            return values
        if marginals is None:
            marginals = torch.zeros_like(scores)
        marginals = marginals.index_put((indices,), values)
    return marginals


class _MatrixTreeLogPartition(torch.autograd.Function):
    """log Z with the marginals as its gradient (differentiable again under ``create_graph``)."""

    @staticmethod
    def forward(ctx, arc_scores, lengths, multiroot):
        ctx.save_for_backward(arc_scores, lengths, multiroot)
        # the inverse that checked the conditioning also gives the gradient
        ctx.inverses = [] if ctx.needs_input_grad[0] else None
        log_z = _matrix_tree_log_partition_no_grad(arc_scores, lengths, multiroot, ctx.inverses)
        return log_z.to(arc_scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        arc_scores, lengths, multiroot = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the marginals must be differentiable
            marginals = _matrix_tree_marginals_with_grad(arc_scores, lengths, multiroot)
        else:
            marginals = _matrix_tree_marginals_no_grad(
                arc_scores, lengths, multiroot, ctx.inverses
            ).clamp_(0.0, 1.0)
        return grad.view(-1, 1, 1) * marginals.to(grad.dtype), None, None


def _matrix_tree_log_partition(
    arc_scores: torch.Tensor, lengths: torch.Tensor, multiroot: bool | torch.Tensor
) -> torch.Tensor:
    """log Z ``(B,)`` in the dtype of ``arc_scores``, computed in float64."""
    flags = _as_flags(multiroot, arc_scores.shape[0], arc_scores.device)
    return _MatrixTreeLogPartition.apply(arc_scores, lengths, flags)


#: from this many words on, float32 marginals try the blocked float32 inverse (matrix
#: products), which beats LAPACK's batched small inverses; below it LAPACK in float64 is faster
_BLOCKED_INVERSE_WORDS = 72

#: blocks at most this wide are inverted by LAPACK inside the Schur-complement recursion
_BLOCKED_INVERSE_LEAF = 32

#: float32 is only tried when no dependent's scores spread (best minus worst) wider than this,
#: where the condition estimate below refused about half the tries (Gaussian scores, 80 and
#: 128 words); beyond it a try mostly adds time. The multiroot matrix degrades sooner: its
#: columns beat their off-diagonal sums by the root weights alone. Speed only, not accuracy
_FLOAT32_TRY_SPREAD = 60.0
_FLOAT32_TRY_SPREAD_MULTIROOT = 10.0

#: the float32 inverse is kept when float32's machine epsilon times the condition estimate
#: ``||A||_1 ||A^{-1}||_inf`` (from the computed inverse) stays under this. Measured against
#: float64, the marginals it lets through stay within 5e-5, also when cycles of best heads
#: make the matrix nearly singular; the scale-100 matrices fail it and go to float64
_FLOAT32_CONDITION = 5e-4


def _shifted_laplacian(
    scores: torch.Tensor,
    shift: torch.Tensor,
    words: torch.Tensor | None,
    multiroot: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_kirchhoff``'s matrix built in place on a private copy in ``dtype``, with few passes.

    ``scores`` has ``-inf`` on arcs of padding and ``words`` marks real words (``None`` when
    there is no padding). Returns ``(matrix, arc weights zero on the diagonal, root weights)``.
    """
    arcs = scores.to(dtype, copy=True).sub_(shift).exp_()
    root = torch.diagonal(arcs, dim1=-2, dim2=-1).clone()
    torch.diagonal(arcs, dim1=-2, dim2=-1).zero_()
    diagonal_terms = arcs.sum(-2)
    if multiroot:
        diagonal_terms.add_(root)
    if words is not None:
        diagonal_terms.add_(~words)
    matrix = arcs.neg()
    torch.diagonal(matrix, dim1=-2, dim2=-1).add_(diagonal_terms)
    if not multiroot:
        matrix[..., 0, :] = root  # Koo et al.: the first row holds the root weights
    return matrix, arcs, root


def _dominant_inverse(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse ``(B, n, n)`` of a diagonally dominant matrix by recursive Schur complements.

    Leading blocks and Schur complements of a strictly diagonally dominant matrix stay
    strictly dominant, so no block needs pivoting and the work is matrix products. A block
    that rounding made singular poisons the result with NaN rather than raising.
    """
    size = matrix.shape[-1]
    if size <= _BLOCKED_INVERSE_LEAF:
        inverse, info = torch.linalg.inv_ex(matrix.double())  # LAPACK is faster in float64
        return inverse.masked_fill_(info.ne(0).view(-1, 1, 1), torch.nan).to(matrix.dtype)
    half = size // 2
    lead, upper = matrix[..., :half, :half], matrix[..., :half, half:]
    lower, trail = matrix[..., half:, :half], matrix[..., half:, half:]
    lead_inverse = _dominant_inverse(lead)
    right = lead_inverse @ upper
    below = lower @ lead_inverse
    schur_inverse = _dominant_inverse(trail - lower @ right)
    upper_inverse = (right @ schur_inverse).neg_()
    inverse = matrix.new_empty(matrix.shape)
    inverse[..., :half, :half] = lead_inverse.sub_(upper_inverse @ below)
    inverse[..., :half, half:] = upper_inverse
    inverse[..., half:, :half] = (schur_inverse @ below).neg_()
    inverse[..., half:, half:] = schur_inverse
    return inverse


def _bordered_inverse(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse ``(B, n, n)`` of a matrix whose block without row and column 0 is dominant.

    That block is inverted by ``_dominant_inverse`` and row and column 0 are added by their
    scalar Schur complement (Koo et al.'s root row only breaks the dominance of row 0).
    """
    corner, top = matrix[..., :1, :1], matrix[..., :1, 1:]
    left, rest = matrix[..., 1:, :1], matrix[..., 1:, 1:]
    rest_inverse = _dominant_inverse(rest)
    left_part = rest_inverse @ left
    corner_inverse = torch.reciprocal(corner - top @ left_part)
    top_part = (top @ rest_inverse).mul_(corner_inverse)
    inverse = matrix.new_empty(matrix.shape)
    inverse[..., :1, :1] = corner_inverse
    inverse[..., :1, 1:] = top_part.neg()
    inverse[..., 1:, 1:] = rest_inverse.addcmul_(left_part, top_part)
    inverse[..., 1:, :1] = left_part.mul_(corner_inverse).neg_()
    return inverse


def _float32_inverse_t(matrix: torch.Tensor, multiroot: bool) -> torch.Tensor | None:
    """``A^{-T}`` of a float32 matrix-tree matrix by the blocked inverse, or ``None`` when the
    condition estimate says float32 cannot be trusted (then the caller redoes it in float64).

    Each diagonal entry of the multiroot matrix exceeds the rest of its column by the root
    weight; the single-root matrix does so only without its root row and column 0 (by the
    weights of word 0's arcs), hence the two blocked inverses.
    """
    inverse_t = (_dominant_inverse if multiroot else _bordered_inverse)(matrix.mT)
    condition = matrix.abs().sum(-2).amax(-1) * inverse_t.abs().sum(-2).amax(-1)
    if bool(condition.max() * torch.finfo(torch.float32).eps <= _FLOAT32_CONDITION):
        return inverse_t
    return None


def _matrix_tree_marginals(
    arc_scores: torch.Tensor, lengths: torch.Tensor, multiroot: bool | torch.Tensor
) -> torch.Tensor:
    """Arc marginals ``(B, N, N)`` without a graph, in the dtype of ``arc_scores``.

    Long float32 sentences whose matrix is well enough conditioned for float32 take the
    blocked float32 inverse (``_float32_inverse_t``); everything else runs in float64
    (``_matrix_tree_marginals_no_grad``).
    """
    size = arc_scores.shape[-1]
    flags = _as_flags(multiroot, arc_scores.shape[0], arc_scores.device)
    uniform = flags.numel() > 0 and bool((flags == flags[0]).all())
    if arc_scores.dtype == torch.float32 and size >= _BLOCKED_INVERSE_WORDS and uniform:
        multiroot_flag = bool(flags[0])
        words, scores = None, arc_scores
        if bool((lengths < size).any()):
            words = _word_mask(lengths, size)
            valid = words.unsqueeze(-1) & words.unsqueeze(-2)
            scores = arc_scores.masked_fill(~valid, -torch.inf)
        shift = scores.amax(-2, keepdim=True)
        if words is not None:
            shift.masked_fill_(~words.unsqueeze(-2), 0.0)
        lowest = scores.masked_fill(scores == -torch.inf, torch.inf)
        spread = float((shift.squeeze(-2) - lowest.amin(-2)).max())
        limit = _FLOAT32_TRY_SPREAD_MULTIROOT if multiroot_flag else _FLOAT32_TRY_SPREAD
        if spread <= limit:
            matrix, arcs, root = _shifted_laplacian(
                scores, shift, words, multiroot_flag, torch.float32
            )
            inverse_t = _float32_inverse_t(matrix, multiroot_flag)
            if inverse_t is not None:
                marginals = _marginals_from_inverse(inverse_t, arcs, root, multiroot_flag)
                return marginals.clamp_(0.0, 1.0)
    marginals = _matrix_tree_marginals_no_grad(arc_scores, lengths, flags)
    # rounding leaves entries a few ulps outside [0, 1]
    return marginals.clamp_(0.0, 1.0).to(arc_scores.dtype)


def _find_cycle(heads: list[int]) -> list[int] | None:
    """A cycle of the functional graph ``d -> heads[d]`` over nodes ``1..``, or ``None``
    (node 0 is the root and ends every path)."""
    visited = [0] * len(heads)
    for start in range(1, len(heads)):
        path = []
        node = start
        while node != 0 and not visited[node]:
            visited[node] = start
            path.append(node)
            node = heads[node]
        if node != 0 and visited[node] == start:
            return path[path.index(node) :]
    return None


def _chu_liu_edmonds(scores: torch.Tensor) -> list[int]:
    """Maximum spanning arborescence of ``scores: (m, m)`` ``[head, dependent]`` rooted at
    node 0 (Chu & Liu 1965; Edmonds 1967); returns ``heads`` with ``heads[0] = 0``.

    Every node takes its best head; a cycle among them is contracted into one node whose
    incoming arcs are scored by what they gain over the cycle arc they replace, and the
    contracted problem is solved in turn (a loop, not recursion: sentences can be long).
    Each contraction is a few ``(m, m)`` tensor operations.
    """
    size = scores.shape[0]
    blocked = torch.eye(size, dtype=torch.bool)
    blocked[:, 0] = True
    current = scores.masked_fill(blocked, -torch.inf)
    contractions = []
    while True:
        heads = current.argmax(0).tolist()
        heads[0] = 0
        cycle = _find_cycle(heads)
        if cycle is None:
            break
        in_cycle = torch.zeros(current.shape[0], dtype=torch.bool)
        in_cycle[cycle] = True
        keep = (~in_cycle).nonzero().squeeze(-1)
        members = torch.tensor(cycle)
        cycle_heads = torch.tensor([heads[node] for node in cycle])
        gain = current[keep][:, members] - current[cycle_heads, members]
        entered = gain.argmax(1)
        leaving = current[members][:, keep].argmax(0)
        count = len(keep)
        contracted = current.new_full((count + 1, count + 1), -torch.inf)
        contracted[:count, :count] = current[keep][:, keep]
        contracted[:count, count] = gain.gather(1, entered.unsqueeze(1)).squeeze(1)
        contracted[count, :count] = current[members][:, keep].gather(0, leaving.unsqueeze(0))[0]
        contracted[:, 0] = -torch.inf
        contractions.append((keep.tolist(), cycle, cycle_heads.tolist(), entered, leaving))
        current = contracted
    for keep, cycle, cycle_heads, entered, leaving in reversed(contractions):
        count = len(keep)
        expanded = [0] * (count + len(cycle))
        for index, node in enumerate(keep):
            if index == 0:
                continue
            head = heads[index]
            expanded[node] = cycle[int(leaving[index])] if head == count else keep[head]
        for node, head in zip(cycle, cycle_heads, strict=True):
            expanded[node] = head
        outside = heads[count]
        expanded[cycle[int(entered[outside])]] = keep[outside]
        heads = expanded
    return heads


def _best_arborescence(arc_scores: torch.Tensor, length: int, multiroot: bool) -> list[int]:
    """The best tree of one sentence (float64 ``arc_scores``); ``heads[j] = j`` at root.

    For a single root every root arc is lowered by more than the spread of all tree scores, so
    the best arborescence uses exactly one root arc and is the best among those that do.
    """
    scores = arc_scores[:length, :length]
    penalty = 0.0
    if not multiroot:
        penalty = (length + 1) * (float(scores.max() - scores.min()) + 1.0)
    graph = scores.new_full((length + 1, length + 1), -torch.inf)
    graph[1:, 1:] = scores
    graph[0, 1:] = torch.diagonal(scores) - penalty
    heads = _chu_liu_edmonds(graph)
    return [dependent if head == 0 else head - 1 for dependent, head in enumerate(heads[1:])]


# ----------------------------------------------------------------------------- Eisner
def _eisner(semiring: type, arc_scores: torch.Tensor, lengths: torch.Tensor, multiroot: bool):
    """Eisner's O(N^3) inside algorithm over a semiring, vectorised over spans of one width.

    Position 0 is a virtual root and words are 1..N. Charts are stored twice, indexed by
    (start, width) and by (end, width), so that every split point of every span of one width
    is one slice: N sequential steps, each O(N^2) work.

    Returns ``(B,)``: log Z (log semiring) or the best tree score (max semiring).
    """
    batch, size = arc_scores.shape[0], arc_scores.shape[-1]
    n = size + 1
    eye = torch.eye(size, dtype=torch.bool, device=arc_scores.device)
    root = torch.diagonal(arc_scores, dim1=-2, dim2=-1)
    words = arc_scores.masked_fill(eye, 0.0)
    # scores[h, d] over positions 0..N; column 0 (arcs into the root) never reaches the result
    top = torch.cat([arc_scores.new_zeros(batch, 1), root], -1).unsqueeze(-2)
    body = torch.cat([arc_scores.new_zeros(batch, size, 1), words], -1)
    scores = torch.cat([top, body], -2)

    def chart() -> torch.Tensor:
        return arc_scores.new_zeros(batch, n, n)

    right_by_start, right_by_end = chart(), chart()
    left_by_start, left_by_end = chart(), chart()
    arc_right_by_start, arc_left_by_end = chart(), chart()
    for width in range(1, n):
        count = n - width
        split = semiring.sum(
            right_by_start[:, :count, :width] + left_by_end[:, width:, :width].flip(-1), -1
        )
        arc_right = split + torch.diagonal(scores, offset=width, dim1=-2, dim2=-1)
        arc_left = split + torch.diagonal(scores, offset=-width, dim1=-2, dim2=-1)
        arc_right_by_start[:, :count, width] = arc_right
        arc_left_by_end[:, width:, width] = arc_left
        right = semiring.sum(
            arc_right_by_start[:, :count, 1 : width + 1] + right_by_end[:, width:, :width].flip(-1),
            -1,
        )
        left = semiring.sum(
            left_by_start[:, :count, :width] + arc_left_by_end[:, width:, 1 : width + 1].flip(-1),
            -1,
        )
        right_by_start[:, :count, width] = right
        right_by_end[:, width:, width] = right
        left_by_start[:, :count, width] = left
        left_by_end[:, width:, width] = left
    if multiroot:
        return right_by_start[:, 0].gather(-1, lengths.unsqueeze(-1)).squeeze(-1)
    # exactly one child of the root: sum over it, d, of root[d] + C_left[1, d] + C_right[d, L]
    positions = torch.arange(1, n, device=lengths.device)
    width_right = (lengths.unsqueeze(-1) - positions).clamp(min=0)
    right = right_by_start[:, 1:].gather(-1, width_right.unsqueeze(-1)).squeeze(-1)
    left = left_by_start[:, 1, : n - 1]
    total = root + left + right
    total = total.masked_fill(positions > lengths.unsqueeze(-1), float("-inf"))
    return semiring.sum(total, -1)


# ------------------------------------------------------------------------- shared base
class _DependencyCRF(StructuredDistribution):
    """Shared surface of the dependency CRFs: shapes, lengths, values, sampling."""

    arg_constraints = {"arc_scores": constraints.real}
    potential_event_dims = 2

    @classmethod
    def infer_shapes(cls, arc_scores, **kwargs):
        """``(batch_shape, event_shape)`` for arc scores ``(..., N, N)``: ``(...)``, ``(N,)``."""
        shape = torch.Size(arc_scores)
        return shape[:-2], shape[-1:]

    def __init__(
        self,
        arc_scores: torch.Tensor,
        lengths: torch.Tensor | None = None,
        multiroot: bool = False,
        validate_args: bool | None = None,
    ) -> None:
        validate = resolve_validation(validate_args)
        check_potentials(arc_scores, "arc_scores", 2, validate)
        size = arc_scores.shape[-1]
        if arc_scores.shape[-2] != size or size == 0:
            raise ValueError(
                "arc_scores must have shape (*batch, N, N) with N >= 1 "
                f"([b, head, dependent], root scores on the diagonal), got "
                f"{tuple(arc_scores.shape)}"
            )
        if not isinstance(multiroot, bool):  # bool("no") is True: take no truthy stand-ins
            raise ValueError(f"multiroot must be True or False, got {multiroot!r}")
        self.multiroot = multiroot
        self.num_words = size
        batch_shape = arc_scores.shape[:-2]
        lengths = check_lengths(lengths, batch_shape, size, validate, device=arc_scores.device)
        super().__init__(arc_scores, lengths, torch.Size((size,)), validate_args=validate_args)

    @property
    def arc_scores(self) -> torch.Tensor:
        """``(*batch, N, N)`` arc scores, ``[..., head, dependent]``, root on the diagonal."""
        return self.potentials

    @property
    def attention(self) -> torch.Tensor:
        """Syntactic attention ``(*batch, dependent, head)``: each word's marginal distribution
        over its head (the root on the diagonal); rows of real words sum to one."""
        return self.marginals.transpose(-1, -2)

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.integer_interval(0, self.num_words - 1), 1)

    # ------------------------------------------------------- values: support, broadcasting
    projective = False

    def _flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        # the base class folds an empty batch into one structure; keep it empty
        dtype = computation_dtype(self.potentials.dtype)
        batch = self.batch_shape.numel()
        potentials = self.potentials.to(dtype).reshape((batch,) + self.potentials.shape[-2:])
        return potentials, self.lengths.reshape(batch)

    def _broadcast_to_value(self, value: torch.Tensor) -> _DependencyCRF:
        """``self`` expanded over the size-1 batch dims that ``value`` enlarges (as
        ``Categorical.log_prob`` broadcasts), or ``self`` when there are none."""
        event_dims = 2 if value.is_floating_point() else 1
        value_batch = value.shape[: max(0, value.dim() - event_dims)]
        try:
            full = torch.broadcast_shapes(value_batch, self.batch_shape)
        except RuntimeError:
            return self  # ``score`` names the mismatch
        batch_shape = full[len(full) - len(self.batch_shape) :]
        return self if batch_shape == self.batch_shape else self.expand(batch_shape)

    def is_tree(self, value: torch.Tensor) -> torch.Tensor:
        """Whether each head vector ``value: (..., N)`` (broadcasting against the batch) is a
        structure of this distribution: heads of real words in ``[0, length)``, no cycle,
        one root unless ``multiroot``, no crossing arcs for the projective CRF. Padded
        positions are ignored. Returns a bool tensor of ``value``'s shape without the event."""
        size = self.num_words
        if value.dim() == 0 or value.shape[-1] != size:
            raise ValueError(f"value must end in the {size} words, got shape {tuple(value.shape)}")
        lengths = self.lengths
        try:
            shape = torch.broadcast_shapes(value.shape[:-1], lengths.shape)
        except RuntimeError as err:
            raise ValueError(
                f"value of shape {tuple(value.shape)} does not broadcast to batch shape "
                f"{tuple(self.batch_shape)}"
            ) from err
        heads = value.long().expand(shape + (size,))
        lengths = lengths.expand(shape).unsqueeze(-1)
        positions = torch.arange(size, device=heads.device)
        real = positions < lengths
        in_range = (heads >= 0) & (heads < lengths)
        ok = (in_range | ~real).all(-1)
        # padding and out-of-range heads point at themselves, so that the walk below stays put
        parent = torch.where(real & in_range, heads, positions)
        roots = (parent == positions) & real
        count = roots.sum(-1)
        ok &= (count >= 1) if self.multiroot else (count == 1)
        # pointer doubling: after 2^t >= N steps every word of a tree has reached its root
        ancestor = parent
        for _ in range(max(1, (size - 1).bit_length())):
            ancestor = ancestor.gather(-1, ancestor)
        ok &= (parent.gather(-1, ancestor) == ancestor).all(-1)
        if self.projective:
            # arcs as spans, the root left of every word; two spans cross when exactly one
            # endpoint of one lies strictly inside the other
            head_position = torch.where(parent == positions, -1, parent)
            low = torch.minimum(head_position, positions).masked_fill(~real, -2)
            high = torch.maximum(head_position, positions).masked_fill(~real, -2)
            a_low, a_high = low.unsqueeze(-1), high.unsqueeze(-1)
            b_low, b_high = low.unsqueeze(-2), high.unsqueeze(-2)
            crossing = (a_low < b_low) & (b_low < a_high) & (a_high < b_high)
            ok &= ~crossing.flatten(-2).any(-1)
        return ok

    def score(self, value: torch.Tensor) -> torch.Tensor:
        """Unnormalized log score, broadcasting ``value`` against size-1 batch dims (see the
        base class); impossible structures are scored as if they were trees."""
        expanded = self._broadcast_to_value(value)
        if expanded is not self:
            return expanded.score(value)
        return super().score(value)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``log p(value)``, shape ``sample_shape + batch_shape``; ``-inf`` for a head vector
        that is not a tree of this distribution (a cycle, a second root without
        ``multiroot``, crossing arcs under the projective CRF, a head out of range). With
        validation on, such a value raises ``ValueError`` instead, as torch does outside
        the support."""
        expanded = self._broadcast_to_value(value)
        if expanded is not self:
            return expanded.log_prob(value)
        heads = self._parts_to_value(value) if value.is_floating_point() else value
        possible = self.is_tree(heads)
        if self._validate_args and not bool(possible.all()):
            raise ValueError(
                f"value must hold {'projective ' if self.projective else ''}dependency trees "
                f"({'one or more roots' if self.multiroot else 'exactly one root'}, no cycle, "
                f"heads in [0, length)); {int((~possible).sum())} of {possible.numel()} are not"
            )
        # is_tree is a stricter check than the base class's support (and works on empty values)
        heads = heads.clamp(0, self.num_words - 1)
        return (self.score(heads) - self.log_partition).masked_fill(~possible, -torch.inf)

    def _score_flat(self, value, potentials, lengths):
        num_samples = value.shape[0]
        arcs = potentials.unsqueeze(0).expand(num_samples, -1, -1, -1)
        chosen = arcs.gather(-2, value.unsqueeze(-2)).squeeze(-2)
        return (chosen * _word_mask(lengths, self.num_words)).sum(-1)

    def _parts_to_value(self, parts):
        if parts.shape[-2:] != self.potentials.shape[-2:]:
            raise ValueError(
                f"parts must end in {tuple(self.potentials.shape[-2:])}, got shape "
                f"{tuple(parts.shape)}"
            )
        return parts.argmax(-2)

    def to_parts(self, value: torch.Tensor) -> torch.Tensor:
        """One-hot arcs ``(..., N, N)`` ``[head, dependent]`` (torch-struct's form) of heads."""
        parts = torch.nn.functional.one_hot(value, self.num_words).transpose(-1, -2)
        mask = _word_mask(self.lengths, self.num_words).unsqueeze(-2)
        return parts.to(self.potentials.dtype) * mask

    def _sample_flat(self, potentials, lengths, num_samples):
        return _sample_heads_by_conditioning(potentials, lengths, num_samples, self._marginals_flat)


def _sample_heads_by_conditioning(
    arc_scores: torch.Tensor,
    lengths: torch.Tensor,
    num_samples: int,
    marginals: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Exact tree samples by the chain rule: draw each word's head from its marginal given the
    heads drawn so far, then forbid the other heads of that word.

    N marginal computations over ``num_samples * B`` sentences; returns ``(num_samples, B, N)``.
    """
    batch, size = arc_scores.shape[0], arc_scores.shape[-1]
    scores = arc_scores.repeat(num_samples, 1, 1)
    many_lengths = lengths.repeat(num_samples)
    forbidden = scores.detach().amin((-1, -2), keepdim=True) - _FORBIDDEN * (size + 1)
    heads = torch.zeros(num_samples * batch, size, dtype=torch.long, device=arc_scores.device)
    candidates = torch.arange(size, device=arc_scores.device)
    for dependent in range(size):
        active = dependent < many_lengths
        column = marginals(scores, many_lengths)[..., dependent].clamp(min=0.0)
        column = torch.where(active.unsqueeze(-1), column, (candidates == 0).to(column.dtype))
        chosen = torch.multinomial(column, 1).squeeze(-1)
        heads[:, dependent] = torch.where(active, chosen, 0)
        keep = (candidates == chosen.unsqueeze(-1)) | ~active.unsqueeze(-1)
        scores[..., dependent] = torch.where(keep, scores[..., dependent], forbidden[..., 0])
    return heads.view(num_samples, batch, size)


def _sample_non_projective(
    arc_scores: torch.Tensor, lengths: torch.Tensor, num_samples: int, multiroot: bool
) -> torch.Tensor:
    """Exact samples ``(num_samples, B, N)`` by the chain rule over dependents, as
    ``_sample_heads_by_conditioning``, with impossible arcs at ``-inf`` (the elimination
    gives them weight zero exactly).

    Once a single-root sentence has drawn its root word, the other root arcs are forbidden
    and the rest is a multiroot distribution with one possible root: that keeps every
    pivot of the single-root elimination nonzero.
    """
    batch, size = arc_scores.shape[0], arc_scores.shape[-1]
    scores = arc_scores.double().repeat(num_samples, 1, 1)
    many_lengths = lengths.repeat(num_samples)
    flags = torch.full((num_samples * batch,), bool(multiroot), device=arc_scores.device)
    heads = torch.zeros(num_samples * batch, size, dtype=torch.long, device=arc_scores.device)
    candidates = torch.arange(size, device=arc_scores.device)
    for dependent in range(int(lengths.max()) if lengths.numel() else 0):
        active = dependent < many_lengths
        column = _matrix_tree_marginals(scores, many_lengths, flags)[..., dependent]
        column = column.clamp(min=0.0).nan_to_num(0.0)
        column = torch.where(active.unsqueeze(-1), column, (candidates == 0).to(column.dtype))
        chosen = torch.multinomial(column, 1).squeeze(-1)
        heads[:, dependent] = torch.where(active, chosen, 0)
        keep = (candidates == chosen.unsqueeze(-1)) | ~active.unsqueeze(-1)
        scores[..., dependent] = scores[..., dependent].masked_fill(~keep, -torch.inf)
        rooted = active & (chosen == dependent) & ~flags
        if bool(rooted.any()):
            others = (candidates != dependent) & rooted.unsqueeze(-1)
            diagonal = torch.diagonal(scores, dim1=-2, dim2=-1)
            diagonal.masked_fill_(others, -torch.inf)
            flags = flags | rooted
    return heads.view(num_samples, batch, size)


# -------------------------------------------------------------------------- the two CRFs
class NonProjectiveDependencyCRF(_DependencyCRF):
    r"""Distribution over (possibly crossing) dependency trees, by the matrix-tree theorem.

    .. math::
        p(\text{heads}) = \frac{1}{Z} \exp \sum_{j < L} s_{\text{heads}_j, j}, \qquad
        Z = \det \hat{L}

    where ``\hat L`` is the (root-augmented) Laplacian of the arc weights (Koo et al. 2007,
    "Structured prediction models via the matrix-tree theorem"; Smith & Smith 2007).

    Every quantity is computed in float64 after a per-dependent shift of the scores. Where the
    shifted Laplacian is well conditioned (a condition estimate from its inverse), the pivoted
    LU gives log Z and the closed form ``A^{-T}`` the marginals; elsewhere (peaked scores: a
    cycle of best heads makes the matrix all but singular) a Gaussian elimination that never
    subtracts (``_eliminate``) gives both to full precision. log Z, marginals, samples and
    argmax are finite and accurate at any score scale while each dependent's scores spread
    less than 700 nats (and finite beyond); marginals lie in ``[0, 1]``, each dependent's sum
    to one.

    * ``log_partition``: differentiable, its gradient the marginals (twice differentiable).
    * ``marginals``: the syntactic attention ``(*batch, N, N)``, without autograd unless a
      graph is being recorded; float32 sentences of 72+ words use a float32 blocked inverse
      when a condition estimate allows it.
    * ``argmax``: Chu-Liu-Edmonds, ``sample``: exact, by sequential conditioning.

    Args:
        arc_scores: ``(*batch, N, N)``, ``[..., head, dependent]``, root scores on the diagonal.
        lengths: ``(*batch,)`` sentence lengths in ``[1, N]`` (default ``N``).
        multiroot: allow several words attached to the root (default: exactly one).
    """

    def _log_partition_flat(self, potentials, lengths):
        return _matrix_tree_log_partition(potentials, lengths, self.multiroot)

    def _marginals_flat(self, potentials, lengths):
        if torch.is_grad_enabled() and potentials.requires_grad:
            flags = _as_flags(self.multiroot, potentials.shape[0], potentials.device)
            marginals = _matrix_tree_marginals_with_grad(potentials, lengths, flags)
            return marginals.clamp(0.0, 1.0).to(potentials.dtype)
        return _matrix_tree_marginals(potentials, lengths, self.multiroot)

    def _sample_flat(self, potentials, lengths, num_samples):
        return _sample_non_projective(potentials, lengths, num_samples, self.multiroot)

    def _argmax_flat(self, potentials, lengths):
        heads = torch.zeros(potentials.shape[:2], dtype=torch.long)
        scores = potentials.double().cpu()
        for index, length in enumerate(lengths.tolist()):
            heads[index, :length] = torch.tensor(
                _best_arborescence(scores[index], length, self.multiroot)
            )
        return heads.to(potentials.device)


class ProjectiveDependencyCRF(_DependencyCRF):
    r"""Distribution over projective (non-crossing) dependency trees, by Eisner's algorithm.

    .. math::
        p(\text{heads}) = \frac{1}{Z} \exp \sum_{j < L} s_{\text{heads}_j, j}

    over trees whose arcs do not cross (Eisner 1996). ``log_partition`` is the inside
    algorithm in the log semiring; ``marginals`` (the syntactic attention of Kim et al. 2017)
    are its gradient (inside-outside as backprop), ``argmax`` the gradient of the same program
    in the max semiring, ``sample`` exact by sequential conditioning.

    Args:
        arc_scores: ``(*batch, N, N)``, ``[..., head, dependent]``, root scores on the diagonal.
        lengths: ``(*batch,)`` sentence lengths in ``[1, N]`` (default ``N``).
        multiroot: allow several words attached to the root (default: exactly one; torch-struct
            defaults to several).
    """

    projective = True

    def _log_partition_flat(self, potentials, lengths):
        # float64 inside: at scale 100 float32 inside-outside left marginals 0.0045 above one
        log_z = _eisner(LogSemiring, potentials.double(), lengths, self.multiroot)
        return log_z.to(potentials.dtype)

    def _marginals_flat(self, potentials, lengths):
        # inside-outside by autograd rounds a few ulps past [0, 1]
        return super()._marginals_flat(potentials, lengths).clamp(0.0, 1.0)

    def _argmax_flat(self, potentials, lengths):
        best = gradient_of_log_partition(
            lambda scores: _eisner(MaxSemiring, scores, lengths, self.multiroot), potentials
        )
        heads = best.argmax(-2)
        return heads * _word_mask(lengths, self.num_words)
