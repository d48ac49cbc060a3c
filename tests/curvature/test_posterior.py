"""``LaplacePosterior`` against a dense ``N(θ*, P⁻¹)`` built directly from the fitted factors.

The dense precision is block-diagonal over layers in the flat ``Ŵ = [W b]`` (row-major) layout, one block per
layer: ``n·kron(G, A) + τ I`` (exact damping), ``kron(√n G + √τ I, √n A + √τ I)`` (factored damping, ω = 1) or
``diag(n·d + τ)`` (diagonal curvature). It is assembled with ``torch.kron`` and inverted densely, never through the
eigenbasis code under test. The same helpers serve the predictive and tuning tests.
"""

from __future__ import annotations

import functools
import io
import math

import pytest
import torch
from torch import Tensor, nn
from torch.distributions import MultivariateNormal
from torch.func import functional_call, jacrev

import curvature as cv
import curvature.posterior as posterior_module
from curvature.posterior import standard_normals

from .cases import CNN, DTYPE, MLP_TANH, assert_close_report, make_problem

EXACT = 1e-9
N_POINTS = 12
KINDS = [("kron", "exact"), ("kron", "factored"), ("diag", "exact")]
KIND_IDS = ["kron-exact", "kron-factored", "diag"]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny problems gain nothing from intra-op threads; on a busy machine waiting for them costs seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- dense references


def param_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear / Conv2d modules with parameters, in ``named_modules`` order (the posterior's layer order)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def layer_matrix(module: nn.Module) -> Tensor:
    w = module.weight.detach().reshape(module.weight.shape[0], -1)
    return w if module.bias is None else torch.cat([w, module.bias.detach()[:, None]], 1)


def flat_mean(model: nn.Module) -> Tensor:
    """``θ*``: every layer's ``Ŵ`` flattened row-major, concatenated."""
    return torch.cat([layer_matrix(m).reshape(-1) for _, m in param_layers(model)])


def flat_weights(model: nn.Module, weights: dict[str, Tensor]) -> Tensor:
    """Per-layer (..., out, in+1) tensors → (..., P) in the flat layout."""
    return torch.cat([weights[n].flatten(-2) for n, _ in param_layers(model)], -1)


def unflat_weights(model: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for name, m in param_layers(model):
        rows, cols = layer_matrix(m).shape
        out[name] = theta[..., i : i + rows * cols].reshape(*theta.shape[:-1], rows, cols)
        i += rows * cols
    return out


def flat_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """(B, C, P) Jacobian of the outputs w.r.t. the flat ``Ŵ`` vector by ``torch.func.jacrev``."""
    base = {k: v.detach() for k, v in model.named_parameters()}

    def f(theta: Tensor) -> Tensor:
        params = dict(base)
        i = 0
        for name, m in param_layers(model):
            rows, cols = layer_matrix(m).shape
            mat = theta[i : i + rows * cols].reshape(rows, cols)
            i += rows * cols
            prefix = f"{name}." if name else ""
            n_in = m.weight[0].numel()
            params[prefix + "weight"] = mat[:, :n_in].reshape(m.weight.shape)
            if m.bias is not None:
                params[prefix + "bias"] = mat[:, n_in]
        out = functional_call(model, params, (x,))
        return out.unsqueeze(-1) if out.dim() == 1 else out

    return jacrev(f)(flat_mean(model))


def dense_precision(
    model: nn.Module,
    factors,
    n_eff: float,
    prior: float | dict[str, float],
    damping: str = "exact",
    omega: float | str = 1.0,
) -> Tensor:
    """Block-diagonal dense precision over the model's layers (see the module docstring).

    Factored damping with ``omega="trace"`` uses ``ω = √((tr G / dim G) / (tr A / dim A))`` (thesis eq. 4.27) in
    ``kron(√n G + ω√τ I, √n A + √τ/ω I)``.
    """
    blocks = []
    for name, _ in param_layers(model):
        tau = float(prior[name]) if isinstance(prior, dict) else float(prior)
        if isinstance(factors, cv.DiagonalFactors):
            blocks.append(torch.diag(n_eff * factors[name].reshape(-1) + tau))
            continue
        G, A = factors[name].G, factors[name].A
        eye_g = torch.eye(G.shape[0], dtype=G.dtype)
        eye_a = torch.eye(A.shape[0], dtype=A.dtype)
        if damping == "exact":
            blocks.append(n_eff * torch.kron(G, A) + tau * torch.kron(eye_g, eye_a))
        else:
            rn, rt = math.sqrt(n_eff), math.sqrt(tau)
            w = float(omega) if omega != "trace" else math.sqrt((G.trace() / len(G)) / (A.trace() / len(A)))
            blocks.append(torch.kron(rn * G + w * rt * eye_g, rn * A + rt / w * eye_a))
    return torch.block_diag(*blocks)


def dense_covariance(precision: Tensor) -> Tensor:
    return torch.cholesky_inverse(torch.linalg.cholesky(precision))


def fit_factors(model: nn.Module, x: Tensor, y: Tensor, lik: cv.Likelihood, kind: str):
    if kind == "diag":
        return cv.fit_diagonal(model, (x, y), lik, method="ggn")
    return cv.fit_kronecker(model, (x, y), lik, method="kflr")


def per_layer_prior(model: nn.Module) -> dict[str, float]:
    return {name: 0.3 * 4.0**i for i, (name, _) in enumerate(param_layers(model))}


@functools.cache
def fitted_problem(case, kind: str, lik_name: str):
    """``(model, x, y, lik, factors)``, fitted once per session (nothing below mutates them)."""
    model, x, y, lik = make_problem(case, lik_name, N_POINTS, seed=3)
    return model, x, y, lik, fit_factors(model, x, y, lik, kind)


def build(case=MLP_TANH, kind: str = "kron", damping: str = "exact", lik_name: str = "ce", prior=0.7, n_eff=None):
    """``(post, model, x, y, lik, factors)`` on a tiny float64 problem; a fresh posterior every call."""
    model, x, y, lik, factors = fitted_problem(case, kind, lik_name)
    if prior == "per_layer":
        prior = per_layer_prior(model)
    post = cv.LaplacePosterior(model, factors, lik, n_eff=n_eff, prior_precision=prior, damping=damping)
    return post, model, x, y, lik, factors


def basis_samples(post: cv.LaplacePosterior, monkeypatch) -> Tensor:
    """(P, P) matrix ``S`` whose row ``k`` is ``sample(z = e_k) − θ*``: the exact linear map of ``sample``.

    The standard normals that ``sample`` draws are replaced by the columns of the identity, layer after layer, so
    ``Cov = Sᵀ S`` exactly.
    """
    sizes = [b.mean.numel() for b in post.blocks.values()]
    p = sum(sizes)
    eye = torch.eye(p, dtype=DTYPE)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    calls = iter(range(len(sizes)))

    def fake_randn(k, *shape, **kwargs):
        i = next(calls)
        assert k == p and math.prod(shape) == sizes[i]
        return eye[:, starts[i] : starts[i] + sizes[i]].reshape(k, *shape).to(kwargs.get("dtype", DTYPE))

    monkeypatch.setattr(torch, "randn", fake_randn)
    draws = post.sample(2 * p)  # p offsets, then their antithetic partners
    monkeypatch.undo()
    means = {name: b.mean for name, b in post.blocks.items()}
    offsets = flat_weights(post.model, draws) - flat_weights(post.model, means)
    assert_close_report(offsets[p:], -offsets[:p], rtol=1e-12, atol=1e-14, name="antithetic partners")
    return offsets[:p]


# ---------------------------------------------------------------------------- the Gaussian


@pytest.mark.parametrize("case", [MLP_TANH, CNN], ids=lambda c: c.name)
@pytest.mark.parametrize("prior", [0.7, "per_layer"], ids=["scalar", "per_layer"])
@pytest.mark.parametrize(("kind", "damping"), KINDS, ids=KIND_IDS)
def test_sampling_map_gives_dense_covariance(case, prior, kind, damping, monkeypatch):
    post, model, *_, factors = build(case, kind, damping, prior=prior, n_eff=9.5)
    s = basis_samples(post, monkeypatch)
    expected = dense_covariance(dense_precision(model, factors, 9.5, post.prior_precision, damping))
    assert_close_report(s.T @ s, expected, rtol=EXACT, name="sample covariance")


@pytest.mark.parametrize("prior", [0.7, "per_layer"], ids=["scalar", "per_layer"])
@pytest.mark.parametrize(("kind", "damping"), KINDS, ids=KIND_IDS)
def test_samples_are_centred_on_the_trained_weights(prior, kind, damping):
    post, model, *_ = build(MLP_TANH, kind, damping, prior=prior)
    mean = flat_mean(model)
    assert_close_report(flat_weights(model, {n: b.mean for n, b in post.blocks.items()}), mean, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(0)
    a = post.sample(5, generator=gen)
    b = post.sample(5, generator=torch.Generator().manual_seed(0))
    for name in a:
        assert a[name].shape == (5, *post.blocks[name].mean.shape)
        assert torch.equal(a[name], b[name]), f"layer {name}: same seed, different samples"


@pytest.mark.parametrize("case", [MLP_TANH, CNN], ids=lambda c: c.name)
def test_trace_norm_omega_gives_dense_covariance_and_log_prob(case, monkeypatch):
    model, x, y, lik, factors = fitted_problem(case, "kron", "ce")
    prior = per_layer_prior(model)
    post = cv.LaplacePosterior(model, factors, lik, n_eff=9.5, prior_precision=prior, damping="factored", omega="trace")
    assert any(abs(b.omega - 1.0) > 0.1 for b in post.blocks.values()), "ω ≈ 1 everywhere: the test would be void"
    precision = dense_precision(model, factors, 9.5, prior, "factored", omega="trace")
    s = basis_samples(post, monkeypatch)
    assert_close_report(s.T @ s, dense_covariance(precision), rtol=EXACT, name="sample covariance (trace ω)")
    mean = flat_mean(model)
    theta = mean + 0.3 * torch.randn(3, mean.numel(), generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    expected = MultivariateNormal(mean, precision_matrix=precision).log_prob(theta)
    assert_close_report(post.log_prob(unflat_weights(model, theta)), expected, rtol=1e-10, name="log_prob (trace ω)")


@pytest.mark.montecarlo
@pytest.mark.parametrize("block", [None, 4096], ids=["randn", "blocked"])
@pytest.mark.parametrize(("kind", "damping"), KINDS, ids=KIND_IDS)
def test_sample_moments_match_dense_gaussian(kind, damping, block, monkeypatch):
    """Whitened by the dense precision's Cholesky factor, samples must be standard normal.

    With ``u = Lᵀ(θ − θ*)``, ``P = L Lᵀ``: the draws come in antithetic pairs, so the mean is exactly zero and
    the covariance is estimated from ``h = k/2`` independent offsets: each entry has standard deviation 1/√h off
    the diagonal and √2/√h on it. 6 standard deviations bound the maximum over P² entries. ``blocked``: the normals
    come in independently seeded blocks (:func:`curvature.posterior.standard_normals`), many per layer.
    """
    if block is not None:
        monkeypatch.setattr(posterior_module, "NORMAL_BLOCK", block)
    post, model, *_, factors = build(MLP_TANH, kind, damping, prior="per_layer")
    k = 40_000
    draws = flat_weights(model, post.sample(k, generator=torch.Generator().manual_seed(11)))
    chol = torch.linalg.cholesky(dense_precision(model, factors, post.n_eff, post.prior_precision, damping))
    u = (draws - flat_mean(model)) @ chol
    p = u.shape[1]
    mean = u.mean(0)
    cov = u.T @ u / k
    se = 1 / math.sqrt(k // 2)
    bound = 6 * se * (1 + (math.sqrt(2) - 1) * torch.eye(p, dtype=DTYPE))
    assert_close_report(mean, torch.zeros(p, dtype=DTYPE), rtol=0, atol=1e-10, name="whitened mean (pairs)")
    bad = (cov - torch.eye(p, dtype=DTYPE)).abs() > bound
    assert not bad.any(), f"whitened covariance entries off by >6 sd at {bad.nonzero()[:10].tolist()}"


@pytest.mark.parametrize("case", [MLP_TANH, CNN], ids=lambda c: c.name)
@pytest.mark.parametrize("prior", [0.7, "per_layer"], ids=["scalar", "per_layer"])
@pytest.mark.parametrize(("kind", "damping"), KINDS, ids=KIND_IDS)
def test_log_prob_matches_multivariate_normal(case, prior, kind, damping):
    post, model, *_, factors = build(case, kind, damping, prior=prior, n_eff=20.0)
    precision = dense_precision(model, factors, 20.0, post.prior_precision, damping)
    mean = flat_mean(model)
    mvn = MultivariateNormal(mean, precision_matrix=precision)
    gen = torch.Generator().manual_seed(5)
    theta = mean + 0.3 * torch.randn(4, mean.numel(), generator=gen, dtype=DTYPE)
    actual = post.log_prob(unflat_weights(model, theta))
    assert_close_report(actual, mvn.log_prob(theta), rtol=1e-10, name="log_prob (batch)")
    one = post.log_prob(unflat_weights(model, theta[0]))
    assert_close_report(one, mvn.log_prob(theta[0]), rtol=1e-10, name="log_prob (single)")


def test_logdet_precision_matches_dense():
    post, model, *_, factors = build(MLP_TANH, "kron", "exact", prior="per_layer")
    expected = torch.linalg.slogdet(dense_precision(model, factors, post.n_eff, post.prior_precision))[1]
    assert_close_report(post.logdet_precision(), expected, rtol=1e-12, name="logdet")


def test_hyperparameters_change_the_gaussian(monkeypatch):
    post, model, *_, factors = build(MLP_TANH, "kron", "exact")
    prior = per_layer_prior(model)
    post.set_hyperparameters(n_eff=3.0, prior_precision=prior)
    s = basis_samples(post, monkeypatch)
    expected = dense_covariance(dense_precision(model, factors, 3.0, prior))
    assert_close_report(s.T @ s, expected, rtol=EXACT, name="covariance after set_hyperparameters")


@pytest.mark.parametrize(
    "bad",
    [{"0": 1.0, "2": 1.0}, {"0": 1.0, "2": 1.0, "4": 0.0}, {"0": 1.0, "2": -1.0, "4": 1.0}, math.inf, 0.0, math.nan],
)
def test_invalid_prior_precision_is_refused(bad):
    post, *_ = build(MLP_TANH)
    with pytest.raises(ValueError):
        post.prior_precision = bad
    assert post.prior_precision == dict.fromkeys(["0", "2", "4"], 0.7)


def test_invalid_n_eff_and_damping_are_refused():
    post, model, x, y, lik, factors = build(MLP_TANH)
    for n in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            post.set_hyperparameters(n_eff=n)
    with pytest.raises(ValueError):
        cv.LaplacePosterior(model, factors, lik, damping="eigen")
    with pytest.raises(ValueError):
        post.sample(0)


# ---------------------------------------------------------------------------- serialisation


def predictions(post: cv.LaplacePosterior, x: Tensor) -> dict[str, dict[str, Tensor]]:
    return {
        "mc": post.predict(x, samples=16, predictive="mc", seed=4),
        "glm": post.predict(x, samples=16, predictive="glm", seed=4),
        "probit": post.predict(x, samples=16, predictive="glm", seed=4, link="probit"),
    }


def saved_posterior(case=MLP_TANH, kind="kron", damping="factored", lik_name="ce"):
    post, model, x, y, lik, _ = build(case, kind, damping, lik_name=lik_name, prior="per_layer", n_eff=30.0)
    post.metadata.update({"seed": 7, "note": "roundtrip"})
    cv.calibrate_ood(post, x, samples=16)
    return post, model, x


@pytest.mark.parametrize(
    ("case", "kind", "damping", "lik_name"),
    [
        (MLP_TANH, "kron", "factored", "ce"),
        (MLP_TANH, "kron", "exact", "gaussian"),
        (CNN, "kron", "exact", "ce"),
        (CNN, "diag", "exact", "ce"),
    ],
    ids=["mlp-factored-ce", "mlp-exact-gaussian", "cnn-exact-ce", "cnn-diag-ce"],
)
def test_save_load_gives_bit_identical_predictions(case, kind, damping, lik_name):
    post, model, x = saved_posterior(case, kind, damping, lik_name)
    before = predictions(post, x)
    blob = post.to_bytes()
    loaded = cv.LaplacePosterior.from_bytes(blob, model)
    after = predictions(loaded, x)
    for mode in before:
        assert before[mode].keys() == after[mode].keys()
        for key in before[mode]:
            a, b = before[mode][key], after[mode][key]
            assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all()), f"{mode}/{key} differs after loading"
    assert loaded.summary() == post.summary()
    assert loaded.prior_precision == post.prior_precision and loaded.n_eff == post.n_eff
    theta = {n: b.mean + 0.1 for n, b in post.blocks.items()}
    assert torch.equal(loaded.log_prob(theta), post.log_prob(theta))
    assert loaded.to_bytes() == blob


def tensor_data_offset(blob: bytes) -> int:
    return 8 + int.from_bytes(blob[:8], "little")


def test_loader_refuses_a_flipped_byte_in_the_tensor_data():
    post, model, _ = saved_posterior()
    blob = bytearray(post.to_bytes())
    start = tensor_data_offset(bytes(blob))
    for pos in (start, start + (len(blob) - start) // 2, len(blob) - 1):
        tampered = bytearray(blob)
        tampered[pos] ^= 0x01
        with pytest.raises(ValueError, match="digest|tampered"):
            cv.LaplacePosterior.from_bytes(bytes(tampered), model)


def test_loader_refuses_pickles_and_garbage():
    post, model, _ = saved_posterior()
    buf = io.BytesIO()
    torch.save({"l0.mean": post.blocks["0"].mean, "n_eff": 3.0}, buf)
    gen = torch.Generator().manual_seed(0)
    garbage = bytes(torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).tolist())
    blob = post.to_bytes()
    for bad in (buf.getvalue(), garbage, b"", blob[:100], blob[: len(blob) // 2]):
        with pytest.raises(ValueError):
            cv.LaplacePosterior.from_bytes(bad, model)


def test_loader_refuses_plain_safetensors_without_kronlap_header():
    from safetensors.torch import save

    post, model, _ = saved_posterior()
    blob = save({"l0.mean": post.blocks["0"].mean.contiguous()})
    with pytest.raises(ValueError, match="kronlap"):
        cv.LaplacePosterior.from_bytes(blob, model)


def test_loader_refuses_a_model_with_other_weights():
    post, model, _ = saved_posterior()
    blob = post.to_bytes()
    other = MLP_TANH.build(seed=3)
    with torch.no_grad():
        other[2].bias[1] += 1e-3
    with pytest.raises(ValueError, match="does not match"):
        cv.LaplacePosterior.from_bytes(blob, other)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)),
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)),
        lambda: CNN.factory(),
    ],
    ids=["wider", "shallower", "no-bias", "cnn"],
)
def test_loader_refuses_another_architecture(factory):
    post, _, _ = saved_posterior()
    blob = post.to_bytes()
    other = factory().to(DTYPE)
    with pytest.raises(ValueError):
        cv.LaplacePosterior.from_bytes(blob, other)


def test_blocked_normals_are_reproducible_whatever_the_threads_and_standard(monkeypatch):
    monkeypatch.setattr(posterior_module, "NORMAL_BLOCK", 1000)
    shape = (7, 50, 31)  # 10,850 values: eleven blocks, the last one partial
    cpu = torch.device("cpu")

    def draw(seed: int) -> torch.Tensor:
        return standard_normals(shape, dtype=DTYPE, device=cpu, generator=torch.Generator().manual_seed(seed))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = draw(3)
        torch.set_num_threads(max(2, threads))
        together = draw(3)
    finally:
        torch.set_num_threads(threads)
    assert alone.shape == shape and alone.dtype == DTYPE
    assert torch.equal(alone, together), "the draw depends on the thread count"
    assert not torch.equal(alone, draw(4))
    flat = alone.reshape(-1)
    n = flat.numel()
    assert abs(float(flat.mean())) < 5 / math.sqrt(n)
    assert abs(float(flat.var()) - 1) < 5 * math.sqrt(2 / n)
    ordered = flat.sort().values
    cdf = torch.distributions.Normal(0.0, 1.0).cdf(ordered)
    grid = torch.arange(1, n + 1, dtype=DTYPE) / n
    assert float((cdf - grid).abs().max()) < 1.63 / math.sqrt(n)  # Kolmogorov-Smirnov at the 1 % level
    blocks = flat[:10_000].reshape(10, 1000)
    corr = torch.corrcoef(blocks)
    off = corr - torch.diag(torch.diag(corr))
    assert float(off.abs().max()) < 5 / math.sqrt(1000), "neighbouring blocks are correlated"
    small = standard_normals((3, 4), dtype=DTYPE, device=cpu, generator=torch.Generator().manual_seed(3))
    assert torch.equal(small, torch.randn(3, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(3)))
