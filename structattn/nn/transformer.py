"""Transformer layers whose attention heads are alignment distributions.

Pre-norm (or post-norm) encoder and decoder layers built on
:class:`~structattn.nn.multihead.MultiheadAttention`, so every self- and cross-attention
takes any registered normalizer; positional encodings found by name in
:data:`POSITIONAL_ENCODINGS`.  Everything is batch first: ``(batch, length, d_model)``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (PyTorch's convention)
from torch import nn

from structattn._registry import class_decorator
from structattn._validation import check_positive_int, check_vectors
from structattn.nn.multihead import MultiheadAttention

__all__ = [
    "POSITIONAL_ENCODINGS",
    "LearnedPositionalEncoding",
    "PositionalEncoding",
    "SinusoidalPositionalEncoding",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "make_positional_encoding",
    "register_positional_encoding",
]

#: positional encodings by name; add to it with :func:`register_positional_encoding`
POSITIONAL_ENCODINGS: dict[str, type[PositionalEncoding]] = {}


def register_positional_encoding(
        name: str) -> Callable[[type[PositionalEncoding]], type[PositionalEncoding]]:
    """Class decorator: make a :class:`PositionalEncoding` available by ``name``."""
    return class_decorator(POSITIONAL_ENCODINGS, name, PositionalEncoding)


def make_positional_encoding(name: str | PositionalEncoding, d_model: int,
                             max_length: int) -> PositionalEncoding:
    """A registered positional encoding by name, or an instance as is."""
    if isinstance(name, PositionalEncoding):
        return name
    if not isinstance(name, str) or name not in POSITIONAL_ENCODINGS:
        raise ValueError(f"positional must be a PositionalEncoding or one of "
                         f"{sorted(POSITIONAL_ENCODINGS)}, got {name!r}")
    return POSITIONAL_ENCODINGS[name](d_model, max_length)


class PositionalEncoding(nn.Module, abc.ABC):
    """Adds position information: ``forward(x (batch, length, d_model)) -> same shape``."""

    def __init__(self, d_model: int, max_length: int) -> None:
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.d_model = d_model
        self.max_length = max_length

    @abc.abstractmethod
    def table(self, length: int) -> torch.Tensor:
        """Encodings of positions ``0 .. length - 1``: ``(length, d_model)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-2]
        if length > self.max_length:
            raise ValueError(f"sequence length {length} exceeds max_length={self.max_length}")
        return x + self.table(length).to(x.dtype)


@register_positional_encoding("sinusoidal")
class SinusoidalPositionalEncoding(PositionalEncoding):
    """Fixed sines and cosines of geometric frequencies (Vaswani et al. 2017)."""

    def __init__(self, d_model: int, max_length: int = 1024) -> None:
        super().__init__(d_model, max_length)
        position = torch.arange(max_length, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32)
                              * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_length, d_model)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)[:, : d_model // 2]
        self.register_buffer("encodings", table, persistent=False)

    def table(self, length: int) -> torch.Tensor:
        return self.encodings[:length]


@register_positional_encoding("learned")
class LearnedPositionalEncoding(PositionalEncoding):
    """One trained vector per position, initialised like a scaled embedding (unit size)."""

    def __init__(self, d_model: int, max_length: int = 1024) -> None:
        super().__init__(d_model, max_length)
        self.encodings = nn.Parameter(torch.randn(max_length, d_model))

    def table(self, length: int) -> torch.Tensor:
        return self.encodings[:length]


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu}


class _Block(nn.Module):
    """Shared pieces: the feed-forward sublayer and the residual wiring (pre- or post-norm)."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, activation: str,
                 norm_first: bool, sublayers: int) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, "
                             f"got {activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        check_positive_int(dim_feedforward, "dim_feedforward")
        self.d_model = check_positive_int(d_model, "d_model")
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.activation = _ACTIVATIONS[activation]
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(sublayers))
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def _feedforward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def _residual(self, x: torch.Tensor, index: int, sublayer) -> torch.Tensor:
        norm = self.norms[index]
        if self.norm_first:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))


def _attention(d_model, nhead, dropout, normalizer, normalizer_kwargs) -> MultiheadAttention:
    return MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True,
                              normalizer=normalizer, normalizer_kwargs=normalizer_kwargs)


class TransformerEncoderLayer(_Block):
    """Self-attention then a feed-forward network, each with a residual connection.

    ``forward(x (batch, S, d_model), padding_mask (batch, S) bool True = valid | None)``.

    Args:
        d_model, nhead, dim_feedforward, dropout, activation: as in torch's layer.
        normalizer, normalizer_kwargs: the heads' normalizer (see
            :class:`~structattn.nn.multihead.MultiheadAttention`).
        norm_first: pre-norm (default) or post-norm.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str = "relu", *,
                 normalizer: Any = "softmax", normalizer_kwargs: dict | None = None,
                 norm_first: bool = True) -> None:
        super().__init__(d_model, dim_feedforward, dropout, activation, norm_first, 2)
        self.self_attn = _attention(d_model, nhead, dropout, normalizer, normalizer_kwargs)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_vectors(x, "x", self.d_model, "(batch, S, d_model)")
        blocked = None if padding_mask is None else ~padding_mask

        def attend(h):
            return self.self_attn(h, h, h, key_padding_mask=blocked, need_weights=False)[0]

        x = self._residual(x, 0, attend)
        return self._residual(x, 1, self._feedforward)


class TransformerDecoderLayer(_Block):
    """Causal self-attention, cross-attention over the memory, then a feed-forward network.

    ``forward(x (batch, T, d_model), memory (batch, S, d_model), memory_mask (batch, S) bool
    True = valid | None)``; target positions only see earlier ones, so padded targets at the
    end never affect real ones.

    Args: as :class:`TransformerEncoderLayer`.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str = "relu", *,
                 normalizer: Any = "softmax", normalizer_kwargs: dict | None = None,
                 norm_first: bool = True) -> None:
        super().__init__(d_model, dim_feedforward, dropout, activation, norm_first, 3)
        self.self_attn = _attention(d_model, nhead, dropout, normalizer, normalizer_kwargs)
        self.cross_attn = _attention(d_model, nhead, dropout, normalizer, normalizer_kwargs)

    def forward(self, x: torch.Tensor, memory: torch.Tensor,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_vectors(x, "x", self.d_model, "(batch, T, d_model)")
        check_vectors(memory, "memory", self.d_model, "(batch, S, d_model)")
        blocked = None if memory_mask is None else ~memory_mask

        def attend_self(h):
            return self.self_attn(h, h, h, is_causal=True, need_weights=False)[0]

        def attend_memory(h):
            return self.cross_attn(h, memory, memory, key_padding_mask=blocked,
                                   need_weights=False)[0]

        x = self._residual(x, 0, attend_self)
        x = self._residual(x, 1, attend_memory)
        return self._residual(x, 2, self._feedforward)


class TransformerEncoder(nn.Module):
    """A stack of :class:`TransformerEncoderLayer` with a final layer norm (pre-norm).

    ``forward(x (batch, S, d_model), padding_mask (batch, S) bool True = valid | None)``.
    """

    def __init__(self, num_layers: int, d_model: int, nhead: int, **layer_kwargs: Any) -> None:
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        self.layers = nn.ModuleList(TransformerEncoderLayer(d_model, nhead, **layer_kwargs)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, padding_mask)
        return self.norm(x)


class TransformerDecoder(nn.Module):
    """A stack of :class:`TransformerDecoderLayer` with a final layer norm (pre-norm).

    ``forward(x (batch, T, d_model), memory (batch, S, d_model), memory_mask (batch, S))``.
    ``num_layers=0`` is allowed: then the stack is the final norm alone.
    """

    def __init__(self, num_layers: int, d_model: int, nhead: int, **layer_kwargs: Any) -> None:
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"num_layers must be a non-negative int, got {num_layers!r}")
        self.layers = nn.ModuleList(TransformerDecoderLayer(d_model, nhead, **layer_kwargs)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, memory: torch.Tensor,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, memory, memory_mask)
        return self.norm(x)
