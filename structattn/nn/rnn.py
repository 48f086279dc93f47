"""A bidirectional RNN over padded batches that keeps the fused (cuDNN / oneDNN) kernels.

Packed sequences make PyTorch fall back to a per-time-step loop on CPU; instead the backward
direction runs a second unidirectional RNN over each sequence reversed *within its own
length*, so padding always comes after the real tokens and never leaks into their states.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BiRNN", "reverse_padded"]


def reverse_padded(inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reverse each row of ``inputs (batch, length, dim)`` within its ``mask (batch, length)``
    length; padded positions stay where they are.  The map is its own inverse."""
    length = inputs.shape[1]
    positions = torch.arange(length, device=inputs.device)
    lengths = mask.sum(-1, keepdim=True)
    index = torch.where(mask, (lengths - 1 - positions).clamp_min(0), positions)
    return inputs.gather(1, index.unsqueeze(-1).expand_as(inputs))


class BiRNN(nn.Module):
    """Bidirectional LSTM or GRU: ``(batch, length, input_dim) -> (batch, length, hidden)``.

    Args:
        input_dim: size of the inputs.
        hidden: output size (both directions together); even.
        cell: ``"lstm"`` or ``"gru"``.
    """

    def __init__(self, input_dim: int, hidden: int, cell: str = "lstm") -> None:
        super().__init__()
        if hidden % 2:
            raise ValueError(f"hidden must be even (two directions), got {hidden}")
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.forward_rnn = rnn(input_dim, hidden // 2, batch_first=True)
        self.backward_rnn = rnn(input_dim, hidden // 2, batch_first=True)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """States ``(batch, length, hidden)``; ``mask (batch, length)`` is True at real tokens
        (padding must come after them).  States at padded positions are unspecified."""
        if mask is None:
            mask = torch.ones(inputs.shape[:2], dtype=torch.bool, device=inputs.device)
        ahead, _ = self.forward_rnn(inputs)
        behind, _ = self.backward_rnn(reverse_padded(inputs, mask))
        return torch.cat([ahead, reverse_padded(behind, mask)], -1)
