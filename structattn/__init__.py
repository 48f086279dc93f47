"""structattn: attention as a latent alignment in a probabilistic graphical model.

Scores in, an alignment distribution out; how the context is read from it (expectation,
sample, enumeration, structured marginals) is the caller's choice, and every estimator is a
way of training through that choice.
"""

from structattn import distributions, functional, infer, models, nn
from structattn.distributions import (
    CategoricalAlignment,
    HMMAlignment,
    LinearChainCRF,
    MonotonicAlignment,
    NonProjectiveDependencyCRF,
    ProjectiveDependencyCRF,
    RelaxedAlignment,
    SparsemaxAlignment,
    segmentation_crf,
)
from structattn.functional import entmax15, entmax_bisect, masked_softmax, sparsemax

__version__ = "0.2.0"

__all__ = [
    "CategoricalAlignment",
    "HMMAlignment",
    "LinearChainCRF",
    "MonotonicAlignment",
    "NonProjectiveDependencyCRF",
    "ProjectiveDependencyCRF",
    "RelaxedAlignment",
    "SparsemaxAlignment",
    "distributions",
    "entmax15",
    "entmax_bisect",
    "functional",
    "infer",
    "masked_softmax",
    "models",
    "nn",
    "segmentation_crf",
    "sparsemax",
]
