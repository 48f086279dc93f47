"""Models built from alignment distributions."""

from structattn.models.seq2seq import MODES, Seq2Seq
from structattn.models.toy import AlignedCopyModel
from structattn.models.transformer import TRANSFORMER_MODES, TransformerSeq2Seq

__all__ = ["MODES", "TRANSFORMER_MODES", "AlignedCopyModel", "Seq2Seq", "TransformerSeq2Seq"]
