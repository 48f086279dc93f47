"""structattn: attention as a latent alignment in a probabilistic graphical model.

Scores in, an alignment distribution out; how the context is read from it (expectation,
sample, enumeration, structured marginals) is the caller's choice, and every estimator is a
way of training through that choice.
"""

from structattn import distributions, functional, infer, nn
from structattn.distributions import (
    CategoricalAlignment,
    RelaxedAlignment,
    SparsemaxAlignment,
)
from structattn.functional import entmax15, entmax_bisect, masked_softmax, sparsemax

__version__ = "0.1.0"

__all__ = [
    "CategoricalAlignment",
    "RelaxedAlignment",
    "SparsemaxAlignment",
    "distributions",
    "entmax15",
    "entmax_bisect",
    "functional",
    "infer",
    "masked_softmax",
    "nn",
    "sparsemax",
]
