"""The HMM aligner's chain as an attention normalizer: scores in, an ``HMMAlignment`` out."""

from __future__ import annotations

import torch
from torch import nn

from structattn.distributions.hmm import HMMAlignment
from structattn.nn.normalizers import Normalizer, register_normalizer

__all__ = ["HMMNormalizer"]


@register_normalizer("hmm")
class HMMNormalizer(Normalizer):
    """Scores ``(..., queries, keys)`` -> :class:`~structattn.distributions.hmm.HMMAlignment`.

    The scores are the emission log-likelihoods (each query is a target step, each key a source
    position); the jump scores are a learnable parameter (or fixed, ``learn_jumps=False``).

    Args:
        max_jump: jumps wider than this share the end buckets (``2 * max_jump + 1`` scores).
        null_probability: ``p_0`` of the NULL states, or ``None`` for none (the default: an
            attention layer's rows then sum to one over the keys).
        jump_scores: initial ``(2 * max_jump + 1,)`` scores (default: zeros, uniform jumps).
        learn_jumps: whether the jump scores are an ``nn.Parameter``.
    """

    def __init__(
        self,
        max_jump: int = 7,
        null_probability: float | None = None,
        jump_scores: torch.Tensor | None = None,
        learn_jumps: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(max_jump, bool) or not isinstance(max_jump, int) or max_jump < 0:
            raise ValueError(f"max_jump must be a non-negative int, got {max_jump!r}")
        if null_probability is not None and not 0.0 < float(null_probability) < 1.0:
            raise ValueError(f"null_probability must lie in (0, 1), got {null_probability!r}")
        if jump_scores is None:
            jump_scores = torch.zeros(2 * max_jump + 1)
        elif jump_scores.shape != (2 * max_jump + 1,):
            raise ValueError(
                f"jump_scores must have shape ({2 * max_jump + 1},), got "
                f"{tuple(jump_scores.shape)}"
            )
        if learn_jumps:
            self.jump_scores = nn.Parameter(jump_scores.clone().float())
        else:
            self.register_buffer("jump_scores", jump_scores.clone().float())
        self.null_probability = null_probability

    def forward(self, scores: torch.Tensor, mask: torch.Tensor | None = None) -> HMMAlignment:
        """``scores: (..., queries, keys)``; ``mask`` bool broadcastable to it, True = valid.

        Valid keys must form a prefix of each row (source lengths); queries with no valid key
        end the target (target lengths). With NULL the distribution's attention has one more
        column than the scores (the NULL probability); the NULL emission score is 0.
        """
        if not isinstance(scores, torch.Tensor) or scores.dim() < 2:
            raise ValueError("scores must be a (..., queries, keys) tensor")
        source_lengths = target_lengths = None
        if mask is not None:
            if mask.dtype != torch.bool:
                raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
            try:
                full = mask.expand(scores.shape)
            except RuntimeError as err:
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not broadcast to scores' shape "
                    f"{tuple(scores.shape)}"
                ) from err
            keys = full.any(-2)
            source_lengths = keys.sum(-1)
            prefix = torch.arange(scores.shape[-1], device=scores.device) < source_lengths[
                ..., None
            ]
            if not torch.equal(prefix, keys):
                raise ValueError("mask must mark a prefix of the keys (source positions) valid")
            target_lengths = full.any(-1).sum(-1).clamp_min(1)
            source_lengths = source_lengths.clamp_min(1)
        emissions = scores
        if self.null_probability is not None:
            emissions = torch.cat([scores, scores.new_zeros(scores.shape[:-1] + (1,))], -1)
        jumps = self.jump_scores.to(scores.dtype)
        return HMMAlignment(
            jumps, emissions, target_lengths=target_lengths, source_lengths=source_lengths,
            null_probability=self.null_probability,
        )

    def weights(self, scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Soft weights ``(..., queries, keys)`` (NULL column dropped when present)."""
        attention = self(scores, mask).attention
        return attention[..., : scores.shape[-1]]
