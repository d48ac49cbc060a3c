"""Kronecker factors, diagonals and GGN-vector products against dense ``torch.func`` references.

The ladder: the dense references themselves are checked against an independently assembled ``Σ_n J_nᵀ Λ_n J_n``;
Kronecker blocks are then compared where theory says they are exact (one data point, bias blocks, deep linear
networks), loop-built factors are compared everywhere, and Monte-Carlo estimators are compared with bounds
derived from their exact variance.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvature as cv
from curvature.estimators import block_slices

from .cases import (
    ALL_MODELS,
    BRANCHY,
    BRANCHY_WIDE,
    CNN,
    CNN_T1,
    DTYPE,
    LIKELIHOODS,
    MLP_INPLACE,
    MLP_RELU,
    MLP_SIGMOID,
    MLP_TANH,
    MLPS,
    SEQ_POOL,
    ChainModule,
    assert_close_report,
    bias_indices,
    deep_linear_lemma_model,
    gradient_support,
    make_data,
    make_problem,
    output_curvatures,
    output_jacobians,
    parameter_jacobian,
    projected_factor_moments,
    record,
    reference_factors,
    rel_error,
    sampled_factor_moments,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")

EXACT = 1e-10
ALL_LIKELIHOODS = list(LIKELIHOODS)
# Chebyshev: P(‖Ĝ − G‖_F ≥ k·√E‖Ĝ − G‖²_F) ≤ 1/k²; seeded, so each check is deterministic.
CHEBYSHEV_K = 6.0


def _ids(cases):
    return [c.name for c in cases]


def _block(dense: torch.Tensor, sl: slice) -> torch.Tensor:
    return dense[sl, sl]


# ---------------------------------------------------------------------------- the references themselves


ROTATED = [(case, ALL_LIKELIHOODS[i % 4]) for i, case in enumerate(ALL_MODELS)]
ROTATED_IDS = [f"{c.name}-{k}" for c, k in ROTATED]


@pytest.mark.parametrize("case, lik_name", ROTATED, ids=ROTATED_IDS)
def test_exact_ggn_equals_independent_jacobian_sum(case, lik_name):
    model, x, y, lik = make_problem(case, lik_name, n=2)
    jac = parameter_jacobian(model, x)  # (n, C, P)
    lam = output_curvatures(lik, model(x), y, "ggn")
    expected = torch.einsum("ncp,ncd,ndq->pq", jac, lam, jac)
    assert_close_report(cv.exact_ggn(model, x, y, lik), expected, rtol=EXACT, name="exact_ggn")
    lam_f = output_curvatures(lik, model(x), y, "fisher")
    expected_f = torch.einsum("ncp,ncd,ndq->pq", jac, lam_f, jac)
    assert_close_report(cv.exact_fisher(model, x, y, lik), expected_f, rtol=EXACT, name="exact_fisher")


@pytest.mark.parametrize("lik_name", ["ce", "gaussian", "bernoulli"])
def test_exact_ggn_last_layer_block_equals_hessian_block(lik_name):
    """The network is linear in its last layer, so the GGN and the Hessian agree on that block."""
    model, x, y, lik = make_problem(MLP_TANH, lik_name, n=4)
    layers = cv.find_layers(model)
    sl = block_slices(layers)["4"]
    hess = cv.exact_curvature(model, x, y, lik, "hessian")
    ggn = cv.exact_ggn(model, x, y, lik)
    assert_close_report(_block(ggn, sl), _block(hess, sl), rtol=EXACT, name="last block")
    first = block_slices(layers)["0"]
    assert rel_error(_block(ggn, first), _block(hess, first)) > 1e-3, "first blocks should differ (tanh)"


def test_block_slices_tile_the_parameter_vector():
    layers = cv.find_layers(BRANCHY_WIDE.build())
    slices = block_slices(layers)
    start = 0
    for layer in layers:
        sl = slices[layer.name]
        assert sl.start == start and sl.stop - sl.start == layer.shape[0] * layer.shape[1]
        start = sl.stop
    assert start == sum(p.numel() for p in BRANCHY_WIDE.build().parameters())


# ---------------------------------------------------------------------------- exactness for one data point

ONE_POINT = [(case, lik) for case in ALL_MODELS for lik in ALL_LIKELIHOODS]


@pytest.mark.parametrize("case, lik_name", ONE_POINT, ids=[f"{c.name}-{k}" for c, k in ONE_POINT])
def test_one_data_point_blocks_are_exact(case, lik_name):
    """``N·(G ⊗ A)`` equals the exact GGN block for every layer applied at a single location (KFLR, KFRA)."""
    model, x, y, lik = make_problem(case, lik_name, n=1, seed=3)
    layers = cv.find_layers(model)
    dense = cv.exact_ggn(model, x, y, lik)
    slices = block_slices(layers)
    methods = ["kflr", "kfra"] if case.kfra else ["kflr"]
    for method in methods:
        factors = cv.fit_kronecker(model, (x, y), lik, method=method)
        assert factors.n_data == 1 and list(factors) == [layer.name for layer in layers]
        for layer in layers:
            approx = factors.n_data * torch.kron(factors[layer.name].G, factors[layer.name].A)
            exact = _block(dense, slices[layer.name])
            if layer.name in case.single_location:
                assert_close_report(approx, exact, rtol=EXACT, name=f"{method} block {layer.name}")
            else:  # a convolution at T > 1 locations: KFC is an approximation even for one point
                assert rel_error(approx, exact) > 1e-3, f"{method} block {layer.name} unexpectedly exact"


# ---------------------------------------------------------------------------- bias blocks

BIAS_CASES = [(MLP_TANH, lik) for lik in ALL_LIKELIHOODS] + [
    (MLP_RELU, "ce"),
    (MLP_SIGMOID, "mixture"),
    (CNN, "gaussian"),
    (BRANCHY, "bernoulli"),
    (BRANCHY_WIDE, "ce"),
]


@pytest.mark.parametrize("case, lik_name", BIAS_CASES, ids=[f"{c.name}-{k}" for c, k in BIAS_CASES])
def test_kflr_bias_block_is_exact_for_many_points(case, lik_name):
    """For a layer at one location ``â[-1] = 1``, so the bias block of ``N·(G ⊗ A)`` is ``N·G = Σ_n G_n``."""
    n = 7
    model, x, y, lik = make_problem(case, lik_name, n=n, seed=4)
    layers = cv.find_layers(model)
    dense = cv.exact_ggn(model, x, y, lik)
    slices = block_slices(layers)
    factors = cv.fit_kronecker(model, (x, y), lik, method="kflr")
    checked, weight_errors = 0, []
    for layer in layers:
        if layer.name not in case.single_location or layer.module.bias is None:
            continue
        A, G = factors[layer.name].A, factors[layer.name].G
        assert A[-1, -1].item() == 1.0
        idx = bias_indices(layer) + slices[layer.name].start
        approx = n * torch.kron(G, A)
        local = bias_indices(layer)
        assert_close_report(approx[local][:, local], dense[idx][:, idx], rtol=EXACT, name=f"bias block {layer.name}")
        assert_close_report(n * G, dense[idx][:, idx], rtol=EXACT, name=f"N·G {layer.name}")
        full_error = rel_error(approx, _block(dense, slices[layer.name]))
        if lik_name == "gaussian" and layer is layers[-1]:
            # Λ = I/σ² and the output layer's J = I: G is constant, so this whole block is exact
            assert full_error < EXACT, f"Gaussian output layer block error {full_error:.2e}"
        else:
            weight_errors.append(full_error)
        checked += 1
    assert checked >= 1
    if weight_errors:
        assert max(weight_errors) > 1e-3, "with many points the full blocks should not be exact"


# ---------------------------------------------------------------------------- deep linear networks (Lemma 4.1)


def _lemma_problem(n: int = 12, seed: int = 0):
    model = deep_linear_lemma_model(width=3, depth=3, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 3, generator=gen, dtype=DTYPE)
    y = torch.randn(n, 3, generator=gen, dtype=DTYPE)
    return model, x, y, cv.Gaussian(sigma=0.7)


def test_kfra_equals_kflr_and_exact_blocks_for_deep_linear_networks():
    model, x, y, lik = _lemma_problem()
    layers = cv.find_layers(model)
    dense = cv.exact_ggn(model, x, y, lik)
    slices = block_slices(layers)
    kfra = cv.fit_kronecker(model, (x, y), lik, method="kfra")
    kflr = cv.fit_kronecker(model, (x, y), lik, method="kflr")
    ws = [layer.module.weight.detach() for layer in layers]
    for i, layer in enumerate(layers):
        name = layer.name
        assert_close_report(kfra[name].A, kflr[name].A, rtol=EXACT, name=f"A {name}")
        assert_close_report(kfra[name].G, kflr[name].G, rtol=EXACT, name=f"G {name}")
        approx = len(x) * torch.kron(kfra[name].G, kfra[name].A)
        assert_close_report(approx, _block(dense, slices[name]), rtol=EXACT, name=f"block {name}")
        # G_l = N_lᵀ Λ N_l with N_l = W_L ⋯ W_{l+1}, independent of the data
        n_l = torch.eye(3, dtype=DTYPE)
        for w in ws[i + 1 :]:
            n_l = w @ n_l
        assert_close_report(kfra[name].G, n_l.T @ n_l / lik.sigma**2, rtol=EXACT, name=f"G {name} closed form")


def test_lemma_4_1_block_diagonal_preconditioning():
    """``Ḡ U = L V`` for ``U = Ḡ_diag⁻¹ V`` and a gradient-like ``V = Σ_n J_nᵀ v_n`` (thesis Lemma 4.1).

    ``Ḡ`` itself is singular for ``L ≥ 2`` (``W_l → W_l S``, ``W_{l−1} → S⁻¹ W_{l−1}`` leaves the function
    unchanged), so the lemma's ``Ḡ⁻¹ V = (1/L) Ḡ_diag⁻¹ V`` is checked in the form proved in the thesis.
    ``Ḡ_diag⁻¹`` is applied through the exact Kronecker-factored KFRA blocks.
    """
    model, x, y, lik = _lemma_problem()
    layers = cv.find_layers(model)
    depth = len(layers)
    dense = cv.exact_ggn(model, x, y, lik)
    assert torch.linalg.matrix_rank(dense) < dense.shape[0]
    slices = block_slices(layers)
    factors = cv.fit_kronecker(model, (x, y), lik, method="kfra")
    jac = parameter_jacobian(model, x)  # (n, C, P)
    gen = torch.Generator().manual_seed(9)
    v_out = torch.randn(len(x), 3, generator=gen, dtype=DTYPE)
    v = torch.einsum("ncp,nc->p", jac, v_out)
    u_parts, u_dense_parts = [], []
    for layer in layers:
        sl = slices[layer.name]
        eig = cv.KronEigen.from_factors(factors[layer.name].G, factors[layer.name].A)
        u_parts.append(eig.damped_inverse_apply(v[sl].reshape(layer.shape), len(x), 0.0).reshape(-1))
        u_dense_parts.append(torch.linalg.solve(_block(dense, sl), v[sl]))
    u = torch.cat(u_parts)
    assert_close_report(u, torch.cat(u_dense_parts), rtol=1e-8, name="Ḡ_diag⁻¹ V")
    assert_close_report(dense @ u, depth * v, rtol=1e-8, name="Ḡ Ḡ_diag⁻¹ V vs L·V")
    # the identity needs V in the range of the Jacobians: a generic vector does not satisfy it
    w = torch.randn(v.shape, generator=gen, dtype=DTYPE)
    uw = torch.cat([torch.linalg.solve(_block(dense, slices[layer.name]), w[slices[layer.name]]) for layer in layers])
    assert rel_error(dense @ uw, depth * w) > 1e-2


# ---------------------------------------------------------------------------- KFRA recursion


def _kfra_reference(model: nn.Sequential, x, y, lik):
    """``Ḡ_L = E[Λ]``, ``Ḡ_l = (W_{l+1}ᵀ Ḡ_{l+1} W_{l+1}) ⊙ E[φ'(h_l) φ'(h_l)ᵀ]`` by explicit computation."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    acts = [m for m in model if not isinstance(m, nn.Linear)]
    hs, h = [], x
    for i, lin in enumerate(linears):
        h = lin(h)
        hs.append(h)
        if i < len(acts):
            h = acts[i](h)
    g = output_curvatures(lik, h, y, "ggn").mean(0)
    gs = [g]
    for i in range(len(linears) - 2, -1, -1):
        pre = hs[i].detach().requires_grad_(True)
        (deriv,) = torch.autograd.grad(acts[i](pre).sum(), pre)
        d = torch.einsum("ni,nj->ij", deriv, deriv) / len(x)
        w = linears[i + 1].weight.detach()
        g = (w.T @ g @ w) * d
        gs.append(g)
    return gs[::-1]


@pytest.mark.parametrize("case", MLPS, ids=_ids(MLPS))
@pytest.mark.parametrize("lik_name", ["ce", "bernoulli", "mixture"])
def test_kfra_matches_explicit_recursion(case, lik_name):
    model, x, y, lik = make_problem(case, lik_name, n=7, seed=5)
    factors = cv.fit_kronecker(model, (x, y), lik, method="kfra")
    ref = reference_factors(model, x, y, lik)
    gs = _kfra_reference(model, x, y, lik)
    for name, g in zip(factors, gs, strict=True):
        assert_close_report(factors[name].A, ref[name][0], rtol=EXACT, name=f"A {name}")
        assert_close_report(factors[name].G, g, rtol=EXACT, name=f"G {name}")
    last = list(factors)[-1]
    assert_close_report(factors[last].G, ref[last][1], rtol=EXACT, name="last G equals KFLR")
    first = list(factors)[0]
    assert rel_error(factors[first].G, ref[first][1]) > 1e-3, "KFRA should differ from KFLR below the top"


def _plain_layer_norm(features: int) -> nn.Module:
    return nn.LayerNorm(features, elementwise_affine=False)


@pytest.mark.parametrize(
    "factory, input_shape, match",
    [
        (CNN.build, (2, 4, 4), "Conv2d"),
        (BRANCHY.build, (1, 3, 3), "nn.Sequential"),
        (lambda: nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1), nn.Linear(3, 3)).to(DTYPE), (4,), "Softmax"),
        (lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh()).to(DTYPE), (4,), "end with a Linear"),
        (lambda: nn.Sequential(nn.Linear(4, 3), _plain_layer_norm(3), nn.Linear(3, 3)).to(DTYPE), (4,), "LayerNorm"),
    ],
    ids=["cnn", "non-sequential", "softmax", "trailing-activation", "layer-norm"],
)
def test_kfra_refuses_unsupported_architectures(factory, input_shape, match):
    x, y = torch.randn(3, *input_shape, dtype=DTYPE), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=match) as info:
        cv.fit_kronecker(factory(), (x, y), cv.CrossEntropy(), method="kfra")
    assert "KFRA" in str(info.value)


# ---------------------------------------------------------------------------- loop references, any architecture


LOOP_CASES = ROTATED + [(CNN, "mixture"), (BRANCHY_WIDE, "mixture"), (SEQ_POOL, "ce")]


@pytest.mark.parametrize("case, lik_name", LOOP_CASES, ids=[f"{c.name}-{k}" for c, k in LOOP_CASES])
def test_kflr_factors_equal_loop_reference(case, lik_name):
    """KFC for convolutions: ``A = mean_n (1/T) Σ_t â_t â_tᵀ``, ``G = mean_n Σ_t J_tᵀ Λ_n J_t`` by loops."""
    model, x, y, lik = make_problem(case, lik_name, n=5, seed=6)
    factors = cv.fit_kronecker(model, (x, y), lik, method="kflr", batch_size=2)
    ref = reference_factors(model, x, y, lik)
    assert list(factors) == list(ref)
    for name, (A, G) in ref.items():
        assert_close_report(factors[name].A, A, rtol=EXACT, name=f"A {name}")
        assert_close_report(factors[name].G, G, rtol=EXACT, name=f"G {name}")


CHAIN_CASES = [(case, lik) for case in ALL_MODELS if case.kfra for lik in ALL_LIKELIHOODS]


def _wide_output_chain() -> nn.Sequential:
    """Outputs wider than the layers below (each example's square root becomes a matrix on the way down), a
    Linear-Linear boundary with no activation, and a bias-free layer."""
    torch.manual_seed(11)
    return nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2, bias=False), nn.Linear(2, 4), nn.Sigmoid(), nn.Linear(4, 7)
    ).to(DTYPE)


@pytest.mark.parametrize("case, lik_name", CHAIN_CASES, ids=[f"{c.name}-{k}" for c, k in CHAIN_CASES])
def test_kflr_chain_recursion_equals_backward_engine_and_loops(case, lik_name, monkeypatch):
    """The backward-free KFLR of Linear chains equals the backward engine and the loop reference, also when the
    examples are processed a few at a time."""
    import curvature.estimators.kfra as kfra_module

    model, x, y, lik = make_problem(case, lik_name, n=7, seed=3)
    backward = cv.estimators.fit_kronecker_backward(model, (x, y), lik, method="kflr", batch_size=4)
    monkeypatch.setattr(kfra_module, "_CHAIN_ELEMENTS", 1)
    chain = cv.estimators.fit_kflr_chain(model, (x, y), lik, batch_size=4)
    ref = reference_factors(model, x, y, lik)
    assert list(chain) == list(backward) == list(ref)
    for name, (A, G) in ref.items():
        assert_close_report(chain[name].A, backward[name].A, rtol=EXACT, name=f"A {name}")
        assert_close_report(chain[name].G, backward[name].G, rtol=EXACT, name=f"G {name}")
        assert_close_report(chain[name].A, A, rtol=EXACT, name=f"A {name} vs loops")
        assert_close_report(chain[name].G, G, rtol=EXACT, name=f"G {name} vs loops")


@pytest.mark.parametrize("lik_name", ["ce", "gaussian", "bernoulli"])
def test_kflr_chain_recursion_with_outputs_wider_than_the_layers(lik_name):
    model = _wide_output_chain()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 3, dtype=DTYPE, generator=g)
    lik = {"ce": cv.CrossEntropy(), "gaussian": cv.Gaussian(sigma=0.7), "bernoulli": cv.Bernoulli()}[lik_name]
    y = {
        "ce": torch.randint(0, 7, (9,), generator=g),
        "gaussian": torch.randn(9, 7, dtype=DTYPE, generator=g),
        "bernoulli": torch.randint(0, 2, (9, 7), generator=g).to(DTYPE),
    }[lik_name]
    chain = cv.fit_kronecker(model, (x, y), lik, method="kflr", batch_size=4)  # dispatches to the recursion
    assert chain.method == "kflr"
    ref = reference_factors(model, x, y, lik)
    for name, (A, G) in ref.items():
        assert_close_report(chain[name].A, A, rtol=EXACT, name=f"A {name}")
        assert_close_report(chain[name].G, G, rtol=EXACT, name=f"G {name}")


def test_non_sequential_module_equals_sequential():
    seq = MLP_TANH.build()
    chain = ChainModule(seq)
    x, y = make_data(MLP_TANH, "ce", n=6)
    lik = cv.CrossEntropy()
    names = {"0": "inp", "2": "mid", "4": "out"}
    for method, kwargs in [("kflr", {}), ("kfac", {"mc_samples": 3}), ("rp", {"mc_samples": 2})]:
        a = cv.fit_kronecker(seq, (x, y), lik, method=method, generator=torch.Generator().manual_seed(1), **kwargs)
        b = cv.fit_kronecker(chain, (x, y), lik, method=method, generator=torch.Generator().manual_seed(1), **kwargs)
        assert list(b) == list(names.values())
        for s_name, c_name in names.items():
            assert_close_report(b[c_name].A, a[s_name].A, rtol=1e-14, name=f"{method} A {c_name}")
            assert_close_report(b[c_name].G, a[s_name].G, rtol=1e-14, name=f"{method} G {c_name}")
    da, db = cv.fit_diagonal(seq, (x, y), lik), cv.fit_diagonal(chain, (x, y), lik)
    for s_name, c_name in names.items():
        assert_close_report(db[c_name], da[s_name], rtol=1e-14, name=f"diag {c_name}")


# ---------------------------------------------------------------------------- Monte-Carlo estimators


def _layer_jacobians(model, x):
    """``(f, {layer: (n, T, C, out) ∂f/∂h_t}, layers)`` by autograd loops."""
    layers = cv.find_layers(model)
    f, _, outs = record(model, layers, x)
    return f.detach(), output_jacobians(f, outs, layers), layers


def _kfac_moments(model, x, lik):
    """Per layer the expected KFAC ``G`` and the constant ``v`` with ``E‖Ĝ_M − G‖²_F = v/M``."""
    f, jac, layers = _layer_jacobians(model, x)
    supports = [gradient_support(lik, f[i]) for i in range(len(x))]
    grads, probs = [s[0] for s in supports], [s[1] for s in supports]
    return {layer.name: sampled_factor_moments(jac[layer.name], grads, probs) for layer in layers}


def _rp_moments(model, x, y, lik):
    """As :func:`_kfac_moments` for random projections of the output-Hessian square root."""
    f, jac, layers = _layer_jacobians(model, x)
    sqrt = lik.hessian_sqrt(f, y)
    return {layer.name: projected_factor_moments(jac[layer.name], sqrt) for layer in layers}


def _check_convergence(fit, reference: dict, small: int = 16, large: int = 4096):
    """Per layer and summed over layers: ``‖Ĝ_M − G‖ ≤ k·√(v/M)``; the summed error falls with ``M``."""
    totals = {}
    for m in (small, large):
        factors = fit(m)
        total_sq, total_var = 0.0, 0.0
        for name, (g_ref, v) in reference.items():
            err = float((factors[name].G - g_ref).norm())
            sd = math.sqrt(v / m)
            assert err <= CHEBYSHEV_K * sd, f"{name}: M={m} error {err:.3e} > {CHEBYSHEV_K}·{sd:.3e}"
            total_sq += err**2
            total_var += v / m
        assert math.sqrt(total_sq) <= CHEBYSHEV_K * math.sqrt(total_var)
        totals[m] = math.sqrt(total_sq)
    # expected ratio √(large/small) = 16
    assert totals[large] < totals[small] / 4, f"no 1/√M decrease of the error: {totals}"


@pytest.mark.montecarlo
@pytest.mark.parametrize(
    "case, lik_name", [(MLP_TANH, "ce"), (MLP_SIGMOID, "bernoulli"), (CNN, "ce")], ids=lambda v: getattr(v, "name", v)
)
def test_kfac_converges_to_kflr(case, lik_name):
    model, x, y, lik = make_problem(case, lik_name, n=5, seed=7)
    reference = _kfac_moments(model, x, lik)
    kflr = cv.fit_kronecker(model, (x, y), lik, method="kflr")
    for name, (g_ref, _) in reference.items():
        assert_close_report(kflr[name].G, g_ref, rtol=EXACT, name=f"E[Ĝ] vs KFLR {name}")

    def fit(m):
        gen = torch.Generator().manual_seed(100 + m)
        return cv.fit_kronecker(model, (x, y), lik, method="kfac", mc_samples=m, generator=gen)

    _check_convergence(fit, reference)
    sampled = fit(16)
    for name in reference:  # the input factor does not depend on the samples
        assert_close_report(sampled[name].A, kflr[name].A, rtol=1e-14, name=f"A {name}")


@pytest.mark.montecarlo
@pytest.mark.parametrize(
    "case, lik_name",
    [(MLP_TANH, "ce"), (MLP_SIGMOID, "gaussian"), (CNN_T1, "bernoulli")],
    ids=lambda v: getattr(v, "name", v),
)
def test_random_projections_converge_to_kflr(case, lik_name):
    model, x, y, lik = make_problem(case, lik_name, n=5, seed=8)
    reference = _rp_moments(model, x, y, lik)
    kflr = cv.fit_kronecker(model, (x, y), lik, method="kflr")
    for name, (g_ref, _) in reference.items():
        assert_close_report(kflr[name].G, g_ref, rtol=EXACT, name=f"E[Ĝ] vs KFLR {name}")

    def fit(m):
        gen = torch.Generator().manual_seed(200 + m)
        return cv.fit_kronecker(model, (x, y), lik, method="rp", mc_samples=m, generator=gen)

    _check_convergence(fit, reference)


# ---------------------------------------------------------------------------- the mixture: Fisher ≠ GGN


def test_mixture_fisher_and_ggn_differ():
    model, x, y, lik = make_problem(MLP_TANH, "mixture", n=6, seed=10)
    ggn, fisher = cv.exact_ggn(model, x, y, lik), cv.exact_fisher(model, x, y, lik)
    assert rel_error(ggn, fisher) > 0.2
    for name in ("ce", "gaussian", "bernoulli"):
        m, xx, yy, lk = make_problem(MLP_TANH, name, n=4, seed=10)
        assert_close_report(cv.exact_fisher(m, xx, yy, lk), cv.exact_ggn(m, xx, yy, lk), rtol=EXACT, name=name)


@pytest.mark.montecarlo
def test_mixture_kfac_estimates_the_fisher_not_the_ggn():
    model, x, y, lik = make_problem(MLP_TANH, "mixture", n=6, seed=10)
    f, jac, layers = _layer_jacobians(model, x)
    fsqrt = lik.fisher_sqrt(f)  # (n, C, 1)
    fisher_ref = reference_factors(model, x, y, lik, kind="fisher")
    kflr = cv.fit_kronecker(model, (x, y), lik, method="kflr")
    moments = _kfac_moments(model, x, lik)
    m = 4096
    kfac = cv.fit_kronecker(model, (x, y), lik, method="kfac", mc_samples=m, generator=torch.Generator().manual_seed(3))
    for layer in layers:
        name = layer.name
        g_cols = torch.einsum("ntco,nck->ntko", jac[name], fsqrt)  # J_tᵀ s_k
        g_fisher = torch.einsum("ntko,ntkp->op", g_cols, g_cols) / len(x)
        assert_close_report(g_fisher, fisher_ref[name][1], rtol=EXACT, name=f"fisher_sqrt G {name}")
        assert_close_report(moments[name][0], g_fisher, rtol=EXACT, name=f"E[KFAC G] {name}")
        sd = math.sqrt(moments[name][1] / m)
        err_fisher = float((kfac[name].G - g_fisher).norm())
        err_ggn = float((kfac[name].G - kflr[name].G).norm())
        assert err_fisher <= CHEBYSHEV_K * sd, f"{name}: KFAC vs Fisher G {err_fisher:.3e} > {CHEBYSHEV_K}·{sd:.3e}"
        assert err_ggn > 5 * CHEBYSHEV_K * sd, f"{name}: KFAC G should be far from the GGN G ({err_ggn:.3e})"
        assert rel_error(kflr[name].G, g_fisher) > 0.1


# ---------------------------------------------------------------------------- diagonals

DIAG_CASES = [(MLP_TANH, "ce"), (MLP_RELU, "gaussian"), (MLP_SIGMOID, "mixture"), (CNN, "ce"), (CNN_T1, "bernoulli")]
DIAG_CASES += [(BRANCHY_WIDE, "mixture")]


@pytest.mark.parametrize("case, lik_name", DIAG_CASES, ids=[f"{c.name}-{k}" for c, k in DIAG_CASES])
def test_ggn_diagonal_times_n_equals_dense_diagonal(case, lik_name):
    model, x, y, lik = make_problem(case, lik_name, n=6, seed=11)
    layers = cv.find_layers(model)
    dense = torch.diagonal(cv.exact_ggn(model, x, y, lik))
    diag = cv.fit_diagonal(model, (x, y), lik, method="ggn", batch_size=4)
    assert diag.n_data == 6 and list(diag) == [layer.name for layer in layers]
    for layer in layers:
        assert diag[layer.name].shape == layer.shape
    flat = torch.cat([diag[layer.name].reshape(-1) for layer in layers])
    assert_close_report(6 * flat, dense, rtol=EXACT, name="diagonal")


@pytest.mark.montecarlo
@pytest.mark.parametrize("case, lik_name", [(MLP_TANH, "mixture"), (CNN, "ce")], ids=lambda v: getattr(v, "name", v))
def test_mc_fisher_diagonal_converges_to_exact_fisher_diagonal(case, lik_name):
    model, x, y, lik = make_problem(case, lik_name, n=5, seed=12)
    layers = cv.find_layers(model)
    n = len(x)
    jac = parameter_jacobian(model, x)  # (n, C, P)
    f = model(x).detach()
    mean, var = 0.0, 0.0
    for i in range(n):
        grads, probs = gradient_support(lik, f[i])
        psi2 = (grads @ jac[i]) ** 2  # (S, P) squared per-example parameter gradients
        d = probs @ psi2
        mean = mean + d
        var += float(probs @ (psi2**2).sum(1) - (d**2).sum())
    mean, var = mean / n, var / n**2
    assert_close_report(n * mean, torch.diagonal(cv.exact_fisher(model, x, y, lik)), rtol=EXACT, name="E diag")

    errs = {}
    for m in (16, 4096):
        gen = torch.Generator().manual_seed(300 + m)
        diag = cv.fit_diagonal(model, (x, y), lik, method="fisher", mc_samples=m, generator=gen)
        flat = torch.cat([diag[layer.name].reshape(-1) for layer in layers])
        err, sd = float((flat - mean).norm()), math.sqrt(var / m)
        assert 0.05 * sd <= err <= CHEBYSHEV_K * sd, f"M={m}: error {err:.3e}, sd {sd:.3e}"
        errs[m] = err
    assert errs[4096] < errs[16] / 3


# ---------------------------------------------------------------------------- GGN-vector products

GVP_CASES = [(MLP_TANH, "ce"), (MLP_RELU, "mixture"), (CNN, "gaussian"), (BRANCHY_WIDE, "bernoulli")]


@pytest.mark.parametrize("case, lik_name", GVP_CASES, ids=[f"{c.name}-{k}" for c, k in GVP_CASES])
def test_ggn_vector_product_equals_dense_product(case, lik_name):
    model, x, y, lik = make_problem(case, lik_name, n=7, seed=13)
    layers = cv.find_layers(model)
    gen = torch.Generator().manual_seed(14)
    vectors = {layer.name: torch.randn(layer.shape, generator=gen, dtype=DTYPE) for layer in layers}
    flat_v = torch.cat([vectors[layer.name].reshape(-1) for layer in layers])
    expected = cv.exact_ggn(model, x, y, lik) @ flat_v
    streams = {
        "one batch": (x, y),
        "batch_size=3": (x, y),
        "dataloader": DataLoader(TensorDataset(x, y), batch_size=2),
    }
    for label, data in streams.items():
        bs = 3 if label == "batch_size=3" else 512
        out = cv.ggn_vector_product(model, data, lik, vectors, batch_size=bs)
        assert list(out) == list(vectors) and all(out[k].shape == vectors[k].shape for k in out)
        flat = torch.cat([out[layer.name].reshape(-1) for layer in layers])
        assert_close_report(flat, expected, rtol=EXACT, name=label)
    with pytest.raises(ValueError, match="Missing"):
        cv.ggn_vector_product(model, (x, y), lik, {layers[0].name: vectors[layers[0].name]})


# ---------------------------------------------------------------------------- data streaming


def _assert_same_factors(a, b, rtol=1e-12, label=""):
    assert list(a) == list(b) and a.n_data == b.n_data
    for name in a:
        assert_close_report(a[name].A, b[name].A, rtol=rtol, name=f"{label} A {name}")
        assert_close_report(a[name].G, b[name].G, rtol=rtol, name=f"{label} G {name}")


@pytest.mark.parametrize(
    "case, lik_name", [(MLP_TANH, "mixture"), (CNN, "ce"), (BRANCHY, "gaussian")], ids=lambda v: getattr(v, "name", v)
)
def test_streaming_equals_one_batch(case, lik_name):
    model, x, y, lik = make_problem(case, lik_name, n=11, seed=15)
    methods = ["kflr", "kfra"] if case.kfra else ["kflr"]
    streams = {
        "batch_size=3": dict(data=(x, y), batch_size=3),
        "dataloader": dict(data=DataLoader(TensorDataset(x, y), batch_size=4)),
        "list": dict(data=[(x[:5], y[:5]), (x[5:6], y[5:6]), (x[6:], y[6:])]),
    }
    for method in methods:
        big = cv.fit_kronecker(model, (x, y), lik, method=method)
        assert big.n_data == 11 and big.method == method
        for label, kw in streams.items():
            small = cv.fit_kronecker(model, kw["data"], lik, method=method, batch_size=kw.get("batch_size", 512))
            _assert_same_factors(small, big, label=f"{method} {label}")
    big = cv.fit_diagonal(model, (x, y), lik)
    for label, kw in streams.items():
        small = cv.fit_diagonal(model, kw["data"], lik, batch_size=kw.get("batch_size", 512))
        for name in big:
            assert_close_report(small[name], big[name], rtol=1e-12, name=f"diag {label} {name}")


def test_float32_loader_feeds_float64_model():
    """Inputs are cast to the model's dtype; values exactly representable in float32 give identical factors."""
    model, x, y, lik = make_problem(MLP_TANH, "ce", n=8, seed=16)
    x32 = x.float()
    ref = cv.fit_kronecker(model, (x32.double(), y), lik, method="kflr")
    got = cv.fit_kronecker(model, DataLoader(TensorDataset(x32, y), batch_size=3), lik, method="kflr")
    _assert_same_factors(got, ref, label="float32 loader")
    assert got["0"].A.dtype == DTYPE


def test_kfac_is_reproducible_with_a_generator():
    model, x, y, lik = make_problem(MLP_TANH, "ce", n=8, seed=17)

    def fit(seed):
        return cv.fit_kronecker(model, (x, y), lik, "kfac", mc_samples=2, generator=torch.Generator().manual_seed(seed))

    _assert_same_factors(fit(1), fit(1), rtol=0.0, label="same seed")
    assert rel_error(fit(1)["0"].G, fit(2)["0"].G) > 1e-3


# ---------------------------------------------------------------------------- interface


def test_include_and_exclude_select_layers():
    model, x, y, lik = make_problem(MLP_TANH, "ce", n=6, seed=18)
    full = cv.fit_kronecker(model, (x, y), lik, method="kflr")
    for method in ("kflr", "kfra"):
        part = cv.fit_kronecker(model, (x, y), lik, method=method, exclude=["2"])
        assert list(part) == ["0", "4"]
        only = cv.fit_kronecker(model, (x, y), lik, method=method, include=["2"])
        assert list(only) == ["2"]
        assert_close_report(only["2"].A, full["2"].A, rtol=1e-14, name="A")
    part = cv.fit_kronecker(model, (x, y), lik, method="kflr", exclude=["2"])
    for name in ("0", "4"):
        assert_close_report(part[name].G, full[name].G, rtol=1e-14, name=f"G {name}")
    diag = cv.fit_diagonal(model, (x, y), lik, include=["4"])
    assert list(diag) == ["4"]


def test_argument_errors():
    model, x, y, lik = make_problem(MLP_TANH, "ce", n=4)
    with pytest.raises(ValueError, match="Unknown method"):
        cv.fit_kronecker(model, (x, y), lik, method="shampoo")
    with pytest.raises(ValueError, match="mc_samples"):
        cv.fit_kronecker(model, (x, y), lik, method="kfac", mc_samples=0)
    with pytest.raises(ValueError, match="No data"):
        cv.fit_kronecker(model, [], lik, method="kflr")
    with pytest.raises(ValueError, match="No data"):
        cv.fit_kronecker(model, [], lik, method="kfra")
    with pytest.raises(ValueError, match="diagonal method"):
        cv.fit_diagonal(model, (x, y), lik, method="hessian")
    with pytest.raises(ValueError, match="batch_size"):
        cv.fit_kronecker(model, (x, y), lik, method="kflr", batch_size=0)
    with pytest.raises(ValueError, match="lengths"):
        cv.fit_kronecker(model, (x, y[:2]), lik, method="kflr")


@pytest.mark.parametrize("method", ["kflr", "kfra", "kfac"])
def test_progress_and_training_mode(method):
    model, x, y, lik = make_problem(MLP_TANH, "ce", n=10)
    model.train()
    calls = []
    cv.fit_kronecker(model, (x, y), lik, method=method, batch_size=4, progress=lambda f, msg: calls.append(f))
    assert calls == pytest.approx([0.4, 0.8, 1.0])
    assert model.training


def test_float32_model_gives_float32_factors_close_to_float64():
    model, x, y, lik = make_problem(MLP_TANH, "ce", n=8, seed=19)
    ref = cv.fit_kronecker(model, (x, y), lik, method="kflr")
    model32 = make_problem(MLP_TANH, "ce", n=8, seed=19)[0].float()
    got = cv.fit_kronecker(model32, (x.float(), y), lik, method="kflr")
    for name in ref:
        assert got[name].A.dtype == got[name].G.dtype == torch.float32
        assert_close_report(got[name].A.double(), ref[name].A, rtol=1e-5, name=f"A {name}")
        assert_close_report(got[name].G.double(), ref[name].G, rtol=1e-4, name=f"G {name}")


# ---------------------------------------------------------------------------- architectures found by bug hunting


def test_inplace_activation_does_not_change_the_factors():
    """``nn.ReLU(inplace=True)`` after a layer must not overwrite the recorded pre-activation output."""
    model, x, y, lik = make_problem(MLP_INPLACE, "ce", n=6, seed=20)
    plain = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    for method in ("kflr", "kfra", "kfac", "rp"):
        a = cv.fit_kronecker(model, (x, y), lik, method, mc_samples=3, generator=torch.Generator().manual_seed(0))
        b = cv.fit_kronecker(plain, (x, y), lik, method, mc_samples=3, generator=torch.Generator().manual_seed(0))
        _assert_same_factors(a, b, rtol=1e-14, label=method)
    da, db = cv.fit_diagonal(model, (x, y), lik), cv.fit_diagonal(plain, (x, y), lik)
    for name in db:
        assert_close_report(da[name], db[name], rtol=1e-14, name=f"diag {name}")


class _SharedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.a(torch.tanh(self.a(x)))))


def test_layer_called_twice_is_refused():
    """A shared layer's curvature is not that of a single call; refusing beats a silently wrong block."""
    model = _SharedLayer().to(DTYPE)
    x, y = torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 3, (4,))
    for method in ("kflr", "kfac"):
        with pytest.raises(ValueError, match="more than once"):
            cv.fit_kronecker(model, (x, y), cv.CrossEntropy(), method=method)
    with pytest.raises(ValueError, match="more than once"):
        cv.fit_diagonal(model, (x, y), cv.CrossEntropy())
    assert [layer.name for layer in cv.find_layers(model, exclude=["a"])] == ["out"]
    lin = nn.Linear(3, 3).to(DTYPE)
    chain = nn.Sequential(lin, nn.Tanh(), lin)
    with pytest.raises(ValueError, match="more than once"):
        cv.fit_kronecker(chain, (x, y), cv.CrossEntropy(), method="kfra")


def test_targets_are_optional_where_the_curvature_is_target_free():
    model, x, y, lik = make_problem(MLP_TANH, "ce", n=5, seed=21)
    for method in ("kflr", "kfra"):
        _assert_same_factors(
            cv.fit_kronecker(model, (x, None), lik, method), cv.fit_kronecker(model, (x, y), lik, method)
        )
    model, x, y, lik = make_problem(MLP_TANH, "mixture", n=5, seed=21)
    for method in ("kflr", "kfra"):
        with pytest.raises(ValueError, match="targets"):
            cv.fit_kronecker(model, (x, None), lik, method)
    cv.fit_kronecker(model, (x, None), lik, "kfac")  # sampled targets only


def test_one_dimensional_outputs():
    """A model returning (n,) is treated as (n, 1)."""
    torch.manual_seed(22)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1), nn.Flatten(0)).to(DTYPE).eval()
    x, y = torch.randn(1, 4, dtype=DTYPE), torch.ones(1, dtype=DTYPE)
    lik = cv.Bernoulli()
    layers = cv.find_layers(model)
    dense = cv.exact_ggn(model, x, y, lik)
    slices = block_slices(layers)
    factors = cv.fit_kronecker(model, (x, y), lik, method="kflr")
    diag = cv.fit_diagonal(model, (x, y), lik)
    for layer in layers:
        block = _block(dense, slices[layer.name])
        kron = torch.kron(factors[layer.name].G, factors[layer.name].A)
        assert_close_report(kron, block, rtol=EXACT, name=layer.name)
        assert_close_report(diag[layer.name].reshape(-1), torch.diagonal(block), rtol=EXACT, name=f"diag {layer.name}")


def test_frozen_layer_inside_the_chain():
    """A frozen Linear is skipped but still propagates curvature (KFLR and KFRA, one point: exact)."""
    model, x, y, lik = make_problem(MLP_TANH, "ce", n=1, seed=23)
    for p in model[2].parameters():
        p.requires_grad_(False)
    layers = cv.find_layers(model)
    assert [layer.name for layer in layers] == ["0", "4"]
    dense = cv.exact_ggn(model, x, y, lik)
    slices = block_slices(layers)
    for method in ("kflr", "kfra"):
        factors = cv.fit_kronecker(model, (x, y), lik, method=method)
        for layer in layers:
            kron = torch.kron(factors[layer.name].G, factors[layer.name].A)
            assert_close_report(kron, _block(dense, slices[layer.name]), rtol=EXACT, name=f"{method} {layer.name}")
