"""Continual learning (``curvature.continual``) against dense float64 references.

* The Kronecker and diagonal penalties and their gradients (and Hessians) equal the dense quadratic forms
  ``½ vec(Δ)ᵀ kron(G, A) vec(Δ)`` built with ``torch.kron`` in the row-major ``Ŵ = [W b]`` layout.
* A linear model with a Gaussian likelihood: KFLR is the exact Gauss-Newton, so online Laplace with exact
  optima reproduces the exact joint posterior after every task; EWC does not.
* On a three-task toy the penalties of ``online``, ``online_sum``, ``ewc`` and ``nononline`` equal their formulas.
* SI's importance equals the path integral computed by hand along the same gradient steps.
* A learner resumed from its serialised state ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

import curvature as cv
from curvature.continual import ContinualConfig, ContinualLearner, read_state, run_tasks

from .cases import assert_close_report

DTYPE = torch.float64


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_psd(n: int, generator: torch.Generator, rank: int | None = None) -> Tensor:
    m = torch.randn(n, rank or n, dtype=DTYPE, generator=generator)
    return m @ m.T / (rank or n)


def dense_quadratic(delta: Tensor, G: Tensor, A: Tensor) -> Tensor:
    """``½ vec(Δ)ᵀ kron(G, A) vec(Δ)`` with ``vec`` row-major, formed densely."""
    v = delta.reshape(-1)
    return 0.5 * v @ torch.kron(G, A) @ v


# ------------------------------------------------------------------------------------------ quadratic forms
def test_kron_quadratic_value_gradient_hessian_match_dense():
    gen = torch.Generator().manual_seed(0)
    o, i, t = 3, 5, 4
    G = torch.stack([random_psd(o, gen) for _ in range(t)])
    A = torch.stack([random_psd(i, gen, rank=2) for _ in range(t)])
    delta = torch.randn(o, i, dtype=DTYPE, generator=gen, requires_grad=True)

    value = cv.kron_quadratic(delta, G, A)
    (grad,) = torch.autograd.grad(value, delta)
    dense = sum(torch.kron(G[k], A[k]) for k in range(t))
    v = delta.detach().reshape(-1)
    assert_close_report(value.detach(), 0.5 * v @ dense @ v, rtol=1e-12, name="value")
    assert_close_report(grad.reshape(-1), dense @ v, rtol=1e-12, name="gradient")
    hess = torch.autograd.functional.hessian(lambda d: cv.kron_quadratic(d, G, A), delta.detach())
    assert_close_report(hess.reshape(o * i, o * i), dense, rtol=1e-12, name="hessian (double backward)")

    # one difference per term (EWC: each penalty has its own centre)
    deltas = torch.randn(t, o, i, dtype=DTYPE, generator=gen, requires_grad=True)
    value = cv.kron_quadratic(deltas, G, A)
    (grads,) = torch.autograd.grad(value, deltas)
    expected = sum(dense_quadratic(deltas[k].detach(), G[k], A[k]) for k in range(t))
    assert_close_report(value.detach(), expected, rtol=1e-12, name="per-term value")
    for k in range(t):
        assert_close_report(grads[k].reshape(-1), torch.kron(G[k], A[k]) @ deltas[k].detach().reshape(-1), rtol=1e-12)

    # the layout matters: the column-stacked kron(A, G) is a different form on a row-major vec
    wrong = 0.5 * v @ sum(torch.kron(A[k], G[k]) for k in range(t)) @ v
    assert abs(float(cv.kron_quadratic(delta.detach(), G, A)) - float(wrong)) > 1e-3 * abs(float(wrong))


def test_diag_quadratic_matches_dense():
    gen = torch.Generator().manual_seed(1)
    D = torch.rand(3, 4, dtype=DTYPE, generator=gen)
    delta = torch.randn(3, 4, dtype=DTYPE, generator=gen, requires_grad=True)
    value = cv.diag_quadratic(delta, D)
    (grad,) = torch.autograd.grad(value, delta)
    v = delta.detach().reshape(-1)
    assert_close_report(value.detach(), 0.5 * v @ torch.diag(D.reshape(-1)) @ v, rtol=1e-13)
    assert_close_report(grad.reshape(-1), torch.diag(D.reshape(-1)) @ v, rtol=1e-13)


def test_nearest_kronecker_sum_is_the_top_singular_pair_of_the_rearrangement():
    gen = torch.Generator().manual_seed(2)
    o, i, t = 3, 4, 3
    G = torch.stack([random_psd(o, gen) for _ in range(t)])
    A = torch.stack([random_psd(i, gen) for _ in range(t)])
    w = torch.tensor([0.5, 1.5, 2.0], dtype=DTYPE)
    X, Y = cv.nearest_kronecker_sum(G, A, w)
    # Van Loan-Pitsianis by brute force: the rearranged matrix R[(a,b),(c,d)] = S[(a,c),(b,d)]
    S = sum(w[k] * torch.kron(G[k], A[k]) for k in range(t))
    R = S.reshape(o, i, o, i).permute(0, 2, 1, 3).reshape(o * o, i * i)
    U, s, Vh = torch.linalg.svd(R)
    best = s[0] * torch.kron(U[:, 0].reshape(o, o), Vh[0].reshape(i, i))
    best = best if best[0, 0] > 0 else -best
    assert_close_report(torch.kron(X, Y), best, rtol=1e-10, name="nearest Kronecker product")
    assert torch.linalg.eigvalsh(X).min() >= -1e-12 and torch.linalg.eigvalsh(Y).min() >= -1e-12
    # not exact for a generic sum, exact when the G's are proportional
    assert (torch.kron(X, Y) - S).norm() > 1e-3 * S.norm()
    G_same = torch.stack([G[0] * c for c in (1.0, 2.0, 0.5)])
    X, Y = cv.nearest_kronecker_sum(G_same, A, w)
    S = sum(w[k] * torch.kron(G_same[k], A[k]) for k in range(t))
    assert_close_report(torch.kron(X, Y), S, rtol=1e-10, name="proportional G")


# ------------------------------------------------------------------------ exactness: linear-Gaussian model
def gaussian_tasks(n_tasks: int = 3, n: int = 25, d_in: int = 3, d_out: int = 2, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d_out, d_in, dtype=DTYPE, generator=gen)
    tasks = []
    for t in range(n_tasks):
        x = (t + 1) * torch.randn(n + 5 * t, d_in, dtype=DTYPE, generator=gen) + t
        y = x @ w_true.T + 0.3 * torch.randn(len(x), d_out, dtype=DTYPE, generator=gen) - t
        tasks.append((x, y))
    return tasks


def exact_joint_posterior(tasks, tau: float, sigma: float, d_out: int) -> tuple[Tensor, Tensor]:
    """Mean (flat row-major ``Ŵ``) and precision of the exact posterior of a linear-Gaussian model."""
    xtx, xty = 0.0, 0.0
    for x, y in tasks:
        xh = torch.cat([x, torch.ones(len(x), 1, dtype=DTYPE)], 1)
        xtx = xtx + xh.T @ xh / sigma**2
        xty = xty + (y.T @ xh / sigma**2).reshape(-1)
    eye = torch.eye(d_out * xh.shape[1], dtype=DTYPE)
    precision = tau * eye + torch.kron(torch.eye(d_out, dtype=DTYPE), xtx)
    return torch.linalg.solve(precision, xty), precision


def flat_weights(learner: ContinualLearner) -> Tensor:
    return torch.cat([w.detach().reshape(-1) for w in learner.weights().values()])


def penalty_hessian(learner: ContinualLearner) -> Tensor:
    names = [layer.name for layer in learner.layers]
    shapes = [layer.shape for layer in learner.layers]

    def f(flat: Tensor) -> Tensor:
        parts, start = {}, 0
        for name, (o, i) in zip(names, shapes, strict=True):
            parts[name] = flat[start : start + o * i].reshape(o, i)
            start += o * i
        return learner.penalty(parts)

    return torch.autograd.functional.hessian(f, flat_weights(learner))


def dense_posterior_precision(post: cv.LaplacePosterior) -> Tensor:
    blocks = []
    for name, block in post.blocks.items():
        lam = post.eigenvalues(name).reshape(-1)
        u = torch.kron(block.U_G, block.U_A) if block.U_G is not None else torch.eye(lam.numel(), dtype=lam.dtype)
        blocks.append(u @ torch.diag(lam) @ u.T)
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("method", ["online", "online_sum", "nononline"])
def test_online_laplace_is_the_exact_joint_posterior_for_a_linear_gaussian_model(method):
    tau, sigma = 0.5, 0.7
    tasks = gaussian_tasks()
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DTYPE)
    cfg = ContinualConfig(
        method=method, curvature="kflr", strength=1.0, prior_precision=tau, optimizer="lbfgs", lr=1.0, epochs=3
    )
    learner = ContinualLearner(model, cv.Gaussian(sigma), cfg)
    for t, data in enumerate(tasks):
        learner.learn_task(data, previous=tasks[:t])
        mean, precision = exact_joint_posterior(tasks[: t + 1], tau, sigma, 2)
        assert_close_report(flat_weights(learner), mean, rtol=1e-9, name=f"mean after task {t}")
        assert_close_report(penalty_hessian(learner), precision, rtol=1e-10, name=f"precision after task {t}")
        for approximation in ("nearest", "sum"):  # every task has G = I/σ², so both are exact
            post = learner.posterior(approximation)
            assert_close_report(dense_posterior_precision(post), precision, rtol=1e-10, name=approximation)
        if t > 0 and method != "online_sum":  # the latest task's factors alone are not
            latest = dense_posterior_precision(learner.posterior("latest"))
            assert (latest - precision).norm() > 1e-3 * precision.norm()
    assert post.n_data == sum(len(x) for x, _ in tasks)


def test_ewc_is_not_the_joint_posterior():
    """EWC's penalties around each task's own optimum over-count the prior and differ from the recursion."""
    tau, sigma = 0.5, 0.7
    tasks = gaussian_tasks()
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DTYPE)
    cfg = ContinualConfig(method="ewc", curvature="kflr", prior_precision=tau, optimizer="lbfgs", lr=1.0, epochs=3)
    learner = ContinualLearner(model, cv.Gaussian(sigma), cfg)
    for data in tasks:
        learner.learn_task(data)
    mean, precision = exact_joint_posterior(tasks, tau, sigma, 2)
    # precision (the penalty's Hessian) is the same sum, but the optimum is not the joint one
    assert_close_report(penalty_hessian(learner), precision, rtol=1e-10)
    assert (flat_weights(learner) - mean).norm() > 1e-4 * mean.norm()


# -------------------------------------------------------------------- the variants on a three-task toy
def toy_tasks(n_tasks: int = 3, n: int = 40, seed: int = 4):
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n_tasks):
        x = torch.randn(n, 4, dtype=DTYPE, generator=gen)
        teacher = torch.randn(4, 3, dtype=DTYPE, generator=gen)
        tasks.append((x, (x @ teacher).argmax(1)))
    return tasks


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


def dense_kron_penalty(model: nn.Module, data, delta_of) -> Tensor:
    """``½ Σ_l vec(Δ_l)ᵀ N kron(G_l, A_l) vec(Δ_l)`` with factors fitted on ``model`` (any weights)."""
    factors = cv.fit_kronecker(model, data, cv.CrossEntropy(), method="kflr")
    return sum(dense_quadratic(delta_of(name), factors.n_data * f.G, f.A) for name, f in factors.items())


@pytest.mark.parametrize("method", ["online", "online_sum", "ewc", "nononline"])
def test_variants_penalise_as_their_formulas_say(method):
    tasks = toy_tasks()
    lam, tau = 3.0, 0.7
    model = tiny_mlp()
    cfg = ContinualConfig(
        method=method, curvature="kflr", strength=lam, prior_precision=tau, epochs=3, batch_size=16, lr=0.05
    )
    learner = ContinualLearner(model, cv.CrossEntropy(), cfg)
    snapshots = []
    for t, data in enumerate(tasks):
        learner.learn_task(data, previous=tasks[:t])
        snapshots.append(copy.deepcopy(model))
    names = [layer.name for layer in learner.layers]
    mats = [
        {k: w.detach() for k, w in ContinualLearner(s, cv.CrossEntropy(), cfg).weights().items()} for s in snapshots
    ]
    gen = torch.Generator().manual_seed(5)
    theta = {k: mats[-1][k] + 0.3 * torch.randn(mats[-1][k].shape, dtype=DTYPE, generator=gen) for k in names}
    latest = mats[-1]

    def prior(centre):
        return sum(0.5 * tau * ((theta[k] - (0 if centre is None else centre[k])) ** 2).sum() for k in names)

    if method == "online":
        expected = prior(latest) + lam * sum(
            dense_kron_penalty(s, d, lambda k: theta[k] - latest[k]) for s, d in zip(snapshots, tasks, strict=True)
        )
    elif method == "ewc":
        expected = prior(None) + lam * sum(
            dense_kron_penalty(s, d, lambda k, m=m: theta[k] - m[k])
            for s, d, m in zip(snapshots, tasks, mats, strict=True)
        )
    elif method == "nononline":
        expected = prior(latest) + lam * sum(
            dense_kron_penalty(snapshots[-1], d, lambda k: theta[k] - latest[k]) for d in tasks
        )
    else:  # online_sum: the data-weighted average factors times all the data
        fits = [cv.fit_kronecker(s, d, cv.CrossEntropy(), method="kflr") for s, d in zip(snapshots, tasks, strict=True)]
        n = sum(f.n_data for f in fits)
        expected = prior(latest)
        for k in names:
            G = sum(f.n_data * f[k].G for f in fits) / n
            A = sum(f.n_data * f[k].A for f in fits) / n
            expected = expected + lam * dense_quadratic(theta[k] - latest[k], n * G, A)

    theta_grad = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    value = learner.penalty(theta_grad)
    grads = torch.autograd.grad(value, [theta_grad[k] for k in names])
    assert_close_report(value.detach(), expected, rtol=1e-11, name=f"{method} penalty")
    # gradient against the dense form: autograd through the dense expression
    theta_dense = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    theta.update(theta_dense)
    if method == "online":
        dense = prior(latest) + lam * sum(
            dense_kron_penalty(s, d, lambda k: theta[k] - latest[k]) for s, d in zip(snapshots, tasks, strict=True)
        )
    elif method == "ewc":
        dense = prior(None) + lam * sum(
            dense_kron_penalty(s, d, lambda k, m=m: theta[k] - m[k])
            for s, d, m in zip(snapshots, tasks, mats, strict=True)
        )
    else:
        dense = None
    if dense is not None:
        expected_grads = torch.autograd.grad(dense, [theta_dense[k] for k in names])
        for k, g, e in zip(names, grads, expected_grads, strict=True):
            assert_close_report(g, e, rtol=1e-11, name=f"{method} gradient {k}")


def test_variants_differ():
    """The formulas differ on this toy, so the per-method test above would catch one variant standing in for another."""
    tasks = toy_tasks()
    values = {}
    for method in ("online", "online_sum", "ewc", "nononline"):
        cfg = ContinualConfig(
            method=method, curvature="kflr", strength=3.0, prior_precision=0.7, epochs=3, batch_size=16, lr=0.05
        )
        learner = ContinualLearner(tiny_mlp(), cv.CrossEntropy(), cfg)
        for t, data in enumerate(tasks):
            learner.learn_task(data, previous=tasks[:t])
        theta = {k: w.detach() + 0.3 for k, w in learner.weights().items()}
        values[method] = float(learner.penalty(theta))
    vals = sorted(values.values())
    assert min(b - a for a, b in zip(vals[:-1], vals[1:], strict=True)) > 1e-6 * vals[-1], values


# ------------------------------------------------------------------------------------------------ SI
def test_si_importance_is_the_path_integral_of_the_loss():
    gen = torch.Generator().manual_seed(6)
    tasks = []
    for _ in range(2):
        x = torch.randn(12, 2, dtype=DTYPE, generator=gen)
        tasks.append((x, x @ torch.randn(2, 1, dtype=DTYPE, generator=gen) + 0.5))
    torch.manual_seed(0)
    model = nn.Linear(2, 1).to(DTYPE)
    eta, c, xi, steps = 0.1, 0.4, 1e-3, 7
    cfg = ContinualConfig(
        method="si",
        strength=c,
        prior_precision=0.0,
        optimizer="sgd",
        momentum=0.0,
        lr=eta,
        epochs=steps,
        batch_size=100,
        si_damping=xi,
    )
    learner = ContinualLearner(model, cv.Gaussian(1.0), cfg)
    name = learner.layers[0].name
    w = learner.weights()[name].detach().clone()  # (1, 3) = [w1 w2 b]

    omega_total = torch.zeros_like(w)
    reference, big_omega = None, torch.zeros_like(w)
    for data in tasks:
        x, y = data
        xh = torch.cat([x, torch.ones(len(x), 1, dtype=DTYPE)], 1)
        start, omega = w.clone(), torch.zeros_like(w)
        for _ in range(steps):
            g = (w @ xh.T - y.T) @ xh / len(x)  # gradient of the mean ½(ŵ·x̂ − y)²
            step = -eta * (g + (0 if reference is None else 2 * c * big_omega * (w - reference)))
            omega -= g * step
            w = w + step
        big_omega = big_omega + omega / ((w - start) ** 2 + xi)
        reference = w.clone()
        omega_total += omega
        learner.learn_task(data)
        assert_close_report(learner.weights()[name].detach(), w, rtol=1e-12, name="weights")
        assert_close_report(learner.si_omega[name], big_omega, rtol=1e-12, name="Ω")
    assert float(omega_total.abs().sum()) > 0


def test_si_importance_closed_form_on_a_diagonal_quadratic():
    """Orthogonal inputs make the loss a diagonal quadratic: ``g_k = h (1 − ηh)^k e_0`` and ``ω = η Σ_k g_k²``."""
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-2.0, 0.0], [0.0, -1.0]], dtype=DTYPE)  # inputs centred, no bias
    y = torch.tensor([[1.0], [3.0], [-1.0], [-3.0]], dtype=DTYPE)
    model = nn.Linear(2, 1, bias=False).to(DTYPE)
    with torch.no_grad():
        model.weight.zero_()
    eta, steps, xi = 0.2, 9, 1e-3
    cfg = ContinualConfig(
        method="si",
        strength=1.0,
        prior_precision=0.0,
        optimizer="sgd",
        momentum=0.0,
        lr=eta,
        epochs=steps,
        batch_size=4,
        si_damping=xi,
    )
    learner = ContinualLearner(model, cv.Gaussian(1.0), cfg)
    learner.learn_task((x, y))
    h = (x**2).mean(0)  # diagonal Hessian of the mean loss: (2.0, 0.5)
    w_star = (x * y).mean(0) / h  # (0.5, 3.0)
    e0 = -w_star  # w_0 − w* with w_0 = 0
    r = 1 - eta * h
    omega = eta * h**2 * e0**2 * (1 - r ** (2 * steps)) / (1 - r**2)
    delta = -e0 * (1 - r**steps)
    omega_hat = learner.si_omega[learner.layers[0].name].reshape(-1)
    assert_close_report(omega_hat, omega / (delta**2 + xi), rtol=1e-12, name="Ω closed form")


# ---------------------------------------------------------------------------------- state round trip
@pytest.mark.parametrize(
    "method,curvature",
    [
        ("online", "kfac"),
        ("online_sum", "kflr"),
        ("ewc", "diag"),
        ("nononline", "kflr"),
        ("si", "diag"),
        ("joint", "diag"),
    ],
)
def test_resumed_learner_equals_uninterrupted(method, curvature):
    tasks = toy_tasks()
    pairs = [(d, d) for d in tasks]
    cfg = ContinualConfig(
        method=method, curvature=curvature, strength=2.0, prior_precision=0.5, epochs=2, batch_size=16, lr=0.05, seed=3
    )
    straight = ContinualLearner(tiny_mlp(), cv.CrossEntropy(), cfg)
    run_tasks(straight, pairs)

    first = ContinualLearner(tiny_mlp(), cv.CrossEntropy(), cfg)
    blobs = []
    run_tasks(first, pairs[:2], checkpoint=lambda lr: blobs.append(lr.to_bytes()))
    assert len(blobs) == 2
    resumed = ContinualLearner.from_bytes(blobs[-1], tiny_mlp(seed=9), cv.CrossEntropy())
    assert resumed.n_tasks == 2
    run_tasks(resumed, pairs)

    for k, w in straight.weights().items():
        assert torch.equal(w, resumed.weights()[k]), k
    theta = {k: w.detach() + 0.1 for k, w in straight.weights().items()}
    assert float(straight.penalty(theta)) == float(resumed.penalty(theta))
    assert straight.accuracy == resumed.accuracy
    assert [len(r) for r in straight.accuracy] == [1, 2, 3]
    tensors, meta = read_state(straight.to_bytes())
    assert set(tensors) == set(resumed.state_dict()[0]) and meta["task_sizes"] == [40, 40, 40]


def test_state_refuses_another_method_or_model():
    tasks = toy_tasks(1)
    learner = ContinualLearner(tiny_mlp(), cv.CrossEntropy(), method="online", curvature="kflr", epochs=1)
    learner.learn_task(tasks[0])
    tensors, meta = learner.state_dict()
    with pytest.raises(ValueError, match="method"):
        ContinualLearner(tiny_mlp(), cv.CrossEntropy(), method="ewc", curvature="kflr").load_state_dict(tensors, meta)
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    with pytest.raises(ValueError, match="layers"):
        ContinualLearner(other, cv.CrossEntropy(), method="online", curvature="kflr").load_state_dict(tensors, meta)
    with pytest.raises(ValueError, match="Not a kronlap"):
        read_state(b"not a state")


def test_config_validation_and_history_requirement():
    with pytest.raises(ValueError, match="method"):
        ContinualConfig(method="bayes")
    with pytest.raises(ValueError, match="strength"):
        ContinualConfig(strength=-1.0)
    with pytest.raises(ValueError, match="SI"):
        ContinualConfig(method="si", optimizer="lbfgs")
    tasks = toy_tasks(2)
    learner = ContinualLearner(tiny_mlp(), cv.CrossEntropy(), method="nononline", epochs=1)
    learner.learn_task(tasks[0])
    with pytest.raises(ValueError, match="earlier tasks"):
        learner.learn_task(tasks[1])


# --------------------------------------------------------------------------------------------- serving
@pytest.mark.parametrize("method,curvature", [("online", "kflr"), ("ewc", "kfac"), ("online", "diag"), ("si", "diag")])
def test_posterior_of_the_latest_model_predicts(method, curvature):
    tasks = toy_tasks()
    learner = ContinualLearner(
        tiny_mlp(),
        cv.CrossEntropy(),
        method=method,
        curvature=curvature,
        strength=2.0,
        epochs=2,
        batch_size=16,
        lr=0.05,
    )
    fractions = []
    run_tasks(learner, [(d, d) for d in tasks], progress=lambda f, m: fractions.append(f))
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0) and len(fractions) >= 3 * 3
    if method == "si":
        with pytest.raises(ValueError, match="pass data"):
            learner.posterior()
        post = learner.posterior(data=tasks[-1])
    else:
        post = learner.posterior()
        assert post.n_data == 120 and post.n_eff == pytest.approx(2.0 * 120)
    x = tasks[0][0][:10]
    out = post.predict(x, samples=50, seed=0)
    probs = out["probs"]
    assert probs.shape == (10, 3) and bool(torch.isfinite(probs).all())
    assert_close_report(probs.sum(-1), torch.ones(10, dtype=probs.dtype), rtol=1e-6)
    assert bool((out["mutual_information"] >= 0).all())
    map_probs = torch.softmax(learner.model(x.to(DTYPE)), -1).detach()
    # the predictive mean stays close to the MAP prediction and puts most mass on the same classes
    assert float((probs - map_probs).abs().max()) < 0.5
    assert float((probs.argmax(-1) == map_probs.argmax(-1)).double().mean()) >= 0.7
    assert math.isfinite(float(post.log_prob({k: b.mean for k, b in post.blocks.items()})))
