"""Models built from alignment distributions."""

from structattn.models.seq2seq import MODES, Seq2Seq
from structattn.models.table_qa import TABLE_QA_MODES, TableQA
from structattn.models.toy import AlignedCopyModel
from structattn.models.transformer import TRANSFORMER_MODES, TransformerSeq2Seq
from structattn.models.word_alignment import ALIGNERS, train_aligner

__all__ = [
    "ALIGNERS",
    "MODES",
    "TABLE_QA_MODES",
    "TRANSFORMER_MODES",
    "AlignedCopyModel",
    "Seq2Seq",
    "TableQA",
    "TransformerSeq2Seq",
    "train_aligner",
]
