"""Torch modules: scorers and latent attention, broadcast-safe under Pyro enumeration."""

from structattn.nn.attention import NORMALIZERS, LatentAttention
from structattn.nn.scorers import (
    AdditiveScorer,
    BilinearScorer,
    DotScorer,
    MultiHeadScorer,
    make_scorer,
)

__all__ = [
    "NORMALIZERS",
    "AdditiveScorer",
    "BilinearScorer",
    "DotScorer",
    "LatentAttention",
    "MultiHeadScorer",
    "make_scorer",
]
