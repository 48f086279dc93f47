"""Emission heads: the output layer every alignment model shares.

``p(y | h, c) = softmax(W_o tanh(W_h h + W_c c))`` for a decoder state ``h`` and a context
``c`` (the expected value under soft attention, the value at ``z`` under hard attention;
Luong et al. 2015's attentional output layer without input feeding, as in Deng et al. 2018).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EmissionHead"]


class EmissionHead(nn.Module):
    """Vocabulary logits from a state and a context, and per-key emission tables.

    Args:
        state_dim: size of the decoder states ``h``.
        context_dim: size of the contexts ``c`` (the values attention reads).
        hidden: size of the combination layer.
        vocab_size: number of output tokens ``V``.
    """

    def __init__(self, state_dim: int, context_dim: int, hidden: int, vocab_size: int) -> None:
        super().__init__()
        for name, value in (("state_dim", state_dim), ("context_dim", context_dim),
                            ("hidden", hidden), ("vocab_size", vocab_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.vocab_size = vocab_size
        self.combine_state = nn.Linear(state_dim, hidden)
        self.combine_context = nn.Linear(context_dim, hidden, bias=False)
        self.out = nn.Linear(hidden, vocab_size)

    def logits(self, states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Logits ``(..., V)``; ``states (..., state_dim)`` broadcast against ``context``."""
        return self.out(torch.tanh(self.combine_state(states) + self.combine_context(context)))

    def log_prob(
        self, states: torch.Tensor, context: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """``log p(targets | states, context)``, the broadcast of ``targets`` and the inputs'
        leading dims (e.g. ``(n, batch, T)`` for sampled contexts ``(n, batch, T, dim)``)."""
        log_probs = self.logits(states, context).log_softmax(-1)
        index = targets.expand(log_probs.shape[:-1]).unsqueeze(-1)
        return log_probs.gather(-1, index).squeeze(-1)

    def table(
        self,
        states: torch.Tensor,
        values: torch.Tensor,
        targets: torch.Tensor,
        target_mask: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        chunk_elements: int = 1 << 24,
    ) -> torch.Tensor:
        """``log p(y_t | h_t, values_k)`` for every key: ``(batch, T, keys)``.

        Only (query, key) pairs that are both real are evaluated (the others are 0), in
        chunks of at most ``chunk_elements`` logits, so memory stays bounded for long inputs.

        Args:
            states: ``(batch, T, state_dim)``; values: ``(batch, keys, context_dim)``;
            targets: ``(batch, T)`` ids; masks: ``(batch, T)`` and ``(batch, keys)`` bool.
        """
        batch, length, _ = states.shape
        keys = values.shape[1]
        valid = torch.ones(batch, length, keys, dtype=torch.bool, device=states.device)
        if target_mask is not None:
            valid = valid & target_mask[:, :, None]
        if key_mask is not None:
            valid = valid & key_mask[:, None, :]
        rows, steps, positions = valid.nonzero(as_tuple=True)
        state_part = self.combine_state(states)[rows, steps]
        context_part = self.combine_context(values)[rows, positions]
        words = targets[rows, steps].unsqueeze(-1)
        chunk = max(1, chunk_elements // self.vocab_size)
        pieces = []
        for start in range(0, rows.shape[0], chunk):
            stop = start + chunk
            log_probs = self.out(torch.tanh(state_part[start:stop] + context_part[start:stop]))
            pieces.append(log_probs.log_softmax(-1).gather(-1, words[start:stop]).squeeze(-1))
        found = torch.cat(pieces) if pieces else state_part.new_zeros(0)
        return found.new_zeros(batch, length, keys).index_put((rows, steps, positions), found)
