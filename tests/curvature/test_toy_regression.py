"""The toy 1-D regression of thesis §5.2.1: KF-Laplace (KFLR) against the full dense Laplace on a 1-7-7-1 tanh
network (78 parameters), both with the linearised predictive.

Targets are standardised (``y / std y``, noise ``σ = 3 / std y``): with raw targets (``|y|`` up to 64) the MAP
weights drive the tanh units into saturation, the network is flat beyond the data and so is every predictive
variance, KF or dense. What holds across seeds and training lengths with standardised targets (measured on seeds
0–3, 1,000–1,500 Adam steps):

* KF variance at ``|x| = 8`` is 8–12× its median over the training inputs (3–4.5× the maximum); dense: 400–700×;
* the log-variances of KF and dense correlate at 0.96–0.98 over ``x ∈ [−8, 8]``;
* KF is *not* below dense: at the training inputs it is 2.7–3.3× larger (median), at ``|x| = 8`` 0.06–0.09×.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import curvature as cv
from curvature.data import toy_regression

from .cases import DTYPE, assert_close_report
from .test_posterior import (
    dense_covariance,
    dense_precision,
    flat_jacobian,
    single_thread,  # noqa: F401  (autouse fixture)
)

TAU = 1.0


@dataclass
class Fit:
    model: nn.Module
    x: Tensor
    y: Tensor
    post: cv.LaplacePosterior
    factors: cv.KroneckerFactors
    grid: Tensor
    kf: Tensor  # KF epistemic variance on the grid
    kf_data: Tensor  # ... and at the training inputs
    dense: Tensor
    dense_data: Tensor


def dense_variance(model: nn.Module, precision: Tensor, x: Tensor) -> Tensor:
    jac = flat_jacobian(model, x)[:, 0]  # (B, P)
    return ((jac @ dense_covariance(precision)) * jac).sum(-1)


@pytest.fixture(scope="module")
def fit(single_thread) -> Fit:  # noqa: F811
    x, y = toy_regression(20, seed=0)
    x, y = x.to(DTYPE), y.to(DTYPE)
    scale = float(y.std())
    y = y / scale
    lik = cv.Gaussian(3.0 / scale)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 1)).to(DTYPE)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(1000):  # MAP under the Gaussian prior of precision TAU
        opt.zero_grad()
        loss = lik.nll(model(x), y) + 0.5 * TAU * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        opt.step()
    model.eval()
    factors = cv.fit_kronecker(model, (x, y), lik, method="kflr")
    post = cv.LaplacePosterior(model, factors, lik, prior_precision=TAU)
    grid = torch.linspace(-8.0, 8.0, 161, dtype=DTYPE)[:, None]
    full = cv.exact_ggn(model, x, y, lik) + TAU * torch.eye(post.n_params, dtype=DTYPE)
    return Fit(
        model,
        x,
        y,
        post,
        factors,
        grid,
        post.predict(grid, predictive="glm")["epistemic_variance"][:, 0],
        post.predict(x, predictive="glm")["epistemic_variance"][:, 0],
        dense_variance(model, full, grid),
        dense_variance(model, full, x),
    )


def at_edges(v: Tensor) -> Tensor:
    return v[[0, -1]]  # x = −8 and x = 8


def test_network_has_78_parameters_and_fits_the_data(fit):
    assert fit.post.n_params == sum(p.numel() for p in fit.model.parameters()) == 78
    with torch.no_grad():
        residual = fit.model(fit.x) - fit.y
    assert float((residual**2).mean()) < 0.1  # the cubic explains > 90 % of the standardised variance


def test_kf_variance_is_the_dense_sandwich_of_its_own_precision(fit):
    precision = dense_precision(fit.model, fit.factors, fit.post.n_eff, TAU)
    expected = dense_variance(fit.model, precision, fit.grid)
    assert_close_report(fit.kf, expected, rtol=1e-9, name="KF epistemic variance")


def test_kf_variance_grows_away_from_the_data(fit):
    edge = at_edges(fit.kf)
    assert bool((edge > 5 * fit.kf_data.median()).all()), (edge, fit.kf_data.median())
    assert bool((edge > 2 * fit.kf_data.max()).all()), (edge, fit.kf_data.max())
    inside = fit.grid[:, 0].abs() <= 4
    assert bool(inside[fit.kf.argmin()]), "the least uncertain input lies outside the data range"


def test_dense_variance_grows_away_from_the_data(fit):
    edge = at_edges(fit.dense)
    assert bool((edge > 100 * fit.dense_data.median()).all()), (edge, fit.dense_data.median())
    assert bool(fit.grid[:, 0].abs()[fit.dense.argmin()] <= 4)


def test_kf_and_dense_have_the_same_shape(fit):
    corr = float(torch.corrcoef(torch.stack([fit.kf.log(), fit.dense.log()]))[0, 1])
    assert corr > 0.9, corr


def test_kf_is_wider_near_the_data_and_narrower_far_away(fit):
    """KF ≤ dense does not hold: KF over-estimates at the training inputs and under-estimates far from them."""
    near = float((fit.kf_data / fit.dense_data).median())
    far = float((at_edges(fit.kf) / at_edges(fit.dense)).max())
    assert near > 1.5, near
    assert far < 0.2, far
    assert math.isfinite(near) and math.isfinite(far)


def test_mc_regression_fit_is_narrowed_until_it_does_not_lose_to_the_network(fit):
    """A regression fit with the MC predictive: the posterior is tuned on the linearised network, whose variance
    a sampled tanh network does not share; the fit narrows it until the MC predictive's validation NLL is no worse
    than the network's own (noise variance alone), and calibrates its OOD thresholds on that predictive."""
    x_val, y_val = toy_regression(20, seed=1)
    x_val, y_val = x_val.to(DTYPE), y_val.to(DTYPE) / float(toy_regression(20, seed=0)[1].std())
    sigma = fit.post.likelihood.sigma
    cfg = cv.LaplaceConfig(curvature="kflr", likelihood="regression", predictive="mc", samples=200, sigma=sigma)
    post = cv.fit_laplace(fit.model, fit.x, fit.y, x_val, y_val, cfg)
    out = post.predict(x_val, samples=200, predictive="mc")
    with torch.no_grad():
        f = fit.model(x_val)
    network = cv.nll_gaussian(f, torch.full_like(f, sigma**2), y_val)
    assert cv.nll_gaussian(out["mean"], out["variance"], y_val) <= network
    assert "mc" in post.ood_table
    tuned = cv.fit_laplace(fit.model, fit.x, fit.y, x_val, y_val, dataclasses.replace(cfg, predictive="glm"))
    unnarrowed = tuned.predict(x_val, samples=200, predictive="mc")
    assert cv.nll_gaussian(unnarrowed["mean"], unnarrowed["variance"], y_val) > network  # the narrowing is needed
    assert post.metadata["mc_narrowed"] >= 10
    assert post.n_eff == pytest.approx(tuned.n_eff * post.metadata["mc_narrowed"], rel=1e-9)
