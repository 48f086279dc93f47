"""Hard monotonic alignment with the alignment summed out exactly (an HMM over source positions).

Target step ``t`` is aligned to one source position ``z_t``; the alignment may stay or move
forward by at most ``max_jump`` positions per step (Wu & Cotterell 2019, "Exact hard monotonic
attention for character-level transduction"; the HMM alignment of Wang et al. 2018). Given
per-step emission log-likelihoods ``log p(y_t | z_t = s, ...)``, the exact marginal likelihood
``log p(y | x)``, the posterior alignment marginals, the Viterbi path and posterior samples all
come from the linear-chain dynamic program of :mod:`structattn.distributions.chain`.
"""

from __future__ import annotations

import torch
from torch.distributions import constraints

from .chain import AlignmentChain
from .structured import check_lengths, check_potentials, resolve_validation


def _monotone_mask(num_sources: int, max_jump: int | None, device) -> torch.Tensor:
    """``(S, S)`` bool, ``[next, previous]``: True where ``0 <= next - previous <= max_jump``."""
    positions = torch.arange(num_sources, device=device)
    step = positions.unsqueeze(-1) - positions
    allowed = step >= 0
    if max_jump is not None:
        allowed = allowed & (step <= max_jump)
    return allowed


class MonotonicAlignment(AlignmentChain):
    r"""Posterior (or prior) over monotone alignments ``z_0 .. z_{T-1}`` of target steps to
    source positions.

    .. math::
        p(z_t = k \mid z_{t-1} = j) = \frac{\exp a_{t,k}}{\sum_{k' = j}^{j + J} \exp a_{t,k'}}
        \quad (j \le k \le j + J), \qquad
        p(y, z \mid x) = \prod_t p(z_t \mid z_{t-1})\, p(y_t \mid z_t)

    with a virtual start ``z_{-1} = 0`` (so ``z_0 <= J``), ``J = max_jump`` and sums cut at the
    source length. Without emissions this is the prior ``p(z | x)`` (``log_partition`` is 0);
    with them it is the posterior ``p(z | x, y)`` and ``log_partition`` is the exact
    ``log p(y | x)`` with the alignment summed out.

    ``node_marginals: (*batch, T, S)`` is the posterior attention; ``argmax`` the Viterbi
    alignment; ``sample`` draws exact posterior alignments; ``log_prob(z) = log p(z | x, y)``.
    Values are ``(*batch, T)`` int64 source positions, zero past each target length.

    Args:
        alignment_logits: ``(*batch, T, S)``, ``a_{t,k}``: score of moving to source ``k`` at
            target step ``t``.
        emission_log_likelihoods: ``(*batch, T, S)``, ``log p(y_t | z_t = k)`` (default none).
        target_lengths: ``(*batch,)`` in ``[1, T]``.
        source_lengths: ``(*batch,)`` in ``[1, S]``.
        max_jump: largest forward move per step (default: unbounded).
    """

    arg_constraints = {
        "alignment_logits": constraints.real,
        "emission_log_likelihoods": constraints.real,
    }
    _batched_attributes = (
        "potentials",
        "lengths",
        "initial_potentials",
        "alignment_logits",
        "emission_log_likelihoods",
        "source_lengths",
    )

    @classmethod
    def infer_shapes(cls, alignment_logits, emission_log_likelihoods=None, **kwargs):
        """``(batch_shape, event_shape)`` for ``(..., T, S)`` logits (and emissions)."""
        shape = torch.Size(alignment_logits)
        batch = shape[:-2]
        if emission_log_likelihoods is not None:
            batch = torch.broadcast_shapes(batch, torch.Size(emission_log_likelihoods)[:-2])
        return batch, shape[-2:-1]

    def __init__(
        self,
        alignment_logits: torch.Tensor,
        emission_log_likelihoods: torch.Tensor | None = None,
        target_lengths: torch.Tensor | None = None,
        source_lengths: torch.Tensor | None = None,
        max_jump: int | None = None,
        validate_args: bool | None = None,
    ) -> None:
        validate = resolve_validation(validate_args)
        check_potentials(alignment_logits, "alignment_logits", 2, validate)
        *batch, num_targets, num_sources = alignment_logits.shape
        if num_targets == 0 or num_sources == 0:
            raise ValueError(
                "alignment_logits must have shape (*batch, T, S) with T, S >= 1, got "
                f"{tuple(alignment_logits.shape)}"
            )
        if max_jump is not None and (not isinstance(max_jump, int) or max_jump < 1):
            raise ValueError(f"max_jump must be a positive int or None, got {max_jump!r}")
        if emission_log_likelihoods is None:
            emission_log_likelihoods = alignment_logits.new_zeros(()).expand(alignment_logits.shape)
        else:
            check_potentials(emission_log_likelihoods, "emission_log_likelihoods", 2, validate)
            try:
                emission_log_likelihoods = emission_log_likelihoods.expand(alignment_logits.shape)
            except RuntimeError as err:
                raise ValueError(
                    "emission_log_likelihoods of shape "
                    f"{tuple(emission_log_likelihoods.shape)} does not broadcast to "
                    f"alignment_logits' shape {tuple(alignment_logits.shape)}"
                ) from err
        batch_shape = torch.Size(batch)
        source_lengths = check_lengths(
            source_lengths,
            batch_shape,
            num_sources,
            validate,
            name="source_lengths",
            device=alignment_logits.device,
        )
        self.alignment_logits = alignment_logits
        self.emission_log_likelihoods = emission_log_likelihoods
        self.source_lengths = source_lengths
        self.max_jump = max_jump
        initial, edges = self._chain_potentials()
        super().__init__(
            edges,
            lengths=self._checked_target_lengths(target_lengths, batch_shape, validate),
            initial_potentials=initial,
            validate_args=validate_args,
        )

    def _checked_target_lengths(self, target_lengths, batch_shape, validate):
        return check_lengths(
            target_lengths,
            batch_shape,
            self.alignment_logits.shape[-2],
            validate,
            name="target_lengths",
            device=self.alignment_logits.device,
        )

    def _moves(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chain's unnormalised moves: ``(scores, allowed, first, start)``.

        ``scores (*batch, T, S, S)`` indexed ``[..., t, next, previous]`` and the bool
        ``allowed`` broadcastable to it; ``first (*batch, S)`` scores the first step's position
        and ``start (*batch, S)`` says which it may be. Subclasses change the moves here.
        """
        logits = self.alignment_logits
        num_sources = logits.shape[-1]
        allowed = _monotone_mask(num_sources, self.max_jump, logits.device)
        allowed = allowed & self._in_source()[..., None, :, None]
        start = allowed[..., 0, :, 0]
        scores = logits.unsqueeze(-1).expand(*logits.shape, num_sources)
        return scores, allowed, logits[..., 0, :], start

    def _in_source(self) -> torch.Tensor:
        """``(*batch, S)`` bool: positions inside each source."""
        logits = self.alignment_logits
        positions = torch.arange(logits.shape[-1], device=logits.device)
        return positions < self.source_lengths.unsqueeze(-1)

    def _normalised_moves(self, forbidden: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first (*batch, S), moves (*batch, T, S, S))``: log-probabilities of the first
        position and of each move ``[..., t, next, previous]``, ``forbidden`` where disallowed."""
        scores, allowed, first, start = self._moves()
        scores = scores.masked_fill(~allowed, forbidden)
        log_moves = scores - torch.logsumexp(scores, -2, keepdim=True)
        log_moves = log_moves.masked_fill(~allowed, forbidden)
        first = first.masked_fill(~start, forbidden)
        first = (first - torch.logsumexp(first, -1, keepdim=True)).masked_fill(~start, forbidden)
        return first, log_moves

    def move_log_probs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prior's transitions: ``(first (*batch, S), moves (*batch, T, S, S))``,
        ``log p(z_0 = k)`` and ``log p(z_t = next | z_{t-1} = previous)`` indexed
        ``[..., t, next, previous]`` (row ``t = 0`` is the move into step 0 from a previous
        position, which a decoder filtering one step at a time reads); ``-inf`` where a move
        is not allowed."""
        first, moves = self._normalised_moves(-torch.inf)
        return first, moves

    def _chain_potentials(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(initial (*batch, S), edges (*batch, T-1, S, S))`` of the equivalent chain.

        Forbidden moves get a finite score far below every allowed path (its ``exp`` is exactly
        zero) rather than ``-inf``, so no gradient ever meets ``inf - inf``.
        """
        emissions = self.emission_log_likelihoods
        num_targets, num_sources = emissions.shape[-2:]
        spread = 0.0
        if emissions.numel() > 0:  # an empty batch has no scores to stay below
            spread = (self._move_spread() + emissions.detach().abs().amax()).item()
        forbidden = -(2 * num_targets + 1) * (spread + num_sources) - 1e4
        first, log_moves = self._normalised_moves(forbidden)
        initial = torch.maximum(first + emissions[..., 0, :], first.new_tensor(forbidden))
        edges = log_moves[..., 1:, :, :] + emissions[..., 1:, :].unsqueeze(-1)
        edges = torch.maximum(edges, edges.new_tensor(forbidden))
        return initial, edges

    def _move_spread(self) -> torch.Tensor:
        """The largest ``|score|`` a move can have (forbidden moves stay far below it)."""
        return self.alignment_logits.detach().abs().amax()

    def with_emissions(self, emission_log_likelihoods: torch.Tensor) -> MonotonicAlignment:
        """The same alignment chain (same class, moves and lengths) with these emissions
        ``(*batch, T, S)``: how exact inference conditions a prior on a table."""
        return type(self)(
            self.alignment_logits, emission_log_likelihoods, self.target_lengths,
            self.source_lengths, self.max_jump, validate_args=False,
        )

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.integer_interval(0, self.num_states - 1), 1)
