"""Estimators and the Pyro helper layer."""

from structattn.infer.baselines import (
    BASELINES,
    Baseline,
    LearnedBaseline,
    LeaveOneOutBaseline,
    NoBaseline,
    RunningMeanBaseline,
    SoftAttentionBaseline,
    make_baseline,
)
from structattn.infer.diagnostics import GradientVarianceReport, gradient_variance
from structattn.infer.elbo import RLOO_ELBO, AlignmentELBO, ExactELBO, StraightThroughELBO
from structattn.infer.enumeration import (
    broadcast_cat,
    gather_along,
    observe_alignment_emission,
)
from structattn.infer.estimators import (
    ESTIMATOR_NAMES,
    AlignmentTerms,
    Estimator,
    ExactEstimator,
    ScoreFunctionEstimator,
    SparseEstimator,
    StraightThroughEstimator,
    make_estimator,
)
from structattn.infer.exact import exact_elbo, marginal_log_likelihood, posterior
from structattn.infer.readout import gather, readout
from structattn.infer.sites import ESTIMATORS, sample_alignment

__all__ = [
    "BASELINES",
    "ESTIMATORS",
    "ESTIMATOR_NAMES",
    "AlignmentELBO",
    "AlignmentTerms",
    "Baseline",
    "Estimator",
    "ExactELBO",
    "ExactEstimator",
    "GradientVarianceReport",
    "LearnedBaseline",
    "LeaveOneOutBaseline",
    "NoBaseline",
    "RLOO_ELBO",
    "RunningMeanBaseline",
    "ScoreFunctionEstimator",
    "SoftAttentionBaseline",
    "SparseEstimator",
    "StraightThroughELBO",
    "StraightThroughEstimator",
    "broadcast_cat",
    "exact_elbo",
    "gather",
    "gather_along",
    "gradient_variance",
    "make_baseline",
    "make_estimator",
    "marginal_log_likelihood",
    "observe_alignment_emission",
    "posterior",
    "readout",
    "sample_alignment",
]
