"""Hyper-parameter choice against brute force: the Laplace evidence and the validation NLL are evaluated densely
(dense precision, dense Jacobians) over grids, and the tuners must land on the dense optimum.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import curvature as cv

from .cases import DTYPE, MLP_TANH, assert_close_report
from .test_posterior import (
    KIND_IDS,
    KINDS,
    build,
    dense_precision,
    flat_jacobian,
    layer_matrix,
    param_layers,
    single_thread,  # noqa: F401  (autouse fixture)
)

N_DATA = 12  # test_posterior.N_POINTS


def train_nll(post: cv.LaplacePosterior, x, y) -> float:
    with torch.no_grad():
        return float(post.likelihood.nll(post.model(x), y))


def dense_log_marglik(model, factors, nll: float, n_data: int, n_eff: float, prior: dict, damping: str) -> float:
    """``−(n/N)·nll − ½ Σ τ_l ‖θ_l‖² + ½ Σ P_l log τ_l − ½ log det P`` with a dense ``log det``."""
    value = -(n_eff / n_data) * nll
    for name, m in param_layers(model):
        theta = layer_matrix(m)
        value += -0.5 * prior[name] * float((theta**2).sum()) + 0.5 * theta.numel() * math.log(prior[name])
    return value - 0.5 * float(torch.linalg.slogdet(dense_precision(model, factors, n_eff, prior, damping))[1])


def layer_log_evidence(model, factors, name: str, log10_taus: np.ndarray, damping: str) -> np.ndarray:
    """The τ-dependent part of one layer's evidence at ``N_eff = N``, densely, for each τ of a grid."""
    sizes = {n: layer_matrix(m).numel() for n, m in param_layers(model)}
    names = list(sizes)
    lo = sum(sizes[n] for n in names[: names.index(name)])
    theta = layer_matrix(dict(param_layers(model))[name])
    out = []
    for t in log10_taus:
        tau = 10.0**t
        dense = dense_precision(model, factors, float(N_DATA), dict.fromkeys(names, tau), damping)
        block = dense[lo : lo + sizes[name], lo : lo + sizes[name]]
        value = -0.5 * tau * float((theta**2).sum()) + 0.5 * theta.numel() * math.log(tau)
        out.append(value - 0.5 * float(torch.linalg.slogdet(block)[1]))
    return np.array(out)


# ---------------------------------------------------------------------------- marginal likelihood


@pytest.mark.parametrize("n_eff", [None, 30.0], ids=["n_eff=N", "n_eff=30"])
@pytest.mark.parametrize("prior", [0.7, "per_layer"], ids=["scalar", "per_layer"])
@pytest.mark.parametrize(("kind", "damping"), KINDS, ids=KIND_IDS)
def test_log_marginal_likelihood_matches_dense(kind, damping, prior, n_eff):
    post, model, x, y, _, factors = build(MLP_TANH, kind, damping, prior=prior, n_eff=n_eff)
    nll = train_nll(post, x, y)
    expected = dense_log_marglik(model, factors, nll, N_DATA, post.n_eff, post.prior_precision, damping)
    assert_close_report(torch.tensor(post.log_marginal_likelihood(nll)), torch.tensor(expected), rtol=1e-11)
    other = {name: 2.0 * tau for name, tau in post.prior_precision.items()}
    expected = dense_log_marglik(model, factors, nll, N_DATA, 7.0, other, damping)
    actual = post.log_marginal_likelihood(nll, n_eff=7.0, prior=other)
    assert_close_report(torch.tensor(actual), torch.tensor(expected), rtol=1e-11, name="with overrides")


@pytest.mark.parametrize(("kind", "damping"), KINDS, ids=KIND_IDS)
def test_tune_marglik_picks_the_dense_grid_maximiser(kind, damping):
    post, model, x, y, _, factors = build(MLP_TANH, kind, damping, n_eff=40.0)
    nll = train_nll(post, x, y)
    result = cv.tune_marglik(post, nll, per_layer=False)
    grid = np.linspace(-4.0, 6.0, 101)
    names = [n for n, _ in param_layers(model)]
    dense = np.array(
        [
            dense_log_marglik(model, factors, nll, N_DATA, float(N_DATA), dict.fromkeys(names, 10.0**g), damping)
            for g in grid
        ]
    )
    best = 10.0 ** grid[int(np.argmax(dense))]
    assert post.n_eff == N_DATA
    assert result.prior_precision == pytest.approx(best, rel=1e-12), (result.prior_precision, best)
    assert post.prior_precision == dict.fromkeys(names, result.prior_precision)
    assert result.objective == pytest.approx(float(dense.max()), rel=1e-10)
    # the history is the evidence up to the τ-independent −nll term
    history = np.array([h["log_marglik"] for h in result.history])
    np.testing.assert_allclose(history - nll, dense, rtol=1e-10)


@pytest.mark.parametrize(("kind", "damping"), KINDS, ids=KIND_IDS)
def test_tune_marglik_per_layer_finds_each_dense_maximiser(kind, damping):
    """The evidence decomposes over layers; each τ_l must be the dense per-layer maximiser (brute force to 0.001 in
    log10 τ) to within the tuner's fine-grid step (0.01)."""
    post, model, x, y, _, factors = build(MLP_TANH, kind, damping)
    result = cv.tune_marglik(post, train_nll(post, x, y), per_layer=True)
    coarse = np.linspace(-4.0, 6.0, 201)
    for name, _ in param_layers(model):
        dense = layer_log_evidence(model, factors, name, coarse, damping)
        i = int(np.argmax(dense))
        assert 0 < i < len(coarse) - 1, f"layer {name}: maximiser on the grid boundary, the check is void"
        fine = np.linspace(coarse[i - 1], coarse[i + 1], 101)
        best = fine[int(np.argmax(layer_log_evidence(model, factors, name, fine, damping)))]
        chosen = math.log10(result.prior_precision[name])
        assert abs(chosen - best) <= 0.01 + 0.001 + 1e-9, (name, chosen, best)


# ---------------------------------------------------------------------------- validation NLL


class GLMRegressionProblem:
    """Validation targets for which the best ``(N_eff, τ)`` is known exactly.

    With the linearised Gaussian predictive the validation NLL of output ``c`` of input ``b`` is
    ``½ log 2π v + r²/(2v)``, ``v = σ² + [J P⁻¹ Jᵀ]_cc``, which is minimised by ``v = r²``. Targets are placed at
    ``y = f(x) ± √v*(x)`` where ``v*`` is the predictive variance at ``(N_eff*, τ*)``, so every term is
    minimised there, and so is the mean. Dense reference: ``P = n C + τ I`` with ``C`` the dense block-diagonal
    Kronecker curvature, diagonalised once, ``v(n, τ) = σ² + Σ_k (J V)²_k / (n s_k + τ)``.
    """

    def __init__(self, kind: str, log10_ratio: float, log10_tau: float) -> None:
        post, model, *_, lik, factors = build(MLP_TANH, kind, "exact", lik_name="gaussian")
        self.post, self.model, self.sigma2 = post, model, lik.sigma**2
        gen = torch.Generator().manual_seed(21)
        self.x = 1.5 * torch.randn(40, 4, generator=gen, dtype=DTYPE)
        s, v = torch.linalg.eigh(dense_precision(model, factors, 1.0, 0.0))
        self.s = s.clamp_min(0)
        self.jv2 = (flat_jacobian(model, self.x) @ v) ** 2  # (B, C, P)
        with torch.no_grad():
            self.f = model(self.x)
        v_star = self.variance(log10_ratio, log10_tau)
        signs = torch.randint(0, 2, self.f.shape, generator=gen, dtype=DTYPE) * 2 - 1
        self.y = self.f + signs * v_star.sqrt()

    def variance(self, log10_ratio, log10_tau) -> torch.Tensor:
        """(B, C, *grid) for scalar or array-like ``log10_ratio``, ``log10_tau`` of one shape."""
        n = N_DATA * 10.0 ** torch.as_tensor(log10_ratio, dtype=DTYPE)
        tau = 10.0 ** torch.as_tensor(log10_tau, dtype=DTYPE)
        inv = 1.0 / (n[..., None] * self.s + tau[..., None])  # (*grid, P)
        return self.sigma2 + torch.einsum("bcp,...p->bc...", self.jv2, inv)

    def nll(self, log10_ratio, log10_tau):
        v = self.variance(log10_ratio, log10_tau)
        r2 = ((self.y - self.f) ** 2).reshape(*self.f.shape, *([1] * (v.dim() - 2)))
        per = (0.5 * torch.log(2 * math.pi * v) + 0.5 * r2 / v).sum(1).mean(0)
        return float(per) if per.dim() == 0 else per.numpy()


@pytest.mark.parametrize("kind", ["kron", "diag"])
def test_tune_validation_recovers_the_known_optimum(kind):
    """The optimum (0.3, 0.7) lies off the tuner's lattices; brute force over a 0.05 grid finds it, and the
    tuner must land within its last refinement step (0.25) of it, scoring every candidate as the dense NLL."""
    target = (0.3, 0.7)
    problem = GLMRegressionProblem(kind, *target)
    ratios, taus = np.arange(-2.5, 2.5001, 0.05), np.arange(-3.5, 5.5001, 0.05)
    grid = problem.nll(*np.meshgrid(ratios, taus, indexing="ij"))
    i, j = np.unravel_index(np.argmin(grid), grid.shape)
    assert abs(ratios[i] - target[0]) < 0.026 and abs(taus[j] - target[1]) < 0.026, (ratios[i], taus[j])

    post = problem.post
    result = cv.tune_validation(post, problem.x, problem.y, predictive="glm")
    chosen = (math.log10(result.n_eff / N_DATA), math.log10(result.prior_precision))
    assert abs(chosen[0] - target[0]) <= 0.25 + 1e-9 and abs(chosen[1] - target[1]) <= 0.25 + 1e-9, chosen
    assert post.n_eff == result.n_eff and post.prior_precision == dict.fromkeys(post.blocks, result.prior_precision)
    assert result.objective == pytest.approx(problem.nll(*chosen), rel=1e-9)
    assert result.objective >= grid.min() - 1e-12
    for h in result.history:
        dense = problem.nll(h["log10_n_ratio"], h["log10_prior"])
        assert h["nll"] == pytest.approx(dense, rel=1e-9), h
    coarse = [h["nll"] for h in result.history[:45]]
    assert result.objective <= min(coarse)


def test_tune_validation_with_n_eff_fixed_finds_the_best_tau():
    problem = GLMRegressionProblem("kron", 0.0, 1.4)
    result = cv.tune_validation(problem.post, problem.x, problem.y, predictive="glm", tune_n_eff=False)
    assert result.n_eff == N_DATA
    assert abs(math.log10(result.prior_precision) - 1.4) <= 0.25 + 1e-9, result.prior_precision
    assert all(h["log10_n_ratio"] == 0.0 for h in result.history)


def test_tune_validation_per_layer_only_improves():
    problem = GLMRegressionProblem("kron", 0.3, 0.7)
    shared = cv.tune_validation(problem.post, problem.x, problem.y, predictive="glm")
    fresh = GLMRegressionProblem("kron", 0.3, 0.7)
    per_layer = cv.tune_validation(fresh.post, fresh.x, fresh.y, predictive="glm", per_layer=True)
    assert per_layer.objective <= shared.objective
    assert per_layer.history[: len(shared.history)] == shared.history


def classification_validation():
    post, model, *_ = build(MLP_TANH, "kron", "exact")
    gen = torch.Generator().manual_seed(13)
    x_val = 1.3 * torch.randn(25, 4, generator=gen, dtype=DTYPE)
    y_val = torch.randint(0, 3, (25,), generator=gen)
    return post, x_val, y_val


@pytest.mark.parametrize("predictive", ["mc", "glm"])
def test_tune_validation_scores_every_candidate_afresh(predictive):
    """Each recorded NLL equals a fresh evaluation on a new posterior set to that candidate (twice, to show the
    evaluation has no state), and two runs record the same history."""
    post, x_val, y_val = classification_validation()
    kwargs = {"predictive": predictive, "samples": 8, "seed": 3, "refine_steps": 1}
    result = cv.tune_validation(post, x_val, y_val, **kwargs)
    again = cv.tune_validation(classification_validation()[0], x_val, y_val, **kwargs)
    assert result.history == again.history
    checked = result.history[::7] + [min(result.history, key=lambda h: h["nll"])]
    for h in checked:
        values = []
        for _ in range(2):
            fresh, *_ = classification_validation()
            fresh.set_hyperparameters(
                n_eff=N_DATA * 10.0 ** h["log10_n_ratio"], prior_precision=10.0 ** h["log10_prior"]
            )
            probs = fresh.predict(x_val, samples=8, predictive=predictive, seed=3)["probs"]
            values.append(cv.nll_classification(probs, y_val))
        assert values[0] == values[1]
        assert h["nll"] == pytest.approx(values[0], rel=1e-12, abs=1e-12), (h, values[0])
    assert result.objective == min(h["nll"] for h in result.history)


@pytest.mark.parametrize("predictive", ["mc", "glm"])
def test_tune_validation_choice_does_not_depend_on_grid_order(predictive):
    post, x_val, y_val = classification_validation()
    kwargs = {"predictive": predictive, "samples": 8, "seed": 3, "refine_steps": 1}
    forward = cv.tune_validation(post, x_val, y_val, log10_n_ratio=(-2.0, 2.0), **kwargs)
    reverse = cv.tune_validation(
        classification_validation()[0], x_val, y_val, log10_prior=(5.0, -3.0), log10_n_ratio=(2.0, -2.0), **kwargs
    )
    assert (reverse.n_eff, reverse.prior_precision, reverse.objective) == pytest.approx(
        (forward.n_eff, forward.prior_precision, forward.objective), rel=1e-12
    )

    def scores(result):
        return sorted((round(h["log10_n_ratio"], 9), round(h["log10_prior"], 9), h["nll"]) for h in result.history[:45])

    assert scores(forward) == scores(reverse)
