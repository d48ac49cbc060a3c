"""Likelihood closed forms against automatic differentiation and against torch.distributions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

import curvature as cv
from curvature.estimators.exact import output_curvature_reference

from .cases import DTYPE, LIKELIHOODS, N_OUT, assert_close_report, gradient_support, make_targets, output_curvatures

pytestmark = pytest.mark.usefixtures("single_torch_thread")

N = 6


def _outputs(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(N, N_OUT, generator=gen, dtype=DTYPE)


def _targets(lik_name: str, seed: int = 1) -> torch.Tensor:
    return make_targets(lik_name, N, torch.Generator().manual_seed(seed))


ALL = list(LIKELIHOODS)


def _mixture_q(f: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(f)
    return s[:, 0] * s[:, 1] + (1 - s[:, 0]) * s[:, 2]


# ---------------------------------------------------------------------------- negative log-likelihoods


@pytest.mark.parametrize("lik_name", ALL)
def test_nll_matches_torch_distributions(lik_name):
    f, y = _outputs(), _targets(lik_name)
    lik = LIKELIHOODS[lik_name]()
    if lik_name == "ce":
        expected = -D.Categorical(logits=f).log_prob(y).sum()
    elif lik_name == "gaussian":
        expected = -D.Normal(f, lik.sigma).log_prob(y).sum()
    elif lik_name == "bernoulli":
        expected = -D.Bernoulli(logits=f).log_prob(y).sum()
    else:  # thesis eq. 4.28
        s = torch.sigmoid(f)
        p1 = s[:, 0] * s[:, 1] ** y * (1 - s[:, 1]) ** (1 - y) + (1 - s[:, 0]) * s[:, 2] ** y * (1 - s[:, 2]) ** (1 - y)
        expected = -p1.log().sum()
    assert_close_report(lik.nll(f, y), expected, rtol=1e-12, name="nll")


# ---------------------------------------------------------------------------- output curvature


@pytest.mark.parametrize("lik_name", ALL)
def test_hessian_sqrt_matches_autodiff_ggn(lik_name):
    f, y = _outputs(), _targets(lik_name)
    lik = LIKELIHOODS[lik_name]()
    s = lik.hessian_sqrt(f, y)
    assert s.shape[:2] == (N, N_OUT)
    assert_close_report(s @ s.transpose(1, 2), output_curvatures(lik, f, y, "ggn"), rtol=1e-10, name="S Sᵀ vs Λ")


@pytest.mark.parametrize("lik_name", ALL)
def test_fisher_sqrt_matches_enumerated_fisher(lik_name):
    f, y = _outputs(), _targets(lik_name)
    lik = LIKELIHOODS[lik_name]()
    s = lik.fisher_sqrt(f)
    assert_close_report(s @ s.transpose(1, 2), output_curvatures(lik, f, y, "fisher"), rtol=1e-10, name="Fisher")


@pytest.mark.parametrize("lik_name", ["ce", "gaussian", "bernoulli"])
def test_convex_likelihoods_ggn_equals_fisher_equals_hessian(lik_name):
    f, y = _outputs(), _targets(lik_name)
    lik = LIKELIHOODS[lik_name]()
    assert lik.target_free_curvature
    ggn = output_curvatures(lik, f, y, "ggn")
    assert_close_report(output_curvatures(lik, f, y, "fisher"), ggn, rtol=1e-10, name="Fisher vs GGN")
    assert_close_report(output_curvatures(lik, f, y, "hessian"), ggn, rtol=1e-10, name="Hessian vs GGN")
    other = _targets(lik_name, seed=7)
    assert_close_report(lik.hessian_sqrt(f, other), lik.hessian_sqrt(f, y), rtol=0, atol=0, name="target-free")


def test_mixture_ggn_depends_on_target_and_averages_to_fisher():
    """``q Λ(f, 1) + (1 − q) Λ(f, 0) = F``; the GGN and the Fisher differ example by example."""
    lik = cv.BinaryMixture()
    assert not lik.target_free_curvature
    f = _outputs()
    q = _mixture_q(f)
    ones, zeros = torch.ones(N, dtype=DTYPE), torch.zeros(N, dtype=DTYPE)
    lam1 = output_curvatures(lik, f, ones, "ggn")
    lam0 = output_curvatures(lik, f, zeros, "ggn")
    fisher = output_curvatures(lik, f, None, "fisher")
    avg = q[:, None, None] * lam1 + (1 - q)[:, None, None] * lam0
    assert_close_report(avg, fisher, rtol=1e-10, name="E_y Λ vs F")
    for lam in (lam0, lam1):
        assert ((lam - fisher).flatten(1).norm(dim=1) / fisher.flatten(1).norm(dim=1)).min() > 1e-2
    hess = output_curvatures(lik, f, ones, "hessian")
    assert (hess - lam1).abs().max() > 1e-2 * lam1.abs().max()


def test_mixture_needs_targets_and_three_outputs():
    lik = cv.BinaryMixture()
    with pytest.raises(ValueError, match="targets"):
        lik.hessian_sqrt(_outputs())
    with pytest.raises(ValueError, match="3 outputs"):
        lik.fisher_sqrt(torch.zeros(2, 4, dtype=DTYPE))


def test_output_curvature_reference_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        output_curvature_reference(cv.CrossEntropy(), _outputs()[0], torch.tensor(0), "laplace")


# ---------------------------------------------------------------------------- sampled gradients


@pytest.mark.parametrize("lik_name", ["ce", "bernoulli", "mixture"])
def test_sampled_gradients_take_autodiff_values(lik_name):
    """Every sampled column (times √m) is ``∇_f −log p(ŷ|f)`` for some ``ŷ`` of the support."""
    lik = LIKELIHOODS[lik_name]()
    f = _outputs()
    m = 50
    g = lik.sampled_gradients(f, m, torch.Generator().manual_seed(3)) * math.sqrt(m)
    assert g.shape == (N, N_OUT, m)
    for i in range(N):
        support, _ = gradient_support(lik, f[i])
        dist = (g[i].T[:, None, :] - support[None]).abs().amax(-1)  # (m, S)
        assert dist.min(1).values.max() < 1e-12, f"example {i}: a sample is not a gradient of the support"


@pytest.mark.montecarlo
@pytest.mark.parametrize("lik_name", ALL)
def test_sampled_gradients_mean_and_covariance(lik_name):
    """Mean 0 (the score) and covariance equal to the Fisher, within 5 standard errors of ``m`` samples.

    Exact per-entry variances: by enumeration of the support (discrete) or ``Var ε_iε_j = 1 + δ_ij`` (Gaussian).
    """
    lik = LIKELIHOODS[lik_name]()
    f = _outputs()
    m = 40_000
    g = lik.sampled_gradients(f, m, torch.Generator().manual_seed(11)) * math.sqrt(m)  # (n, C, m)
    mean = g.mean(-1)
    cov = torch.einsum("nim,njm->nij", g, g) / m
    fisher = output_curvatures(lik, f, _targets(lik_name), "fisher")
    if lik_name == "gaussian":
        var_mean = torch.full((N, N_OUT), 1 / lik.sigma**2, dtype=DTYPE)
        var_cov = (1 + torch.eye(N_OUT, dtype=DTYPE)).expand(N, -1, -1) / lik.sigma**4
    else:
        var_mean, var_cov = [], []
        for i in range(N):
            support, probs = gradient_support(lik, f[i])
            assert_close_report(probs.sum(), torch.tensor(1.0, dtype=DTYPE), rtol=1e-12, name="support mass")
            outer = support[:, :, None] * support[:, None, :]
            var_mean.append(probs @ support**2)
            var_cov.append(torch.einsum("s,sij->ij", probs, outer**2) - fisher[i] ** 2)
        var_mean, var_cov = torch.stack(var_mean), torch.stack(var_cov)
    z_mean = mean.abs() / (var_mean / m).sqrt()
    z_cov = (cov - fisher).abs() / (var_cov.clamp_min(1e-300) / m).sqrt()
    assert z_mean.max() < 5, f"sample mean off by {z_mean.max():.2f} standard errors:\n{mean}"
    assert z_cov.max() < 5, f"sample covariance off by {z_cov.max():.2f} standard errors:\n{cov - fisher}"


@pytest.mark.montecarlo
@pytest.mark.parametrize("lik_name", ALL)
def test_random_projection_covariance_is_ggn(lik_name):
    """``E[S v vᵀ Sᵀ] = Λ`` with ``Var((Sv)_i (Sv)_j) = Λ_ii Λ_jj + Λ_ij²`` (Isserlis)."""
    lik = LIKELIHOODS[lik_name]()
    f, y = _outputs(), _targets(lik_name)
    m = 40_000
    r = lik.random_projection(f, y, m, torch.Generator().manual_seed(5)) * math.sqrt(m)
    lam = output_curvatures(lik, f, y, "ggn")
    cov = torch.einsum("nim,njm->nij", r, r) / m
    d = torch.diagonal(lam, dim1=1, dim2=2)
    var = d[:, :, None] * d[:, None, :] + lam**2
    z = (cov - lam).abs() / (var.clamp_min(1e-300) / m).sqrt()
    assert z.max() < 5, f"projection covariance off by {z.max():.2f} standard errors:\n{cov - lam}"


# ---------------------------------------------------------------------------- construction


def test_likelihood_from_name():
    assert isinstance(cv.likelihood_from_name("classification"), cv.CrossEntropy)
    assert isinstance(cv.likelihood_from_name("binary"), cv.Bernoulli)
    gauss = cv.likelihood_from_name("regression", sigma=0.3)
    assert isinstance(gauss, cv.Gaussian) and gauss.sigma == 0.3
    with pytest.raises(ValueError, match="Unknown likelihood"):
        cv.likelihood_from_name("poisson")
    for sigma in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            cv.Gaussian(sigma)
