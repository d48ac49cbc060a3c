"""A separate prior for the directions the training data never excited (curvature ~0)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvature as cv


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _problem(n: int = 60):
    """Inputs whose last two features are always 0 in training: unseen input directions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(n, 5)
    x[:, 3:] = 0.0
    y = torch.randint(0, 3, (n,))
    return model, x, y


def _posterior(model, x, y, kind="kflr"):
    lik = cv.CrossEntropy()
    if kind == "diag":
        factors = cv.fit_diagonal(model, (x, y), lik)
    else:
        factors = cv.fit_kronecker(model, (x, y), lik, method=kind)
    return cv.LaplacePosterior(model, factors, lik, prior_precision=2.0)


def _dense_precision(post: cv.LaplacePosterior) -> torch.Tensor:
    """Block-diagonal precision built directly from the factors and the per-direction prior."""
    blocks = []
    for name, b in post.blocks.items():
        tau = post.prior_matrix(name)
        tau_col = tau if isinstance(tau, torch.Tensor) else torch.full((b.mean.shape[1],), tau)
        if b.diag is not None:
            blocks.append(torch.diag((post.n_eff * b.diag + tau_col).reshape(-1)))
            continue
        g = b.U_G @ torch.diag(b.s_G) @ b.U_G.T
        a = b.U_A @ torch.diag(b.s_A) @ b.U_A.T
        prior_a = b.U_A @ torch.diag(tau_col) @ b.U_A.T
        blocks.append(post.n_eff * torch.kron(g, a) + torch.kron(torch.eye(g.shape[0]), prior_a))
    return torch.block_diag(*blocks)


def test_unseen_input_directions_are_found():
    model, x, y = _problem()
    post = _posterior(model, x, y)
    assert int(post.blocks["0"].null_columns.sum()) == 2  # features 3 and 4 never vary
    assert int(post.blocks["2"].null_columns.sum()) == 0
    diag = _posterior(model, x, y, "diag")
    assert diag.blocks["0"].null_columns.tolist() == [False, False, False, True, True, False]


@pytest.mark.parametrize("kind", ["kflr", "diag"])
def test_covariance_log_prob_and_evidence_match_dense(kind):
    model, x, y = _problem()
    post = _posterior(model, x, y, kind)
    post.null_prior = 0.01
    assert set(post.null_prior) == {"0"}
    precision = _dense_precision(post)
    dense = torch.distributions.MultivariateNormal(
        torch.cat([b.mean.reshape(-1) for b in post.blocks.values()]), precision_matrix=precision
    )
    gen = torch.Generator().manual_seed(3)
    draws = post.sample(5, generator=gen)
    flat = torch.cat([draws[name].reshape(5, -1) for name in post.blocks], 1)
    torch.testing.assert_close(post.log_prob(draws), dense.log_prob(flat), rtol=1e-10, atol=1e-10)
    # evidence: −nll − ½ θᵀ Π θ + ½ log det Π − ½ log det P, with Π the (per-direction) prior precision
    prior = precision.clone()
    start = 0
    for b in post.blocks.values():
        size = b.mean.numel()
        prior[start : start + size, start : start + size] -= post.n_eff * (
            torch.diag(b.diag.reshape(-1))
            if b.diag is not None
            else torch.kron(b.U_G @ torch.diag(b.s_G) @ b.U_G.T, b.U_A @ torch.diag(b.s_A) @ b.U_A.T)
        )
        start += size
    theta = dense.loc
    expected = -1.5 - 0.5 * theta @ prior @ theta + 0.5 * torch.logdet(prior) - 0.5 * torch.logdet(precision)
    assert post.log_marginal_likelihood(1.5) == pytest.approx(float(expected), rel=1e-9)


def test_glm_variance_grows_only_for_inputs_using_unseen_directions():
    model, x, y = _problem()
    post = _posterior(model, x, y)
    seen = x[:5]
    unseen = x[:5].clone()
    unseen[:, 3:] = 3.0
    before = [post.predict(z, predictive="glm", samples=8)["probs"] for z in (seen, unseen)]
    from curvature.predictive import glm_covariance, glm_features

    cov_before = [glm_covariance(post, glm_features(post, z)) for z in (seen, unseen)]
    post.null_prior = 1e-3
    cov_after = [glm_covariance(post, glm_features(post, z)) for z in (seen, unseen)]
    torch.testing.assert_close(cov_after[0], cov_before[0], rtol=1e-10, atol=1e-12)
    assert (cov_after[1].diagonal(dim1=1, dim2=2) > 100 * cov_before[1].diagonal(dim1=1, dim2=2)).all()
    assert before[0].shape == (5, 3)


def test_tuning_keeps_validation_nll_within_tolerance():
    model, x, y = _problem(200)
    post = _posterior(model, x[:150], y[:150])
    post.set_hyperparameters(prior_precision=5.0)
    chosen = cv.tune_null_prior(post, x[150:], y[150:], predictive="glm", tolerance=0.005)
    # validation inputs never touch the unseen directions, so the broadest candidate is accepted
    assert chosen == pytest.approx(5.0 * 10.0**-8)
    assert post.null_prior == {"0": chosen}


def test_tuning_stops_where_validation_nll_rises():
    model, x, y = _problem(200)
    post = _posterior(model, x[:150], y[:150])
    x_val = x[150:].clone()
    x_val[:, 3:] = torch.randn(50, 2)  # validation data does excite the unseen directions
    chosen = cv.tune_null_prior(post, x_val, y[150:], predictive="glm", tolerance=0.005)
    assert chosen is None or chosen > 2.0 * 10.0**-8


def test_factored_damping_refuses_and_reload_keeps_the_null_prior():
    model, x, y = _problem()
    lik = cv.CrossEntropy()
    factors = cv.fit_kronecker(model, (x, y), lik, method="kflr")
    factored = cv.LaplacePosterior(model, factors, lik, damping="factored")
    with pytest.raises(ValueError, match="exact damping"):
        factored.null_prior = 0.1
    post = cv.LaplacePosterior(model, factors, lik)
    post.null_prior = 0.1
    again = cv.LaplacePosterior.from_bytes(post.to_bytes(), model)
    assert again.null_prior == post.null_prior
    for name in post.blocks:
        torch.testing.assert_close(again.eigenvalues(name), post.eigenvalues(name), rtol=0, atol=0)
    assert math.isfinite(again.log_marginal_likelihood(1.0))
