"""Multi-head attention whose heads are alignment distributions.

:class:`MultiheadAttention` takes the constructor, forward signature, parameter names and return
values of :class:`torch.nn.MultiheadAttention` (a torch state dict loads into it), and lets each
head normalise its scores ``(batch, heads, queries, keys)`` with any registered
:class:`~structattn.nn.normalizers.Normalizer`: softmax (through
``F.scaled_dot_product_attention`` when no weights are asked for), sparsemax, entmax15, entmax
with one learned alpha per head (:class:`HeadwiseEntmaxNormalizer`), and so on.  How a head reads
its weights from its alignment distribution is a :class:`HeadReadout` found by name in
:data:`HEAD_READOUTS`: the soft weights, a straight-through one-hot sample, a one-hot sample for
score-function training, or the argmax.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (PyTorch's convention)
from torch import nn

from structattn import functional
from structattn._registry import class_decorator
from structattn.distributions.categorical import SparsemaxAlignment, mask_value
from structattn.nn.normalizers import (
    NORMALIZERS,
    Normalizer,
    SoftmaxNormalizer,
    make_normalizer,
    register_normalizer,
)

__all__ = [
    "HEAD_READOUTS",
    "ArgmaxReadout",
    "HeadReadout",
    "HeadwiseEntmaxNormalizer",
    "HeadwiseNormalizer",
    "MultiheadAttention",
    "SampleReadout",
    "SoftReadout",
    "StraightThroughReadout",
    "register_head_readout",
]


# --------------------------------------------------------------------------- normalizers


class HeadwiseNormalizer(Normalizer):
    """A normalizer with parameters per head: built with ``num_heads``; its scores are
    ``(..., heads, queries, keys)``.  :class:`MultiheadAttention` passes its head count."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        self.num_heads = num_heads

    def _check_heads(self, scores: torch.Tensor) -> None:
        if self.num_heads == 1 and scores.dim() >= 2:  # one head: no head dim needed
            return
        if scores.dim() < 3 or scores.shape[-3] != self.num_heads:
            raise ValueError(
                f"scores must be (..., heads={self.num_heads}, queries, keys), got "
                f"{tuple(scores.shape)}"
            )


@register_normalizer("entmax-heads")
class HeadwiseEntmaxNormalizer(HeadwiseNormalizer):
    """alpha-entmax with one alpha per head (Correia et al. 2019, "Adaptively Sparse
    Transformers").

    ``alpha = 1 + sigmoid(raw)`` stays in ``(1, 2)``: between softmax and sparsemax.  The
    weights are :func:`structattn.entmax_bisect` with the exact gradient in alpha.

    Args:
        num_heads: number of heads (the size of dim ``-3`` of the scores; with one head the
            scores may be any ``(..., queries, keys)``).
        alpha: initial alpha, in ``(1, 2)``, for every head.
        learnable: train alpha (otherwise it is a fixed buffer).
    """

    def __init__(self, num_heads: int = 1, alpha: float = 1.5, learnable: bool = True) -> None:
        super().__init__(num_heads)
        if not 1.0 < alpha < 2.0:
            raise ValueError(f"alpha must lie in (1, 2), got {alpha!r}")
        raw = torch.full((num_heads,), math.log((alpha - 1.0) / (2.0 - alpha)))
        if learnable:
            self.raw_alpha = nn.Parameter(raw)
        else:
            self.register_buffer("raw_alpha", raw)

    @property
    def alpha(self) -> torch.Tensor:
        """The alpha of each head, ``(heads,)``."""
        return 1.0 + torch.sigmoid(self.raw_alpha)

    def weights(self, scores, mask=None) -> torch.Tensor:
        self._check_heads(scores)
        # half-precision scores are worked on in float32; keep alpha's precision too
        alpha = self.alpha.to(torch.promote_types(scores.dtype, torch.float32))
        alpha = alpha.view(-1, 1, 1) if self.num_heads > 1 else alpha.view(1, 1)
        return functional.entmax_bisect(scores, alpha=alpha, dim=-1, mask=mask)

    def forward(self, scores, mask=None) -> SparsemaxAlignment:
        probs = self.weights(scores, mask)
        # The probabilities are already sparse and normalised: hand them over as logits, so
        # enumeration still visits only the support.
        logits = torch.where(probs > 0, probs.clamp_min(torch.finfo(probs.dtype).tiny).log(),
                             torch.full_like(probs, mask_value(probs.dtype)))
        return SparsemaxAlignment(logits=logits, mask=mask)


# --------------------------------------------------------------------------- readouts

#: head readouts by name; add to it with :func:`register_head_readout`
HEAD_READOUTS: dict[str, type[HeadReadout]] = {}


def register_head_readout(name: str) -> Callable[[type[HeadReadout]], type[HeadReadout]]:
    """Class decorator: make a :class:`HeadReadout` available as ``readout=name``."""
    return class_decorator(HEAD_READOUTS, name, HeadReadout)


class HeadReadout(abc.ABC):
    """How a head turns its alignment probabilities into the weights it reads values with.

    Class attributes:
        soft: the weights are the probabilities themselves (enables the SDPA fast path).
    """

    soft: bool = False

    @abc.abstractmethod
    def read(self, probs: torch.Tensor) -> torch.Tensor:
        """Weights ``(..., queries, keys)`` from probabilities of the same shape."""


def _one_hot_sample(probs: torch.Tensor) -> torch.Tensor:
    keys = probs.shape[-1]
    index = torch.multinomial(probs.detach().reshape(-1, keys).float(), 1)
    return torch.zeros_like(probs).scatter_(-1, index.view(probs.shape[:-1] + (1,)), 1.0)


@register_head_readout("soft")
class SoftReadout(HeadReadout):
    """The expectation: weights are the alignment probabilities."""

    soft = True

    def read(self, probs):
        return probs


@register_head_readout("straight-through")
class StraightThroughReadout(HeadReadout):
    """A one-hot sample forward, the probabilities' gradient backward (Bengio et al. 2013)."""

    def read(self, probs):
        return _one_hot_sample(probs) + (probs - probs.detach())  # exactly one-hot forward


@register_head_readout("sample")
class SampleReadout(HeadReadout):
    """A one-hot sample without gradient: train the scores by the score function, with
    ``alignment.log_prob(weights.argmax(-1))`` from ``return_alignment=True``."""

    def read(self, probs):
        return _one_hot_sample(probs)


@register_head_readout("argmax")
class ArgmaxReadout(HeadReadout):
    """The most probable key, one-hot, without gradient (hard attention at test time)."""

    def read(self, probs):
        index = probs.argmax(-1, keepdim=True)
        return torch.zeros_like(probs).scatter_(-1, index, 1.0)


# --------------------------------------------------------------------------- masks


def _mask_parts(mask: torch.Tensor, name: str):
    """(valid, bias) of one torch-style mask: bool True = not allowed, or float added."""
    if mask.dtype == torch.bool:
        return ~mask, None
    if not mask.is_floating_point():
        raise ValueError(f"{name} must be bool or floating point, got {mask.dtype}")
    blocked = mask == -math.inf
    if bool(torch.isnan(mask).any()) or bool((mask == math.inf).any()):
        raise ValueError(f"{name} contains NaN or +inf")
    valid = ~blocked if bool(blocked.any()) else None
    bias = mask.masked_fill(blocked, 0.0)
    return valid, bias


def _and(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    if first is None:
        return second
    if second is None:
        return first
    return first & second


def _add(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    if first is None:
        return second
    if second is None:
        return first
    return first + second


# --------------------------------------------------------------------------- the layer


class MultiheadAttention(nn.Module):
    """Multi-head attention with alignment-distribution heads; a drop-in for
    :class:`torch.nn.MultiheadAttention`.

    ``forward(query, key, value)`` takes ``(queries, batch, embed_dim)`` (``(batch, queries,
    embed_dim)`` with ``batch_first``, or unbatched ``(queries, embed_dim)``) and returns
    ``(attn_output, attn_weights)`` exactly as torch does; with ``return_alignment=True`` a
    third item, the alignment distribution with batch ``(batch, heads, queries)`` over keys
    (for ``pyro.sample`` or :func:`structattn.infer.readout`).

    Masked keys get exactly zero weight for every normalizer; a query whose keys are all masked
    raises ``ValueError`` (torch returns NaN there).  ``is_causal=True`` without ``attn_mask``
    builds the causal mask.

    ``embed_dim``, ``num_heads``, ``dropout``, ``bias``, ``add_bias_kv``, ``add_zero_attn``,
    ``kdim``, ``vdim`` and ``batch_first`` mean what they mean in
    :class:`torch.nn.MultiheadAttention`.

    Args:
        normalizer: a registered name or :class:`~structattn.nn.normalizers.Normalizer` shared
            by every head, or a sequence of ``num_heads`` of them (one per head).  A
            :class:`HeadwiseNormalizer` name is built with ``num_heads``.
        normalizer_kwargs: options of a named normalizer.
        readout: a :data:`HEAD_READOUTS` name or a :class:`HeadReadout` (``"soft"``,
            ``"straight-through"``, ``"sample"``, ``"argmax"``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        normalizer: str | Normalizer | Sequence[str | Normalizer] = "softmax",
        normalizer_kwargs: dict[str, Any] | None = None,
        readout: str | HeadReadout = "soft",
    ) -> None:
        super().__init__()
        for value, name in ((embed_dim, "embed_dim"), (num_heads, "num_heads")):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

        kwargs = dict(normalizer_kwargs or {})
        if isinstance(normalizer, (str, Normalizer)):
            self.normalizer = self._build_normalizer(normalizer, kwargs)
            self.head_normalizers = None
        else:
            normalizers = list(normalizer)
            if len(normalizers) != num_heads:
                raise ValueError(f"normalizer must be one normalizer or a sequence of "
                                 f"num_heads={num_heads}, got {len(normalizers)}")
            self.normalizer = None
            self.head_normalizers = nn.ModuleList(
                self._build_normalizer(item, kwargs, per_head=True) for item in normalizers)
        if isinstance(readout, HeadReadout):
            self.readout = readout
        elif isinstance(readout, str) and readout in HEAD_READOUTS:
            self.readout = HEAD_READOUTS[readout]()
        else:
            raise ValueError(f"readout must be a HeadReadout or one of {sorted(HEAD_READOUTS)}, "
                             f"got {readout!r}")

    def _build_normalizer(self, spec, kwargs, per_head: bool = False) -> Normalizer:
        if isinstance(spec, str) and spec in NORMALIZERS and issubclass(
                NORMALIZERS[spec], HeadwiseNormalizer):
            if per_head:
                raise ValueError(f"normalizer {spec!r} already has one parameter per head; "
                                 "give it once, not per head")
            return make_normalizer(spec, num_heads=self.num_heads, **kwargs)
        built = make_normalizer(spec, **kwargs)
        if isinstance(built, HeadwiseNormalizer) and (
                per_head or built.num_heads != self.num_heads):
            raise ValueError(f"a HeadwiseNormalizer must be shared by all heads and have "
                             f"num_heads={self.num_heads}")
        return built

    def _reset_parameters(self) -> None:
        # torch's initialisation, so the two layers start from the same distribution
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    # ------------------------------------------------------------------ pieces

    def _project(self, query, key, value):
        """q, k, v projections, ``(..., length, embed_dim)`` each (inputs batch-major)."""
        embed = self.embed_dim
        bias = self.in_proj_bias
        b_q = b_k = b_v = None
        if bias is not None:
            b_q, b_k, b_v = bias.chunk(3)
        if self._qkv_same_embed_dim:
            weight = self.in_proj_weight
            if query is key and key is value:
                return F.linear(query, weight, bias).chunk(3, dim=-1)
            q = F.linear(query, weight[:embed], b_q)
            if key is value:
                k, v = F.linear(key, weight[embed:], None if bias is None else bias[embed:]) \
                    .chunk(2, dim=-1)
                return q, k, v
            return q, F.linear(key, weight[embed:2 * embed], b_k), \
                F.linear(value, weight[2 * embed:], b_v)
        return (F.linear(query, self.q_proj_weight, b_q), F.linear(key, self.k_proj_weight, b_k),
                F.linear(value, self.v_proj_weight, b_v))

    def _masks(self, key_padding_mask, attn_mask, is_causal, batch, queries, keys, device):
        """(valid, bias): bool True = allowed and a float bias, each broadcastable to
        ``(batch, heads, queries, keys)`` or None."""
        valid = bias = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(queries, keys, dtype=torch.bool, device=device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (queries, keys):
                    raise ValueError(f"attn_mask must be (queries={queries}, keys={keys}) or "
                                     f"(batch * heads, queries, keys), got "
                                     f"{tuple(attn_mask.shape)}")
                shaped = attn_mask
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (batch * self.num_heads, queries, keys):
                    raise ValueError(f"attn_mask must be (batch * heads={batch * self.num_heads},"
                                     f" queries={queries}, keys={keys}), got "
                                     f"{tuple(attn_mask.shape)}")
                shaped = attn_mask.view(batch, self.num_heads, queries, keys)
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D")
            valid, bias = _mask_parts(shaped, "attn_mask")
        if key_padding_mask is not None:
            if key_padding_mask.shape != (batch, keys):
                raise ValueError(f"key_padding_mask must be (batch={batch}, keys={keys}), got "
                                 f"{tuple(key_padding_mask.shape)}")
            pad_valid, pad_bias = _mask_parts(key_padding_mask, "key_padding_mask")
            valid = _and(valid, None if pad_valid is None else pad_valid[:, None, None, :])
            bias = _add(bias, None if pad_bias is None else pad_bias[:, None, None, :])
        if valid is not None and not bool(valid.any(-1).all()):
            raise ValueError("attn_mask and key_padding_mask leave a query with no valid key "
                             "(torch would return NaN there)")
        return valid, bias

    def _head_probs(self, scores, valid, return_alignment):
        """Probabilities ``(batch, heads, queries, keys)`` and the alignment (or None)."""
        if self.normalizer is not None:
            if return_alignment:
                alignment = self.normalizer(scores, valid)
                return alignment.attention, alignment
            return self.normalizer.weights(scores, valid), None
        if return_alignment:
            raise ValueError("return_alignment needs one normalizer shared by all heads")
        if valid is not None:
            valid = valid.reshape((1,) * (scores.dim() - valid.dim()) + valid.shape)
        heads = []
        for head, normalizer in enumerate(self.head_normalizers):
            head_valid = None
            if valid is not None:
                head_valid = valid[:, head] if valid.shape[1] > 1 else valid[:, 0]
            heads.append(normalizer.weights(scores[:, head], head_valid))
        return torch.stack(heads, 1), None

    @property
    def uses_sdpa(self) -> bool:
        """Soft softmax heads: the no-weights path runs ``F.scaled_dot_product_attention``."""
        return self.readout.soft and isinstance(self.normalizer, SoftmaxNormalizer)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        return_alignment: bool = False,
    ):
        """Attention output ``(queries, batch, embed_dim)`` (batch first with ``batch_first``)
        and weights ``(batch, queries, keys)`` averaged over heads, ``(batch, heads, queries,
        keys)`` with ``average_attn_weights=False``, or None without ``need_weights``.

        Masks follow torch: ``key_padding_mask (batch, keys)`` and ``attn_mask (queries,
        keys)`` or ``(batch * heads, queries, keys)``; bool True = not allowed, float = added
        to the scores (``-inf`` = not allowed).
        """
        for name, tensor in (("query", query), ("key", key), ("value", value)):
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"{name} must be a floating-point tensor, got {kind}")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (unbatched) or 3-D, got {query.dim()}-D")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError("query, key and value must have the same number of dimensions")
        batched = query.dim() == 3
        same_kv = key is value
        self_attention = same_kv and query is key
        if not batched:
            query, key, value = (x.unsqueeze(0) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        # everything below is batch-major: (batch, length, features)
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must have embed_dim={self.embed_dim} features, got "
                             f"{query.shape[-1]}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"key and value must have kdim={self.kdim} and vdim={self.vdim} "
                             f"features, got {key.shape[-1]} and {value.shape[-1]}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError("key and value must have the same batch and length, and the same "
                             "batch as query")
        if self_attention:
            q, k, v = self._project(query, query, query)
        elif same_kv:
            q, k, v = self._project(query, key, key)
        else:
            q, k, v = self._project(query, key, value)
        batch, queries, _ = q.shape
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], 1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], 1)
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, 1, self.embed_dim)], 1)
            v = torch.cat([v, v.new_zeros(batch, 1, self.embed_dim)], 1)
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        keys = k.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        q = q.view(batch, queries, heads, head_dim).transpose(1, 2)
        k = k.view(batch, keys, heads, head_dim).transpose(1, 2)
        v = v.view(batch, keys, heads, head_dim).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        causal_only = is_causal and attn_mask is None and key_padding_mask is None
        valid, bias = self._masks(key_padding_mask, None if causal_only else attn_mask,
                                  is_causal and not causal_only, batch, queries, keys, q.device)
        weights = alignment = None
        if self.uses_sdpa and not need_weights and not return_alignment:
            sdpa_mask = valid if bias is None else (
                bias if valid is None else bias.masked_fill(~valid, -math.inf))
            output = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask,
                                                    dropout_p=dropout, is_causal=causal_only)
        else:
            # scale the queries, not the (queries x keys) scores: one pass over less memory
            scores = torch.matmul(q * (1.0 / math.sqrt(head_dim)), k.transpose(-1, -2))
            if causal_only:
                valid = torch.ones(queries, keys, dtype=torch.bool, device=q.device).tril()
            if bias is not None:
                scores = scores + bias
            probs, alignment = self._head_probs(scores, valid, return_alignment)
            weights = self.readout.read(probs)
            if dropout > 0.0:
                weights = F.dropout(weights, dropout)
            output = torch.matmul(weights, v)
        output = self.out_proj(output.transpose(1, 2).reshape(batch, queries, self.embed_dim))
        if not batched:
            output = output.squeeze(0)
        elif not self.batch_first:
            output = output.transpose(0, 1)
        if need_weights:
            if average_attn_weights:
                weights = weights.mean(1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            weights = None
        if return_alignment:
            return output, weights, alignment
        return output, weights

    # ------------------------------------------------------------------ reports

    def alphas(self) -> torch.Tensor | None:
        """The alpha of each head ``(heads,)`` for entmax heads (None for other heads)."""
        if isinstance(self.normalizer, HeadwiseEntmaxNormalizer):
            return self.normalizer.alpha.detach()
        return None


def _pad_masks(attn_mask, key_padding_mask):
    """Masks extended by one always-allowed key (``add_bias_kv`` and ``add_zero_attn``)."""
    if attn_mask is not None:
        attn_mask = F.pad(attn_mask, (0, 1))
    if key_padding_mask is not None:
        key_padding_mask = F.pad(key_padding_mask, (0, 1))
    return attn_mask, key_padding_mask
