"""Torch modules: scorers and latent attention, broadcast-safe under Pyro enumeration."""

from structattn.nn.attention import NORMALIZERS, LatentAttention
from structattn.nn.inference import InferenceNetwork
from structattn.nn.multihead import MultiheadAttention
from structattn.nn.rnn import BiRNN
from structattn.nn.scorers import (
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
    "AdditiveScorer",
    "BiRNN",
    "BilinearScorer",
    "DotScorer",
    "Entmax15",
    "EntmaxBisect",
    "InferenceNetwork",
    "LatentAttention",
    "MultiHeadScorer",
    "MultiheadAttention",
    "Sparsemax",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    "make_scorer",
]
