"""The fast tuner against brute force, and the fit's OOD calibration that reuses its work.

The known-optimum problem is :class:`tests.curvature.test_tuning.GLMRegressionProblem`: validation targets placed
so that the linearised Gaussian predictive's NLL is minimised exactly at a chosen ``(N_eff*, τ*)``, with a dense
float64 reference for every candidate's NLL.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import curvature as cv

from .test_posterior import single_thread  # noqa: F401  (autouse fixture)
from .test_tuning import N_DATA, GLMRegressionProblem, classification_validation


def _brute_force(problem: GLMRegressionProblem, ratios: np.ndarray, taus: np.ndarray) -> tuple[float, float, float]:
    grid = problem.nll(*np.meshgrid(ratios, taus, indexing="ij"))
    i, j = np.unravel_index(np.argmin(grid), grid.shape)
    return float(ratios[i]), float(taus[j]), float(grid.min())


@pytest.mark.parametrize("interpolate", [False, True], ids=["exact", "interpolated"])
@pytest.mark.parametrize("kind", ["kron", "diag"])
@pytest.mark.parametrize("target", [(0.3, 0.7), (-1.2, 0.2), (1.4, -0.9)], ids=["centre", "low-n", "high-n"])
def test_fast_tuner_finds_the_brute_force_optimum(kind, target, interpolate):
    """Brute force over a 0.05 grid finds the optimum. The fast tuner's NLL is within 0.05 % of the brute-force
    minimum, and its objective is the dense NLL of its choice. With Kronecker curvature it also lands within its
    last refinement step (a quarter of the grid step: 0.25 in log10 N_eff/N, 0.375 in log10 τ); the diagonal problem has a
    ridge along which ``N_eff`` and ``τ`` trade off (NLL within 0.03 % over 0.7 decades), so there only the value
    is pinned. Exact scoring records the dense NLL of every candidate; interpolated scoring is within 0.1 %."""
    problem = GLMRegressionProblem(kind, *target)
    r_bf, t_bf, nll_bf = _brute_force(problem, np.arange(-2.5, 2.5001, 0.05), np.arange(-3.5, 5.5001, 0.05))
    assert abs(r_bf - target[0]) < 0.026 and abs(t_bf - target[1]) < 0.026

    result = cv.tune_linearised(problem.post, problem.x, problem.y, null_prior=False, interpolate=interpolate)
    chosen = (math.log10(result.n_eff / N_DATA), math.log10(result.prior_precision))
    if kind == "kron":
        assert abs(chosen[0] - r_bf) <= 0.25 + 0.026 and abs(chosen[1] - t_bf) <= 0.375 + 0.026, (chosen, (r_bf, t_bf))
    assert result.objective == pytest.approx(problem.nll(*chosen), rel=1e-9)
    assert nll_bf - 1e-12 <= result.objective <= nll_bf * (1 + 5e-4), (result.objective, nll_bf)
    assert not result.at_edge
    assert len(result.history) <= 60, "tens of candidates, not hundreds"
    for h in result.history:
        dense = problem.nll(h["log10_n_ratio"], h["log10_prior"])
        assert h["nll"] == pytest.approx(dense, rel=1e-3 if interpolate and kind == "kron" else 1e-9), h
    assert problem.post.n_eff == result.n_eff
    assert problem.post.prior_precision == dict.fromkeys(problem.post.blocks, result.prior_precision)


def test_the_range_grows_until_the_optimum_is_inside():
    """The optimum (N_eff*/N, τ*) = (10^-3, 10^-2.9) lies beyond the initial ranges (10^-2 … 10^2 and 10^-2 …
    10^4): both axes grow, and the choice lands near the brute-force optimum; with growth disabled the tuner
    reports that it stopped at the edge."""
    target = (-3.0, -2.9)
    problem = GLMRegressionProblem("kron", *target)
    r_bf, t_bf, _ = _brute_force(problem, np.arange(-5.0, 0.0001, 0.05), np.arange(-5.0, 1.0001, 0.05))
    grown = cv.tune_linearised(problem.post, problem.x, problem.y, null_prior=False)
    chosen = (math.log10(grown.n_eff / N_DATA), math.log10(grown.prior_precision))
    assert abs(chosen[0] - r_bf) <= 0.25 + 0.026 and abs(chosen[1] - t_bf) <= 0.375 + 0.026, (chosen, (r_bf, t_bf))
    assert not grown.at_edge
    assert min(h["log10_prior"] for h in grown.history) < -2.0
    assert min(h["log10_n_ratio"] for h in grown.history) < -2.0

    fixed = GLMRegressionProblem("kron", *target)
    stuck = cv.tune_linearised(fixed.post, fixed.x, fixed.y, null_prior=False, max_growth=0, refine_steps=0)
    assert stuck.at_edge
    assert min(h["log10_prior"] for h in stuck.history) == -2.0
    assert grown.objective < stuck.objective


def _ray_brute_force(problem: GLMRegressionProblem, shape: float) -> tuple[float, float]:
    """The best ``log10 τ`` (0.01 grid) and its NLL on the ray ``N_eff = shape · τ``."""
    taus = np.arange(-6.0, 10.0001, 0.01)
    values = problem.nll(math.log10(shape / N_DATA) + taus, taus)
    return float(taus[np.argmin(values)]), float(values.min())


@pytest.mark.parametrize("kind", ["kron", "diag"])
@pytest.mark.parametrize("offset", [0.0, 2.0, -1.5], ids=["through", "above", "below"])
def test_ray_search_finds_the_brute_force_optimum_on_its_ray(kind, offset):
    """With a fixed shape ``N_eff/τ`` the tuner searches ``τ`` alone. On the ray through the known optimum
    (0.3, 0.7) and on rays 10^2 and 10^-1.5 away from it, it lands within its last refinement (1/8 decade) of the
    brute-force optimum along the ray, at an NLL within 0.05 % of it, in tens of candidates all on the ray."""
    problem = GLMRegressionProblem(kind, 0.3, 0.7)
    shape = N_DATA * 10.0 ** (0.3 - 0.7 + offset)
    t_bf, nll_bf = _ray_brute_force(problem, shape)
    if offset == 0.0:
        assert abs(t_bf - 0.7) < 0.011
    result = cv.tune_linearised(problem.post, problem.x, problem.y, null_prior=False, shape=shape)
    chosen = math.log10(result.prior_precision)
    assert result.n_eff / result.prior_precision == pytest.approx(shape, rel=1e-9)
    assert abs(chosen - t_bf) <= 0.125 + 0.011, (chosen, t_bf)
    assert nll_bf - 1e-12 <= result.objective <= nll_bf * (1 + 5e-4) + 1e-12
    assert result.objective == pytest.approx(problem.nll(math.log10(result.n_eff / N_DATA), chosen), rel=1e-9)
    assert not result.at_edge
    assert len(result.history) <= 30
    for h in result.history:
        assert h["log10_n_ratio"] - h["log10_prior"] == pytest.approx(math.log10(shape / N_DATA), abs=1e-9)


def test_ray_search_grows_past_its_range_and_keeps_the_optimum_unless_the_network_is_as_good():
    """The optimum (10^-3, 10^-2.9) lies below the ray's initial τ range (10^-2 … 10^4): the range grows to it.
    A broad tolerance changes nothing while the network's own NLL (zero covariance) is outside it; once the
    tolerance admits the network, the broadest candidate within it (the smallest τ) is chosen."""
    problem = GLMRegressionProblem("kron", -3.0, -2.9)
    shape = N_DATA * 10.0 ** (-3.0 + 2.9)
    t_bf, _ = _ray_brute_force(problem, shape)
    grown = cv.tune_linearised(problem.post, problem.x, problem.y, null_prior=False, shape=shape)
    assert abs(math.log10(grown.prior_precision) - t_bf) <= 0.125 + 0.011
    assert min(h["log10_prior"] for h in grown.history) < -2.0 and not grown.at_edge

    same = GLMRegressionProblem("kron", -3.0, -2.9)
    kept = cv.tune_linearised(same.post, same.x, same.y, null_prior=False, shape=shape, broad_tolerance=0.01)
    assert kept.prior_precision == grown.prior_precision

    network = same.nll(-12.0, 12.0)  # a posterior narrower than round-off: the network itself
    tolerance = 1.5 * (network - grown.objective) / abs(grown.objective)
    broad = GLMRegressionProblem("kron", -3.0, -2.9)
    wide = cv.tune_linearised(broad.post, broad.x, broad.y, null_prior=False, shape=shape, broad_tolerance=tolerance)
    eligible = [h for h in wide.history if h["nll"] <= grown.objective + tolerance * abs(grown.objective)]
    assert math.log10(wide.prior_precision) == pytest.approx(min(h["log10_prior"] for h in eligible))
    assert wide.prior_precision < grown.prior_precision


@pytest.mark.parametrize("curvature", ["kflr", "kfac", "diag"])
def test_spectral_shape_is_the_inverse_median_excited_eigenvalue(curvature):
    """Against the dense block-diagonal curvature built from the fitted factors (float64 ``eigvalsh``): the
    shape is one over the median of its eigenvalues, leaving out the zero ones (never-varying input features,
    the softmax's constant direction). With it, half of the excited directions have ``shape · λ ≥ 1``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(60, 5, dtype=torch.float64)
    x[:, 3:] = 0.0
    y = torch.randint(0, 3, (60,))
    lik = cv.CrossEntropy()
    if curvature == "diag":
        factors = cv.fit_diagonal(model, (x, y), lik)
        dense = torch.cat([factors[n].reshape(-1) for n in factors])
    else:
        factors = cv.fit_kronecker(model, (x, y), lik, method=curvature)
        dense = torch.cat([torch.linalg.eigvalsh(torch.kron(factors[n].G, factors[n].A)) for n in factors])
    excited = dense[dense > 1e-10 * dense.max()]
    assert 0 < excited.numel() < dense.numel()  # some directions are not excited: the exclusion is tested
    post = cv.LaplacePosterior(model, factors, lik)
    shape = cv.spectral_shape(post)
    assert shape == pytest.approx(1.0 / float(excited.median()), rel=1e-9)
    assert abs(int((shape * excited >= 1 - 1e-9).sum()) - excited.numel() / 2) <= 1


def test_mutual_information_of_a_narrow_posterior_is_not_round_off():
    """Float32 logits and covariances scaled down to 1e-12: the mutual information stays the small-variance
    limit, linear in the scale (½ tr of the softmax Fisher times the covariance, to first order), so it ranks
    inputs as a broader posterior of the same shape does. Computed in float32 it would be the difference of two
    equal entropies (round-off, often zero)."""
    from curvature.predictive import glm_features, glm_summary, regression_summary

    post, x_val, _ = classification_validation()
    feats = glm_features(post, x_val)
    f = feats.f.float()
    cov = cv.predictive.glm_covariance(post, feats).float()
    base = glm_summary(post, f, cov * 1e-6, 64, 0)["mutual_information"].double() / 1e-6
    for scale in (1e-9, 1e-12):
        mi = glm_summary(post, f, cov * scale, 64, 0)["mutual_information"].double() / scale
        assert mi.dtype == torch.float64 and bool((mi > 0).all())
        torch.testing.assert_close(mi, base, rtol=2e-3, atol=0)
    mean = torch.zeros(3, 2)
    epistemic = torch.full((3, 2), 1e-9)
    mi = regression_summary(mean, epistemic, sigma=1.0)["mutual_information"]
    torch.testing.assert_close(mi, torch.full((3,), 1e-9), rtol=1e-6, atol=0)


def test_fast_tuner_scores_classification_candidates_as_fresh_predictions():
    """Every candidate's NLL equals a fresh ``post.predict`` of a posterior set to it (same seed, same samples)."""
    post, x_val, y_val = classification_validation()
    result = cv.tune_linearised(post, x_val, y_val, samples=8, seed=3, null_prior=False, interpolate=False)
    assert 10 <= len(result.history) <= 80  # tens, not hundreds: the N_eff axis grows to its optimum near 1e-8
    for h in result.history[::6] + [min(result.history, key=lambda h: h["nll"])]:
        fresh, *_ = classification_validation()
        fresh.set_hyperparameters(n_eff=N_DATA * 10.0 ** h["log10_n_ratio"], prior_precision=10.0 ** h["log10_prior"])
        probs = fresh.predict(x_val, samples=8, predictive="glm", seed=3)["probs"]
        assert h["nll"] == pytest.approx(cv.nll_classification(probs, y_val), rel=1e-12, abs=1e-12), h
    assert result.objective == min(h["nll"] for h in result.history)
    out = post.predict(x_val, samples=8, predictive="glm", seed=3)
    assert torch.equal(result.summary["probs"], out["probs"])


# ---------------------------------------------------------------------------- the spectral covariance


def _spectral_problem(case_name: str, curvature: str):
    """A trained-looking network with never-excited input features (null columns) and validation features."""
    from curvature.predictive import glm_features

    from .cases import CNN, MLP_TANH, make_problem

    case = {"mlp": MLP_TANH, "cnn": CNN}[case_name]
    model, x, y, lik = make_problem(case, "ce", n=60, seed=2)
    x = x.clone()
    if case_name == "cnn":
        x[:, 1] = 0.0  # an input channel the training data never excites
    else:
        x[:, -1] = 0.0  # an input feature the training data never excites
    if curvature == "diag":
        factors = cv.fit_diagonal(model, (x, y), lik)
    else:
        factors = cv.fit_kronecker(model, (x, y), lik, method=curvature)
    post = cv.LaplacePosterior(model, factors, lik)
    x_val = torch.randn(17, *case.input_shape, dtype=x.dtype, generator=torch.Generator().manual_seed(8))
    return post, glm_features(post, x_val)


SPECTRAL_CASES = [("mlp", "kflr"), ("mlp", "diag"), ("cnn", "kflr")]


@pytest.mark.parametrize("case_name, curvature", SPECTRAL_CASES, ids=[f"{a}-{b}" for a, b in SPECTRAL_CASES])
@pytest.mark.parametrize("interpolate", [False, True], ids=["exact", "interpolated"])
def test_spectral_covariance_equals_the_glm_covariance(case_name, curvature, interpolate):
    """``U(N_eff/τ)/τ`` (+ the null part at ``τ₀``) equals the linearised covariance of the posterior set to
    ``(N_eff, τ, τ₀)``: to round-off when exact, every entry within 1 % of the diagonal scale when interpolated,
    over twenty decades of ``N_eff/τ`` (at the largest, directions of eigenvalue ~1e-12 of the largest still
    decide the variance)."""
    from curvature.predictive import glm_covariance
    from curvature.spectral import SpectralCovariance

    post, feats = _spectral_problem(case_name, curvature)
    assert any(bool(b.null_columns.any()) for b in post.blocks.values())
    spectral = SpectralCovariance(post, feats, split_null=True, interpolate=interpolate)
    assert spectral.has_null
    tol = 0.01 if interpolate and curvature != "diag" else 1e-12
    for n_eff in (0.3, 60.0, 6e4, 6e9):
        for tau in (1e-7, 1e-3, 1.0, 1e3):
            for tau0 in (None, tau * 1e-3):
                prior = {k: b.prior_matrix(tau, tau0) for k, b in post.blocks.items()}
                expected = glm_covariance(post, feats, n_eff=n_eff, prior=prior)
                got = spectral.covariance(n_eff, tau, tau0)
                d = expected.diagonal(dim1=-2, dim2=-1)
                scale = (d.unsqueeze(-1) * d.unsqueeze(-2)).sqrt()
                err = float(((got - expected).abs() / scale).max())
                assert err <= tol, (n_eff, tau, tau0, err)
    if interpolate and curvature != "diag":
        assert err > 1e-12, "the interpolated covariance should not be exact (the test would not see a fallback)"
        assert not any(type(layer).__name__ == "_ExactLayer" for layer in spectral._layers)


def test_spectral_covariance_needs_exact_damping():
    from curvature.spectral import SpectralCovariance

    post, feats = _spectral_problem("mlp", "kflr")
    post.damping = "factored"
    with pytest.raises(ValueError, match="exact damping"):
        SpectralCovariance(post, feats)


# ---------------------------------------------------------------------------- null-space prior in the same pass


def _null_problem():
    """A tanh MLP whose last two input features never vary in training: unseen directions exist in layer 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(200, 5, generator=gen, dtype=torch.float64)
    x[:, 3:] = 0.0
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return model, x, y


def _null_posterior():
    """:func:`_null_problem`'s KFLR posterior on its first 150 points, and the problem's inputs and labels."""
    model, x, y = _null_problem()
    factors = cv.fit_kronecker(model, (x[:150], y[:150]), cv.CrossEntropy(), method="kflr")
    return cv.LaplacePosterior(model, factors, cv.CrossEntropy()), x, y


def test_null_prior_is_the_broadest_within_tolerance():
    post, x, y = _null_posterior()
    result = cv.tune_linearised(post, x[150:], y[150:], samples=16, null_tolerance=0.005)
    nulls = [h for h in result.history if "log10_null_prior" in h]
    assert nulls, "the null-space prior was not searched"
    accepted = [h for h in nulls if h["nll"] <= result.objective * 1.005]
    if result.null_prior is None:
        assert not accepted or nulls[0]["nll"] > result.objective * 1.005
    else:
        assert math.log10(result.null_prior) == pytest.approx(min(h["log10_null_prior"] for h in accepted))
        assert post.null_prior == {"0": result.null_prior}
        assert result.null_prior < result.prior_precision


def test_back_off_takes_one_grid_step_inside_what_validation_accepts():
    """On the ray, the broad rule's choice moves half a decade narrower (still within the tolerance of the best);
    the null-space prior one decade back from the broadest accepted value; with nothing rejected beyond them
    (the decade limit reached) neither moves."""
    problem = GLMRegressionProblem("kron", -1.2, 0.2)
    shape = N_DATA * 10.0 ** (-1.2 - 0.2)
    optimum = cv.tune_linearised(problem.post, problem.x, problem.y, null_prior=False, shape=shape)
    tolerance = 1.5 * (problem.nll(-12.0, 12.0) - optimum.objective) / abs(optimum.objective)
    ceiling = optimum.objective + tolerance * abs(optimum.objective)
    runs = {}
    for back_off in (False, True):
        p = GLMRegressionProblem("kron", -1.2, 0.2)
        runs[back_off] = cv.tune_linearised(
            p.post, p.x, p.y, null_prior=False, shape=shape, broad_tolerance=tolerance, back_off=back_off
        )
    edge, inside = (math.log10(runs[b].prior_precision) for b in (False, True))
    assert inside == pytest.approx(edge + 0.5)
    assert problem.nll(math.log10(runs[True].n_eff / N_DATA), inside) <= ceiling
    assert any(h["nll"] > ceiling and h["log10_prior"] < edge for h in runs[True].history)  # one was rejected

    for amplitude, moved in ((0.1, "one decade"), (0.2, "to the layer's prior")):
        # validation inputs that touch the features training never varied: a broad enough τ₀ gets rejected
        nulls = {}
        for back_off in (False, True):
            post, x, y = _null_posterior()
            x_val = x[150:].clone()
            gen = torch.Generator().manual_seed(5)
            x_val[:, 3:] = amplitude * torch.randn(50, 2, generator=gen, dtype=torch.float64)
            nulls[back_off] = cv.tune_linearised(post, x_val, y[150:], samples=16, back_off=back_off)
        plain, backed = nulls[False], nulls[True]
        tau = math.log10(plain.prior_precision)
        assert backed.prior_precision == plain.prior_precision and plain.null_prior is not None
        accepted = math.log10(plain.null_prior)
        tried = [h["log10_null_prior"] for h in plain.history if "log10_null_prior" in h]
        assert min(tried) == pytest.approx(accepted - 1)  # the next decade was tried and rejected
        if moved == "one decade":
            assert accepted <= tau - 2 and math.log10(backed.null_prior) == pytest.approx(accepted + 1)
        else:
            assert accepted == pytest.approx(tau - 1) and backed.null_prior is None
    for limit in (2, 1):  # validation blind to those features: the decade limit, not a rejection, stops the search
        post, x, y = _null_posterior()
        capped = cv.tune_linearised(post, x[150:], y[150:], samples=16, back_off=True, null_decades=limit)
        assert capped.null_prior == pytest.approx(capped.prior_precision * 10.0**-limit)


# ---------------------------------------------------------------------------- the fit: timings, reuse, FPR


def _blobs(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    centres = torch.tensor([[2.0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0], [0, 0, 2.0, 0, 0], [0, 0, 0, 2.0, 0]])
    return centres[y] + 1.2 * torch.randn(n, 5, generator=gen), y


def _trained_blob_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = _blobs(1000, 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def test_default_fit_records_timings_and_calibrates_from_the_tuning_pass():
    model, x, y = _trained_blob_model()
    xv, yv = _blobs(300, 1)
    post = cv.fit_laplace(model, x, y, xv, yv, cv.LaplaceConfig(samples=50))
    timings = post.metadata["timings"]
    assert set(timings) == {"curvature", "posterior", "features", "tuning", "ood_calibration", "total"}
    assert all(v >= 0 for v in timings.values())
    assert timings["total"] == pytest.approx(sum(v for k, v in timings.items() if k != "total"), abs=2e-3)
    assert post.summary()["timings"] == timings
    # thresholds from tuning's validation pass equal a fresh calibration of the tuned posterior
    fresh = post.predict(xv, samples=50)
    for score in ("entropy", "mutual_information", "max_prob"):
        expected = float(cv.predictive.ood_score_of(fresh, score).double().quantile(0.95))
        assert post.ood_threshold(score) == expected, score
    blob = cv.LaplacePosterior.from_bytes(post.to_bytes(), model)
    assert blob.metadata["timings"] == timings


@pytest.mark.slow
def test_flag_false_positive_rate_on_held_out_data_is_the_nominal_quantile():
    """Tuned and calibrated on 8,000 validation points, the flag fires on 5 % ± 1 point of 20,000 unseen
    in-distribution points (binomial standard error of the two estimates together ≈ 0.28 points; with 3,000
    validation points the quantile alone moves by ±1 point between draws, for MAP's entropy as much as for ours),
    for the default score and for entropy."""
    model, x, y = _trained_blob_model()
    xv, yv = _blobs(8000, 1)
    x_test, _ = _blobs(20000, 2)
    for score in ("mutual_information", "entropy"):
        post = cv.fit_laplace(model, x, y, xv, yv, cv.LaplaceConfig(samples=50, ood_score=score))
        fpr = float(post.predict(x_test, samples=50)["ood"].double().mean())
        assert abs(fpr - 0.05) <= 0.01, (score, fpr)
        # a threshold calibrated on training points instead would be too low: the property is not automatic
        train_scores = post.predict(x, samples=50)["ood_score"].double()
        naive = float(train_scores.quantile(0.95))
        assert naive != post.ood_threshold(score)


def test_calibration_rule_and_accuracy_floor_choose_among_recorded_candidates():
    """With a tolerance, the choice is the recorded candidate (no null prior) of smallest |confidence − accuracy|
    among those within the tolerance of the best NLL; candidates under the accuracy floor are never chosen."""
    post, x_val, y_val = classification_validation()
    probe = cv.tune_linearised(
        post, x_val, y_val, samples=8, seed=3, null_prior=False, min_accuracy=0.0, interpolate=False
    )
    accs = sorted({h["acc"] for h in probe.history})
    assert len(accs) >= 3, "the floor would not bite"
    floor = accs[len(accs) // 2]  # about half of the candidates fall under it
    post, *_ = classification_validation()
    tol = 0.05
    result = cv.tune_linearised(
        post,
        x_val,
        y_val,
        samples=8,
        seed=3,
        null_prior=False,
        calibration_tolerance=tol,
        min_accuracy=floor,
        interpolate=False,
    )
    best = min(h["nll"] for h in result.history)
    eligible = [h for h in result.history if h["nll"] <= best * (1 + tol)]
    assert all(h["acc"] >= floor for h in eligible)
    assert all(math.isinf(h["nll"]) for h in result.history if h["acc"] < floor)
    pick = min(eligible, key=lambda h: (h["calibration_gap"], h["nll"]))
    chosen = (math.log10(result.n_eff / N_DATA), math.log10(result.prior_precision))
    assert chosen == pytest.approx((pick["log10_n_ratio"], pick["log10_prior"]), abs=1e-9)
    assert result.objective == pick["nll"]
    # the gap is what it says: the tuned posterior's predictions on the validation inputs
    probs = post.predict(x_val, samples=8, predictive="glm", seed=3)["probs"]
    acc = float((probs.argmax(-1) == y_val).double().mean())
    assert abs(float(probs.max(-1).values.double().mean()) - acc) == pytest.approx(pick["calibration_gap"], abs=1e-6)
    assert any(h["acc"] < floor for h in result.history)


def test_mc_narrowing_rescales_the_kept_draws():
    """Narrowing multiplies every precision by 10, which scales each weight draw's offset by 1/√10: the rescaled
    draws give what fresh draws (same seed) at the narrowed hyper-parameters give."""
    from curvature.laplace import _narrow_until_accurate

    model, x, y = _trained_blob_model()
    lik = cv.CrossEntropy()
    factors = cv.fit_kronecker(model, (x, y), lik, method="kflr")
    post = cv.LaplacePosterior(model, factors, lik, n_eff=1.0, prior_precision=1e-3)
    x_val, y_val = _blobs(300, 1)
    out = _narrow_until_accurate(post, x_val, y_val, samples=16)
    assert post.metadata.get("mc_narrowed", 1) >= 10, "the posterior was not broad enough to be narrowed"
    fresh = cv.LaplacePosterior(model, factors, lik, n_eff=post.n_eff, prior_precision=post.prior_precision)
    ref = fresh.predict(x_val, samples=16, predictive="mc")
    torch.testing.assert_close(out["probs"], ref["probs"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out["probs"], post.model(x_val).softmax(-1), atol=1e-3), "no weight noise left"


def test_mc_narrowing_probes_with_a_few_draws_before_running_them_all():
    """The first few draws, run alone, find the narrowing where the full set is first run: when the posterior must
    be narrowed several times, the full set runs once or twice (not once per step), and the result is still the
    narrowed posterior's own MC predictive."""
    from curvature.laplace import _narrow_until_accurate

    model, x, y = _trained_blob_model()
    lik = cv.CrossEntropy()
    factors = cv.fit_kronecker(model, (x, y), lik, method="kflr")
    post = cv.LaplacePosterior(model, factors, lik, n_eff=1.0, prior_precision=1e-5)
    x_val, y_val = _blobs(300, 1)
    full_passes = []
    predict = post.predict
    post.predict = lambda *a, **k: full_passes.append(1) or predict(*a, **k)
    heard: list[tuple[float, str]] = []
    out = _narrow_until_accurate(post, x_val, y_val, samples=40, probes=8, progress=lambda f, m: heard.append((f, m)))
    narrowed = post.metadata.get("mc_narrowed", 1)
    assert narrowed >= 100, f"narrowed only ×{narrowed}: the test needs several steps"
    assert len(full_passes) <= 2
    # every stage is heard of, in order: the draws, each probe step, each full pass
    assert heard[0][1] == "MC predictive: drawing 40 networks"
    assert sum("8 probe networks" in m for _, m in heard) >= 3
    assert sum("40 networks on validation" in m for _, m in heard) == len(full_passes)
    assert [f for f, _ in heard] == sorted(f for f, _ in heard)
    fresh = cv.LaplacePosterior(model, factors, lik, n_eff=post.n_eff, prior_precision=post.prior_precision)
    torch.testing.assert_close(
        out["probs"], fresh.predict(x_val, samples=40, predictive="mc")["probs"], rtol=1e-4, atol=1e-5
    )


def test_a_curvature_that_excites_nothing_falls_back_to_searching_the_shape():
    """A saturated softmax has an output Hessian of exactly zero, so no direction is excited and no shape can be
    read from the spectrum: ``spectral_shape`` says so, and the default fit searches the shape on validation data
    instead of failing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([1000.0, 0.0]))
    x, y = torch.randn(50, 4), torch.zeros(50, dtype=torch.long)
    factors = cv.fit_kronecker(model, (x, y), cv.CrossEntropy(), method="kflr")
    with pytest.raises(ValueError, match="excites no direction"):
        cv.spectral_shape(cv.LaplacePosterior(model, factors, cv.CrossEntropy()))
    post = cv.fit_laplace(model, x, y, x[:20], y[:20])
    assert "shape" not in post.metadata and "no direction" in post.metadata["tuning_note"]
    assert bool(torch.isfinite(post.predict(x[:5])["probs"]).all())


def test_mc_fits_give_never_excited_directions_the_layers_prior():
    """A feature the training data never vary (a null column) gets the broader null-space prior in a fit with the
    linearised predictive, and the layer's own τ in an MC fit, whose sampled networks are not linear there."""
    model, x, y = _trained_blob_model()
    x, (xv, yv) = x.clone(), _blobs(300, 1)
    x[:, 4], xv = 0.0, xv.clone()
    xv[:, 4] = 0.0
    glm = cv.fit_laplace(model, x, y, xv, yv, cv.LaplaceConfig(curvature="kflr"))
    assert glm.null_prior, "the linearised fit chose no null-space prior: the test would be void"
    assert min(glm.null_prior.values()) < min(glm.prior_precision.values())
    mc = cv.fit_laplace(model, x, y, xv, yv, cv.LaplaceConfig(curvature="kflr", predictive="mc", samples=20))
    assert mc.null_prior == {} and mc.metadata["null_prior"] is None
