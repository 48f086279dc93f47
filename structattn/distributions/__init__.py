"""Pyro distributions over alignments."""

from structattn.distributions.categorical import (
    CategoricalAlignment,
    RelaxedAlignment,
    SparsemaxAlignment,
    mask_value,
)

__all__ = ["CategoricalAlignment", "RelaxedAlignment", "SparsemaxAlignment", "mask_value"]
