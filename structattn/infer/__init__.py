"""Estimators and the Pyro helper layer."""

from structattn.infer.exact import exact_elbo, marginal_log_likelihood, posterior
from structattn.infer.readout import gather, readout
from structattn.infer.sites import ESTIMATORS, sample_alignment

__all__ = [
    "ESTIMATORS",
    "exact_elbo",
    "gather",
    "marginal_log_likelihood",
    "posterior",
    "readout",
    "sample_alignment",
]
