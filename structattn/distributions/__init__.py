"""Pyro distributions over alignments: per-query categorical and structured."""

from structattn.distributions.categorical import (
    CategoricalAlignment,
    RelaxedAlignment,
    SparsemaxAlignment,
    mask_value,
)
from structattn.distributions.chain import LinearChainCRF, segmentation_crf
from structattn.distributions.hmm import HMMAlignment
from structattn.distributions.jump import JumpAlignment
from structattn.distributions.monotonic import MonotonicAlignment
from structattn.distributions.segmentation import SegmentationAlignment
from structattn.distributions.structured import StructuredDistribution
from structattn.distributions.tree import NonProjectiveDependencyCRF, ProjectiveDependencyCRF

__all__ = [
    "CategoricalAlignment",
    "HMMAlignment",
    "JumpAlignment",
    "LinearChainCRF",
    "MonotonicAlignment",
    "NonProjectiveDependencyCRF",
    "ProjectiveDependencyCRF",
    "RelaxedAlignment",
    "SparsemaxAlignment",
    "SegmentationAlignment",
    "StructuredDistribution",
    "mask_value",
    "segmentation_crf",
]
