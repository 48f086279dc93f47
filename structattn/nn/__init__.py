"""Torch modules: scorers, normalizers and latent attention, broadcast-safe under Pyro
enumeration; emission heads; encoders and inference networks."""

from structattn.nn.attention import LatentAttention
from structattn.nn.heads import EmissionHead
from structattn.nn.hmm import HMMNormalizer
from structattn.nn.inference import InferenceNetwork
from structattn.nn.multihead import MultiheadAttention
from structattn.nn.normalizers import (
    NORMALIZERS,
    Entmax15Normalizer,
    EntmaxNormalizer,
    JumpNormalizer,
    MonotonicNormalizer,
    Normalizer,
    RelaxedNormalizer,
    SegmentationNormalizer,
    SoftmaxNormalizer,
    SparsemaxNormalizer,
    TreeNormalizer,
    make_normalizer,
    register_normalizer,
)
from structattn.nn.rnn import BiRNN
from structattn.nn.scorers import (
    SCORERS,
    AdditiveScorer,
    BilinearScorer,
    DotScorer,
    MultiHeadScorer,
    make_scorer,
)
from structattn.nn.simplex import Entmax15, EntmaxBisect, Sparsemax
from structattn.nn.transformer import TransformerDecoderLayer, TransformerEncoderLayer

__all__ = [
    "NORMALIZERS",
    "SCORERS",
    "AdditiveScorer",
    "BiRNN",
    "BilinearScorer",
    "DotScorer",
    "EmissionHead",
    "Entmax15",
    "Entmax15Normalizer",
    "EntmaxBisect",
    "EntmaxNormalizer",
    "HMMNormalizer",
    "InferenceNetwork",
    "LatentAttention",
    "JumpNormalizer",
    "MonotonicNormalizer",
    "MultiHeadScorer",
    "MultiheadAttention",
    "Normalizer",
    "RelaxedNormalizer",
    "SegmentationNormalizer",
    "SoftmaxNormalizer",
    "Sparsemax",
    "SparsemaxNormalizer",
    "TreeNormalizer",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    "make_normalizer",
    "make_scorer",
    "register_normalizer",
]
