"""Models built from alignment distributions."""

from structattn.models.seq2seq import MODES, Seq2Seq
from structattn.models.table_qa import TABLE_QA_MODES, TableQA
from structattn.models.toy import AlignedCopyModel

__all__ = ["MODES", "TABLE_QA_MODES", "AlignedCopyModel", "Seq2Seq", "TableQA"]
