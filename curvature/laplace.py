"""One call from a trained network to a tuned, OOD-calibrated Laplace posterior."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor, nn

from .estimators import DiagonalFactors, KroneckerFactors, fit_diagonal, fit_kronecker
from .layers import find_layers
from .likelihoods import CrossEntropy, Gaussian
from .ood import calibrate_ood
from .options import (
    DEFAULT_CURVATURE,
    Curvature,
    Damping,
    OodScore,
    Predictive,
    Subset,
    Task,
    Tuning,
    TuningShape,
)
from .posterior import LaplacePosterior, estimate_sigma
from .predictive import glm_features
from .tuning import spectral_shape, tune_linearised, tune_marglik, tune_null_prior, tune_validation

CURVATURES = tuple(Curvature)


@dataclass
class LaplaceConfig:
    """Everything that shapes a fit (JSON-able).

    Defaults, and why (evidence: ``bench/results/quality.md`` and ``fit.md``):

    * ``curvature="kfac"`` (:data:`~curvature.options.DEFAULT_CURVATURE`): the cheapest Kronecker fit.
    * ``predictive="glm"``: the linearised predictive. Tuning it costs a re-weighting of features computed once
      (:func:`~curvature.tuning.tune_linearised`), its mean logits are the network's, and it does not lose the
      accuracy that sampled networks lose; MC weight sampling stays available (tuned the same way, then narrowed
      while it loses to the network on validation: accuracy for classification, NLL for regression).
    * ``ood_score="mutual_information"``: the epistemic part of the predictive entropy; on every network and
      OOD kind of the quality benchmark its AUROC is at least that of the total entropy.
    * ``tuning="validation"`` with ``tune_shape="spectrum"``: the ratio ``N_eff/τ`` (the posterior's shape) is
      read from the curvature's spectrum (:func:`~curvature.tuning.spectral_shape`: prior and data weigh
      equally in the median excited direction), then ``τ`` (the scale) and the null-space prior by validation NLL
      on at most ``tune_points=2048`` validation points (a seeded draw; ``None``: all), among candidates that
      keep the network's validation accuracy (one example of slack). Validation NLL barely sees the shape: on
      six networks (the quality benchmark's three, two more LeNet-style CNNs and a 784-256-256-10 MLP trained
      to 100 % training accuracy) it varies by under 1 % along ridges of ``(N_eff, τ)`` whose letters AUROC
      runs from below the network's entropy to 0.1 above it. The spectral shape lies in the good stretch of
      each ridge: with it every network gains AUROC on every OOD set (+0.014 to +0.39), where the
      two-dimensional search of both on validation NLL (``tune_shape="validation"``) loses on three OOD sets of
      the benchmark CNN (up to 0.012) and scores about twice as many candidates (38-89 against 19-37). OOD thresholds
      are the ``ood_quantile`` of the score over *all* validation points at the chosen values, from the same
      features (no second pass).
    * ``tune_null_prior=True``: never-excited directions get their own, broader prior (the broadest within 0.5 %
      of the best validation NLL) in fits with the linearised predictive. MC fits keep the layer's ``τ`` there:
      the linearised network does not move in those directions, sampled networks do (units that never fired
      come alive), and on two CNNs the MC predictive with that prior ranked noise and inverted digits as *less*
      out-of-distribution than test digits (AUROC 0.12-0.35; without it inverted 0.94-0.97, noise 0.84-0.91).
    * ``broad_tolerance=0.005``: when the network itself (zero covariance) is within 0.5 % of the best
      validation NLL, the validation data cannot tell the posterior from the network, and the broadest
      candidate within the tolerance is taken (the rule the null-space prior follows too); otherwise the NLL
      optimum. Taking the broadest everywhere costs calibration (test ECE of the tanh MLP 0.057 against 0.041);
      taking the optimum everywhere let the benchmark CNN, whose validation NLL is flat, run to ``τ = 1e10``,
      where its AUROC on noise fell below MAP's. ``None``: always the optimum.
    * ``back_off=True``: the broad choices (the rule above, the null-space prior) step one grid step back
      inside what validation accepts: half a decade of ``τ``, one decade of ``τ₀``. At the edge itself
      validation NLL is about to turn, and other data often disagree: on three retrained LeNets, three tanh
      MLPs and two 784-256-256-10 MLPs (500 test digits each), the step back lowered test NLL on six of the
      eight and left it unchanged on two (two LeNets went from 0.0008 and 0.0026 above MAP's NLL to 0.0002
      below it), and every network still gains AUROC on every OOD set.
    * ``calibration_tolerance=None``: the optional rule "within this relative tolerance of the best NLL, the
      candidate whose mean confidence is closest to its accuracy". On a CNN already underconfident on
      validation it takes the narrowest candidate there is (``τ`` at the end of the grown range), so it is off
      by default.
    """

    curvature: Curvature = DEFAULT_CURVATURE
    damping: Damping = Damping.exact
    tuning: Tuning = Tuning.validation
    subset: Subset = Subset.all
    likelihood: Task = Task.classification
    mc_samples: int = 1
    batch_size: int = 512
    prior_precision: float = 1.0
    n_eff: float | None = None
    ood_score: OodScore = OodScore.mutual_information
    ood_quantile: float = 0.95
    predictive: Predictive = Predictive.glm
    samples: int = 100
    seed: int = 0
    tune_per_layer: bool = False
    tune_null_prior: bool = True
    tune_points: int | None = 2048
    tune_shape: TuningShape = TuningShape.spectrum
    calibration_tolerance: float | None = None
    broad_tolerance: float | None = 0.005
    back_off: bool = True
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
            "tune_shape": TuningShape,
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
        if self.tune_points is not None and self.tune_points < 2:
            raise ValueError("tune_points must be at least 2 (or None for every validation point).")
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
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    start = clock

    def lap(phase: str) -> float:
        nonlocal clock
        now = time.perf_counter()
        timings[phase] = timings.get(phase, 0.0) + now - clock
        clock = now
        return timings[phase]

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
        report(0.05 + 0.55 * f, f"fitting {cfg.curvature} curvature ({msg})")

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
    report(0.6, f"fitted {cfg.curvature} curvature in {lap('curvature'):.1f} s; building posterior")
    # Eigendecompositions in the factors' own precision: float32 halves their cost for float32 networks, and its
    # error (~1e-7 of the largest eigenvalue) is far below what the prior adds to every eigenvalue.
    post = LaplacePosterior(
        model,
        factors,
        lik,
        n_eff=cfg.n_eff,
        prior_precision=cfg.prior_precision,
        damping=cfg.damping,
        eigh_dtype=None,
    )
    post.metadata.update(
        {
            "config": cfg.to_dict(),
            "seed": cfg.seed,
            "ood_score": cfg.ood_score,
            "predictive": cfg.predictive,
            "input_norm_max": _max_norm(x_train if x_val is None else torch.cat([x_train, x_val])),
        }
    )
    report(0.65, f"posterior built in {lap('posterior'):.1f} s")
    tuning = cfg.tuning
    if tuning == "validation" and x_val is None:
        tuning = "marglik"
        post.metadata["tuning_note"] = "no validation split given: tuned by marginal likelihood"
    calibration: dict[str, dict[str, Tensor]] = {}
    if tuning == "validation":
        tune_samples = min(cfg.samples, 32)

        def tune_progress(f: float, m: str) -> None:
            report(0.65 + 0.25 * f, m)

        if cfg.tune_per_layer:
            result = tune_validation(
                post,
                x_val,
                y_val,
                predictive="glm",
                samples=tune_samples,
                seed=cfg.seed,
                per_layer=True,
                progress=tune_progress,
            )
            if cfg.tune_null_prior and cfg.damping == "exact":
                post.metadata["null_prior"] = tune_null_prior(
                    post, x_val, y_val, predictive="glm", samples=tune_samples, seed=cfg.seed
                )
        else:
            device = next(iter(post.blocks.values())).mean.device
            x_val, y_val = x_val.to(device), y_val.to(device)
            feats = glm_features(post, x_val)
            report(0.67, f"validation features in {lap('features'):.1f} s")
            rows = None
            if cfg.tune_points is not None and cfg.tune_points < len(x_val):
                order = torch.randperm(len(x_val), generator=torch.Generator().manual_seed(cfg.seed))
                rows = order[: cfg.tune_points].to(device)
            tuned_x = feats.f if rows is None else feats.f[rows]
            tuned_y = y_val if rows is None else y_val[rows]
            min_accuracy = None
            if cfg.likelihood == "classification":
                # the predictive may not cost accuracy: at most one tuning example below the network's own
                min_accuracy = float((tuned_x.argmax(-1) == tuned_y).double().mean()) - 1.0 / len(tuned_y) - 1e-12
            shape = None
            if cfg.tune_shape == "spectrum":
                try:
                    shape = spectral_shape(post)  # N_eff/τ, from the curvature's spectrum
                    post.metadata["shape"] = shape
                except ValueError:  # no excited direction to read it from: search it on validation data
                    post.metadata["tuning_note"] = "the curvature excites no direction: shape tuned on validation"
            result = tune_linearised(
                post,
                x_val,
                y_val,
                samples=tune_samples,
                seed=cfg.seed,
                link="mc",
                points=4,
                # sampled networks leave the linear regime in never-excited directions (dead units come alive)
                null_prior=cfg.tune_null_prior and cfg.predictive == "glm",
                feats=feats,
                summary_samples=cfg.samples,
                min_accuracy=min_accuracy,
                calibration_tolerance=cfg.calibration_tolerance if cfg.likelihood == "classification" else None,
                broad_tolerance=cfg.broad_tolerance,
                rows=rows,
                shape=shape,
                progress=tune_progress,
                back_off=cfg.back_off,
            )
            post.metadata["link"] = result.link
            post.metadata["null_prior"] = result.null_prior
            post.metadata["at_edge"] = result.at_edge
            post.metadata["candidates"] = len(result.history)
            post.metadata["tuning_points"] = len(x_val) if rows is None else len(rows)
            calibration["glm"] = result.summary
        post.metadata["validation_nll"] = result.objective
        post.metadata["tuned_on"] = "linearised predictive (validation NLL)"
    elif tuning == "marglik":
        result = tune_marglik(
            post, _train_nll(model, lik, x_train, y_train, cfg.batch_size), per_layer=cfg.tune_per_layer
        )
        post.metadata["log_marglik"] = result.objective
    post.metadata["tuning"] = tuning
    report(0.9, f"tuned in {lap('tuning'):.1f} s; calibrating OOD threshold")
    heldout = x_val if x_val is not None else x_train[: min(len(x_train), 1000)]
    # The configured predictive is always calibrated. After validation tuning the other one is calibrated when it
    # costs nothing more (the linearised predictive on the validation set is a by-product of tuning); MC weight
    # sampling (K sampled networks, the weight draws alone cost more than the whole default fit) is calibrated
    # only for fits configured for it. Fits without validation tuning calibrate both.
    if cfg.predictive == "mc" and tuning == "validation":
        calibration["mc"] = _narrow_until_accurate(
            post, x_val, y_val.to(x_val.device), cfg.samples, progress=lambda f, m: report(0.9 + 0.08 * f, m)
        )
        if "glm" in calibration and post.metadata.get("mc_narrowed"):  # tuning's summary is stale
            del calibration["glm"]
    others = tuple(p for p in Predictive if p != cfg.predictive)
    if tuning == "validation":
        others = tuple(p for p in others if p in calibration)
    for predictive in (cfg.predictive, *others):
        calibrate_ood(
            post,
            heldout,
            quantile=cfg.ood_quantile,
            samples=cfg.samples,
            predictive=predictive,
            outputs=calibration.get(predictive),
        )
    post.metadata["ood_calibrated"] = sorted(post.ood_table)
    lap("ood_calibration")
    timings["total"] = time.perf_counter() - start
    post.metadata["timings"] = {k: round(v, 4) for k, v in timings.items()}
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items() if k != "total")
    report(1.0, f"done in {timings['total']:.1f} s ({phases})")
    return post


def _max_norm(x: Tensor, batch_size: int = 4096) -> float:
    """The largest Euclidean norm of an input row (each input flattened)."""
    norms = [x[i : i + batch_size].flatten(1).double().norm(dim=-1).max() for i in range(0, len(x), batch_size)]
    return float(torch.stack(norms).max())


def _narrow_until_accurate(
    post: LaplacePosterior,
    x_val: Tensor,
    y_val: Tensor,
    samples: int,
    tries: int = 6,
    probes: int = 10,
    progress: Callable[[float, str], None] | None = None,
):
    """MC over weights of the tuned posterior on the validation set, narrowed ×10 at a time while it loses to the
    network.

    The hyper-parameters are tuned on the linearised network; sampled *networks* can be far worse where the
    linearisation is not (saturating units, ReLU kinks). While the MC predictive loses to the network itself on
    the validation set (classification: an accuracy more than one validation example below the network's;
    regression: a Gaussian NLL above the network's with the noise variance alone), every precision (``N_eff``,
    ``τ``, ``τ₀``) is multiplied by 10 (covariance ÷ 10), at most ``tries`` times. Every precision ×10 scales
    each draw's offset from the mean by 1/√10 (same normals, same seed), so the ``samples`` draws are made once
    and rescaled. ``probes`` of them (antithetic pairs), run alone at each narrowing, pick where the full set is
    first run (about a tenth of a full pass each); the full set then confirms, and narrows on if it must. Returns the
    final MC predictive on the validation set (reused for OOD calibration). ``progress(fraction, message)`` hears
    of each stage.
    """
    from .metrics import nll_gaussian
    from .predictive import outputs_under, weight_samples

    regression = isinstance(post.likelihood, Gaussian)
    with torch.no_grad():
        f0 = torch.cat([post.model(x_val[i : i + 1024]) for i in range(0, len(x_val), 1024)])
    if regression:
        f0 = f0.reshape(len(x_val), -1)
        noise = post.likelihood.sigma**2
        target = nll_gaussian(f0, torch.full_like(f0, noise), y_val)
    else:
        target = float((f0.argmax(-1) == y_val).double().mean()) - 1.0 / len(y_val) - 1e-12

    def accurate(out: dict[str, Tensor]) -> bool:
        if regression:
            return nll_gaussian(out["mean"], out["variance"], y_val) <= target
        return float((out["probs"].argmax(-1) == y_val).double().mean()) >= target

    def summary(outs: Tensor) -> dict[str, Tensor]:
        if regression:
            outs = outs.reshape(outs.shape[0], len(x_val), -1)
            return {"mean": outs.mean(0), "variance": outs.var(0, unbiased=False) + noise}
        return {"probs": outs.softmax(-1).mean(0)}

    report = progress or (lambda f, m: None)
    seed = int(post.metadata.get("seed", 0))
    report(0.0, f"MC predictive: drawing {samples} networks")
    draws = weight_samples(post, samples, seed)
    means = {name: b.mean for name, b in post.blocks.items()}
    start = 0
    if 0 < probes < samples:
        pairs = max(1, probes // 2)
        picked = post.paired_indices(samples, pairs)
        head = {name: w[picked.to(w.device)] - means[name] for name, w in draws.items()}
        while start < tries:
            report(0.5, f"MC predictive: {2 * pairs} probe networks on validation, covariance ÷ {10**start:g}")
            scaled = {name: means[name] + d * 10 ** (-start / 2) for name, d in head.items()}
            if accurate(summary(outputs_under(post, scaled, x_val))):
                break
            start += 1
    key = (samples, seed)
    step = 0
    while True:
        if step < start:
            jump = start - step  # where the probes passed (or gave up): no full pass before it
        else:
            report(0.6, f"MC predictive: {samples} networks on validation, covariance ÷ {10**step:g}")
            out = post.predict(x_val, samples=samples, predictive="mc")
            if accurate(out) or step >= tries:
                return out
            jump = 1
        factor = 10**jump
        null = post.null_prior
        post.set_hyperparameters(
            n_eff=factor * post.n_eff, prior_precision={k: factor * v for k, v in post.prior_precision.items()}
        )
        post.null_prior = {k: factor * v for k, v in null.items()} or None
        step += jump
        post.metadata["mc_narrowed"] = 10**step
        for name, w in draws.items():  # θ* + (w − θ*)/√factor, in one pass
            w.lerp_(means[name], 1.0 - factor**-0.5)
        post.offer_samples({key: draws})
