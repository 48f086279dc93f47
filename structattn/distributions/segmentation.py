"""Segmentation attention (Kim et al. 2017): a binary linear-chain CRF over the keys of a query.

Every key ``k`` of a query carries a binary label ``z_k`` (1 = selected). The labels of one query
form a two-state chain over the valid keys, in key order::

    p(z | s) ∝ exp( sum_k z_k s_k + sum_k T[z_{k+1}, z_k] )

with unary scores ``s`` (the attention scores) and a ``2 x 2`` pairwise table ``T``. Any
number of keys, including none, can be selected, and ``T`` makes contiguous selections (spans)
more or less likely. The marginals ``p(z_k = 1)`` come from forward-backward on
:class:`~structattn.distributions.chain.LinearChainCRF` (through :func:`segmentation_crf`).

Kim et al. (2017, "Structured Attention Networks", section 4.2) read the context with the
marginals rescaled to sum to a constant ``lambda`` (``lambda = 2`` in their NMT experiments,
"for stable training"):

    c = sum_k  lambda * p(z_k = 1) / sum_j p(z_j = 1) * v_k

:attr:`SegmentationAlignment.attention` is that rescaled vector (``scale`` = lambda); the raw
marginals are :attr:`SegmentationAlignment.marginals`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

from structattn._validation import (
    broadcast_mask,
    check_finite,
    check_real_number,
    check_some_valid,
    refuse_jit_tracing,
)
from structattn.distributions.chain import LinearChainCRF, segmentation_crf
from structattn.distributions.structured import resolve_validation

__all__ = ["SegmentationAlignment"]


def _compaction(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key order that puts the valid keys of every row first (stably), and the row lengths.

    A chain runs over the valid keys in their order, so a mask with holes is handled by moving
    the valid keys to the front, running a chain of ``lengths`` keys, and moving back.
    """
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
    return order, mask.sum(-1)


class SegmentationAlignment(TorchDistribution):
    r"""Per-query binary selections of keys, a two-state chain CRF each (Kim et al. 2017).

    Batch shape ``(..., queries)``, event shape ``(keys,)``; a value is a binary int64 tensor
    ``(..., queries, keys)`` (zero at masked keys).

    Args:
        scores: ``(..., queries, keys)`` unary scores of selecting each key.
        mask: boolean, broadcastable to ``scores``; True = valid key. Masked keys are never
            selected and are skipped by the chain (their neighbours become adjacent).
        transition: ``(2, 2)`` pairwise scores ``[z_next, z_prev]`` (default zeros).
        scale: the ``lambda`` of Kim et al.: :attr:`attention` sums to it over the keys.

    Attributes:
        marginals: ``p(z_k = 1)``, ``(..., queries, keys)``, in ``[0, 1]``.
        attention: ``scale * marginals / marginals.sum(-1)``, ``(..., queries, keys)``.
    """

    arg_constraints = {"scores": constraints.real}
    has_rsample = False
    has_enumerate_support = False

    def __new__(cls, *args: Any, **kwargs: Any) -> SegmentationAlignment:
        refuse_jit_tracing(cls.__name__)  # (as StructuredDistribution: a chain inside)
        return super().__new__(cls)

    def __init__(
        self,
        scores: torch.Tensor,
        mask: torch.Tensor | None = None,
        transition: torch.Tensor | None = None,
        scale: float = 2.0,
        validate_args: bool | None = None,
    ) -> None:
        validate = resolve_validation(validate_args)
        if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
            raise ValueError("scores must be a floating-point tensor (..., queries, keys)")
        if scores.dim() < 2 or scores.shape[-1] == 0:
            raise ValueError(
                f"scores must be (..., queries, keys) with keys >= 1, got {tuple(scores.shape)}"
            )
        scale = check_real_number(scale, "scale")
        if not 0 < scale < math.inf:
            raise ValueError(f"scale must be positive and finite, got {scale!r}")
        if transition is None:
            transition = scores.new_zeros(2, 2)
        elif (not isinstance(transition, torch.Tensor) or not transition.is_floating_point()
              or transition.shape != (2, 2)):
            raise ValueError("transition must be a (2, 2) floating tensor [z_next, z_prev]")
        elif validate:
            check_finite(transition, "transition")
        full_mask = broadcast_mask(mask, scores.shape)
        if full_mask is None:
            full_mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        full_mask = full_mask.expand(scores.shape)
        check_some_valid(full_mask, -1, "mask")
        if validate:
            check_finite(scores, "scores", full_mask)
        self.scores = scores
        self.key_mask = full_mask
        self.transition = transition.to(scores.dtype)
        self.scale = float(scale)
        self.num_keys = scores.shape[-1]
        self._order, self._lengths = _compaction(full_mask)
        super().__init__(scores.shape[:-1], scores.shape[-1:], validate_args=False)
        self._validate_args = validate
        self._chain_cache: LinearChainCRF | None = None

    # ------------------------------------------------------------------------ the chain
    @property
    def chain(self) -> LinearChainCRF:
        """The equivalent chain over the compacted keys, batch ``(B,)`` = flattened queries."""
        if self._chain_cache is None:
            keys = self.num_keys
            compact = self.scores.gather(-1, self._order).reshape(-1, keys)
            # masked keys sit past each row's length, where the chain never reads them
            compact = compact.masked_fill(
                ~self.key_mask.gather(-1, self._order).reshape(-1, keys), 0.0
            )
            self._chain_cache = segmentation_crf(
                compact, self.transition, lengths=self._lengths.reshape(-1),
                validate_args=False,
            )
        return self._chain_cache

    def _to_keys(self, compact: torch.Tensor) -> torch.Tensor:
        """Scatter ``(*lead, B, keys)`` from compacted order back to key order and shape."""
        lead = compact.shape[:-2]
        compact = compact.reshape(lead + self.scores.shape)
        order = self._order.expand(lead + self._order.shape)
        return torch.zeros_like(compact).scatter(-1, order, compact)

    def _to_compact(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        """Key-ordered values ``(*lead, ..., queries, keys)`` in chain order ``(K, B, keys)``,
        and ``lead``."""
        lead = value.shape[: value.dim() - self.scores.dim()]
        order = self._order.expand(lead + self._order.shape)
        compact = value.gather(-1, order)
        return compact.reshape((max(1, lead.numel()), -1, self.num_keys)), lead

    # ------------------------------------------------------------------ public surface
    @property
    def marginals(self) -> torch.Tensor:
        """``p(z_k = 1)``, ``(..., queries, keys)``; exactly zero at masked keys."""
        nodes = self.chain.node_marginals[..., 1]
        return self._to_keys(nodes).masked_fill(~self.key_mask, 0.0)

    @property
    def attention(self) -> torch.Tensor:
        """Kim et al.'s weights: the marginals rescaled to sum to ``scale`` over the keys."""
        return self.weights_of(self.marginals)

    def weights_of(self, selection: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(..., queries, keys)`` of a selection (binary value or marginals).

        ``scale * selection / selection.sum(-1)``; a row that selects nothing reads nothing.
        """
        selection = selection.to(self.scores.dtype)
        total = selection.sum(-1, keepdim=True)
        safe = torch.where(total > 0, total, torch.ones_like(total))
        return self.scale * selection / safe

    @property
    def argmax(self) -> torch.Tensor:
        """The most likely selection, ``(..., queries, keys)`` int64 (Viterbi)."""
        return self._to_keys(self.chain.argmax)

    @property
    def mode(self) -> torch.Tensor:
        """Alias of :attr:`argmax`."""
        return self.argmax

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Exact samples, ``sample_shape + (..., queries, keys)`` int64."""
        sample_shape = torch.Size(sample_shape)
        draws = self.chain.sample((max(1, sample_shape.numel()),))
        return self._to_keys(draws).reshape(sample_shape + self.batch_shape + self.event_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``log p(value)``, ``sample_shape + (..., queries)``; ``value`` binary per key."""
        shape = self.batch_shape + self.event_shape
        try:
            full = torch.broadcast_shapes(value.shape, shape)
        except RuntimeError:
            raise ValueError(
                f"value of shape {tuple(value.shape)} does not broadcast against "
                f"batch + event shape {tuple(shape)}"
            ) from None
        if full[len(full) - len(shape):] != shape:
            # size-1 batch dims grow to the value's, as torch's Categorical does
            grown = full[len(full) - len(shape): len(full) - len(self.event_shape)]
            return self.expand(grown).log_prob(value)
        value = value.expand(full)
        if self._validate_args and bool(((value != 0) & ~self.key_mask).any()):
            raise ValueError("value selects a masked key")
        compact, lead = self._to_compact(value.long())
        log_prob = self.chain.log_prob(compact)
        return log_prob.reshape(lead + self.batch_shape)

    def entropy(self) -> torch.Tensor:
        """Shannon entropy of each query's selection, ``(..., queries)``."""
        return self.chain.entropy().reshape(self.batch_shape)

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.boolean, 1)

    def expand(self, batch_shape, _instance=None) -> SegmentationAlignment:
        """Broadcast to ``batch_shape`` (rebuilds the chain for the larger batch)."""
        batch_shape = torch.Size(batch_shape)
        shape = batch_shape + self.event_shape
        return SegmentationAlignment(
            self.scores.expand(shape), self.key_mask.expand(shape), self.transition, self.scale,
            validate_args=self._validate_args,
        )
