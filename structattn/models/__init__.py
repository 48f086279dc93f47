"""Models built from alignment distributions."""

from structattn.models.seq2seq import MODES, Seq2Seq
from structattn.models.toy import AlignedCopyModel

__all__ = ["MODES", "AlignedCopyModel", "Seq2Seq"]
