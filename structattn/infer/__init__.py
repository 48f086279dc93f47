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
    register_baseline,
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
    ESTIMATORS,
    AlignmentTerms,
    Estimator,
    ExactEstimator,
    RLOOEstimator,
    ScoreFunctionEstimator,
    SparseEstimator,
    StraightThroughEstimator,
    make_estimator,
    register_estimator,
)
from structattn.infer.exact import (
    condition,
    exact_elbo,
    marginal_log_likelihood,
    posterior,
    register_conditioner,
)
from structattn.infer.readout import READOUT_MODES, gather, readout, register_readout
from structattn.infer.sites import sample_alignment

__all__ = [
    "READOUT_MODES",
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
    "RLOOEstimator",
    "RLOO_ELBO",
    "RunningMeanBaseline",
    "ScoreFunctionEstimator",
    "SoftAttentionBaseline",
    "SparseEstimator",
    "StraightThroughELBO",
    "StraightThroughEstimator",
    "broadcast_cat",
    "condition",
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
    "register_readout",
    "register_baseline",
    "register_conditioner",
    "register_estimator",
    "sample_alignment",
]
