"""kronlap's numerical core: Kronecker-factored Gauss-Newton curvature and Laplace posteriors in PyTorch.

Example::

    import curvature as cv
    factors = cv.fit_kronecker(model, (x, y), cv.CrossEntropy(), method="kflr")
    A, G = factors["0"].A, factors["0"].G                  # per-layer factors, G ⊗ A ≈ GGN block / N
    eig = cv.KronEigen.from_factors(G, A)
    step = eig.damped_inverse_apply(grad_matrix, n_eff=len(x), prior_precision=1.0)
    diag = cv.fit_diagonal(model, (x, y), cv.CrossEntropy())
"""

from .continual import (
    ContinualConfig,
    ContinualLearner,
    diag_quadratic,
    kron_quadratic,
    nearest_kronecker_sum,
    run_tasks,
)
from .estimators import (
    DiagonalFactors,
    KroneckerFactors,
    LayerFactors,
    exact_curvature,
    exact_fisher,
    exact_ggn,
    fit_diagonal,
    fit_kronecker,
    ggn_vector_product,
    merge_factors,
    supported_curvatures,
)
from .kron import FactoredPrecision, KronEigen, factored_damping, kron_matvec, sym_eigh, trace_norm_omega
from .laplace import CURVATURES, LaplaceConfig, fit_laplace
from .layers import Layer, find_layers, register_handler
from .likelihoods import Bernoulli, BinaryMixture, CrossEntropy, Gaussian, Likelihood, likelihood_from_name
from .metrics import accuracy, auroc, ece, nll_classification, nll_gaussian
from .ood import calibrate_ood
from .optim import OptimizerConfig, SecondOrderOptimizer, StepInfo
from .options import (
    DEFAULT_CURVATURE,
    ContinualMethod,
    ContinualOptimizer,
    Curvature,
    Damping,
    KronSum,
    OodScore,
    Predictive,
    Subset,
    Task,
    Tuning,
    TuningShape,
)
from .posterior import DiagBlock, KronBlock, LaplacePosterior, LayerPosterior
from .predictive import predict
from .tuning import TuningResult, spectral_shape, tune_linearised, tune_marglik, tune_null_prior, tune_validation

__all__ = [
    "CURVATURES",
    "DEFAULT_CURVATURE",
    "Curvature",
    "Damping",
    "OodScore",
    "Predictive",
    "Subset",
    "Task",
    "Tuning",
    "TuningShape",
    "LaplaceConfig",
    "LaplacePosterior",
    "LayerPosterior",
    "KronBlock",
    "DiagBlock",
    "OptimizerConfig",
    "SecondOrderOptimizer",
    "StepInfo",
    "TuningResult",
    "accuracy",
    "auroc",
    "calibrate_ood",
    "ece",
    "fit_laplace",
    "nll_classification",
    "nll_gaussian",
    "predict",
    "spectral_shape",
    "tune_linearised",
    "tune_marglik",
    "tune_null_prior",
    "tune_validation",
    "Bernoulli",
    "BinaryMixture",
    "CrossEntropy",
    "DiagonalFactors",
    "FactoredPrecision",
    "Gaussian",
    "KronEigen",
    "KroneckerFactors",
    "Layer",
    "LayerFactors",
    "Likelihood",
    "exact_curvature",
    "exact_fisher",
    "exact_ggn",
    "factored_damping",
    "find_layers",
    "fit_diagonal",
    "fit_kronecker",
    "ggn_vector_product",
    "kron_matvec",
    "likelihood_from_name",
    "merge_factors",
    "register_handler",
    "supported_curvatures",
    "sym_eigh",
    "trace_norm_omega",
    "ContinualConfig",
    "ContinualLearner",
    "ContinualMethod",
    "ContinualOptimizer",
    "KronSum",
    "diag_quadratic",
    "kron_quadratic",
    "nearest_kronecker_sum",
    "run_tasks",
]
