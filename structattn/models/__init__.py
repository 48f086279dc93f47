"""Models built from alignment distributions."""

from structattn.models.seq2seq import MODES, Seq2Seq
from structattn.models.toy import AlignedCopyModel
from structattn.models.word_alignment import ALIGNERS, train_aligner

__all__ = ["ALIGNERS", "MODES", "AlignedCopyModel", "Seq2Seq", "train_aligner"]
