"""Neural HMM attention: content scores plus a jump-width bias, moving either way.

Target step ``t`` reads one source position ``z_t``. The move from ``z_{t-1} = j`` to
``z_t = k`` is scored by what the decoder wants at step ``t`` (``a_{t,k}``, the attention scores)
plus a learned score of the jump width ``c(k - j)``, bucketed as in the HMM word aligner (Vogel,
Ney & Tillmann 1996), forward or backward; the first step jumps from a virtual position ``-1``.
This is the neural HMM of Wang et al. (2018, "Neural Hidden Markov Model for Machine
Translation"), and the alignment prior of an HMM aligner whose jump table is conditioned on the
decoder. Given emissions ``log p(y_t | z_t = k)`` the exact ``log p(y | x)``, posterior
marginals, Viterbi alignment and samples come from the chain of
:mod:`structattn.distributions.chain` (the same program as
:class:`~structattn.distributions.monotonic.MonotonicAlignment`, with other moves).
"""

from __future__ import annotations

import torch
from torch.distributions import constraints

from .hmm import check_jump_scores, jump_buckets
from .monotonic import MonotonicAlignment
from .structured import check_potentials, resolve_validation

__all__ = ["JumpAlignment"]


class JumpAlignment(MonotonicAlignment):
    r"""Posterior (or prior) over alignments ``z_0 .. z_{T-1}`` with content-and-jump moves.

    .. math::
        p(z_t = k \mid z_{t-1} = j) =
            \frac{\exp(a_{t,k} + c(k - j))}{\sum_{k' < I} \exp(a_{t,k'} + c(k' - j))},
        \qquad z_{-1} = -1,

    where ``I`` is the source length and ``c`` the jump scores (``c(d)`` for
    ``|d| <= max_jump``; wider jumps share the end buckets). Without emissions this is the
    prior ``p(z | x)``; with them the posterior and ``log_partition = log p(y | x)``.

    Args:
        alignment_logits: ``(*batch, T, S)``, ``a_{t,k}``.
        jump_scores: ``(*batch, 2 * max_jump + 1)`` (or unbatched ``(2 * max_jump + 1,)``),
            bucket ``b`` scoring the jump ``b - max_jump``.
        emission_log_likelihoods: ``(*batch, T, S)``, ``log p(y_t | z_t = k)`` (default none).
        target_lengths: ``(*batch,)`` in ``[1, T]``; source_lengths: ``(*batch,)`` in ``[1, S]``.
    """

    arg_constraints = {
        "alignment_logits": constraints.real,
        "jump_scores": constraints.real,
        "emission_log_likelihoods": constraints.real,
    }
    _batched_attributes = MonotonicAlignment._batched_attributes + ("jump_scores",)

    @classmethod
    def infer_shapes(cls, alignment_logits, jump_scores=None, emission_log_likelihoods=None,
                     **kwargs):
        """``(batch_shape, event_shape)`` for ``(..., T, S)`` logits (and emissions)."""
        return super().infer_shapes(alignment_logits, emission_log_likelihoods)

    def __init__(
        self,
        alignment_logits: torch.Tensor,
        jump_scores: torch.Tensor,
        emission_log_likelihoods: torch.Tensor | None = None,
        target_lengths: torch.Tensor | None = None,
        source_lengths: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        validate = resolve_validation(validate_args)
        buckets = check_jump_scores(jump_scores, validate)
        check_potentials(alignment_logits, "alignment_logits", 2, validate)
        batch = alignment_logits.shape[:-2]
        try:
            self.jump_scores = jump_scores.expand(batch + (buckets,))
        except RuntimeError as err:
            raise ValueError(
                f"jump_scores of shape {tuple(jump_scores.shape)} does not broadcast to the "
                f"batch shape {tuple(batch)} of alignment_logits") from err
        super().__init__(alignment_logits, emission_log_likelihoods, target_lengths,
                         source_lengths, validate_args=validate_args)

    def with_emissions(self, emission_log_likelihoods: torch.Tensor) -> JumpAlignment:
        return type(self)(
            self.alignment_logits, self.jump_scores, emission_log_likelihoods,
            self.target_lengths, self.source_lengths, validate_args=False,
        )

    @property
    def jump_width(self) -> int:
        """``max_jump``: the widest jump with a bucket of its own."""
        return self.jump_scores.shape[-1] // 2

    def _moves(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.alignment_logits
        num_sources = logits.shape[-1]
        # [next, previous] for previous in 0..S-1, then the virtual start as row S: [S, next]
        buckets = jump_buckets(num_sources, self.jump_width, logits.device)
        bias = self.jump_scores[..., buckets]                     # (*batch, S + 1, S)
        moves = bias[..., :num_sources, :].unsqueeze(-3)          # (*batch, 1, next, previous)
        scores = logits.unsqueeze(-1) + moves
        in_source = self._in_source()
        allowed = in_source[..., None, :, None]
        first = logits[..., 0, :] + bias[..., num_sources, :]
        return scores, allowed, first, in_source

    def _move_spread(self) -> torch.Tensor:
        return (self.alignment_logits.detach().abs().amax()
                + self.jump_scores.detach().abs().amax())
