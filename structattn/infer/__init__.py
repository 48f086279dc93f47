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
    "exact_elbo",
    "gather",
    "gradient_variance",
    "make_baseline",
    "make_estimator",
    "marginal_log_likelihood",
    "posterior",
    "readout",
    "sample_alignment",
]
