"""One call from a trained network to a tuned, OOD-calibrated Laplace posterior."""

from __future__ import annotations

import dataclasses
from enum import StrEnum
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .estimators import DiagonalFactors, KroneckerFactors, fit_diagonal, fit_kronecker
from .layers import find_layers
from .likelihoods import CrossEntropy, Gaussian
from .ood import calibrate_ood
from .options import DEFAULT_CURVATURE, Curvature, Damping, OodScore, Predictive, Subset, Task, Tuning
from .posterior import LaplacePosterior, estimate_sigma
from .tuning import tune_marglik, tune_null_prior, tune_validation

CURVATURES = tuple(Curvature)


@dataclass
class LaplaceConfig:
    """Everything that shapes a fit (JSON-able)."""

    curvature: Curvature = DEFAULT_CURVATURE
    damping: Damping = Damping.exact
    tuning: Tuning = Tuning.validation
    subset: Subset = Subset.all
    likelihood: Task = Task.classification
    mc_samples: int = 1
    batch_size: int = 512
    prior_precision: float = 1.0
    n_eff: float | None = None
    ood_score: OodScore = OodScore.entropy
    ood_quantile: float = 0.95
    predictive: Predictive = Predictive.mc
    samples: int = 100
    seed: int = 0
    tune_per_layer: bool = False
    tune_null_prior: bool = True
    sigma: float | None = None

    def __post_init__(self) -> None:
        options = {
            "curvature": Curvature,
            "damping": Damping,
            "tuning": Tuning,
            "subset": Subset,
            "likelihood": Task,
            "predictive": Predictive,
            "ood_score": OodScore,
        }
        for key, enum in options.items():
            value = getattr(self, key)
            try:
                setattr(self, key, enum(value))
            except ValueError:
                allowed = tuple(m.value for m in enum)
                raise ValueError(f"{key} must be one of {allowed}, got {value!r}.") from None
        if not 0 < self.ood_quantile < 1:
            raise ValueError("ood_quantile must be in (0, 1).")
        if self.samples < 1 or self.mc_samples < 1 or self.batch_size < 1:
            raise ValueError("samples, mc_samples and batch_size must be positive.")
        if self.damping == "factored" and self.curvature == "diag":
            raise ValueError("factored damping applies to Kronecker curvature only.")
        if self.likelihood == "regression" and self.ood_score == "max_prob":
            raise ValueError("max_prob is defined for classification only.")

    def to_dict(self) -> dict:
        """The configuration as plain JSON values (enum members become their strings)."""
        return {k: (v.value if isinstance(v, StrEnum) else v) for k, v in dataclasses.asdict(self).items()}


def _train_nll(model: nn.Module, likelihood, x: Tensor, y: Tensor, batch_size: int) -> float:
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            f = model(x[i : i + batch_size])
            total += float(likelihood.nll(f if f.dim() > 1 else f.unsqueeze(-1), y[i : i + batch_size]))
    return total


def fit_laplace(
    model: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor | None = None,
    y_val: Tensor | None = None,
    config: LaplaceConfig | None = None,
    progress: Callable[[float, str], None] | None = None,
    factors: KroneckerFactors | DiagonalFactors | None = None,
) -> LaplacePosterior:
    """Fit curvature, build the posterior, tune ``(N_eff, τ)``, calibrate the OOD threshold.

    Args:
        model: trained network (evaluated in eval mode; its weights are the posterior mean).
        x_train, y_train: the training data (or a representative subset).
        x_val, y_val: optional validation split, used for tuning and OOD calibration.
        config: :class:`LaplaceConfig`.
        progress: ``callable(fraction, message)``.
        factors: curvature already fitted on ``(x_train, y_train)`` with ``config``'s curvature (e.g. shards'
            factors combined by :func:`~curvature.estimators.common.merge_factors`); the fit then starts at
            the posterior. The training data still serves the input-norm bound, marginal-likelihood tuning
            and, without a validation split, OOD calibration.
    """
    cfg = config or LaplaceConfig()
    report = progress or (lambda f, m: None)
    model.eval()
    dtype = next(model.parameters()).dtype
    x_train = x_train.to(dtype)
    if x_val is not None:
        x_val = x_val.to(dtype)
    if cfg.likelihood == "regression":
        y_train = y_train.to(dtype)
        if y_val is not None:
            y_val = y_val.to(dtype)
        sigma = cfg.sigma or estimate_sigma(model, x_train, y_train)
        lik = Gaussian(sigma)
    else:
        lik = CrossEntropy()
    include = None
    if cfg.subset == "last_layer":
        include = [find_layers(model)[-1].name]
    gen = torch.Generator().manual_seed(cfg.seed)

    def fit_progress(f: float, msg: str) -> None:
        report(0.05 + 0.6 * f, f"fitting {cfg.curvature} curvature ({msg})")

    report(0.0, "starting")
    if factors is not None:
        if factors.method != ("ggn" if cfg.curvature == "diag" else cfg.curvature):
            raise ValueError(f"factors of method {factors.method!r} do not match curvature {cfg.curvature!r}.")
    elif cfg.curvature == "diag":
        factors = fit_diagonal(
            model,
            (x_train, y_train),
            lik,
            method="ggn",
            batch_size=cfg.batch_size,
            progress=fit_progress,
            include=include,
        )
    else:
        factors = fit_kronecker(
            model,
            (x_train, y_train),
            lik,
            method=cfg.curvature,
            mc_samples=cfg.mc_samples,
            batch_size=cfg.batch_size,
            generator=gen,
            progress=fit_progress,
            include=include,
        )
    report(0.65, "building posterior")
    post = LaplacePosterior(
        model, factors, lik, n_eff=cfg.n_eff, prior_precision=cfg.prior_precision, damping=cfg.damping
    )
    post.metadata.update(
        {"config": cfg.to_dict(), "seed": cfg.seed, "ood_score": cfg.ood_score, "predictive": cfg.predictive}
    )
    tuning = cfg.tuning
    if tuning == "validation" and x_val is None:
        tuning = "marglik"
        post.metadata["tuning_note"] = "no validation split given: tuned by marginal likelihood"
    if tuning == "validation":
        result = tune_validation(
            post,
            x_val,
            y_val,
            predictive=cfg.predictive,
            samples=min(cfg.samples, 32),
            seed=cfg.seed,
            per_layer=cfg.tune_per_layer,
            progress=lambda f, m: report(0.65 + 0.25 * f, m),
        )
        post.metadata["validation_nll"] = result.objective
        if cfg.tune_null_prior and cfg.damping == "exact":
            chosen = tune_null_prior(
                post, x_val, y_val, predictive=cfg.predictive, samples=min(cfg.samples, 32), seed=cfg.seed
            )
            post.metadata["null_prior"] = chosen
    elif tuning == "marglik":
        result = tune_marglik(
            post, _train_nll(model, lik, x_train, y_train, cfg.batch_size), per_layer=cfg.tune_per_layer
        )
        post.metadata["log_marglik"] = result.objective
    post.metadata["tuning"] = tuning
    report(0.9, "calibrating OOD threshold")
    heldout = x_val if x_val is not None else x_train[: min(len(x_train), 1000)]
    for predictive in (cfg.predictive, *(p for p in ("mc", "glm") if p != cfg.predictive)):
        calibrate_ood(post, heldout, quantile=cfg.ood_quantile, samples=cfg.samples, predictive=predictive)
    report(1.0, "done")
    return post
