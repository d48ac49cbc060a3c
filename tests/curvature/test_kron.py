"""Kronecker linear algebra against dense ``torch.kron`` computations."""

from __future__ import annotations

import math

import pytest
import torch

import curvature as cv

from .cases import DTYPE, MLP_TANH, assert_close_report, make_problem

pytestmark = pytest.mark.usefixtures("single_torch_thread")

OUT, IN = 3, 4  # G is OUT × OUT, A is IN × IN (IN counts the bias column)
N_EFF, TAU = 37.0, 0.8


def _spd(d: int, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(d, rank or d, generator=gen, dtype=DTYPE)
    return b @ b.T / (rank or d)


def _factors(rank_g=None, rank_a=None):
    return _spd(OUT, rank_g, seed=1), _spd(IN, rank_a, seed=2)


def _dense_precision(G, A, n=N_EFF, tau=TAU):
    return n * torch.kron(G, A) + tau * torch.eye(G.shape[0] * A.shape[0], dtype=DTYPE)


def _vec(V):
    return V.reshape(*V.shape[:-2], -1)


FACTOR_RANKS = [(None, None), (2, None), (None, 2), (1, 3)]


def test_kron_matvec_is_row_major_kron():
    G, A = _factors()
    V = torch.randn(2, 5, OUT, IN, dtype=DTYPE)
    expected = torch.einsum("ij,bcj->bci", torch.kron(G, A), _vec(V))
    assert_close_report(_vec(cv.kron_matvec(G, A, V)), expected, rtol=1e-12, name="kron_matvec")
    # non-symmetric factors pin down the transposes
    Gn, An = torch.randn(OUT, OUT, dtype=DTYPE), torch.randn(IN, IN, dtype=DTYPE)
    assert_close_report(
        _vec(cv.kron_matvec(Gn, An, V[0, 0])), torch.kron(Gn, An) @ _vec(V[0, 0]), rtol=1e-12, name="non-symmetric"
    )


@pytest.mark.parametrize("ranks", FACTOR_RANKS)
def test_kron_eigen_damped_inverse_apply_and_logdet(ranks):
    G, A = _factors(*ranks)
    eig = cv.KronEigen.from_factors(G, A)
    assert_close_report(eig.U_G @ torch.diag(eig.s_G) @ eig.U_G.T, G, rtol=1e-12, name="G reconstruction")
    assert_close_report(eig.U_A @ torch.diag(eig.s_A) @ eig.U_A.T, A, rtol=1e-12, name="A reconstruction")
    P = _dense_precision(G, A)
    V = torch.randn(2, OUT, IN, dtype=DTYPE)
    got = eig.damped_inverse_apply(V, N_EFF, TAU)
    expected = torch.linalg.solve(P, _vec(V).T).T
    assert_close_report(_vec(got), expected, rtol=1e-10, name="damped inverse")
    assert_close_report(_vec(eig.damped_apply(V, N_EFF, TAU)), _vec(V) @ P, rtol=1e-12, name="damped apply")
    sign, logdet = torch.linalg.slogdet(P)
    assert sign.item() == 1.0
    assert_close_report(eig.logdet(N_EFF, TAU), logdet, rtol=1e-12, name="logdet")
    ev = eig.eigenvalues(N_EFF, TAU)
    assert ev.shape == (OUT, IN)
    assert_close_report(ev.reshape(-1).sort().values, torch.linalg.eigvalsh(P), rtol=1e-10, name="eigenvalues")


def test_kron_eigen_with_eigenbasis_prior_precision():
    """A per-eigendirection ``τ`` (an (out, in+1) tensor) is the precision ``U diag(n s + τ) Uᵀ``."""
    G, A = _factors()
    eig = cv.KronEigen.from_factors(G, A)
    tau = 0.1 + torch.rand(OUT, IN, dtype=DTYPE)
    U = torch.kron(eig.U_G, eig.U_A)
    P = U @ torch.diag(_vec(N_EFF * torch.outer(eig.s_G, eig.s_A) + tau)) @ U.T
    V = torch.randn(OUT, IN, dtype=DTYPE)
    assert_close_report(_vec(eig.damped_inverse_apply(V, N_EFF, tau)), torch.linalg.solve(P, _vec(V)), rtol=1e-10)
    assert_close_report(eig.logdet(N_EFF, tau), torch.linalg.slogdet(P)[1], rtol=1e-12, name="logdet")
    # a tensor τ equal everywhere is the scalar case
    const = torch.full((OUT, IN), TAU, dtype=DTYPE)
    assert_close_report(eig.damped_inverse_apply(V, N_EFF, const), eig.damped_inverse_apply(V, N_EFF, TAU), rtol=0)


def _covariance_of_linear_sampler(sample, shape) -> torch.Tensor:
    """``L Lᵀ`` for the linear map ``z ↦ sample(z)``, obtained by applying it to the identity."""
    d = shape[0] * shape[1]
    basis = torch.eye(d, dtype=DTYPE).reshape(d, *shape)
    cols = _vec(sample(basis))  # (d, d): row i is L e_i
    return cols.T @ cols


@pytest.mark.parametrize("ranks", FACTOR_RANKS)
def test_kron_eigen_sampling_covariance_is_exact_inverse(ranks):
    G, A = _factors(*ranks)
    eig = cv.KronEigen.from_factors(G, A)
    cov = _covariance_of_linear_sampler(lambda z: eig.sample(z, N_EFF, TAU), (OUT, IN))
    assert_close_report(cov, torch.linalg.inv(_dense_precision(G, A)), rtol=1e-10, name="sample covariance")
    z = torch.randn(OUT, IN, dtype=DTYPE)
    assert_close_report(eig.sample(2.5 * z, N_EFF, TAU), 2.5 * eig.sample(z, N_EFF, TAU), rtol=1e-14)


@pytest.mark.montecarlo
def test_kron_eigen_sampling_empirical_covariance():
    """Empirical covariance of ``m`` draws within 5 standard errors, ``Var Ŝ_ij = (Σ_ij² + Σ_ii Σ_jj)/m``."""
    G, A = _factors(rank_g=2)
    eig = cv.KronEigen.from_factors(G, A)
    m = 50_000
    z = torch.randn(m, OUT, IN, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    draws = _vec(eig.sample(z, N_EFF, TAU))
    sigma = torch.linalg.inv(_dense_precision(G, A))
    emp = draws.T @ draws / m
    d = torch.diagonal(sigma)
    se = ((sigma**2 + d[:, None] * d[None, :]) / m).sqrt()
    zscore = ((emp - sigma).abs() / se).max()
    assert zscore < 5, f"empirical covariance off by {zscore:.2f} standard errors"
    mean_z = (draws.mean(0).abs() / (d / m).sqrt()).max()
    assert mean_z < 5, f"sample mean off by {mean_z:.2f} standard errors"


# ---------------------------------------------------------------------------- factored damping


def test_factored_damping_formula():
    G, A = _factors()
    eye_g, eye_a = torch.eye(OUT, dtype=DTYPE), torch.eye(IN, dtype=DTYPE)
    pg, pa = cv.factored_damping(G, A, N_EFF, TAU)
    assert_close_report(pg, math.sqrt(N_EFF) * G + math.sqrt(TAU) * eye_g, rtol=1e-14, name="omega=1 G")
    assert_close_report(pa, math.sqrt(N_EFF) * A + math.sqrt(TAU) * eye_a, rtol=1e-14, name="omega=1 A")
    pg, pa = cv.factored_damping(G, A, N_EFF, TAU, omega=2.0)
    assert_close_report(pg, math.sqrt(N_EFF) * G + 2.0 * math.sqrt(TAU) * eye_g, rtol=1e-14, name="omega=2 G")
    assert_close_report(pa, math.sqrt(N_EFF) * A + 0.5 * math.sqrt(TAU) * eye_a, rtol=1e-14, name="omega=2 A")
    pg, pa = cv.factored_damping(G, A, N_EFF, 0.0, omega=3.0)
    assert_close_report(torch.kron(pg, pa), N_EFF * torch.kron(G, A), rtol=1e-12, name="tau=0 is exact")
    for kwargs in (dict(n_eff=-1.0, prior_precision=1.0), dict(n_eff=1.0, prior_precision=-1.0)):
        with pytest.raises(ValueError, match="non-negative"):
            cv.factored_damping(G, A, **kwargs)
    with pytest.raises(ValueError, match="omega"):
        cv.factored_damping(G, A, 1.0, 1.0, omega=0.0)


def test_trace_norm_omega_minimises_the_damping_residual():
    """``ω* = √(‖G ⊗ I‖_* / ‖I ⊗ A‖_*)`` (thesis eq. 4.27) minimises ``‖(P_G ⊗ P_A) − (n G ⊗ A + τ I)‖_*``."""
    G, A = _factors()
    A = 5.0 * A  # unequal traces so that ω* ≠ 1
    eye_g, eye_a = torch.eye(OUT, dtype=DTYPE), torch.eye(IN, dtype=DTYPE)
    nuc = torch.linalg.matrix_norm
    expected = math.sqrt(nuc(torch.kron(G, eye_a), ord="nuc") / nuc(torch.kron(eye_g, A), ord="nuc"))
    omega = cv.trace_norm_omega(G, A)
    assert omega == pytest.approx(expected, rel=1e-12)
    assert omega == pytest.approx(math.sqrt(float(G.trace() / OUT) / float(A.trace() / IN)), rel=1e-12)

    def residual(w):
        pg, pa = cv.factored_damping(G, A, N_EFF, TAU, omega=w)
        return nuc(torch.kron(pg, pa) - _dense_precision(G, A), ord="nuc").item()

    best = residual(omega)
    for w in torch.linspace(0.2 * omega, 3 * omega, 41).tolist():
        assert best <= residual(w) * (1 + 1e-12), f"ω={w:.4f} beats ω*={omega:.4f}"
    assert residual(1.0) > best * (1 + 1e-6)
    assert cv.trace_norm_omega(torch.zeros(OUT, OUT, dtype=DTYPE), A) == 1.0


@pytest.mark.parametrize("omega", [1.0, 0.3])
def test_factored_precision_against_dense(omega):
    G, A = _factors(rank_g=1)
    fp = cv.FactoredPrecision.from_factors(G, A, N_EFF, TAU, omega=omega)
    pg, pa = cv.factored_damping(G, A, N_EFF, TAU, omega=omega)
    P = torch.kron(pg, pa)
    assert_close_report(fp.U_G @ torch.diag(fp.s_G) @ fp.U_G.T, pg, rtol=1e-12, name="P_G")
    assert_close_report(fp.U_A @ torch.diag(fp.s_A) @ fp.U_A.T, pa, rtol=1e-12, name="P_A")
    V = torch.randn(3, OUT, IN, dtype=DTYPE)
    assert_close_report(_vec(fp.inverse_apply(V)), torch.linalg.solve(P, _vec(V).T).T, rtol=1e-10, name="inverse")
    assert_close_report(fp.logdet(), torch.linalg.slogdet(P)[1], rtol=1e-12, name="logdet")
    assert_close_report(fp.eigenvalues().reshape(-1).sort().values, torch.linalg.eigvalsh(P), rtol=1e-10)
    cov = _covariance_of_linear_sampler(fp.sample, (OUT, IN))
    assert_close_report(cov, torch.linalg.inv(P), rtol=1e-10, name="sample covariance")
    assert_close_report(cov, torch.kron(torch.linalg.inv(pg), torch.linalg.inv(pa)), rtol=1e-10, name="MN covariance")


def test_factored_precision_differs_from_exact_damping_but_agrees_without_prior():
    G, A = _factors()
    exact = torch.linalg.inv(_dense_precision(G, A))
    fp = cv.FactoredPrecision.from_factors(G, A, N_EFF, TAU)
    cov = _covariance_of_linear_sampler(fp.sample, (OUT, IN))
    assert ((cov - exact).norm() / exact.norm()).item() > 1e-3
    fp0 = cv.FactoredPrecision.from_factors(G, A, N_EFF, 0.0)
    eig = cv.KronEigen.from_factors(G, A)
    V = torch.randn(OUT, IN, dtype=DTYPE)
    assert_close_report(fp0.inverse_apply(V), eig.damped_inverse_apply(V, N_EFF, 0.0), rtol=1e-9, name="tau=0")


# ---------------------------------------------------------------------------- sym_eigh


def test_sym_eigh():
    M = torch.randn(4, 4, dtype=DTYPE)
    s, u = cv.sym_eigh(M)
    sym = 0.5 * (M + M.T)
    expected = torch.linalg.eigvalsh(sym).clamp_min(0.0)
    assert_close_report(s, expected, rtol=1e-12, name="clamped eigenvalues of the symmetric part")
    pos = s > 0
    assert_close_report(sym @ u[:, pos], u[:, pos] * s[pos], rtol=1e-10, name="eigenvectors")
    s_min, _ = cv.sym_eigh(M, min_eig=0.5)
    assert bool((s_min >= 0.5).all())
    s32, u32 = cv.sym_eigh(_spd(4).float())
    assert s32.dtype == u32.dtype == torch.float32
    assert_close_report(s32.double(), torch.linalg.eigvalsh(_spd(4).float().double()), rtol=1e-6)
    with pytest.raises(ValueError, match="square"):
        cv.sym_eigh(torch.zeros(2, 3, dtype=DTYPE))


# ---------------------------------------------------------------------------- with fitted factors


def test_damped_inverse_on_fitted_factors_matches_dense_block():
    model, x, y, lik = make_problem(MLP_TANH, "ce", n=1, seed=2)
    layers = cv.find_layers(model)
    factors = cv.fit_kronecker(model, (x, y), lik, method="kflr")
    dense = cv.exact_ggn(model, x, y, lik)
    start = 0
    for layer in layers:
        size = layer.shape[0] * layer.shape[1]
        block = dense[start : start + size, start : start + size]
        start += size
        eig = cv.KronEigen.from_factors(factors[layer.name].G, factors[layer.name].A)
        V = torch.randn(layer.shape, dtype=DTYPE)
        P = block + TAU * torch.eye(size, dtype=DTYPE)
        got = eig.damped_inverse_apply(V, factors.n_data, TAU)
        assert_close_report(_vec(got), torch.linalg.solve(P, _vec(V)), rtol=1e-9, name=layer.name)
        assert_close_report(eig.logdet(factors.n_data, TAU), torch.linalg.slogdet(P)[1], rtol=1e-10)


def test_sym_eigh_in_single_precision_survives_a_factor_lapack_cannot_diagonalise() -> None:
    """The input factor of a 784-64-10 MLP on 600 MNIST digits (hundreds of never-lit pixels: many zero
    eigenvalues) makes single-threaded float32 ``eigh`` fail to converge here; ``sym_eigh`` must still answer."""
    from torch import nn

    from curvature.data import mnist5k

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        splits = mnist5k(seed=0, flat=True)
        x, y = splits.train.x[:600], splits.train.y[:600]
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
        A = cv.fit_kronecker(net, (x, y), cv.CrossEntropy(), method="kfac", batch_size=512)["0"].A
        s, u = cv.sym_eigh(A, compute_dtype=None)
    finally:
        torch.set_num_threads(threads)
    assert s.dtype == torch.float32 and bool(torch.isfinite(u).all())
    torch.testing.assert_close(u @ torch.diag(s) @ u.T, A, atol=2e-5, rtol=0)
