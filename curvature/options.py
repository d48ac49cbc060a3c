"""Option names, each defined once.

Every choice a user can make by name (in :class:`~curvature.laplace.LaplaceConfig`, in the service's request
schemas, on the worker, on the command line) is a member of one of these enums. They are ``StrEnum``s, so a
member compares equal to its string value and serialises to it: ``Curvature.kfac == "kfac"``.

The service imports these enums for its pydantic schemas (so the OpenAPI document lists the allowed values)
and the CLI for its ``choices``; nothing else spells the values out.
"""

from __future__ import annotations

from enum import StrEnum


class Curvature(StrEnum):
    """How the Gauss-Newton blocks of the posterior precision are approximated.

    ``kfac``: Kronecker factors with ``G`` from sampled targets (thesis eq. 4.9); ``kflr``: Kronecker factors
    with ``G`` from the exact low-rank output Hessian (§4.3.1); ``kfra``: recursive approximation (§4.3.2),
    chains of Linear layers only; ``rp``: ``G`` from random projections of the output Hessian; ``diag``: the
    exact diagonal of the Gauss-Newton matrix.
    """

    kfac = "kfac"
    kflr = "kflr"
    kfra = "kfra"
    rp = "rp"
    diag = "diag"


KRONECKER_CURVATURES = (Curvature.kfac, Curvature.kflr, Curvature.kfra, Curvature.rp)

DEFAULT_CURVATURE = Curvature.kfac
"""The curvature used when none is named: by the library, the API and the CLI alike.

KFAC because it is the cheapest Kronecker fit (under one training epoch on the benchmark MLP, against about three
for KFLR) and the only one that leaves room, within a three-epoch budget, for the eigendecomposition, validation
tuning and OOD calibration. Its tuned linearised posterior is no worse than KFLR's (per-curvature rows of the
quality benchmark at commit e80187e: test NLL 0.239 vs 0.246, letters AUROC 0.921 vs 0.929). ``LaplaceConfig``'s
other defaults (linearised predictive, mutual information as the OOD score, fast validation tuning) are documented
there.
"""


class Damping(StrEnum):
    """How ``τ I`` is added to a Kronecker block: ``exact`` eigen-damping or ``factored`` (thesis eq. 5.14)."""

    exact = "exact"
    factored = "factored"


class Tuning(StrEnum):
    """How ``(N_eff, τ)`` are chosen: validation NLL, the Laplace marginal likelihood, or not at all."""

    validation = "validation"
    marglik = "marglik"
    none = "none"


class TuningShape(StrEnum):
    """How validation tuning sets the ratio ``N_eff/τ`` (the posterior's shape; ``τ`` then sets its scale).

    ``spectrum``: from the curvature alone, so that the prior and the data weigh equally in the median direction
    the data excite (:func:`curvature.tuning.spectral_shape`); ``validation``: searched with ``τ`` on validation
    NLL over a two-dimensional grid.
    """

    spectrum = "spectrum"
    validation = "validation"


class Subset(StrEnum):
    """Which layers the posterior covers."""

    all = "all"
    last_layer = "last_layer"


class Task(StrEnum):
    """What a network predicts: class logits (softmax cross-entropy) or real values (Gaussian)."""

    classification = "classification"
    regression = "regression"


class Predictive(StrEnum):
    """``mc``: Monte Carlo over weight samples; ``glm``: the linearised network with its logit covariance."""

    mc = "mc"
    glm = "glm"


class OodScore(StrEnum):
    """The uncertainty that flags out-of-distribution inputs."""

    entropy = "entropy"
    mutual_information = "mutual_information"
    max_prob = "max_prob"


REGRESSION_OOD_SCORES = (OodScore.entropy, OodScore.mutual_information)


class ContinualMethod(StrEnum):
    """How a sequence of tasks is learned (thesis §5.3, :mod:`curvature.continual`).

    ``online``: Laplace recursion, one curvature term per task around the latest optimum (eq. 5.23, 5.25);
    ``online_sum``: the same with the Kronecker factors of all tasks added together (constant memory);
    ``ewc``: one penalty per task around that task's own optimum (eq. 5.26); ``nononline``: the curvature of
    every task seen so far recomputed at the latest optimum (eq. 5.24); ``si``: Synaptic Intelligence;
    ``finetune``: no penalty (lower bound); ``joint``: training on all data seen so far (upper bound).
    """

    online = "online"
    online_sum = "online_sum"
    ewc = "ewc"
    nononline = "nononline"
    si = "si"
    finetune = "finetune"
    joint = "joint"


class ContinualOptimizer(StrEnum):
    """The optimiser that trains each task: ``adam``, ``sgd`` (with optional Nesterov momentum) or full-batch ``lbfgs``."""

    adam = "adam"
    sgd = "sgd"
    lbfgs = "lbfgs"


class KronSum(StrEnum):
    """How a sum of Kronecker terms ``Σ_t N_t G_t ⊗ A_t`` becomes one servable Kronecker block.

    ``nearest``: the Frobenius-nearest ``X ⊗ Y`` (Van Loan & Pitsianis); ``sum``: the task-weighted averages of
    the factors, ``N (Ḡ ⊗ Ā)`` (the constant-memory approximation); ``latest``: the latest task's factors scaled
    to all the data seen.
    """

    nearest = "nearest"
    sum = "sum"
    latest = "latest"


MAX_SEED = 2**63 - 1
"""The largest seed accepted anywhere a seed is an option (``torch.Generator.manual_seed`` takes a signed 64-bit)."""


class LikelihoodName(StrEnum):
    """The likelihood a network is trained or fitted with (:func:`curvature.likelihood_from_name`).

    ``classification``: softmax cross-entropy over logits; ``regression``: Gaussian; ``binary``: independent
    Bernoulli outputs on logits (autoencoders); ``binary_mixture``: the two-component Bernoulli mixture of thesis
    eq. 4.28, where the Gauss-Newton matrix and the Fisher differ.
    """

    classification = "classification"
    regression = "regression"
    binary = "binary"
    binary_mixture = "binary_mixture"


class TrainingMethod(StrEnum):
    """How an optimise job trains: the second-order optimiser with one curvature, or a first-order baseline."""

    kfra = "kfra"
    kflr = "kflr"
    kfac = "kfac"
    rp = "rp"
    diag = "diag"
    adam = "adam"
    sgd = "sgd"


FIRST_ORDER_METHODS = (TrainingMethod.adam, TrainingMethod.sgd)
