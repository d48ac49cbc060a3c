"""The second-order optimiser against dense float64 references built with ``torch.func``.

Each reference step is assembled from scratch: the gradient of the mean loss by ``torch.func.grad``, the dense
Gauss-Newton from :func:`curvature.exact_ggn`, the block-diagonal damped Kronecker matrix with ``torch.kron``,
and the quadratic-model minimisers by dense solves. The optimiser must reproduce them to round-off.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.func import grad as func_grad

import curvature as cv
from curvature.estimators import flatten_matrices, functional_model, layer_matrices, unflatten_vector

from .cases import DTYPE, LIKELIHOODS, MLP_TANH, assert_close_report, make_problem, reference_factors

pytestmark = pytest.mark.usefixtures("single_torch_thread")

EXACT = 1e-9


def _theta(model: nn.Module) -> torch.Tensor:
    layers = cv.find_layers(model)
    return flatten_matrices(layers, layer_matrices(layers))


def _dense_gradient(model, x, y, lik, weight_decay: float) -> torch.Tensor:
    layers = cv.find_layers(model)
    fn = functional_model(model, layers)

    def objective(th):
        return lik.nll(fn(unflatten_vector(layers, th), x), y) / len(x) + 0.5 * weight_decay * th @ th

    return func_grad(objective)(_theta(model))


def _dense_preconditioner(factors, layers, damping: str, shift: float) -> torch.Tensor:
    """Block-diagonal ``G̃ + shift·I`` (exact) or its factored approximation (eq. 4.25, ω of eq. 4.27)."""
    blocks = []
    for layer in layers:
        parts = factors[layer.name]
        if "diag" in parts:
            blocks.append(torch.diag(parts["diag"].reshape(-1) + shift))
            continue
        G, A = parts["G"].to(DTYPE), parts["A"].to(DTYPE)
        if damping == "exact":
            blocks.append(torch.kron(G, A) + shift * torch.eye(G.shape[0] * A.shape[0], dtype=DTYPE))
        else:
            omega = math.sqrt((torch.trace(G) / G.shape[0]) / (torch.trace(A) / A.shape[0]))
            k = math.sqrt(shift)
            blocks.append(
                torch.kron(
                    G + omega * k * torch.eye(G.shape[0], dtype=DTYPE),
                    A + k / omega * torch.eye(A.shape[0], dtype=DTYPE),
                )
            )
    return torch.block_diag(*blocks)


def _dense_step(model, x, y, lik, factors, damping, weight_decay, zeta, tau, previous=None):
    """The update ``Δ`` and the model change ``q(Δ) − q(0)`` a step must take, by dense algebra."""
    layers = cv.find_layers(model)
    g = _dense_gradient(model, x, y, lik, weight_decay)
    delta = -torch.linalg.solve(_dense_preconditioner(factors, layers, damping, weight_decay + zeta), g)
    C = cv.exact_ggn(model, x, y, lik) / len(x) + (weight_decay + tau) * torch.eye(len(g), dtype=DTYPE)
    dirs = torch.stack([delta] if previous is None else [delta, previous], dim=1)
    D, b = dirs.T @ C @ dirs, dirs.T @ g
    coef = torch.linalg.solve(D, -b)
    return dirs @ coef, float(coef @ b + 0.5 * coef @ D @ coef), coef


def _step_and_update(opt, model, x, y):
    before = _theta(model).clone()
    info = opt.step(x, y)
    return info, _theta(model) - before


# ---------------------------------------------------------------------------- closed-form output curvature


@pytest.mark.parametrize("lik_name", list(LIKELIHOODS))
def test_output_curvature_closed_forms_match_square_roots(lik_name):
    _, x, y, lik = make_problem(MLP_TANH, lik_name, n=5)
    f = torch.randn(5, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    s = lik.hessian_sqrt(f, y)
    v = torch.randn(5, 3, dtype=DTYPE)
    assert_close_report(lik.output_curvature_sum(f, y), torch.einsum("nck,ndk->cd", s, s), EXACT, name="sum")
    assert_close_report(lik.output_curvature_apply(f, y, v), torch.einsum("nck,ndk,nd->nc", s, s, v), EXACT)


# ---------------------------------------------------------------------------- direction and step size


@pytest.mark.parametrize(
    "curvature, damping, n",
    [
        ("kflr", "factored", 6),
        ("kflr", "exact", 6),
        ("kfra", "factored", 1),
        ("kfac", "exact", 6),
        ("diag", "exact", 6),
    ],
)
def test_step_equals_dense_damped_solve_and_quadratic_minimiser(curvature, damping, n):
    model, x, y, lik = make_problem(MLP_TANH, "ce", n=n)
    reference = copy.deepcopy(model)
    cfg = cv.OptimizerConfig(curvature=curvature, damping=damping, weight_decay=0.03, tau=0.2, zeta=0.5, momentum=False)
    opt = cv.SecondOrderOptimizer(model, lik, cfg)
    info, update = _step_and_update(opt, model, x, y)
    if curvature in ("kflr", "kfra"):  # KFRA is exact for one data point
        ref = reference_factors(reference, x, y, lik)
        for name, (A, G) in ref.items():
            assert_close_report(opt.factors[name]["A"], A, EXACT, name=f"A[{name}]")
            assert_close_report(opt.factors[name]["G"], G, EXACT, name=f"G[{name}]")
    expected, change, coef = _dense_step(reference, x, y, lik, opt.factors, damping, 0.03, 0.5, 0.2)
    assert_close_report(update, expected, EXACT, name="update")
    assert info.accepted and info.mu == 0.0
    assert info.alpha == pytest.approx(float(coef[0]), rel=EXACT)
    assert info.model_change == pytest.approx(change, rel=EXACT)


def test_factored_damping_differs_from_exact():
    model, x, y, lik = make_problem(MLP_TANH, "ce", n=6)
    updates = []
    for damping in ("factored", "exact"):
        m = copy.deepcopy(model)
        _, update = _step_and_update(cv.SecondOrderOptimizer(m, lik, cv.OptimizerConfig(damping=damping)), m, x, y)
        updates.append(update)
    assert (updates[0] - updates[1]).norm() > 1e-3 * updates[1].norm()


def test_momentum_step_solves_two_by_two_quadratic_model():
    model, x, y, lik = make_problem(MLP_TANH, "gaussian", n=8)
    cfg = cv.OptimizerConfig(curvature="kflr", momentum=True, tau=0.3, zeta=0.4)
    opt = cv.SecondOrderOptimizer(model, lik, cfg)
    first, previous = _step_and_update(opt, model, x, y)
    reference = copy.deepcopy(model)
    info, update = _step_and_update(opt, model, x, y)
    expected, change, coef = _dense_step(reference, x, y, lik, opt.factors, "factored", 0.0, 0.4, first.tau, previous)
    assert_close_report(update, expected, EXACT, name="momentum update")
    assert (info.alpha, info.mu) == pytest.approx((float(coef[0]), float(coef[1])), rel=EXACT)
    assert abs(info.mu) > 1e-6
    assert info.model_change == pytest.approx(change, rel=EXACT)


def test_undamped_step_on_linear_gaussian_model_lands_on_least_squares():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=gen, dtype=DTYPE)
    y = torch.randn(40, 3, generator=gen, dtype=DTYPE)
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DTYPE)
    for curvature in ("kflr", "kfra", "kfac"):
        m = copy.deepcopy(model)
        cfg = cv.OptimizerConfig(curvature=curvature, damping="exact", tau=1e-8, zeta=1e-8, min_damping=1e-8)
        opt = cv.SecondOrderOptimizer(m, cv.Gaussian(sigma=0.5), cfg)
        info = opt.step(x, y)
        x1 = torch.cat([x, torch.ones(40, 1, dtype=DTYPE)], dim=1)
        solution = torch.linalg.lstsq(x1, y).solution.T  # Ŵ = [W b]
        got = torch.cat([m.weight, m.bias.unsqueeze(1)], dim=1).detach()
        if curvature == "kfac":  # sampled Gaussian targets: G is only an estimate of I/σ²
            assert (got - solution).norm() > 1e-6
            continue
        assert_close_report(got, solution, 1e-6, name=f"{curvature} least squares")
        assert info.alpha == pytest.approx(1.0, rel=1e-6)
        assert info.rho == pytest.approx(1.0, rel=1e-5)  # the quadratic model is exact


# ---------------------------------------------------------------------------- damping adaptation


def test_tau_follows_levenberg_marquardt_rule_on_scripted_rho():
    model, _, _, lik = make_problem(MLP_TANH, "ce", n=2)
    opt = cv.SecondOrderOptimizer(model, lik, cv.OptimizerConfig(tau=1.0, tau_decay=0.95))
    expected = 1.0
    for rho in (0.9, 1.3, 0.5, -2.0, float("nan"), 0.8, 0.76, 0.1):
        opt.update_tau(rho)
        expected = expected * 0.95 if rho > 0.75 else expected / 0.95
        assert opt.tau == pytest.approx(expected, rel=1e-15)
    opt.update_tau(0.75)  # exactly on the threshold: unchanged
    assert opt.tau == pytest.approx(expected, rel=1e-15)

    banded = cv.SecondOrderOptimizer(model, lik, cv.OptimizerConfig(tau=1.0, rho_low=0.25, rho_high=0.75))
    for rho, tau in ((0.5, 1.0), (0.9, 0.95), (0.1, 1.0)):
        banded.update_tau(rho)
        assert banded.tau == pytest.approx(tau, rel=1e-15)


def test_tau_adapts_every_tau_interval_from_measured_rho():
    model, x, y, lik = make_problem(MLP_TANH, "bernoulli", n=10)
    opt = cv.SecondOrderOptimizer(model, lik, cv.OptimizerConfig(tau=2.0, tau_interval=3))
    tau = 2.0
    for t in range(7):
        before = opt.loss(x, y)
        info = opt.step(x, y)
        if t % 3 == 0:
            rho = (opt.loss(x, y) - before) / info.model_change
            assert info.rho == pytest.approx(rho, rel=1e-9)
            tau = tau * 0.95 if rho > 0.75 else tau / 0.95
        else:
            assert math.isnan(info.rho)
        assert info.tau == pytest.approx(tau, rel=1e-12)


def test_zeta_is_chosen_greedily_every_zeta_interval():
    model, x, y, lik = make_problem(MLP_TANH, "ce", n=6)
    cfg = cv.OptimizerConfig(curvature="kflr", zeta=0.05, zeta_decay=0.5, zeta_interval=2, tau=0.1, momentum=False)
    opt = cv.SecondOrderOptimizer(model, lik, cfg)
    zeta = 0.05
    for t in range(5):
        reference = copy.deepcopy(model)
        tau = opt.tau
        info, update = _step_and_update(opt, model, x, y)
        candidates = (zeta * 0.5, zeta, zeta / 0.5) if t > 0 and t % 2 == 0 else (zeta,)
        changes = {}
        for z in candidates:
            changes[z] = _dense_step(reference, x, y, lik, opt.factors, "factored", 0.0, z, tau)
        zeta = min(changes, key=lambda z: changes[z][1])
        assert info.zeta == zeta
        assert_close_report(update, changes[zeta][0], EXACT, name=f"step {t}")
    assert zeta != 0.05  # the search moved ζ


# ---------------------------------------------------------------------------- checkpoints and rejection


def _run(opt, batches):
    return [opt.step(x, y) for x, y in batches]


def test_state_dict_resume_is_bit_for_bit():
    model, x, y, lik = make_problem(MLP_TANH, "ce", n=24)
    batches = [(x[i % 3 * 8 : i % 3 * 8 + 8], y[i % 3 * 8 : i % 3 * 8 + 8]) for i in range(12)]
    cfg = cv.OptimizerConfig(
        curvature="kfac", momentum=True, curvature_ema=0.9, curvature_interval=3, inverse_interval=2, zeta_interval=4
    )
    straight_model = copy.deepcopy(model)
    straight = _run(cv.SecondOrderOptimizer(straight_model, lik, copy.deepcopy(cfg)), batches)

    opt = cv.SecondOrderOptimizer(model, lik, copy.deepcopy(cfg))
    first = _run(opt, batches[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _run(opt, batches[5:7])  # the interrupted run goes on a little, then is thrown away

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_model = MLP_TANH.build(seed=99)
    resumed_model.load_state_dict(saved["model"])
    resumed = cv.SecondOrderOptimizer(resumed_model, lik)
    resumed.load_state_dict(saved["opt"])
    rest = _run(resumed, batches[5:])
    assert first + rest == straight
    assert torch.equal(_theta(resumed_model), _theta(straight_model))


def test_non_finite_loss_is_rejected_and_damping_raised():
    model, x, y, lik = make_problem(MLP_TANH, "gaussian", n=8)
    opt = cv.SecondOrderOptimizer(model, lik, cv.OptimizerConfig(tau=0.5, zeta=0.2, tau_interval=100))
    start = _theta(model).clone()
    opt.step(x, y)
    tau, zeta = opt.tau, opt.zeta
    bad = y.clone()
    bad[0, 0] = float("nan")
    info = opt.step(x, bad)
    assert not info.accepted
    # the unverified previous update is undone as well
    assert torch.equal(_theta(model), start)
    assert (opt.tau, opt.zeta) == (pytest.approx(tau * 10), pytest.approx(zeta * 10))
    assert opt.step(x, y).accepted


def test_non_finite_update_is_never_applied():
    model, x, y, lik = make_problem(MLP_TANH, "ce", n=8)
    opt = cv.SecondOrderOptimizer(model, lik, cv.OptimizerConfig(curvature_interval=100, inverse_interval=100))
    opt.step(x, y)
    first_layer = next(iter(opt.factors))
    opt.factors[first_layer]["G"][0, 0] = float("inf")
    opt._rebuild_basis()
    before = _theta(model).clone()
    tau, zeta = opt.tau, opt.zeta
    info = opt.step(x, y)
    assert not info.accepted
    assert torch.equal(_theta(model), before)
    assert opt.tau == pytest.approx(tau * 10) and opt.zeta == pytest.approx(zeta * 10)
    assert opt.step(x, y).accepted  # the broken curvature is recomputed


# ---------------------------------------------------------------------------- every likelihood


@pytest.mark.parametrize("lik_name", list(LIKELIHOODS))
@pytest.mark.parametrize("curvature", ["kfra", "kflr", "kfac", "diag"])
def test_every_likelihood_trains(lik_name, curvature):
    model, x, y, lik = make_problem(MLP_TANH, lik_name, n=32)
    opt = cv.SecondOrderOptimizer(model, lik, cv.OptimizerConfig(curvature=curvature, momentum=True))
    start = opt.loss(x, y)
    history = opt.run(((x, y) for _ in range(15)), max_steps=10)
    assert len(history) == 10 and all(h.accepted for h in history)
    assert opt.loss(x, y) < 0.9 * start


def test_mixture_gauss_newton_and_fisher_differ():
    """KFLR/KFRA use the Gauss-Newton of eq. 4.28's mixture, KFAC the (sampled) Fisher; they are not equal."""
    model, x, y, lik = make_problem(MLP_TANH, "mixture", n=4)
    ggn = reference_factors(model, x, y, lik, "ggn")
    fisher = reference_factors(model, x, y, lik, "fisher")
    factors = {}
    for curvature, extra in (("kflr", {}), ("kfac", {"mc_samples": 4000})):
        m = copy.deepcopy(model)
        opt = cv.SecondOrderOptimizer(m, lik, cv.OptimizerConfig(curvature=curvature, **extra))
        opt.step(x, y)
        factors[curvature] = opt.factors
    for name in ggn:
        G_gn, G_f = ggn[name][1], fisher[name][1]
        assert (G_gn - G_f).norm() > 0.05 * G_gn.norm()
        assert_close_report(factors["kflr"][name]["G"], G_gn, EXACT, name=f"kflr G[{name}]")
        err_fisher = (factors["kfac"][name]["G"] - G_f).norm()
        assert err_fisher < 0.25 * (factors["kfac"][name]["G"] - G_gn).norm()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="curvature"):
        cv.OptimizerConfig(curvature="newton")
    with pytest.raises(ValueError, match="tau_interval"):
        cv.OptimizerConfig(tau_interval=0)
    with pytest.raises(ValueError, match="curvature_ema"):
        cv.OptimizerConfig(curvature_ema=1.0)
