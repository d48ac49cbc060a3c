"""Choosing ``(N_eff, τ)`` without refitting the curvature (thesis §5.1.1).

* :func:`tune_validation` minimises the validation negative log-likelihood of the predictive over a coarse
  log-grid followed by local refinement. Every candidate is scored afresh (no metric state is carried between
  candidates). For the linearised predictive the Jacobian pieces of the validation inputs are computed once and
  each candidate only re-weights them by new eigenvalues.
* :func:`tune_null_prior` then gives the directions the training data never excited (pixels that are never
  lit, units that never fire; curvature ~0) their own, broader prior: the smallest precision whose validation
  NLL stays within a tolerance of the tuned one. The validation data barely touches those directions, so this
  is the most uncertainty the in-distribution evidence allows where the network has seen nothing.
* :func:`tune_linearised` is the fast tuner :func:`~curvature.laplace.fit_laplace` uses. The validation inputs'
  Jacobian pieces are computed once, rotated into each layer's Kronecker eigenbasis (GLM features), and every
  candidate ``(N_eff, τ, τ₀)`` only re-weights them: the logit covariance is ``Σ_k φ_k φ_kᵀ / (N_eff λ_k + τ_k)``
  over the eigen-directions ``k`` (``τ_k = τ₀`` on directions the data never excited). The logit draws are shared
  by all candidates (one seed), so candidates differ only by their hyper-parameters. A coarse grid whose range
  grows while the optimum sits on its edge, two local refinements and a decade search for ``τ₀``: tens of
  candidates, each a few small matrix products.
* :func:`tune_marglik` maximises the Laplace evidence over ``τ`` (per layer, where it decomposes) at
  ``N_eff = N``; log-determinants come from the eigenvalues.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .likelihoods import Gaussian
from .metrics import nll_classification, nll_gaussian
from .predictive import GLMFeatures, glm_covariance, glm_features, glm_summary, predictive_summary
from .spectral import SpectralCovariance

if TYPE_CHECKING:
    from .posterior import LaplacePosterior


@dataclass
class TuningResult:
    """The chosen hyper-parameters, the objective there and every candidate scored on the way.

    ``null_prior`` (fast tuner) is the chosen prior precision of never-excited directions (``None``: none);
    ``at_edge`` says whether a chosen value still sits on the edge of the (grown) search range;
    ``summary`` holds the validation predictive at the choice, for reuse (OOD calibration); ``link`` the link
    chosen with it.
    """

    n_eff: float
    prior_precision: float | dict[str, float]
    objective: float
    history: list[dict[str, float]] = field(default_factory=list)
    null_prior: float | None = None
    at_edge: bool = False
    summary: dict[str, Tensor] | None = None
    link: str = "mc"


def _validation_nll(post, summaries, y: Tensor) -> float:
    if isinstance(post.likelihood, Gaussian):
        return nll_gaussian(summaries["mean"], summaries["variance"], y)
    return nll_classification(summaries["probs"], y)


def _on_posterior_device(post, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    mean = post.blocks[post.layers[0].name].mean
    return x.to(device=mean.device, dtype=mean.dtype), y.to(mean.device)


def tune_validation(
    post,
    x_val: Tensor,
    y_val: Tensor,
    predictive: str = "glm",
    samples: int = 32,
    seed: int = 0,
    log10_prior: tuple[float, float] = (-3.0, 5.0),
    log10_n_ratio: tuple[float, float] | None = None,
    tune_n_eff: bool = True,
    per_layer: bool = False,
    refine_steps: int = 2,
    link: str = "mc",
    progress: Callable[[float, str], None] | None = None,
) -> TuningResult:
    """Set ``post``'s ``(N_eff, τ)`` to the validation-NLL minimiser and return the search record."""
    x_val, y_val = _on_posterior_device(post, x_val, y_val)
    post.null_prior = None
    feats = glm_features(post, x_val) if predictive == "glm" else None
    n_data = post.n_data
    history: list[dict[str, float]] = []

    def objective(log_n_ratio: float, log_tau: dict[str, float]) -> float:
        n_eff = n_data * 10.0**log_n_ratio
        prior = {k: 10.0**v for k, v in log_tau.items()}
        if predictive == "glm":
            s = predictive_summary(post, x_val, samples, "glm", seed, link, n_eff=n_eff, prior=prior, feats=feats)
        else:
            post.set_hyperparameters(n_eff=n_eff, prior_precision=prior)
            s = predictive_summary(post, x_val, samples, "mc", seed)
        value = _validation_nll(post, s, y_val)
        if not math.isfinite(value):
            value = math.inf
        history.append(
            {"log10_n_ratio": log_n_ratio, "log10_prior": float(np.mean(list(log_tau.values()))), "nll": value}
        )
        return value

    names = list(post.blocks)
    taus = np.linspace(*log10_prior, 9)
    if log10_n_ratio is None:  # the linearised predictive is cheap to score: search a wider range
        log10_n_ratio = (-2.0, 6.0) if predictive == "glm" else (-2.0, 2.0)
    n_ratios = int(round(abs(log10_n_ratio[1] - log10_n_ratio[0]))) + 1  # one point per decade
    ratios = np.linspace(*log10_n_ratio, max(n_ratios, 2)) if tune_n_eff else np.array([0.0])
    total = len(taus) * len(ratios) + refine_steps * 9 + (len(names) * 5 * refine_steps if per_layer else 0)
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(min(done / total, 1.0), "tuning hyper-parameters")

    best = (math.inf, 0.0, 0.0)
    for r in ratios:
        for t in taus:
            v = objective(float(r), dict.fromkeys(names, float(t)))
            tick()
            if v < best[0]:
                best = (v, float(r), float(t))
    step_t, step_r = (taus[1] - taus[0]) / 2, ((ratios[1] - ratios[0]) / 2 if len(ratios) > 1 else 0.0)
    for _ in range(refine_steps):
        _, r0, t0 = best
        for dr in (-step_r, 0.0, step_r) if tune_n_eff else (0.0,):
            for dt in (-step_t, 0.0, step_t):
                if dr == 0.0 and dt == 0.0:
                    continue
                v = objective(r0 + dr, dict.fromkeys(names, t0 + dt))
                tick()
                if v < best[0]:
                    best = (v, r0 + dr, t0 + dt)
        step_t, step_r = step_t / 2, step_r / 2
    value, r_best, t_best = best
    log_tau = dict.fromkeys(names, t_best)
    if per_layer and len(names) > 1:
        step = 1.0
        for _ in range(refine_steps):
            for name in names:
                for d in (-2 * step, -step, step, 2 * step):
                    trial = dict(log_tau)
                    trial[name] = log_tau[name] + d
                    v = objective(r_best, trial)
                    tick()
                    if v < value:
                        value, log_tau = v, trial
            step /= 2
    if not math.isfinite(value):
        raise ValueError("Validation NLL is not finite for any hyper-parameter candidate.")
    prior = {k: 10.0**v for k, v in log_tau.items()}
    post.set_hyperparameters(n_eff=n_data * 10.0**r_best, prior_precision=prior)
    single = len(set(prior.values())) == 1
    return TuningResult(post.n_eff, next(iter(prior.values())) if single else prior, value, history)


def tune_marglik(
    post,
    train_nll: float,
    per_layer: bool = True,
    log10_prior: tuple[float, float] = (-4.0, 6.0),
    points: int = 101,
) -> TuningResult:
    """Maximise the Laplace evidence over ``τ`` at ``N_eff = N`` (per layer: the evidence decomposes)."""
    post.set_hyperparameters(n_eff=float(post.n_data))
    grid = np.linspace(*log10_prior, points)
    names = list(post.blocks)
    history = []

    def layer_terms(name: str, tau: float) -> float:
        block = post.blocks[name]
        lam = post.eigenvalues(name, post.n_eff, tau)
        return (
            -0.5 * tau * float((block.mean**2).sum())
            + 0.5 * block.mean.numel() * math.log(tau)
            - 0.5 * float(lam.log().sum())
        )

    if per_layer:
        prior = {}
        for name in names:
            vals = [layer_terms(name, 10.0**g) for g in grid]
            i = int(np.argmax(vals))
            lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
            fine = np.linspace(lo, hi, 21)
            fvals = [layer_terms(name, 10.0**g) for g in fine]
            prior[name] = 10.0 ** fine[int(np.argmax(fvals))]
    else:
        vals = [sum(layer_terms(n, 10.0**g) for n in names) for g in grid]
        history = [{"log10_prior": float(g), "log_marglik": float(v)} for g, v in zip(grid, vals, strict=True)]
        prior = dict.fromkeys(names, 10.0 ** grid[int(np.argmax(vals))])
    post.set_hyperparameters(prior_precision=prior)
    value = post.log_marginal_likelihood(train_nll)
    single = len(set(prior.values())) == 1
    return TuningResult(post.n_eff, next(iter(prior.values())) if single else prior, value, history)


def tune_null_prior(
    post,
    x_val: Tensor,
    y_val: Tensor,
    predictive: str = "glm",
    samples: int = 32,
    seed: int = 0,
    tolerance: float = 0.005,
    decades: int = 8,
    link: str = "mc",
) -> float | None:
    """Broadest prior for never-excited directions whose validation NLL is within ``tolerance`` (relative).

    Candidates go down from ``τ/10`` one decade at a time (at most ``decades``); the search stops at the first
    candidate over the tolerance. Sets ``post.null_prior`` and returns the chosen precision (``None``: no layer
    has unseen directions, or even ``τ/10`` costs validation NLL).
    """
    if post.damping != "exact" or not any(bool(b.null_columns.any()) for b in post.blocks.values()):
        return None
    x_val, y_val = _on_posterior_device(post, x_val, y_val)
    post.null_prior = None
    feats = glm_features(post, x_val) if predictive == "glm" else None

    def nll(null_tau: float | None) -> float:
        prior = {name: post.prior_matrix(name, null_prior=null_tau) for name in post.blocks}
        if predictive == "glm":
            s = predictive_summary(post, x_val, samples, "glm", seed, link, prior=prior, feats=feats)
        else:
            post.null_prior = null_tau
            s = predictive_summary(post, x_val, samples, "mc", seed)
        return _validation_nll(post, s, y_val)

    base = nll(None)
    tau = min(post.prior_precision.values())
    chosen = None
    for k in range(1, decades + 1):
        candidate = tau * 10.0**-k
        if not nll(candidate) <= base * (1 + tolerance):
            break
        chosen = candidate
    post.null_prior = chosen
    return chosen


#: Curvature eigenvalues at most this fraction of their factor's (or layer's, for a diagonal) largest are
#: directions the data do not excite (as :attr:`~curvature.posterior.LayerPosterior.null_columns` for inputs).
EXCITED_FRACTION = 1e-6


def spectral_shape(post: LaplacePosterior) -> float:
    """``N_eff/τ = 1/λ_med``, with ``λ_med`` the median curvature eigenvalue over the directions the data excite.

    The precision of direction ``k`` is ``τ (1 + (N_eff/τ) λ_k)``: with this ratio the prior and the data weigh
    equally in the median excited direction, so the data determine the better-excited half of those directions
    and the prior the rest (and every direction the data do not excite). It is the posterior's shape; a scale
    ``τ`` is then chosen on validation data, which barely constrain the shape (their NLL is flat along whole
    ridges of ``(N_eff, τ)`` that give very different uncertainty away from the data). Pooled over layers,
    Kronecker directions count as excited when both of their factors' eigenvalues exceed
    :data:`EXCITED_FRACTION` of that factor's largest, diagonal ones when the entry does of its layer's largest.
    """
    excited = []
    for block in post.blocks.values():
        lam = block.eigenvalues(1.0, 0.0, "exact")
        if block.kind == "kron":
            mask = torch.outer(
                block.s_G > EXCITED_FRACTION * block.s_G.max(), block.s_A > EXCITED_FRACTION * block.s_A.max()
            )
        else:
            mask = lam > EXCITED_FRACTION * lam.max()
        excited.append(lam[mask].reshape(-1).double())
    values = torch.cat(excited)
    values = values[values > 0]
    if values.numel() == 0:
        raise ValueError("The curvature excites no direction: no shape can be read from its spectrum.")
    return float(1.0 / values.median())


def _search_grid(nll, best_point, log10_n_ratio, log10_prior, points, max_growth, refine_steps) -> bool:
    """Steps 1-2 of :func:`tune_linearised` on the ``(log10 N_eff/N, log10 τ)`` grid; whether the optimum of the
    grown grid sat on its edge."""
    ratios = [float(v) for v in np.linspace(*log10_n_ratio, points)]
    taus = [float(v) for v in np.linspace(*log10_prior, points)]
    step_r, step_t = ratios[1] - ratios[0], taus[1] - taus[0]
    for r in ratios:
        for t in taus:
            nll(float(r), float(t))
    grown = {"r-": 0, "r+": 0, "t-": 0, "t+": 0}
    while True:
        _, r, t = best_point()
        moved = False
        for side, ax, values, delta in (
            ("r-", 0, ratios, -step_r),
            ("r+", 0, ratios, step_r),
            ("t-", 1, taus, -step_t),
            ("t+", 1, taus, step_t),
        ):
            edge = values[0] if delta < 0 else values[-1]
            at = r if ax == 0 else t
            if abs(at - edge) < 1e-9 and grown[side] < max_growth:
                new = edge + delta
                values.insert(0 if delta < 0 else len(values), new)
                grown[side] += 1
                for other in list(taus if ax == 0 else ratios):
                    nll(*((new, other) if ax == 0 else (other, new)))
                moved = True
        if not moved:
            break
    _, r0, t0 = best_point()
    at_edge = abs(r0 - ratios[0]) < 1e-9 or abs(r0 - ratios[-1]) < 1e-9 or abs(t0 - taus[0]) < 1e-9
    at_edge = at_edge or abs(t0 - taus[-1]) < 1e-9
    dr, dt = step_r / 2, step_t / 2
    for _ in range(refine_steps):
        _, r0, t0 = best_point()
        for a in (-dr, 0.0, dr):
            for b in (-dt, 0.0, dt):
                if a or b:
                    nll(r0 + a, t0 + b)
        dr, dt = dr / 2, dt / 2
    return at_edge


def _search_ray(nll, best_tau, log10_prior, max_growth: int, step: float = 0.5) -> None:
    """Steps 1-2 of :func:`tune_linearised` along ``log10 τ`` alone (``nll(log10 τ)``, ``best_tau()``): a grid of
    ``step`` that grows by one step past an edge while the best sits on it (``max_growth`` per side), then the
    neighbours of the best at ``step/2`` and ``step/4``."""
    lo, hi = log10_prior
    taus = [float(v) for v in np.arange(lo, hi + step / 2, step)]
    for t in taus:
        nll(t)
    grown = {"-": 0, "+": 0}
    while True:
        t = best_tau()
        if abs(t - taus[0]) < 1e-9 and grown["-"] < max_growth:
            taus.insert(0, taus[0] - step)
            grown["-"] += 1
            nll(taus[0])
        elif abs(t - taus[-1]) < 1e-9 and grown["+"] < max_growth:
            taus.append(taus[-1] + step)
            grown["+"] += 1
            nll(taus[-1])
        else:
            break
    for d in (step / 2, step / 4):
        t = best_tau()
        nll(t - d)
        nll(t + d)


def tune_linearised(
    post: LaplacePosterior,
    x_val: Tensor,
    y_val: Tensor,
    samples: int = 32,
    seed: int = 0,
    link: str | tuple[str, ...] = "mc",
    log10_n_ratio: tuple[float, float] = (-2.0, 2.0),
    log10_prior: tuple[float, float] = (-2.0, 4.0),
    points: int = 5,
    max_growth: int = 6,
    refine_steps: int = 2,
    null_prior: bool = True,
    null_tolerance: float = 0.005,
    null_decades: int = 8,
    feats: GLMFeatures | None = None,
    summary_samples: int | None = None,
    min_accuracy: float | None = None,
    calibration_tolerance: float | None = None,
    broad_tolerance: float | None = None,
    rows: Tensor | None = None,
    interpolate: bool = True,
    shape: float | None = None,
    progress: Callable[[float, str], None] | None = None,
    back_off: bool = False,
) -> TuningResult:
    """Validation-NLL tuning of ``(N_eff, τ)`` and the null-space prior ``τ₀`` with the linearised predictive.

    Search (all on log10 scales, ``N_eff`` relative to ``N``):

    1. a ``points × points`` grid over ``log10_n_ratio × log10_prior``; while the best candidate sits on an edge
       of an axis, that axis grows by one grid step beyond it (at most ``max_growth`` times per side);
    2. ``refine_steps`` rounds of the 8 neighbours of the best at half, then a quarter, of the grid step;
    3. ``τ₀`` (exact damping, layers with never-excited directions): from ``τ/10`` down one decade at a time,
       the broadest whose validation NLL stays within ``null_tolerance`` (relative) of step 2's, as
       :func:`tune_null_prior` does.

    With ``shape`` (e.g. :func:`spectral_shape`) the ratio ``N_eff/τ`` is fixed and steps 1 and 2 search ``τ``
    alone, on the ray ``N_eff = shape · τ``: half-decade steps over ``log10_prior``, growing by one step past an
    edge while the best candidate sits on it (at most ``4 · max_growth`` steps per side), then the neighbours of
    the best at a quarter and an eighth of a decade. Every candidate on the ray shares one covariance sum,
    rescaled. ``at_edge`` then says whether the *chosen* ``τ`` sits at an end of the explored range.

    With exact damping the logit covariance of a candidate is ``U(N_eff/τ)/τ``
    (:class:`~curvature.spectral.SpectralCovariance`): the grid's candidates share a few values of
    ``N_eff/τ``, each computed once, and with ``interpolate`` (the default) each costs a few small products
    independent of the layers' widths, within about 1 % of the exact covariance. The chosen candidate's
    ``objective`` and the returned ``summary`` are always exact. The logit draws are shared by all candidates (one
    seed). Given several links (``("mc", "probit")``), each candidate is scored with each on the same covariance
    and keeps the better; the link is chosen with the hyper-parameters. With ``min_accuracy``, a candidate whose
    validation accuracy is below it is not eligible (its NLL counts as infinite). Sets the posterior's
    hyper-parameters and null prior.

    Args:
        feats: the validation inputs' GLM features, if already computed.
        summary_samples: logit samples of the returned validation ``summary`` (default ``samples``).
        calibration_tolerance: if given (classification), the choice of step 2 is, among the candidates whose
            NLL is within this relative tolerance of the best, the one whose mean top-class probability is
            closest to its accuracy (a one-bin calibration error): the NLL optimum tends to be underconfident
            on average, since NLL punishes confident errors far more than diffident hits.
        broad_tolerance: if given, the choice of step 2 is, among the candidates whose NLL is within this
            relative tolerance of the best (and that keep the accuracy floor), the broadest: the one with the
            largest mean logit variance on the tuning rows. Validation NLL alone often prefers a posterior
            barely wider than the network itself (the data it can see say little about the rest); the
            broadest posterior that fits them as well gives the uncertainty where the data say nothing. With
            ``shape`` it applies only when the network itself (zero covariance) is within the tolerance of the
            best: the validation data cannot tell the posterior from the network, so the broadest candidate they
            accept is taken; otherwise the NLL optimum is (along the ray only the scale varies, and the OOD
            ranking of the mutual information barely depends on it).
        rows: indices of the validation inputs the candidates are scored on (default: all). The returned
            ``summary`` covers every input, e.g. to calibrate OOD thresholds on all of them.
        interpolate: score candidates on the interpolated covariance (exact: ``False``).
        back_off: where a broad choice stops at a rejected candidate, step one grid step back inside the
            accepted region: half a decade of ``τ`` from the broad rule's choice on the ray (when that candidate
            is still within ``broad_tolerance`` of the best), one decade of ``τ₀`` from the broadest accepted
            null-space prior (none when only ``τ/10`` was accepted). A choice on the edge of what validation
            accepts sits where validation NLL turns, the estimate least likely to hold on other data.
    """
    if len(x_val) == 0:
        raise ValueError("Validation tuning needs at least one validation input.")
    x_val, y_val = _on_posterior_device(post, x_val, y_val)
    post.null_prior = None
    all_feats = glm_features(post, x_val) if feats is None else feats
    feats = all_feats
    if rows is not None:
        rows = rows.to(y_val.device)
        feats, y_val = all_feats.rows(rows), y_val[rows]
    n_data = post.n_data
    names = list(post.blocks)
    history: list[dict[str, float]] = []
    scores: dict[tuple[float, float, float | None], float] = {}
    has_null = post.damping == "exact" and any(bool(b.null_columns.any()) for b in post.blocks.values())
    spectral = None
    if post.damping == "exact":
        spectral = SpectralCovariance(post, feats, split_null=null_prior and has_null, interpolate=interpolate)
    if shape is None:
        expected = points * points + 8 * refine_steps
    else:  # the ray's initial half-decade grid and its four refinements
        expected = round((log10_prior[1] - log10_prior[0]) / 0.5) + 1 + 4
    expected += null_decades if null_prior and has_null else 0

    def prior_of(log_tau: float, log_null: float | None) -> dict[str, float | Tensor]:
        tau = 10.0**log_tau
        if log_null is None:
            return dict.fromkeys(names, tau)
        return {n: post.blocks[n].prior_matrix(tau, 10.0**log_null) for n in names}

    def covariance(log_ratio: float, log_tau: float, log_null: float | None, exact: bool = False) -> Tensor:
        n_eff = n_data * 10.0**log_ratio
        if spectral is None or exact:
            return glm_covariance(post, feats, n_eff=n_eff, prior=prior_of(log_tau, log_null))
        return spectral.covariance(n_eff, 10.0**log_tau, None if log_null is None else 10.0**log_null)

    links = (link,) if isinstance(link, str) else tuple(link)
    best_link: dict[tuple, str] = {}
    gaps: dict[tuple, float] = {}
    spreads: dict[tuple, float] = {}

    def evaluate(cov: Tensor, entry: dict) -> tuple[float, str, float | None]:
        """The best NLL over the links, its link and its one-bin calibration gap (classification); per-link
        accuracies and NLLs go into the history ``entry``."""
        value, chosen, gap = math.inf, links[0], None
        for lk in links:
            s = glm_summary(post, feats.f, cov, samples, seed, lk)
            v = _validation_nll(post, s, y_val)
            v = v if math.isfinite(v) else math.inf
            g = None
            if "probs" in s and (min_accuracy is not None or calibration_tolerance is not None):
                correct = (s["probs"].argmax(-1) == y_val).double()
                acc = float(correct.mean())
                g = abs(float(s["probs"].max(-1).values.double().mean()) - acc)
                entry[f"acc_{lk}" if len(links) > 1 else "acc"] = acc
                if min_accuracy is not None and acc < min_accuracy:
                    v = math.inf
            if len(links) > 1:
                entry[f"nll_{lk}"] = v
            if v < value or (value == math.inf and lk == links[0]):
                value, chosen, gap = v, lk, g
        return value, chosen, gap

    def nll(log_ratio: float, log_tau: float, log_null: float | None = None) -> float:
        key = (round(log_ratio, 9), round(log_tau, 9), None if log_null is None else round(log_null, 9))
        if key in scores:
            return scores[key]
        cov = covariance(log_ratio, log_tau, log_null)
        entry: dict = {"log10_n_ratio": log_ratio, "log10_prior": log_tau}
        if log_null is None:
            spreads[key] = float(cov.diagonal(dim1=-2, dim2=-1).sum(-1).double().mean())
        if log_null is not None:
            entry["log10_null_prior"] = log_null
        value, chosen, gap = evaluate(cov, entry)
        if gap is not None:
            gaps[key] = gap
            entry["calibration_gap"] = gap
        scores[key] = value
        best_link[key] = chosen
        entry["nll"] = value
        if len(links) > 1:
            entry["link"] = chosen
        history.append(entry)
        if progress is not None:
            progress(min(len(history) / expected, 1.0), f"tuning: {len(history)} candidates")
        return value

    def best_point() -> tuple[float, float, float]:
        (r, t, _), v = min(((k, v) for k, v in scores.items() if k[2] is None), key=lambda kv: (kv[1], kv[0]))
        return v, r, t

    at_edge = False
    if shape is None:
        at_edge = _search_grid(nll, best_point, log10_n_ratio, log10_prior, points, max_growth, refine_steps)
    else:
        ray = math.log10(shape / n_data)  # log10(N_eff/N) = ray + log10(τ) on the ray
        _search_ray(lambda t: nll(ray + t, t), lambda: best_point()[2], log10_prior, 4 * max_growth)
    value, r_best, t_best = best_point()
    if not math.isfinite(value):
        raise ValueError("Validation NLL is not finite for any hyper-parameter candidate.")

    def network_within(tolerance: float) -> bool:
        """Whether the network's own validation NLL (zero covariance) is within ``tolerance`` of the best."""
        zero = feats.f.new_zeros(*feats.f.shape, feats.f.shape[-1])
        own = _validation_nll(post, glm_summary(post, feats.f, zero, 1, seed, links[0]), y_val)
        return own <= value + tolerance * abs(value)

    if calibration_tolerance is not None:
        # Among candidates within the NLL tolerance of the best, the one whose mean confidence is closest to its
        # accuracy on the tuning rows (ties: the lower NLL).
        near = [
            (gaps[k], v, k)
            for k, v in scores.items()
            if k[2] is None and k in gaps and v <= value + calibration_tolerance * abs(value)
        ]
        if near:
            _, value, (r_best, t_best, _) = min(near)
    elif broad_tolerance is not None and (shape is None or network_within(broad_tolerance)):
        near = [
            (-spreads[k], v, k)
            for k, v in scores.items()
            if k[2] is None and k in spreads and math.isfinite(v) and v <= value + broad_tolerance * abs(value)
        ]
        if near:
            ceiling = value + broad_tolerance * abs(value)
            _, value, (r_best, t_best, _) = min(near)
            if back_off and shape is not None:
                # one half-decade step inside the accepted stretch of the ray, when a broader candidate was
                # rejected (not merely unexplored): validation NLL next to where it turns is the least reliable
                if any(k[2] is None and k[1] < t_best - 1e-9 for k in scores):
                    t_back = t_best + 0.5
                    v_back = nll(ray + t_back, t_back)
                    if v_back <= ceiling:
                        value, r_best, t_best = v_back, ray + t_back, t_back

    if shape is not None:
        explored = [k[1] for k in scores if k[2] is None]
        at_edge = abs(t_best - min(explored)) < 1e-9 or abs(t_best - max(explored)) < 1e-9

    chosen_null: float | None = None
    chosen_key = (round(r_best, 9), round(t_best, 9), None)
    if null_prior and has_null:
        for k in range(1, null_decades + 1):
            candidate = t_best - k
            if not nll(r_best, t_best, candidate) <= value + null_tolerance * abs(value):
                if back_off and k > 1:  # one decade back from the rejected candidate's neighbour
                    kept = candidate + 2 if k > 2 else None
                    chosen_null = None if kept is None else 10.0**kept
                    chosen_key = (round(r_best, 9), round(t_best, 9), None if kept is None else round(kept, 9))
                break
            chosen_null = 10.0**candidate
            chosen_key = (round(r_best, 9), round(t_best, 9), round(candidate, 9))
    post.set_hyperparameters(n_eff=n_data * 10.0**r_best, prior_precision=10.0**t_best)
    post.null_prior = chosen_null
    chosen_link = best_link[chosen_key]
    full_cov = glm_covariance(post, all_feats)  # exact, at the chosen values, on every input
    if spectral is not None and interpolate:
        # the choice was scored on the interpolated covariance; its objective is the exact one
        cov = full_cov if rows is None else full_cov[rows]
        value = _validation_nll(post, glm_summary(post, feats.f, cov, samples, seed, chosen_link), y_val)
    summary = glm_summary(post, all_feats.f, full_cov, summary_samples or samples, seed, chosen_link)
    return TuningResult(
        post.n_eff,
        10.0**t_best,
        value,
        history,
        null_prior=chosen_null,
        at_edge=bool(at_edge),
        summary=summary,
        link=chosen_link,
    )
