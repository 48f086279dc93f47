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

import networkx as nx
import torch
from torch.distributions import constraints

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
def _kirchhoff(
    arc_scores: torch.Tensor, lengths: torch.Tensor, multiroot: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The matrix whose determinant counts the trees (Koo et al. 2007, Tutte 1984).

    Every column (dependent) is shifted by its largest score before ``exp``: each word has
    exactly one head, so the shift moves ``log Z`` by the sum of the column shifts and nothing
    else, and no weight can overflow. Padded words get an identity row and column.

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
    if padded:
        shift = shift.masked_fill(~words, 0.0)
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


def _matrix_tree_log_partition(
    arc_scores: torch.Tensor, lengths: torch.Tensor, multiroot: bool
) -> torch.Tensor:
    """log Z ``(B,)``. The determinant is taken in float64 whatever the input: when the best
    head of every word closes a cycle, the shifted Laplacian is nearly singular (log det of
    -70 at scale 100) and float32 elimination loses tens of nats; float64 keeps ~1e-5."""
    matrix, _, _, offset = _kirchhoff(arc_scores.double(), lengths, multiroot)
    return (torch.linalg.slogdet(matrix).logabsdet + offset).to(arc_scores.dtype)


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
    arc_scores: torch.Tensor, lengths: torch.Tensor, multiroot: bool
) -> torch.Tensor:
    """Closed-form arc marginals ``(B, N, N)``: ``d log det / d A = A^{-T}``.

    In float64 (this path never records a graph), except for long float32 sentences whose
    matrix is well enough conditioned for float32 (``_float32_inverse_t``): at scale 100 an
    arc weight below float32's range can carry a marginal of one (the only way to close a
    tree), and float32 elimination of the nearly singular matrix loses everything.
    """
    size = arc_scores.shape[-1]
    words, scores = None, arc_scores
    if bool((lengths < size).any()):
        words = _word_mask(lengths, size)
        scores = arc_scores.masked_fill(~(words.unsqueeze(-1) & words.unsqueeze(-2)), -torch.inf)
    shift = scores.amax(-2, keepdim=True)
    if words is not None:
        shift.masked_fill_(~words.unsqueeze(-2), 0.0)
    inverse_t = None
    if arc_scores.dtype == torch.float32 and size >= _BLOCKED_INVERSE_WORDS:
        lowest = (
            arc_scores if words is None else scores.masked_fill(scores == -torch.inf, torch.inf)
        )
        spread = float((shift.squeeze(-2) - lowest.amin(-2)).max())
        if spread <= (_FLOAT32_TRY_SPREAD_MULTIROOT if multiroot else _FLOAT32_TRY_SPREAD):
            matrix, arcs, root = _shifted_laplacian(scores, shift, words, multiroot, torch.float32)
            inverse_t = _float32_inverse_t(matrix, multiroot)
    if inverse_t is None:
        matrix, arcs, root = _shifted_laplacian(scores, shift, words, multiroot, torch.float64)
        # the inverse of the transpose is A^{-T}, the gradient of log det
        inverse_t = torch.linalg.inv(matrix.mT)
    diagonal = torch.diagonal(inverse_t, dim1=-2, dim2=-1)
    if multiroot:
        # arc h -> d adds w to A[d, d] and -w to A[h, d]; root arc adds r to A[d, d]
        marginals = diagonal.unsqueeze(-2) - inverse_t
        root_marginals = root * diagonal
    else:
        # row 0 holds the root weights, so arcs into or out of word 0 lose that term
        from_dependent = diagonal.clone()
        from_dependent[..., 0] = 0.0
        marginals = from_dependent.unsqueeze(-2) - inverse_t
        marginals[..., 0, :] = from_dependent
        root_marginals = root * inverse_t[..., 0, :]
    marginals.mul_(arcs)
    # arcs is zero on the diagonal, so the root marginals go there
    torch.diagonal(marginals, dim1=-2, dim2=-1).copy_(root_marginals)
    return marginals.to(arc_scores.dtype)


def _best_arborescence(arc_scores: torch.Tensor, length: int, multiroot: bool) -> list[int]:
    """Chu-Liu-Edmonds (networkx) on one sentence; returns heads with ``heads[j] = j`` at root.

    For a single root every root arc is lowered by more than the spread of all tree scores, so
    the best arborescence uses exactly one root arc and is the best among those that do.
    """
    scores = arc_scores[:length, :length].tolist()
    penalty = 0.0
    if not multiroot:
        spread = float(arc_scores[:length, :length].max() - arc_scores[:length, :length].min())
        penalty = (length + 1) * (spread + 1.0)
    graph = nx.DiGraph()
    for dependent in range(length):
        graph.add_edge(0, dependent + 1, weight=scores[dependent][dependent] - penalty)
        for head in range(length):
            if head != dependent:
                graph.add_edge(head + 1, dependent + 1, weight=scores[head][dependent])
    tree = nx.maximum_spanning_arborescence(graph, attr="weight", preserve_attrs=False)
    heads = list(range(length))
    for head, dependent in tree.edges():
        heads[dependent - 1] = dependent - 1 if head == 0 else head - 1
    return heads


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
        self.multiroot = bool(multiroot)
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


# -------------------------------------------------------------------------- the two CRFs
class NonProjectiveDependencyCRF(_DependencyCRF):
    r"""Distribution over (possibly crossing) dependency trees, by the matrix-tree theorem.

    .. math::
        p(\text{heads}) = \frac{1}{Z} \exp \sum_{j < L} s_{\text{heads}_j, j}, \qquad
        Z = \det \hat{L}

    where ``\hat L`` is the (root-augmented) Laplacian of the arc weights (Koo et al. 2007,
    "Structured prediction models via the matrix-tree theorem"; Smith & Smith 2007).

    * ``log_partition``: ``slogdet`` after a per-dependent shift, computed in float64 (the
      shifted Laplacian is nearly singular for peaked scores), finite and accurate for float32
      scores of scale 100; no ``eps``.
    * ``marginals``: the syntactic attention ``(*batch, N, N)``, closed form from ``A^{-T}``
      (no autograd) unless a graph is being recorded: in float64, or for float32 sentences of
      72+ words in float32 by Schur complements when a condition estimate allows it.
    * ``argmax``: Chu-Liu-Edmonds (networkx), ``sample``: exact, by sequential conditioning.

    Args:
        arc_scores: ``(*batch, N, N)``, ``[..., head, dependent]``, root scores on the diagonal.
        lengths: ``(*batch,)`` sentence lengths in ``[1, N]`` (default ``N``).
        multiroot: allow several words attached to the root (default: exactly one).
    """

    def _log_partition_flat(self, potentials, lengths):
        return _matrix_tree_log_partition(potentials, lengths, self.multiroot)

    def _marginals_flat(self, potentials, lengths):
        if torch.is_grad_enabled() and potentials.requires_grad:
            return super()._marginals_flat(potentials, lengths)
        return _matrix_tree_marginals(potentials, lengths, self.multiroot)

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

    def _log_partition_flat(self, potentials, lengths):
        return _eisner(LogSemiring, potentials, lengths, self.multiroot)

    def _argmax_flat(self, potentials, lengths):
        best = gradient_of_log_partition(
            lambda scores: _eisner(MaxSemiring, scores, lengths, self.multiroot), potentials
        )
        heads = best.argmax(-2)
        return heads * _word_mask(lengths, self.num_words)
