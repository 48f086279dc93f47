"""The aligned-copy toy task: a target that reads its source position by position.

Each target token is ``y_t = perm[x_t]`` for a fixed permutation ``perm`` of the vocabulary,
replaced by a uniformly random token with probability ``noise``; so the true alignment is
``z_t = t`` and a model must learn *where* to look to predict well.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CopyBatch", "aligned_copy_batch", "copy_permutation"]


@dataclass
class CopyBatch:
    """A padded batch: ``src (batch, S)``, ``tgt (batch, T)``, boolean masks of the same
    shapes (True = real token) and the true ``alignment (batch, T)``."""

    src: torch.Tensor
    tgt: torch.Tensor
    src_mask: torch.Tensor
    tgt_mask: torch.Tensor
    alignment: torch.Tensor

    def to(self, device: torch.device | str) -> CopyBatch:
        return CopyBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def copy_permutation(vocab_size: int, seed: int = 1234) -> torch.Tensor:
    """The task's fixed token permutation ``(vocab_size,)``."""
    return torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))


def aligned_copy_batch(
    batch_size: int,
    length: int,
    vocab_size: int,
    noise: float = 0.1,
    min_length: int | None = None,
    generator: torch.Generator | None = None,
) -> CopyBatch:
    """Draw a batch of the aligned-copy task.

    Args:
        batch_size: number of sequence pairs.
        length: maximum (padded) length of source and target.
        vocab_size: number of token types.
        noise: probability that a target token is replaced by a random one.
        min_length: shortest sequence (default ``length``: no padding).
        generator: torch random generator for reproducible batches.
    """
    if batch_size < 1 or length < 1 or vocab_size < 2:
        raise ValueError("batch_size and length must be >= 1 and vocab_size >= 2")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must lie in [0, 1], got {noise}")
    min_length = length if min_length is None else min_length
    if not 1 <= min_length <= length:
        raise ValueError(f"min_length must lie in [1, length={length}], got {min_length}")
    lengths = torch.randint(min_length, length + 1, (batch_size,), generator=generator)
    mask = torch.arange(length) < lengths[:, None]
    src = torch.randint(vocab_size, (batch_size, length), generator=generator)
    tgt = copy_permutation(vocab_size)[src]
    noisy = torch.rand(batch_size, length, generator=generator) < noise
    random = torch.randint(vocab_size, (batch_size, length), generator=generator)
    tgt = torch.where(noisy, random, tgt)
    src, tgt = src.masked_fill(~mask, 0), tgt.masked_fill(~mask, 0)
    alignment = torch.arange(length).expand(batch_size, length).masked_fill(~mask, 0)
    return CopyBatch(src, tgt, mask, mask.clone(), alignment.clone())
