"""The HMM word aligner's alignment chain: jump-width transitions and NULL states.

Target word ``t`` is generated from source position ``z_t``; the alignment moves from one
target word to the next by a jump ``z_t - z_{t-1}`` whose probability depends only on the jump
width, bucketed (Vogel, Ney & Tillmann 1996, "HMM-based word alignment in statistical
translation"), forward or backward. Och & Ney (2003, "A systematic comparison of various
statistical alignment models") add one NULL state per source position: entering NULL keeps the
position it left, so the jump after an unaligned word is measured from the last real one.

Summing the alignment out is the linear-chain dynamic program of
:mod:`structattn.distributions.chain`, so ``log_partition``, marginals, Viterbi, exact samples,
``log_prob`` and entropy all come from it.
"""

from __future__ import annotations

import torch
from torch.distributions import constraints

from .chain import LinearChainCRF
from .structured import check_lengths, check_potentials, resolve_validation

__all__ = ["HMMAlignment", "hmm_log_transitions", "jump_buckets", "state_emissions"]


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


def _log_probability(value: float | torch.Tensor, like: torch.Tensor, name: str):
    """``(log p, log (1 - p))`` of a probability in ``(0, 1)`` as tensors like ``like``."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if bool(((value <= 0) | (value >= 1)).any()):
        raise ValueError(f"{name} must lie strictly between 0 and 1")
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


def state_emissions(emissions: torch.Tensor, num_sources: int) -> torch.Tensor:
    """``(*batch, T, C)`` emission scores per chain state from ``(*batch, T, S[+1])``.

    With a NULL column (``S + 1`` columns) it is repeated for the ``S`` NULL states.
    """
    if emissions.shape[-1] == num_sources:
        return emissions
    null = emissions[..., num_sources:].expand(emissions.shape[:-1] + (num_sources,))
    return torch.cat([emissions[..., :num_sources], null], -1)


class HMMAlignment(LinearChainCRF):
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
        "potentials",
        "lengths",
        "initial_potentials",
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
        check_potentials(jump_scores, "jump_scores", 1, validate)
        check_potentials(emission_log_likelihoods, "emission_log_likelihoods", 2, validate)
        num_buckets = jump_scores.shape[-1]
        if num_buckets % 2 == 0:
            raise ValueError(
                f"jump_scores must end in 2 * max_jump + 1 buckets (odd), got {num_buckets}"
            )
        has_null = null_probability is not None
        *emission_batch, num_targets, num_columns = emission_log_likelihoods.shape
        num_sources = num_columns - int(has_null)
        if num_targets == 0 or num_sources < 1:
            raise ValueError(
                "emission_log_likelihoods must have shape (*batch, T, S) (S + 1 with NULL) with "
                f"T, S >= 1, got {tuple(emission_log_likelihoods.shape)}"
            )
        try:
            batch_shape = torch.broadcast_shapes(
                jump_scores.shape[:-1], torch.Size(emission_batch)
            )
        except RuntimeError as err:
            raise ValueError(
                f"the batch dims of jump_scores {tuple(jump_scores.shape[:-1])} and "
                f"emission_log_likelihoods {tuple(emission_batch)} do not broadcast"
            ) from err
        self.jump_scores = jump_scores.expand(batch_shape + (num_buckets,))
        self.emission_log_likelihoods = emission_log_likelihoods.expand(
            batch_shape + (num_targets, num_columns)
        )
        self.source_lengths = check_lengths(
            source_lengths, batch_shape, num_sources, validate, name="source_lengths",
            device=jump_scores.device,
        )
        self.max_jump = num_buckets // 2
        self.num_sources = num_sources
        self.has_null = has_null
        self.null_probability = null_probability
        lengths = check_lengths(
            target_lengths, batch_shape, num_targets, validate, name="target_lengths",
            device=jump_scores.device,
        )
        initial, edges = self._chain_potentials()
        super().__init__(
            edges, lengths=lengths, initial_potentials=initial, validate_args=validate_args
        )

    def _forbidden(self) -> float:
        """A finite score far below every allowed path (its ``exp`` is exactly zero).

        Finite rather than ``-inf`` so that no gradient ever meets ``inf - inf``.
        """
        def largest(tensor: torch.Tensor) -> float:  # 0 for an empty batch
            return tensor.detach().abs().amax().item() if tensor.numel() else 0.0

        spread = largest(self.jump_scores) + largest(self.emission_log_likelihoods)
        steps = self.emission_log_likelihoods.shape[-2]
        return -(2 * steps + 2) * (2 * spread + self.num_sources + 10) - 1e4

    def _chain_potentials(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(initial (*batch, C), edges (*batch, T-1, C, C))``, ``C = S`` or ``2S``."""
        forbidden = self._forbidden()
        start, moves, valid = hmm_log_transitions(
            self.jump_scores, self.source_lengths, self.num_sources, self.null_probability,
            forbidden,
        )
        emissions = state_emissions(self.emission_log_likelihoods, self.num_sources)
        initial = (start + emissions[..., 0, :]).masked_fill(~valid, forbidden)
        edges = moves.unsqueeze(-3) + emissions[..., 1:, :].unsqueeze(-1)
        allowed = moves > forbidden / 2
        return initial, edges.masked_fill(~allowed.unsqueeze(-3), forbidden)

    @property
    def log_marginal_likelihood(self) -> torch.Tensor:
        """``log p(y | x)`` with the alignment summed out, shape ``batch_shape``."""
        return self.log_partition

    @property
    def target_lengths(self) -> torch.Tensor:
        """``(*batch,)`` target lengths (the chain's ``lengths``)."""
        return self.lengths

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
