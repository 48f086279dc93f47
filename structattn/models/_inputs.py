"""Checks of what the sequence models are given: token ids, masks and batches.

Every model checks its inputs here, so that a bad id or mask is a ``ValueError`` naming it
whichever model reads it (an out-of-range id would otherwise be an ``IndexError`` from the
embedding, a mask of the wrong shape a broadcasting ``RuntimeError``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_batch", "check_ids", "check_source"]


def check_ids(ids: Any, vocab_size: int, name: str) -> None:
    """``ids`` must be an integer tensor with values in ``[0, vocab_size)``."""
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
        kind = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must hold integer token ids, got {kind}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"{name} holds token ids outside [0, {vocab_size}) (the vocabulary size): "
            f"min {int(ids.min())}, max {int(ids.max())}"
        )


def _check_mask(mask: Any, ids: torch.Tensor, name: str, ids_name: str) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor (True = real token), got {kind}")
    if mask.shape != ids.shape:
        raise ValueError(f"{name} must have the shape of {ids_name} {tuple(ids.shape)}, got "
                         f"{tuple(mask.shape)}")


def check_source(source: Any, source_mask: Any, vocab_size: int) -> None:
    """``source: (batch, S)`` ids and ``source_mask: (batch, S)`` bool, every row with a token."""
    check_ids(source, vocab_size, "source")
    if source.dim() != 2:
        raise ValueError(f"source must be (batch, S) token ids, got shape {tuple(source.shape)}")
    _check_mask(source_mask, source, "source_mask", "source")
    if source.shape[1] == 0 or bool((source_mask.sum(-1) == 0).any()):
        raise ValueError("source_mask has an empty source sequence")


def check_batch(batch: Any, source_vocab_size: int, target_vocab_size: int) -> None:
    """A :class:`~structattn.data.batching.Seq2SeqBatch`: its source as :func:`check_source`,
    its target ``(batch, T)`` ids framed ``bos .. eos`` (``T >= 2``: something to predict) with
    a ``target_mask`` of the same shape, and one target per source."""
    check_source(batch.source, batch.source_mask, source_vocab_size)
    check_ids(batch.target, target_vocab_size, "target")
    if batch.target.dim() != 2 or batch.target.shape[1] < 2:
        raise ValueError("target must be (batch, T) ids with T >= 2 (bos and at least one "
                         f"token to predict), got shape {tuple(batch.target.shape)}")
    _check_mask(batch.target_mask, batch.target, "target_mask", "target")
    if batch.target.shape[0] != batch.source.shape[0]:
        raise ValueError(f"source and target must hold the same number of sequences, got "
                         f"{batch.source.shape[0]} and {batch.target.shape[0]}")
