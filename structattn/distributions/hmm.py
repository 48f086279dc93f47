"""The HMM word aligner's alignment chain: jump-width transitions and NULL states.

Target word ``t`` is generated from source position ``z_t``; the alignment moves from one
target word to the next by a jump ``z_t - z_{t-1}`` whose probability depends only on the jump
width, bucketed (Vogel, Ney & Tillmann 1996, "HMM-based word alignment in statistical
translation"), forward or backward. Och & Ney (2003, "A systematic comparison of various
statistical alignment models") add one NULL state per source position: entering NULL keeps the
position it left, so the jump after an unaligned word is measured from the last real one.

The alignment is a linear chain (:mod:`structattn.distributions.chain`): Viterbi, exact
samples, ``log_prob`` and entropy run the chain's dynamic program on its ``(T-1, C, C)``
potentials, built on first use.

``log_partition`` and the marginals, the training path, never build them
(:func:`scaled_forward`): the moves depend only on the jump width and the source length, so
one ``(S, S)`` matrix per sentence serves every step; the forward recursion runs in
probability space (a vector-matrix product per step, renormalized, the logs of the scales
summed); NULL states cost one product with the previous distribution instead of doubling the
matrix; the marginals are the gradient of ``log Z`` (autograd runs the backward recursion).
:func:`scaled_forward_is_exact` proves from the inputs that nothing can underflow; a sequence
it rejects in the emissions' dtype is run in float64, and one it rejects there goes through
the chain's log-space program, so no route is silently inexact.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

from structattn._backend import computation_dtype

from .chain import AlignmentChain, LinearChainCRF
from .structured import check_lengths, check_potentials, resolve_validation

__all__ = [
    "HMMAlignment",
    "check_jump_scores",
    "hmm_log_transitions",
    "jump_buckets",
    "move_log_probabilities",
    "scaled_forward",
    "scaled_forward_is_exact",
    "state_emissions",
]


def jump_buckets(num_sources: int, max_jump: int, device=None) -> torch.Tensor:
    """``(S + 1, S)`` int64 bucket of every jump ``[next, previous]``.

    Rows ``0 .. S-1`` are the next position ``i``; columns the previous position ``j``; the
    last row is the virtual start ``j = -1``, read as ``[S, i]``: the first word's jump from
    before the sentence. Bucket ``k`` holds the jump ``k - max_jump``; wider jumps share the
    two end buckets.
    """
    positions = torch.arange(num_sources, device=device)
    jumps = positions.unsqueeze(-1) - positions
    start = (positions + 1).unsqueeze(0)
    jumps = torch.cat([jumps, start], 0)
    return jumps.clamp(-max_jump, max_jump) + max_jump


def check_jump_scores(jump_scores: torch.Tensor, validate: bool) -> int:
    """Check ``(*batch, 2 * max_jump + 1)`` jump scores; returns the number of buckets."""
    check_potentials(jump_scores, "jump_scores", 1, validate)
    buckets = jump_scores.shape[-1]
    if buckets % 2 == 0:
        raise ValueError(
            f"jump_scores must end in 2 * max_jump + 1 buckets (odd), got {buckets}")
    return buckets


def _log_probability(value: float | torch.Tensor, like: torch.Tensor, name: str):
    """``(log p, log (1 - p))`` of a probability in ``(0, 1)`` as tensors like ``like``."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    # (Written as "inside" so that NaN, which compares False with everything, is refused.)
    if not bool(((value > 0) & (value < 1)).all()):
        raise ValueError(f"{name} must lie strictly between 0 and 1 (no NaN)")
    return value.log(), torch.log1p(-value)


def hmm_log_transitions(
    jump_scores: torch.Tensor,
    source_lengths: torch.Tensor,
    num_sources: int,
    null_probability: float | torch.Tensor | None,
    forbidden: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log start and transition probabilities of the HMM aligner (see :class:`HMMAlignment`).

    Args:
        jump_scores: ``(*batch, 2 * max_jump + 1)``.
        source_lengths: ``(*batch,)``.
        num_sources: ``S``.
        null_probability: ``p_0`` (float or ``(*batch,)``) or ``None`` for no NULL states.
        forbidden: the finite score given to impossible states and moves.

    Returns:
        ``start: (*batch, C)``, ``moves: (*batch, C, C)`` indexed ``[next, previous]``, and
        ``valid: (*batch, C)`` bool (states inside the source), ``C = S`` or ``2S`` with NULL.
        Every column of ``moves`` from a valid state is normalized over the next state.
    """
    max_jump = jump_scores.shape[-1] // 2
    buckets = jump_buckets(num_sources, max_jump, jump_scores.device)
    jumps = jump_scores[..., buckets.flatten()].reshape(jump_scores.shape[:-1] + buckets.shape)
    # [..., next, previous], the virtual start appended as the last previous column
    jumps = torch.cat([jumps[..., :num_sources, :], jumps[..., num_sources:, :].mT], -1)
    positions = torch.arange(num_sources, device=jump_scores.device)
    in_source = positions < source_lengths.unsqueeze(-1)
    jumps = jumps.masked_fill(~in_source.unsqueeze(-1), forbidden)
    log_moves = jumps - torch.logsumexp(jumps, -2, keepdim=True)
    log_moves = log_moves.masked_fill(~in_source.unsqueeze(-1), forbidden)
    moves, start = log_moves[..., :num_sources], log_moves[..., num_sources]
    if null_probability is None:
        return start, moves.masked_fill(~in_source.unsqueeze(-2), forbidden), in_source
    log_null, log_real = _log_probability(null_probability, jump_scores, "null_probability")
    batch_shape = jump_scores.shape[:-1]
    log_null = log_null.expand(batch_shape)[..., None, None]
    log_real = log_real.expand(batch_shape)[..., None, None]
    stay = torch.eye(num_sources, dtype=torch.bool, device=jump_scores.device)
    stay = stay & in_source.unsqueeze(-1)
    into_null = torch.where(stay, log_null, forbidden)
    real_rows = torch.cat([moves, moves], -1) + log_real
    moves = torch.cat([real_rows, torch.cat([into_null, into_null], -1)], -2)
    valid = torch.cat([in_source, in_source], -1)
    moves = moves.masked_fill(~(valid.unsqueeze(-1) & valid.unsqueeze(-2)), forbidden)
    start = torch.cat([start + log_real[..., 0], start + log_null[..., 0]], -1)
    return start.masked_fill(~valid, forbidden), moves, valid


def move_log_probabilities(
    jump_scores: torch.Tensor, source_lengths: torch.Tensor, num_sources: int
) -> torch.Tensor:
    """Log jump probabilities without NULL, ``(B, S + 1, S)`` ``[previous, next]``.

    ``jump_scores: (B or 1, J)``, ``source_lengths: (B,)``. Row ``S`` is the virtual start.
    Each row is a log-softmax over the next positions inside the source (``-inf`` outside);
    rows of previous positions outside the source are never used.
    """
    buckets = jump_buckets(num_sources, jump_scores.shape[-1] // 2, jump_scores.device)
    index = torch.cat([buckets[:num_sources].T, buckets[num_sources:]], 0)
    scores = jump_scores[:, index.flatten()].view(-1, num_sources + 1, num_sources)
    positions = torch.arange(num_sources, device=jump_scores.device)
    outside = positions >= source_lengths.unsqueeze(-1)
    return torch.log_softmax(scores.masked_fill(outside.unsqueeze(-2), -math.inf), -1)


def state_emissions(emissions: torch.Tensor, num_sources: int) -> torch.Tensor:
    """``(*batch, T, C)`` emission scores per chain state from ``(*batch, T, S[+1])``.

    With a NULL column (``S + 1`` columns) it is repeated for the ``S`` NULL states.
    """
    if emissions.shape[-1] == num_sources:
        return emissions
    null = emissions[..., num_sources:].expand(emissions.shape[:-1] + (num_sources,))
    return torch.cat([emissions[..., :num_sources], null], -1)


def _shifted(emissions: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Emissions past each target length set to zero (neutral steps), and their maximum per
    step ``(B, T, 1)``."""
    emissions = emissions.masked_fill(~steps.unsqueeze(-1), 0.0)
    return emissions, emissions.amax(-1, keepdim=True)


def scaled_forward(
    start: torch.Tensor,
    moves: torch.Tensor,
    emissions: torch.Tensor,
    target_lengths: torch.Tensor,
    null_probability: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log p(y | x)`` ``(B,)`` of the HMM aligner by a forward recursion in probability space.

    Every step is one vector-matrix product with the sentence's own ``(S, S)`` move matrix
    (the moves depend on the jump width only, so no ``(T, C, C)`` tensor exists); the
    emissions are shifted by their maximum per step and the forward vector is renormalized, so
    every value stays in ``[0, 1]``. A NULL state is entered from its position (or itself) with
    probability ``p_0`` whatever the previous state was, so NULL adds one elementwise product
    with the previous distribution over positions instead of doubling the matrix.
    Differentiable: the gradient with respect to ``emissions`` is the posterior of every
    state (autograd runs the backward recursion). Exact when
    :func:`scaled_forward_is_exact` says so.

    Args:
        start: ``(B, S)`` probabilities of the first position (zero outside the source).
        moves: ``(B, S, S)`` probabilities ``[previous, next]``, each row of a position inside
            the source summing to one over the next positions.
        emissions: ``(B, T, S + K)`` emission scores, ``-inf`` at positions outside the
            source: the ``S`` positions, then ``K = 0`` (no NULL), ``1`` (one NULL score
            shared by the NULL states) or ``S`` (one per NULL state) columns.
        target_lengths: ``(B,)`` in ``[1, T]``.
        null_probability: ``(B,)`` ``p_0`` (``None`` without NULL states).
    """
    num_targets, num_sources = emissions.shape[-2], moves.shape[-1]
    steps = torch.arange(num_targets, device=emissions.device) < target_lengths.unsqueeze(-1)
    # past its end a sequence takes neutral steps (weight one, the moves keep the mass), so its
    # normalizers are one and the recursion needs no per-sequence condition
    emissions, shift = _shifted(emissions, steps)
    weights = (emissions - shift).exp().unsqueeze(-2)  # (B, T, 1, S + K)
    # one view per step from a single unbind: one backward node, not T zero-filled copies
    real = weights[..., :num_sources].unbind(1)
    if null_probability is None:
        vector = start.unsqueeze(-2) * real[0]
        null = None
    else:
        p0 = null_probability.view(-1, 1, 1)
        null = (weights[..., num_sources:] * p0.unsqueeze(-1)).unbind(1)
        moves = moves * (1 - p0)
        vector = start.unsqueeze(-2) * ((1 - p0) * real[0] + null[0])
    scales = [vector.sum(-1)]
    vector = vector / scales[-1].unsqueeze(-1)
    for t in range(1, num_targets):
        moved = torch.bmm(vector, moves) * real[t]
        if null is not None:
            moved = moved + vector * null[t]
        scales.append(moved.sum(-1))
        vector = moved / scales[-1].unsqueeze(-1)
    log_scales = torch.cat(scales, -1).log() + shift.squeeze(-1)
    return torch.where(steps, log_scales, 0.0).sum(-1)


def scaled_forward_is_exact(
    log_moves: torch.Tensor,
    emissions: torch.Tensor,
    target_lengths: torch.Tensor,
    null_probability: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(B,)`` bool: :func:`scaled_forward` run in ``dtype`` never underflows on these inputs.

    Every term of the recursion is non-negative, so rounding errors stay relative (sums of
    non-negative numbers do not cancel); accuracy can only be lost to underflow. Every entry
    of the normalized forward vector at a position inside the source is at least ``m * w_t``
    (``m`` the smallest move probability, ``(1 - p_0)`` and ``p_0`` included, ``w_t`` the
    smallest shifted emission weight of step ``t``), so every product the recursion forms is
    at least ``m^2 w_{t-1} w_t``. When that is a normal number of ``dtype`` at every step,
    nothing underflows and the result (and its gradient) is exact to rounding.

    Args:
        log_moves: ``(B, S + 1, S)`` from :func:`move_log_probabilities` (without ``p_0``).
        emissions, target_lengths, null_probability: as for :func:`scaled_forward`.
        dtype: the dtype the recursion would run in.
    """
    # rows of previous positions outside the source are never used: counting them only makes
    # the test stricter, and saves a mask
    floor = torch.where(torch.isneginf(log_moves), 0.0, log_moves).amin((-1, -2))
    if null_probability is not None:
        floor = torch.minimum(floor + torch.log1p(-null_probability), null_probability.log())
    steps = torch.arange(emissions.shape[-2], device=emissions.device) < target_lengths.unsqueeze(
        -1)
    emissions, shift = _shifted(emissions, steps)
    # positions outside the source are exact zeros in every dtype: they do not count
    weight_floor = torch.where(torch.isneginf(emissions), 0.0, emissions - shift).amin(-1)
    previous = torch.cat([torch.zeros_like(weight_floor[:, :1]), weight_floor[:, :-1]], -1)
    worst = 2 * floor.to(weight_floor.dtype) + (weight_floor + previous).amin(-1)
    return worst >= math.log(torch.finfo(dtype).tiny)


def _chain_potentials(
    jump_scores: torch.Tensor,
    states: torch.Tensor,
    source_lengths: torch.Tensor,
    null_probability: float | torch.Tensor | None,
    forbidden: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-space chain ``(initial (*batch, C), edges (*batch, T-1, C, C))`` from the
    emission scores per state ``states: (*batch, T, C)`` (:func:`state_emissions`)."""
    num_sources = states.shape[-1] // (2 if null_probability is not None else 1)
    start, moves, valid = hmm_log_transitions(
        jump_scores, source_lengths, num_sources, null_probability, forbidden
    )
    initial = (start + states[..., 0, :]).masked_fill(~valid, forbidden)
    edges = moves.unsqueeze(-3) + states[..., 1:, :].unsqueeze(-1)
    allowed = moves > forbidden / 2
    return initial, edges.masked_fill(~allowed.unsqueeze(-3), forbidden)


def _forbidden_score(jump_scores: torch.Tensor, emissions: torch.Tensor, num_sources: int) -> float:
    """A finite score far below every allowed path (its ``exp`` is exactly zero).

    Finite rather than ``-inf`` so that no gradient of the log-space chain meets ``inf - inf``.
    """
    def largest(tensor: torch.Tensor) -> float:  # 0 for an empty batch
        return tensor.detach().abs().amax().item() if tensor.numel() else 0.0

    spread = largest(jump_scores) + largest(emissions)
    steps = emissions.shape[-2]
    return -(2 * steps + 2) * (2 * spread + num_sources + 10) - 1e4


def _lengths(lengths, batch_shape, max_length, validate, name, device) -> torch.Tensor:
    """:func:`check_lengths`, skipped for int64 lengths of the batch shape when not
    validating (the aligner's training loop builds one distribution per batch)."""
    if (not validate and isinstance(lengths, torch.Tensor) and lengths.dtype == torch.long
            and lengths.shape == batch_shape and lengths.device == device):
        return lengths
    return check_lengths(lengths, batch_shape, max_length, validate, name=name, device=device)


def _take(tensor: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor[rows]``; ``rows=None`` means every row (no copy), and ``None`` stays ``None``."""
    return tensor if rows is None or tensor is None else tensor[rows]


class HMMAlignment(AlignmentChain):
    r"""Posterior (or prior) over HMM word alignments ``z_0 .. z_{T-1}``.

    .. math::
        p(z_t = i \mid z_{t-1} = j) = (1 - p_0)\,
            \frac{\exp c(i - j)}{\sum_{i' < I} \exp c(i' - j)}, \qquad
        p(z_t = \varnothing_j \mid z_{t-1} \in \{j, \varnothing_j\}) = p_0,

    where ``c`` are the jump scores (``c(d)`` for ``|d| <= max_jump``, the end buckets beyond),
    ``I`` the source length, ``\varnothing_j`` the NULL state that remembers position ``j``
    (transitions out of it are those out of ``j``), and the first word jumps from a virtual
    position ``-1`` to some ``j``, then is NULL (state ``\varnothing_j``) with probability
    ``p_0``. With emissions ``e_t(k) = log p(y_t | z_t = k)`` this is the posterior
    ``p(z | x, y)`` and ``log_partition`` is ``log p(y | x)``; without them the prior.

    States (the values of ``sample``/``argmax``/``log_prob``) are ``0 .. S-1`` for source
    positions and, with NULL, ``S + j`` for ``\varnothing_j``; :meth:`positions` maps NULL
    states to ``S``. Values are ``(*batch, T)`` int64, zero past each target length.

    Args:
        jump_scores: ``(*batch, 2 * max_jump + 1)`` unnormalized log weights ``c(d)``, bucket
            ``k`` for the jump ``d = k - max_jump`` (learnable: gradients reach them).
        emission_log_likelihoods: ``(*batch, T, S)``, or ``(*batch, T, S + 1)`` with NULL (the
            last column is ``log p(y_t | NULL)``); pass zeros for the prior.
        target_lengths: ``(*batch,)`` in ``[1, T]``.
        source_lengths: ``(*batch,)`` in ``[1, S]``.
        null_probability: ``p_0`` in ``(0, 1)``, a float or a ``(*batch,)`` tensor; ``None``
            (default) means no NULL states.

    Attributes:
        attention: ``(*batch, T, S)`` (``S + 1`` with NULL, the last column the total NULL
            probability) posterior marginals.
    """

    arg_constraints = {
        "jump_scores": constraints.real,
        "emission_log_likelihoods": constraints.real,
    }
    _batched_attributes = (
        "lengths",
        "jump_scores",
        "emission_log_likelihoods",
        "source_lengths",
    )

    @classmethod
    def infer_shapes(cls, jump_scores, emission_log_likelihoods, **kwargs):
        """``(batch_shape, event_shape)`` for jump scores ``(..., J)`` and emissions
        ``(..., T, S)``: the broadcast batch and ``(T,)``."""
        emissions = torch.Size(emission_log_likelihoods)
        batch = torch.broadcast_shapes(torch.Size(jump_scores)[:-1], emissions[:-2])
        return batch, emissions[-2:-1]

    def __init__(
        self,
        jump_scores: torch.Tensor,
        emission_log_likelihoods: torch.Tensor,
        target_lengths: torch.Tensor | None = None,
        source_lengths: torch.Tensor | None = None,
        null_probability: float | torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        validate = resolve_validation(validate_args)
        num_buckets = check_jump_scores(jump_scores, validate)
        check_potentials(emission_log_likelihoods, "emission_log_likelihoods", 2, validate)
        has_null = null_probability is not None
        if has_null:
            _log_probability(null_probability, jump_scores, "null_probability")
        *emission_batch, num_targets, num_columns = emission_log_likelihoods.shape
        num_sources = num_columns - int(has_null)
        if num_targets == 0 or num_sources < 1:
            raise ValueError(
                "emission_log_likelihoods must have shape (*batch, T, S) (S + 1 with NULL) with "
                f"T, S >= 1, got {tuple(emission_log_likelihoods.shape)}"
            )
        try:
            batch_shape = torch.Size(emission_batch) if jump_scores.dim() == 1 else (
                torch.broadcast_shapes(jump_scores.shape[:-1], torch.Size(emission_batch)))
        except RuntimeError as err:
            raise ValueError(
                f"the batch dims of jump_scores {tuple(jump_scores.shape[:-1])} and "
                f"emission_log_likelihoods {tuple(emission_batch)} do not broadcast"
            ) from err
        self.jump_scores = jump_scores.expand(batch_shape + (num_buckets,))
        self.emission_log_likelihoods = emission_log_likelihoods.expand(
            batch_shape + (num_targets, num_columns)
        )
        self.source_lengths = _lengths(
            source_lengths, batch_shape, num_sources, validate, "source_lengths",
            jump_scores.device,
        )
        self.max_jump = num_buckets // 2
        self.num_sources = num_sources
        self.has_null = has_null
        self.null_probability = null_probability
        self.lengths = _lengths(
            target_lengths, batch_shape, num_targets, validate, "target_lengths",
            jump_scores.device,
        )
        self.num_states = num_sources * (2 if has_null else 1)
        self._chain: tuple[torch.Tensor, torch.Tensor] | None = None
        # LinearChainCRF's constructor would build the (T-1, C, C) potentials now; they are
        # built on first use (sampling, Viterbi, log_prob, entropy), never for log Z or marginals
        TorchDistribution.__init__(
            self, batch_shape, torch.Size((num_targets,)), validate_args=False
        )
        self._validate_args = validate

    # ------------------------------------------------------ the log-space chain, on demand
    def _chain_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._chain is None:
            forbidden = _forbidden_score(
                self.jump_scores, self.emission_log_likelihoods, self.num_sources
            )
            self._chain = _chain_potentials(
                self.jump_scores,
                state_emissions(self.emission_log_likelihoods, self.num_sources),
                self.source_lengths, self.null_probability, forbidden,
            )
        return self._chain

    @property
    def potentials(self) -> torch.Tensor:
        """Edge scores ``(*batch, T-1, C, C)`` of the equivalent linear chain (built lazily)."""
        return self._chain_tensors()[1]

    @property
    def initial_potentials(self) -> torch.Tensor:
        """Scores ``(*batch, C)`` of the first state in the equivalent linear chain."""
        return self._chain_tensors()[0]

    def _result_dtype(self) -> torch.dtype:
        return self.emission_log_likelihoods.dtype

    def expand(self, batch_shape, _instance=None) -> HMMAlignment:
        new = super().expand(batch_shape, _instance)
        new._chain = None  # the cached chain has the old batch shape
        return new

    # ------------------------------------------------- the fast path: log Z and marginals
    def _flat_inputs(self):
        """Flat ``(jumps (1 or B, J), emissions (B, T, S[+1]), source_lengths, target_lengths,
        p0 (B,) or None)`` in the computation dtype."""
        batch = self.batch_shape.numel()
        emissions = self.emission_log_likelihoods
        dtype = torch.promote_types(computation_dtype(emissions.dtype),
                                    computation_dtype(self.jump_scores.dtype))
        emissions = emissions.to(dtype).reshape((batch,) + emissions.shape[-2:])
        jumps = self.jump_scores.to(dtype)
        # one set of jump scores broadcast over the batch (the usual case) is read once
        if batch > 0 and all(s == 0 for s in jumps.stride()[:-1]):
            jumps = jumps[(0,) * (jumps.dim() - 1)].unsqueeze(0)
        else:
            jumps = jumps.reshape(batch, jumps.shape[-1])
        null = None
        if self.has_null:  # checked in (0, 1) by the constructor
            null = torch.as_tensor(self.null_probability, dtype=dtype, device=jumps.device)
            null = null.expand(self.batch_shape).reshape(batch)
        return (jumps, emissions, self.source_lengths.reshape(batch),
                self.lengths.reshape(batch), null)

    def _log_partition_of(self, probe: torch.Tensor | None = None) -> torch.Tensor:
        """Flat ``log Z (B,)``. With ``probe`` (``(B, T, C)`` zeros) added to the emissions of
        every state, the gradient with respect to it is the node marginals.

        Each sequence takes the cheapest exact route: the scaled forward in the emissions'
        dtype, else in float64, when :func:`scaled_forward_is_exact` says it cannot underflow;
        else the log-space chain (:class:`LinearChainCRF` on the materialized potentials).
        """
        jumps, emissions, source_lengths, target_lengths, null = self._flat_inputs()
        if probe is not None:
            emissions = state_emissions(emissions, self.num_sources) + probe
        batch, num_sources = emissions.shape[0], self.num_sources
        log_moves = move_log_probabilities(jumps, source_lengths, num_sources)
        inside = torch.arange(num_sources, device=jumps.device) < source_lengths.unsqueeze(-1)
        inside = torch.cat([inside, inside[:, : emissions.shape[-1] - num_sources]], -1)
        masked = emissions.masked_fill(~inside.unsqueeze(-2), -math.inf)
        parts = []
        remaining = None  # every sequence
        take = _take
        for dtype in dict.fromkeys([emissions.dtype, torch.float64]):
            with torch.no_grad():
                exact = scaled_forward_is_exact(
                    take(log_moves, remaining), take(masked, remaining),
                    take(target_lengths, remaining), take(null, remaining), dtype,
                )
            if remaining is None and bool(exact.all()):
                rows = None  # the common case: no indexing
            else:
                if remaining is None:
                    remaining = torch.arange(batch, device=emissions.device)
                rows, remaining = remaining[exact], remaining[~exact]
            if rows is None or rows.numel():
                probabilities = take(log_moves, rows).to(dtype).exp()
                null_rows = take(null, rows)
                value = scaled_forward(
                    probabilities[:, num_sources], probabilities[:, :num_sources],
                    take(masked, rows).to(dtype), take(target_lengths, rows),
                    None if null_rows is None else null_rows.to(dtype),
                ).to(emissions.dtype)
                if rows is None:
                    return value
                parts.append((rows, value))
            if not remaining.numel():
                break
        if remaining.numel():
            states = state_emissions(emissions[remaining], num_sources)
            jumps = jumps.expand(batch, -1)[remaining]
            initial, edges = _chain_potentials(
                jumps, states, source_lengths[remaining],
                None if null is None else null[remaining],
                _forbidden_score(jumps, states, num_sources),
            )
            value = LinearChainCRF(
                edges, lengths=target_lengths[remaining], initial_potentials=initial,
                validate_args=False,
            ).log_partition
            parts.append((remaining, value.to(emissions.dtype)))
        result = emissions.new_zeros(batch)
        for rows, value in parts:
            result = result.index_put((rows,), value)
        return result

    @property
    def log_partition(self) -> torch.Tensor:
        """``log Z``, shape ``batch_shape``: ``log p(y | x)`` with emissions. Differentiable;
        its gradient with respect to the emissions is the posterior of every link."""
        return self._log_partition_of().reshape(self.batch_shape).to(self._result_dtype())

    @property
    def node_marginals(self) -> torch.Tensor:
        """``p(z_t = c)``, shape ``(*batch, T, C)``; zero past each target length.

        The gradient of ``log Z`` with respect to the state emissions, differentiable when
        autograd records and an argument requires grad.
        """
        emissions = self.emission_log_likelihoods
        arguments = [self.jump_scores, emissions, self.null_probability]
        record = torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in arguments
        )
        shape = (self.batch_shape.numel(), emissions.shape[-2], self.num_states)
        # under inference mode too: the marginals are a gradient
        with torch.inference_mode(False), torch.enable_grad():
            probe = torch.zeros(shape, dtype=computation_dtype(emissions.dtype),
                                device=emissions.device, requires_grad=True)
            (nodes,) = torch.autograd.grad(
                self._log_partition_of(probe).sum(), probe, create_graph=record
            )
        return nodes.reshape(self.batch_shape + shape[1:]).to(self._result_dtype())

    def positions(self, value: torch.Tensor) -> torch.Tensor:
        """Source positions of chain states ``value``: NULL states become ``S``."""
        if not self.has_null:
            return value
        return torch.where(value >= self.num_sources, self.num_sources, value)

    @property
    def attention(self) -> torch.Tensor:
        """Posterior marginals ``(*batch, T, S)``; with NULL ``(*batch, T, S + 1)``."""
        nodes = self.node_marginals
        if not self.has_null:
            return nodes
        null = nodes[..., self.num_sources :].sum(-1, keepdim=True)
        return torch.cat([nodes[..., : self.num_sources], null], -1)

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.integer_interval(0, self.num_states - 1), 1)
