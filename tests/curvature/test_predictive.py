"""Predictives against dense references: the linearised logit covariance is ``J P⁻¹ Jᵀ`` with ``J`` from
``torch.func.jacrev`` over the flat ``Ŵ`` vector and ``P`` the dense block-diagonal precision; Monte Carlo over
weights agrees with it where the network is linear in its weights; the reported summaries obey their identities;
and an end-to-end fit on an MNIST slice flags letters more often than digits.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import curvature as cv
from curvature.data import letters, mnist5k
from curvature.predictive import glm_covariance, glm_features

from .cases import BRANCHY_WIDE, CNN, CNN_T1, DTYPE, MLP_TANH, assert_close_report
from .test_posterior import (
    KIND_IDS,
    KINDS,
    build,
    dense_covariance,
    dense_precision,
    flat_jacobian,
    single_thread,  # noqa: F401  (autouse fixture)
)

EXACT = 1e-9


def dense_logit_covariance(post: cv.LaplacePosterior, factors, x: torch.Tensor, n_eff=None, prior=None):
    n_eff = post.n_eff if n_eff is None else n_eff
    prior = post.prior_precision if prior is None else prior
    jac = flat_jacobian(post.model, x)  # (B, C, P)
    cov = dense_covariance(dense_precision(post.model, factors, n_eff, prior, post.damping))
    return jac @ cov @ jac.transpose(-1, -2)


# ---------------------------------------------------------------------------- GLM covariance


@pytest.mark.parametrize("case", [MLP_TANH, CNN, CNN_T1, BRANCHY_WIDE], ids=lambda c: c.name)
@pytest.mark.parametrize(("kind", "damping"), KINDS, ids=KIND_IDS)
def test_glm_covariance_equals_dense_jacobian_sandwich(case, kind, damping):
    """CNN has convolutions at T = 16 and T = 4 locations; CNN_T1 one at T = 1; BRANCHY_WIDE is not a chain."""
    post, model, x, *_, factors = build(case, kind, damping, prior="per_layer", n_eff=15.0)
    cov = glm_covariance(post, glm_features(post, x))
    assert_close_report(cov, dense_logit_covariance(post, factors, x), rtol=EXACT, name="GLM covariance")


@pytest.mark.parametrize(("kind", "damping"), KINDS, ids=KIND_IDS)
def test_glm_covariance_with_hyperparameter_overrides(kind, damping):
    """The pieces computed once are re-weighted for any ``(N_eff, τ)`` without touching the posterior."""
    post, model, x, *_, factors = build(CNN, kind, damping)
    feats = glm_features(post, x)
    prior = {name: 10.0**i for i, name in enumerate(post.blocks)}
    cov = glm_covariance(post, feats, n_eff=2.5, prior=prior)
    expected = dense_logit_covariance(post, factors, x, n_eff=2.5, prior=prior)
    assert_close_report(cov, expected, rtol=EXACT, name="GLM covariance (overrides)")
    assert post.n_eff == float(len(x)) and post.prior_precision == dict.fromkeys(post.blocks, 0.7)


def test_glm_regression_variance_is_the_dense_diagonal_plus_noise():
    post, model, x, _, lik, factors = build(MLP_TANH, "kron", "exact", lik_name="gaussian", prior="per_layer")
    out = post.predict(x, predictive="glm")
    epistemic = dense_logit_covariance(post, factors, x).diagonal(dim1=-2, dim2=-1)
    assert_close_report(out["epistemic_variance"], epistemic, rtol=EXACT, name="epistemic variance")
    assert_close_report(out["mean"], model(x), rtol=0, atol=0, name="mean")
    assert torch.equal(out["aleatoric_variance"], torch.full_like(epistemic, lik.sigma**2))
    assert torch.equal(out["variance"], out["aleatoric_variance"] + out["epistemic_variance"])


# ---------------------------------------------------------------------------- linear model: MC = GLM


def linear_problem(n: int = 30, sigma: float = 0.5):
    gen = torch.Generator().manual_seed(2)
    model = nn.Linear(3, 2).to(DTYPE)
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, 3, generator=gen, dtype=DTYPE))
        model.bias.copy_(torch.randn(2, generator=gen, dtype=DTYPE))
    x = torch.randn(n, 3, generator=gen, dtype=DTYPE)
    y = model(x).detach() + sigma * torch.randn(n, 2, generator=gen, dtype=DTYPE)
    lik = cv.Gaussian(sigma)
    factors = cv.fit_kronecker(model, (x, y), lik, method="kflr")
    return model, x, y, lik, factors


def test_linear_model_kronecker_precision_is_the_exact_ggn():
    """For one Linear layer and a Gaussian likelihood ``N·(G ⊗ A)`` is the GGN, so the GLM is the exact posterior."""
    model, x, y, lik, factors = linear_problem()
    ggn = cv.exact_ggn(model, x, y, lik)
    kron = len(x) * torch.kron(factors[""].G, factors[""].A)
    assert_close_report(kron, ggn, rtol=1e-12, name="N G⊗A vs exact GGN")


@pytest.mark.montecarlo
def test_linear_model_mc_predictive_agrees_with_glm():
    """Outputs are linear in the weights, so MC output samples are exactly ``N(f(x, θ*), J P⁻¹ Jᵀ)``.

    The weight samples come in antithetic pairs ``θ* ± δ``: the MC mean of a linear model is its mean to
    round-off, and the (1/K-normalised) variance rests on K/2 independent offsets, so its standard deviation is
    ``≈ v√(2/(K/2))``; 5 standard errors.
    """
    model, x, y, lik, factors = linear_problem()
    post = cv.LaplacePosterior(model, factors, lik, prior_precision=2.0)
    k = 20_000
    glm = post.predict(x[:8], predictive="glm")
    mc = post.predict(x[:8], samples=k, predictive="mc", seed=1)
    v = glm["epistemic_variance"]
    assert_close_report(mc["mean"], glm["mean"], rtol=1e-9, atol=1e-12, name="MC mean (antithetic pairs)")
    tol = 5 * v * math.sqrt(2 / (k // 2)) + v / k
    bad = (mc["epistemic_variance"] - v).abs() > tol
    assert not bad.any(), f"MC variance {mc['epistemic_variance'][bad]} vs GLM {v[bad]} (tol {tol[bad]})"
    dense = dense_logit_covariance(post, factors, x[:8]).diagonal(dim1=-2, dim2=-1)
    assert_close_report(v, dense, rtol=EXACT, name="GLM variance vs dense")


# ---------------------------------------------------------------------------- summaries and flags


def classification_posterior(prior=0.05):
    post, model, x, *_ = build(MLP_TANH, "kron", "exact", prior=prior)
    gen = torch.Generator().manual_seed(9)
    far = 4.0 * torch.randn(10, 4, generator=gen, dtype=DTYPE)
    return post, torch.cat([x, far])


@pytest.mark.parametrize(
    ("predictive", "link"), [("mc", "mc"), ("glm", "mc"), ("glm", "probit")], ids=["mc", "glm", "glm-probit"]
)
def test_classification_summaries_obey_their_identities(predictive, link):
    post, x = classification_posterior()
    out = post.predict(x, samples=64, predictive=predictive, seed=3, link=link)
    probs = out["probs"]
    assert probs.shape == (len(x), 3) and bool((probs >= 0).all())
    assert_close_report(probs.sum(-1), torch.ones(len(x), dtype=DTYPE), rtol=1e-12, name="sum of probs")
    assert torch.equal(out["max_prob"], probs.max(-1).values)
    h, eh, mi = out["entropy"], out["expected_entropy"], out["mutual_information"]
    assert_close_report(h, -(probs * probs.log()).sum(-1), rtol=1e-12, name="entropy of the mean")
    assert bool((eh >= 0).all()) and bool((h <= math.log(3) + 1e-12).all())
    if link == "mc":
        # H[p̄] ≥ E H[p_k] (concavity) when p̄ is the mean of the same samples
        assert bool((h >= eh - 1e-12).all()), f"entropy < expected entropy at {(h < eh - 1e-12).nonzero().tolist()}"
        assert_close_report(mi, h - eh, rtol=0, atol=1e-12, name="mutual information")
    else:
        assert_close_report(mi, (h - eh).clamp_min(0.0), rtol=0, atol=1e-12, name="mutual information")


def test_mc_expected_entropy_is_the_average_over_weight_samples():
    """The K networks of the MC predictive are the K posterior samples for the seed, run one by one here."""
    post, x = classification_posterior()
    out = post.predict(x, samples=12, predictive="mc", seed=8)
    weights = post.sample(12, generator=torch.Generator().manual_seed(8))
    probs = []
    for k in range(12):
        params = {}
        for name, w in weights.items():
            params[f"{name}.weight"], params[f"{name}.bias"] = w[k][:, :-1], w[k][:, -1]
        probs.append(torch.softmax(functional_call(post.model, params, (x,)), -1))
    p = torch.stack(probs)
    assert_close_report(out["probs"], p.mean(0), rtol=1e-10, name="MC mean probabilities")
    eh = -(p * p.log()).sum(-1).mean(0)
    assert_close_report(out["expected_entropy"], eh, rtol=1e-10, name="expected entropy")


@pytest.mark.parametrize("predictive", ["mc", "glm"])
def test_regression_variance_is_aleatoric_plus_epistemic(predictive):
    post, model, x, _, lik, _ = build(MLP_TANH, "kron", "factored", lik_name="gaussian", prior=0.3)
    out = post.predict(x, samples=32, predictive=predictive, seed=0)
    assert torch.equal(out["variance"], out["aleatoric_variance"] + out["epistemic_variance"])
    assert torch.equal(out["aleatoric_variance"], torch.full_like(out["mean"], lik.sigma**2))
    assert bool((out["epistemic_variance"] > 0).all())
    h = 0.5 * torch.log(2 * math.pi * math.e * out["variance"]).sum(-1)
    eh = 0.5 * torch.log(2 * math.pi * math.e * out["aleatoric_variance"]).sum(-1)
    assert_close_report(out["entropy"], h, rtol=1e-12, name="entropy")
    assert_close_report(out["mutual_information"], h - eh, rtol=1e-10, name="mutual information")


@pytest.mark.parametrize("score", ["entropy", "mutual_information", "max_prob"])
@pytest.mark.parametrize("predictive", ["mc", "glm"])
def test_ood_flags_are_score_above_the_calibrated_quantile(score, predictive):
    post, x = classification_posterior()
    held, query = x[:12], x
    thresholds = cv.calibrate_ood(post, held, quantile=0.8, samples=32, predictive=predictive)
    ref = post.predict(held, samples=32, predictive=predictive)
    values = {"entropy": ref["entropy"], "mutual_information": ref["mutual_information"]}
    values["max_prob"] = 1.0 - ref["max_prob"]
    for name, v in values.items():
        assert thresholds[name] == float(v.quantile(0.8)), name
    out = post.predict(query, samples=32, predictive=predictive, ood_score=score)
    expected_score = 1.0 - out["max_prob"] if score == "max_prob" else out[score]
    assert torch.equal(out["ood_score"], expected_score)
    assert float(out["ood_threshold"]) == thresholds[score]
    assert torch.equal(out["ood"], out["ood_score"] > thresholds[score])
    assert 0 < int(out["ood"].sum()) < len(query)


def test_uncalibrated_score_flags_nothing():
    post, x = classification_posterior()
    out = post.predict(x, samples=8, ood_score="entropy")
    assert math.isnan(float(out["ood_threshold"])) and not bool(out["ood"].any())


@pytest.mark.montecarlo
def test_probit_link_is_close_to_mc_link():
    """Both turn the same Gaussian logits into probabilities; the probit rule is an approximation, so the bound is
    loose: mean absolute difference below 0.02 and no entry off by more than 0.08 (measured ≈ 0.009 / 0.04)."""
    post, x = classification_posterior(prior=0.5)
    mc = post.predict(x, samples=20_000, predictive="glm", seed=0)["probs"]
    probit = post.predict(x, samples=20_000, predictive="glm", seed=0, link="probit")["probs"]
    diff = (mc - probit).abs()
    assert float(diff.mean()) < 0.02 and float(diff.max()) < 0.08, f"mean {diff.mean():.4f}, max {diff.max():.4f}"


@pytest.mark.parametrize("predictive", ["glm", "mc"])
def test_near_ties_do_not_flip_on_monte_carlo_noise(predictive):
    """A posterior whose logit standard deviations are ~1e-2 and inputs whose top-two logit gap is ~1e-3 (between
    σ² and σ). MC noise in an average over K draws is ~σ/√K, larger than the gap, but the draws come in
    antithetic pairs, so the first-order noise cancels and what is left (~σ²) is smaller than the gap: with
    K = 2, 4, 10 draws and any seed the predicted class is the network's at every near tie."""
    post, x = classification_posterior()
    with torch.no_grad():
        f = post.model(x)
    top = f.argmax(-1)
    i, j = next((a, b) for a in range(len(x)) for b in range(len(x)) if top[a] != top[b])
    ties = []
    for gap in torch.logspace(-3.2, -2.8, 8, dtype=DTYPE):
        lo, hi = 0.0, 1.0  # bisect along the segment from x_i to x_j for a top-two gap of `gap`
        for _ in range(80):
            mid = (lo + hi) / 2
            logits = post.model(((1 - mid) * x[i] + mid * x[j])[None])[0].detach()
            two = logits.topk(2).values
            if (two[0] - two[1]) > gap and logits.argmax() == top[i]:
                lo = mid
            else:
                hi = mid
        ties.append((1 - lo) * x[i] + lo * x[j])
    ties = torch.stack(ties)
    with torch.no_grad():
        tf = post.model(ties)
    gaps = tf.topk(2, -1).values
    assert bool(((gaps[:, 0] - gaps[:, 1]) > 5e-4).all()) and bool(((gaps[:, 0] - gaps[:, 1]) < 2e-3).all())
    # scale the posterior so logit standard deviations are about 1e-2
    cov = cv.predictive.glm_covariance(post, glm_features(post, ties))
    sd = float(cov.diagonal(dim1=-2, dim2=-1).sqrt().mean())
    factor = (sd / 1e-2) ** 2
    post.set_hyperparameters(
        n_eff=post.n_eff * factor, prior_precision={k: v * factor for k, v in post.prior_precision.items()}
    )
    cov = cv.predictive.glm_covariance(post, glm_features(post, ties))
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    assert float(sd.min()) > 3e-3 and float(sd.max()) < 3e-2, "logit noise not at the scale the test needs"
    for k in (2, 4, 10):
        for seed in range(5):
            probs = post.predict(ties, predictive=predictive, samples=k, seed=seed)["probs"]
            assert torch.equal(probs.argmax(-1), tf.argmax(-1)), (predictive, k, seed)


@pytest.mark.parametrize(
    ("predictive", "link"), [("mc", "mc"), ("glm", "mc"), ("glm", "probit")], ids=["mc", "glm", "glm-probit"]
)
def test_predictions_do_not_depend_on_batching(predictive, link):
    """An input's prediction is the same alone, inside a batch, or split over chunks (the API micro-batches)."""
    post, x = classification_posterior()
    whole = post.predict(x, samples=16, predictive=predictive, seed=2, link=link)
    parts = post.predict(x, samples=16, predictive=predictive, seed=2, link=link, batch_size=5)
    alone = post.predict(x[7:8], samples=16, predictive=predictive, seed=2, link=link)
    for key in ("probs", "entropy", "expected_entropy", "mutual_information"):
        assert_close_report(parts[key], whole[key], rtol=1e-12, name=f"{key} (chunks)")
        assert_close_report(alone[key], whole[key][7:8], rtol=1e-12, name=f"{key} (alone)")


def test_invalid_requests_are_refused():
    post, x = classification_posterior()
    for kwargs in ({"samples": 0}, {"predictive": "laplace"}, {"predictive": "glm", "link": "logit"}):
        with pytest.raises(ValueError):
            post.predict(x, **kwargs)
    with pytest.raises(ValueError):
        post.predict(x[:0])
    with pytest.raises(ValueError):
        post.predict(x, ood_score="variance")


# ---------------------------------------------------------------------------- end to end on an MNIST slice


def trained_mnist_mlp():
    data = mnist5k(seed=0)
    gen = torch.Generator().manual_seed(0)
    train_idx = torch.randperm(len(data.train), generator=gen)[:600]
    x_tr, y_tr = data.train.x[train_idx], data.train.y[train_idx]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        for i in range(0, 600, 100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_tr[i : i + 100]), y_tr[i : i + 100]).backward()
            opt.step()
    return model.eval(), x_tr, y_tr, data.val[:200], data.test[:300]


@pytest.mark.slow
def test_fit_laplace_on_mnist_flags_letters_more_than_digits():
    model, x_tr, y_tr, val, test = trained_mnist_mlp()
    with torch.no_grad():
        assert cv.accuracy(torch.softmax(model(test.x), -1), test.y) > 0.8
    config = cv.LaplaceConfig(curvature="kflr", samples=50, ood_quantile=0.95, predictive="glm")
    post = cv.fit_laplace(model, x_tr, y_tr, val.x, val.y, config)
    assert post.metadata["tuning"] == "validation"
    ood_letters = post.predict(letters(300, seed=1), samples=50)["ood"].double().mean()
    ood_test = post.predict(test.x, samples=50)["ood"].double().mean()
    ood_val = post.predict(val.x, samples=50)["ood"].double().mean()
    # the threshold is the 95 % quantile of the validation scores: 5 % of them lie above it (±1 point)
    assert abs(float(ood_val) - 0.05) <= 1 / len(val) + 1e-12, float(ood_val)
    # test digits: 5 % ± 3.5 binomial standard errors (n = 300)
    assert abs(float(ood_test) - 0.05) < 3.5 * math.sqrt(0.05 * 0.95 / len(test)), float(ood_test)
    # letters: flagged more than twice as often as the nominal 5 %, and above the digits by > 3 pooled standard errors
    pooled = (float(ood_letters) + float(ood_test)) / 2
    se = math.sqrt(pooled * (1 - pooled) * 2 / len(test))
    assert float(ood_letters) > 0.1, float(ood_letters)
    assert float(ood_letters) - float(ood_test) > 3 * se, (float(ood_letters), float(ood_test), se)
