"""Padding, length bucketing and seq2seq batches.

Every batch is a pair of ``(batch, length)`` ``LongTensor`` ids with a boolean mask of the same
shape (True = real token).  Batch order depends only on ``(seed, epoch)``, never on global
random state, so a training run that resumes mid-epoch sees exactly the batches it would have
seen (see :class:`structattn.app.training.Trainer`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import torch

from structattn.data.vocab import Vocab

__all__ = [
    "Seq2SeqBatch",
    "Seq2SeqBatches",
    "Seq2SeqExample",
    "bucket_by_length",
    "collate_seq2seq",
    "pad_sequences",
]


# Batches per length-sorting pool: large enough to keep padding low, small enough to mix.
_POOL_BATCHES = 50


class Seq2SeqExample(Protocol):
    """Anything with ``source`` and ``target`` symbol sequences (G2P words, Bible verses)."""

    @property
    def source(self) -> Sequence[str]: ...

    @property
    def target(self) -> Sequence[str]: ...


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id sequences into a matrix.

    Args:
        sequences: ``batch`` id sequences, each non-empty.
        pad_id: id written after the end of each sequence.

    Returns:
        ``ids``: ``(batch, max_length)`` LongTensor; ``mask``: ``(batch, max_length)`` bool,
        True at real tokens.
    """
    if len(sequences) == 0:
        raise ValueError("sequences must hold at least one sequence")
    lengths = [len(sequence) for sequence in sequences]
    if min(lengths) == 0:
        raise ValueError(f"sequences holds an empty sequence at index {lengths.index(0)}")
    ids = torch.full((len(sequences), max(lengths)), int(pad_id), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : lengths[row]] = torch.as_tensor(list(sequence), dtype=torch.long)
    mask = torch.arange(ids.shape[1]) < torch.as_tensor(lengths).unsqueeze(1)
    return ids, mask


def bucket_by_length(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
    shuffle: bool = True,
    pool_batches: int = _POOL_BATCHES,
) -> list[list[int]]:
    """Group example indices into batches of similar length, deterministically.

    With ``shuffle`` the indices are permuted by ``random.Random`` seeded from
    ``(seed, epoch)``, cut into pools of ``pool_batches * batch_size``, sorted by length
    inside each pool, cut into batches, and the batch order is permuted again; so padding
    stays small while every epoch sees a different order.  Without ``shuffle`` the batches
    follow the sorted lengths (ties by index), which suits evaluation.

    Args:
        lengths: length of each example, ``(num_examples,)``.
        batch_size: examples per batch (the last batch of a pool may be smaller).
        seed, epoch: together they fix the order.
        pool_batches: batches per sorting pool.

    Returns:
        A list of batches, each a list of indices into ``lengths``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(pool_batches, int) or pool_batches < 1:
        raise ValueError(f"pool_batches must be a positive int, got {pool_batches!r}")
    if not isinstance(seed, int) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"seed and epoch must be ints (epoch >= 0), got {seed!r}, {epoch!r}")
    order = list(range(len(lengths)))
    if not shuffle:
        order.sort(key=lambda i: (lengths[i], i))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    # An integer seed keeps the stream independent of PYTHONHASHSEED.
    rng = random.Random(seed * 1_000_003 + epoch)
    rng.shuffle(order)
    pool = pool_batches * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


@dataclass
class Seq2SeqBatch:
    """A padded batch of source/target pairs.

    Attributes:
        source: ``(batch, source_length)`` ids, no bos/eos.
        source_mask: ``(batch, source_length)`` bool, True at real tokens.
        target: ``(batch, target_length)`` ids framed as ``bos y_1 .. y_n eos``; a decoder
            reads ``target[:, :-1]`` and predicts ``target[:, 1:]``.
        target_mask: ``(batch, target_length)`` bool, True at real tokens (bos and eos count).
        indices: ``(batch,)`` positions of the examples in their dataset, to look up
            references such as gold alignments.
    """

    source: torch.Tensor
    source_mask: torch.Tensor
    target: torch.Tensor
    target_mask: torch.Tensor
    indices: torch.Tensor

    def to(self, device: torch.device | str) -> Seq2SeqBatch:
        """The same batch with every tensor on ``device``."""
        return Seq2SeqBatch(
            **{f.name: getattr(self, f.name).to(device) for f in fields(self)}
        )

    def __len__(self) -> int:
        return int(self.source.shape[0])

    @property
    def num_target_tokens(self) -> int:
        """Predicted tokens in the batch (targets after bos), for per-token losses."""
        return int(self.target_mask[:, 1:].sum())


def collate_seq2seq(
    examples: Sequence[Seq2SeqExample],
    source_vocab: Vocab,
    target_vocab: Vocab,
    indices: Sequence[int] | None = None,
) -> Seq2SeqBatch:
    """Encode and pad ``examples`` into a :class:`Seq2SeqBatch`.

    Args:
        examples: objects with ``source`` and ``target`` symbol sequences.
        indices: dataset positions stored in the batch (default ``0 .. batch - 1``).
    """
    if len(examples) == 0:
        raise ValueError("examples must hold at least one example")
    _check_nonempty_examples(examples)
    if indices is None:
        indices = range(len(examples))
    elif len(indices) != len(examples):
        raise ValueError(f"indices has {len(indices)} entries for {len(examples)} examples")
    source, source_mask = pad_sequences(
        [source_vocab.encode(ex.source) for ex in examples], source_vocab.pad_id
    )
    target, target_mask = pad_sequences(
        [target_vocab.encode(ex.target, add_bos=True, add_eos=True) for ex in examples],
        target_vocab.pad_id,
    )
    return Seq2SeqBatch(
        source, source_mask, target, target_mask, torch.as_tensor(list(indices), dtype=torch.long)
    )


def _check_nonempty_examples(examples: Sequence[Seq2SeqExample]) -> None:
    """Refuse an example with an empty side now, naming it, rather than when its batch is
    collated somewhere in the middle of training."""
    for position, example in enumerate(examples):
        for side in ("source", "target"):
            if len(getattr(example, side)) == 0:
                raise ValueError(
                    f"examples[{position}] has an empty {side}; every example needs at least "
                    "one token on each side"
                )


class Seq2SeqBatches:
    """A re-creatable, seeded batch stream: ``batches(epoch)`` gives that epoch's batches.

    This is the ``train_batches`` argument :class:`structattn.app.training.Trainer` expects: the
    order depends only on ``(seed, epoch)``.  A batch is padded only when it is indexed or
    iterated, so skipping to the middle of an epoch on resume costs nothing.

    Args:
        examples: objects with ``source`` and ``target`` symbol sequences.
        source_vocab, target_vocab: vocabularies for the two sides.
        batch_size: examples per batch.
        seed: fixes the order together with the epoch.
        shuffle: False gives length-sorted batches in a fixed order (evaluation).
    """

    def __init__(
        self,
        examples: Sequence[Seq2SeqExample],
        source_vocab: Vocab,
        target_vocab: Vocab,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if len(examples) == 0:
            raise ValueError("examples must hold at least one example")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        _check_nonempty_examples(examples)
        self.examples = examples
        self.source_vocab = source_vocab
        self.target_vocab = target_vocab
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._lengths = [len(ex.source) + len(ex.target) for ex in examples]

    def __len__(self) -> int:
        """Batches per epoch (the same for every epoch)."""
        if not self.shuffle:
            return -(-len(self.examples) // self.batch_size)
        pool = _POOL_BATCHES * self.batch_size
        total = len(self.examples)
        sizes = [min(pool, total - start) for start in range(0, total, pool)]
        return sum(-(-size // self.batch_size) for size in sizes)

    def __call__(self, epoch: int = 0) -> Sequence[Seq2SeqBatch]:
        """The batches of ``epoch``, collated lazily on indexing or iteration."""
        groups = bucket_by_length(
            self._lengths, self.batch_size, seed=self.seed, epoch=epoch, shuffle=self.shuffle
        )
        return _CollatedBatches(self, groups)


class _CollatedBatches(Sequence):
    """A read-only sequence of batches that collates each one when it is asked for."""

    def __init__(self, owner: Seq2SeqBatches, groups: list[list[int]]) -> None:
        self._owner = owner
        self._groups = groups

    def __len__(self) -> int:
        return len(self._groups)

    def __getitem__(self, position):  # type: ignore[override]
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        group = self._groups[position]
        owner = self._owner
        return collate_seq2seq(
            [owner.examples[i] for i in group], owner.source_vocab, owner.target_vocab, group
        )
