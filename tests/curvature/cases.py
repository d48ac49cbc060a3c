"""Tiny float64 problems for the curvature tests and dense, loop-based references built independently of the
estimators under test.

Every model maps its input to 3 outputs, so each likelihood (softmax over 3 classes, 3-dimensional Gaussian,
3 independent Bernoullis, the 3-output binary mixture) applies to each model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import curvature as cv
from curvature.estimators.exact import output_curvature_reference
from curvature.layers import Layer, find_layers, unfold_reference

DTYPE = torch.float64
N_OUT = 3

# ---------------------------------------------------------------------------- reporting


def assert_close_report(
    actual: Tensor, expected: Tensor, rtol: float = 1e-8, atol: float | None = None, name: str = ""
):
    """``|actual − expected| ≤ atol + rtol·|expected|`` entry-wise; lists the worst differing entries on failure.

    ``atol`` defaults to ``rtol · max|expected|`` so that entries that cancel to round-off do not fail.
    """
    actual = torch.as_tensor(actual).detach()
    expected = torch.as_tensor(expected).detach().to(actual.dtype)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    atol = rtol * scale if atol is None else atol
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bool(bad.any()):
        idx = bad.nonzero()
        order = diff[bad].argsort(descending=True)[:10]
        lines = [
            f"{name}: {int(bad.sum())} of {bad.numel()} entries differ (rtol={rtol:.1e}, atol={atol:.2e}, "
            f"max |diff|={diff.max().item():.3e}, max |expected|={scale:.3e})"
        ]
        for i in order.tolist():
            where = tuple(idx[i].tolist())
            lines.append(f"  {where}: actual={actual[where].item():+.10e} expected={expected[where].item():+.10e}")
        raise AssertionError("\n".join(lines))


def rel_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


# ---------------------------------------------------------------------------- models


class Branchy(nn.Module):
    """Non-sequential: a convolution whose kernel covers its 1×3×3 input (T = 1) next to a Linear branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.lin = nn.Linear(9, 3)
        self.head = nn.Linear(5, N_OUT)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.conv(x)).flatten(1)
        b = torch.tanh(self.lin(x.flatten(1)))
        return self.head(torch.cat([a, b], dim=1))


class BranchyWide(nn.Module):
    """Non-sequential with a convolution applied at T = 4 locations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2)
        self.lin = nn.Linear(9, 2)
        self.head = nn.Linear(10, N_OUT)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.tanh(self.conv(x)).flatten(1)
        b = torch.sigmoid(self.lin(x.flatten(1)))
        return self.head(torch.cat([a, b], dim=1))


class ChainModule(nn.Module):
    """The three-layer tanh MLP written as a plain module (same computation, no ``nn.Sequential``)."""

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        self.inp, self.act1, self.mid, self.act2, self.out = (seq[i] for i in range(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act2(self.mid(self.act1(self.inp(x)))))


class SeqPool(nn.Module):
    """A Linear applied at every position of a (n, T, in) sequence (T locations), mean-pooled, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 5)
        self.out = nn.Linear(5, N_OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(x)).mean(1))


def _mlp_inplace() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, N_OUT))


def _nested_chain() -> nn.Module:
    # a leading Flatten, a nested Sequential, Dropout, Identity and two activations in a row
    return nn.Sequential(
        nn.Flatten(),
        nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Sigmoid()),
        nn.Dropout(0.5),
        nn.Linear(5, 4, bias=False),
        nn.Identity(),
        nn.ELU(),
        nn.Linear(4, N_OUT),
    )


def _mlp(act: type[nn.Module], hidden_bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), act(), nn.Linear(5, 4, bias=hidden_bias), act(), nn.Linear(4, N_OUT))


class PerFeatureTanh(nn.Module):
    """``scale ⊙ tanh(x)`` with a constant per-feature scale: a module KFRA knows only by its ``elementwise`` flag."""

    elementwise = True

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, features))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x) * self.scale


def _mlp_more_activations() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.SELU(), nn.Linear(5, 4), nn.Hardswish(), nn.Linear(4, N_OUT))


def _mlp_flagged_elementwise() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), PerFeatureTanh(5), nn.Linear(5, 4), nn.Mish(), nn.Linear(4, N_OUT))


def _deep_linear() -> nn.Module:
    return nn.Sequential(*(nn.Linear(3, 3, bias=False) for _ in range(4)))


def _cnn() -> nn.Module:
    # (2,4,4) -conv 3x3 pad 1-> (3,4,4) T=16 -conv 2x2 stride 2-> (2,2,2) T=4 -> 8 -> 3
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8, N_OUT),
    )


def _cnn_t1() -> nn.Module:
    # (2,4,4) -conv 3x3 pad 1-> (3,4,4) T=16 -conv 4x4-> (4,1,1) T=1 -> 4 -> 3
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4, N_OUT)
    )


@dataclass(frozen=True)
class ModelCase:
    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    #: KFRA applies (a chain of Linear layers with element-wise activations)
    kfra: bool
    #: layers applied at a single location (T = 1): their Kronecker block is exact for one data point
    single_location: tuple[str, ...]

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        model = self.factory().to(DTYPE)
        gen = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            for p in model.parameters():
                # larger than the default init so that activations are far from linear and factors well scaled
                p.copy_(torch.randn(p.shape, generator=gen, dtype=DTYPE) * (1.0 / max(1, p[0].numel()) ** 0.5))
        model.eval()
        return model


MLP_TANH = ModelCase("mlp_tanh", lambda: _mlp(nn.Tanh), (4,), True, ("0", "2", "4"))
MLP_RELU = ModelCase("mlp_relu", lambda: _mlp(nn.ReLU), (4,), True, ("0", "2", "4"))
MLP_SIGMOID = ModelCase("mlp_sigmoid", lambda: _mlp(nn.Sigmoid, hidden_bias=False), (4,), True, ("0", "2", "4"))
MLP_SELU_HARDSWISH = ModelCase("mlp_selu_hardswish", _mlp_more_activations, (4,), True, ("0", "2", "4"))
MLP_FLAGGED = ModelCase("mlp_flagged_elementwise", _mlp_flagged_elementwise, (4,), True, ("0", "2", "4"))
DEEP_LINEAR = ModelCase("deep_linear", _deep_linear, (3,), True, ("0", "1", "2", "3"))
CNN = ModelCase("cnn", _cnn, (2, 4, 4), False, ("5",))
CNN_T1 = ModelCase("cnn_t1", _cnn_t1, (2, 4, 4), False, ("2", "5"))
BRANCHY = ModelCase("branchy", Branchy, (1, 3, 3), False, ("conv", "lin", "head"))
BRANCHY_WIDE = ModelCase("branchy_wide", BranchyWide, (1, 3, 3), False, ("lin", "head"))

MLP_INPLACE = ModelCase("mlp_inplace", _mlp_inplace, (4,), True, ("0", "2", "4"))
NESTED_CHAIN = ModelCase("nested_chain", _nested_chain, (2, 2), True, ("1.0", "3", "6"))
SEQ_POOL = ModelCase("seq_pool", SeqPool, (3, 4), False, ("out",))

MLPS = (MLP_TANH, MLP_RELU, MLP_SIGMOID, MLP_SELU_HARDSWISH, MLP_FLAGGED)
ALL_MODELS = (
    MLP_TANH,
    MLP_RELU,
    MLP_SIGMOID,
    MLP_SELU_HARDSWISH,
    MLP_FLAGGED,
    DEEP_LINEAR,
    MLP_INPLACE,
    NESTED_CHAIN,
    CNN,
    CNN_T1,
    BRANCHY,
    BRANCHY_WIDE,
    SEQ_POOL,
)


def deep_linear_lemma_model(width: int = 3, depth: int = 3, seed: int = 0) -> nn.Sequential:
    """Thesis Lemma 4.1 network: identity activations, no biases, square well-conditioned invertible weights."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(width, width, bias=False).to(DTYPE)
        q, _ = torch.linalg.qr(torch.randn(width, width, generator=gen, dtype=DTYPE))
        scales = 0.7 + 0.6 * torch.rand(width, generator=gen, dtype=DTYPE)
        with torch.no_grad():
            lin.weight.copy_(q * scales)
        layers.append(lin)
    return nn.Sequential(*layers).eval()


# ---------------------------------------------------------------------------- likelihoods and data

LIKELIHOODS: dict[str, Callable[[], cv.Likelihood]] = {
    "ce": cv.CrossEntropy,
    "gaussian": lambda: cv.Gaussian(sigma=0.7),
    "bernoulli": cv.Bernoulli,
    "mixture": cv.BinaryMixture,
}
CONVEX_LIKELIHOODS = ("ce", "gaussian", "bernoulli")


def make_targets(lik_name: str, n: int, generator: torch.Generator) -> Tensor:
    if lik_name == "ce":
        return torch.randint(0, N_OUT, (n,), generator=generator)
    if lik_name == "gaussian":
        return torch.randn(n, N_OUT, generator=generator, dtype=DTYPE)
    if lik_name == "bernoulli":
        return torch.randint(0, 2, (n, N_OUT), generator=generator).to(DTYPE)
    if lik_name == "mixture":
        return torch.randint(0, 2, (n,), generator=generator).to(DTYPE)
    raise KeyError(lik_name)


def make_data(case: ModelCase, lik_name: str, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *case.input_shape, generator=gen, dtype=DTYPE)
    return x, make_targets(lik_name, n, gen)


def make_problem(case: ModelCase, lik_name: str, n: int, seed: int = 0):
    """``(model, x, y, likelihood)``."""
    model = case.build(seed)
    x, y = make_data(case, lik_name, n, seed)
    return model, x, y, LIKELIHOODS[lik_name]()


# ---------------------------------------------------------------------------- loop references


def output_curvatures(lik: cv.Likelihood, f: Tensor, y: Tensor | None, kind: str = "ggn") -> Tensor:
    """(n, C, C) per-example output curvature by automatic differentiation."""
    return torch.stack(
        [output_curvature_reference(lik, f[i].detach(), None if y is None else y[i], kind) for i in range(len(f))]
    )


def record(model: nn.Module, layers: list[Layer], x: Tensor) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Forward pass keeping every layer's input and (in-graph) output."""
    ins: dict[str, Tensor] = {}
    outs: dict[str, Tensor] = {}
    handles = []
    for layer in layers:

        def hook(module, args, output, name=layer.name):
            ins[name] = args[0].detach()
            outs[name] = output
            return output.clone()  # downstream in-place operations must not overwrite the recorded output

        handles.append(layer.module.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            f = model(x.clone().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    return f, ins, outs


def augmented_inputs(layer: Layer, inputs: Tensor) -> Tensor:
    """(n, T, in[+1]) layer inputs ``â_t`` by explicit loops (convolutions) or reshaping (Linear)."""
    module = layer.module
    if isinstance(module, nn.Conv2d):
        rows = unfold_reference(module, inputs)
    else:  # Linear: every position of the middle dimensions is a location
        rows = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    if module.bias is not None:
        rows = torch.cat([rows, torch.ones(*rows.shape[:-1], 1, dtype=rows.dtype)], dim=-1)
    return rows


def output_jacobians(f: Tensor, outs: dict[str, Tensor], layers: list[Layer]) -> dict[str, Tensor]:
    """Per layer (n, T, C, out): ``∂f_n / ∂h_{n,t}`` by one autograd call per example and output.

    Examples must not interact (eval mode), so ``∂f_n/∂h_m = 0`` for ``m ≠ n``.
    """
    n, c = f.shape
    tensors = [outs[layer.name] for layer in layers]
    jac = {layer.name: [] for layer in layers}
    for i in range(n):
        per_out = {layer.name: [] for layer in layers}
        for k in range(c):
            grads = torch.autograd.grad(f[i, k], tensors, retain_graph=True, allow_unused=True)
            for layer, g, h in zip(layers, grads, tensors, strict=True):
                g = torch.zeros_like(h) if g is None else g
                gi = g[i]
                if isinstance(layer.module, nn.Conv2d):  # (out, Ho, Wo): location t = row * Wo + col
                    rows = [gi[:, r, s] for r in range(gi.shape[1]) for s in range(gi.shape[2])]
                    per_out[layer.name].append(torch.stack(rows))  # (T, out)
                else:  # Linear (..., out)
                    per_out[layer.name].append(gi.reshape(-1, gi.shape[-1]))
        for layer in layers:
            jac[layer.name].append(torch.stack(per_out[layer.name], dim=1))  # (T, C, out)
    return {name: torch.stack(v) for name, v in jac.items()}


def reference_factors(
    model: nn.Module, x: Tensor, y: Tensor | None, lik: cv.Likelihood, kind: str = "ggn", layers=None
) -> dict[str, tuple[Tensor, Tensor]]:
    """KFLR-type factors by loops: ``A = mean_n (1/T) Σ_t â_t â_tᵀ`` and ``G = mean_n Σ_t J_tᵀ Λ_n J_t``.

    ``Λ_n`` is the autodiff output curvature of ``kind`` ("ggn" or "fisher").
    """
    layers = find_layers(model) if layers is None else layers
    f, ins, outs = record(model, layers, x)
    lam = output_curvatures(lik, f, y, kind)
    jac = output_jacobians(f, outs, layers)
    out = {}
    for layer in layers:
        a_rows = augmented_inputs(layer, ins[layer.name])
        n, t = a_rows.shape[:2]
        A = sum(a_rows[i, s].outer(a_rows[i, s]) for i in range(n) for s in range(t)) / (n * t)
        J = jac[layer.name]
        G = sum(J[i, s].T @ lam[i] @ J[i, s] for i in range(n) for s in range(t)) / n
        out[layer.name] = (A, G)
    return out


def parameter_jacobian(model: nn.Module, x: Tensor, layers=None) -> Tensor:
    """(n, C, P): per-example Jacobian of the outputs w.r.t. all ``Ŵ = [W b]``, flattened row-major."""
    layers = find_layers(model) if layers is None else layers
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f_one(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),))[0]

    jacs = []
    for i in range(len(x)):
        jp = jacrev(f_one)(params, x[i])
        blocks = []
        for layer in layers:
            prefix = f"{layer.name}." if layer.name else ""
            w = jp[prefix + "weight"]
            c, out = w.shape[:2]
            parts = [w.reshape(c, out, -1)]
            if layer.module.bias is not None:
                parts.append(jp[prefix + "bias"].reshape(c, out, 1))
            blocks.append(torch.cat(parts, dim=2).reshape(c, -1))
        jacs.append(torch.cat(blocks, dim=1))
    return torch.stack(jacs)


def bias_indices(layer: Layer) -> Tensor:
    """Flat indices of the bias column of ``Ŵ`` inside the layer's block."""
    rows, cols = layer.shape
    return torch.arange(rows) * cols + (cols - 1)


# ---------------------------------------------------------------------------- Monte-Carlo references


def gradient_support(lik: cv.Likelihood, f: Tensor) -> tuple[Tensor, Tensor]:
    """All values of ``∇_f −log p(ŷ|f)`` for one example of a discrete likelihood, with their probabilities.

    Returns ``(grads (S, C), probs (S,))`` by enumerating ``ŷ`` and differentiating ``nll`` automatically.
    """
    c = f.shape[-1]
    if isinstance(lik, cv.CrossEntropy):
        support = [torch.tensor(k) for k in range(c)]
    elif isinstance(lik, cv.BinaryMixture):
        support = [torch.tensor(v, dtype=f.dtype) for v in (0.0, 1.0)]
    elif isinstance(lik, cv.Bernoulli):
        grid = torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=f.dtype)] * c).reshape(-1, c)
        support = list(grid)
    else:
        raise TypeError(f"{type(lik).__name__} is not discrete")

    grads, probs = [], []
    for yy in support:
        ff = f.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = lik.nll(ff.unsqueeze(0), yy.unsqueeze(0))
            (g,) = torch.autograd.grad(loss, ff)
        grads.append(g)
        probs.append(torch.exp(-loss.detach()))
    return torch.stack(grads), torch.stack(probs)


def sampled_factor_moments(jac: Tensor, grads: list[Tensor], probs: list[Tensor]) -> tuple[Tensor, float]:
    """Mean and expected squared Frobenius error of the one-sample KFAC estimate of ``G``.

    Per example ``n`` the one-sample estimate is ``X = Σ_t J_tᵀ d dᵀ J_t`` with ``d`` drawn from the support
    ``grads[n]`` with ``probs[n]``. With ``M`` samples per example and ``N`` examples the averaged estimate
    ``Ĝ`` has ``E Ĝ = G`` (returned) and ``E‖Ĝ − G‖²_F = v / M`` with ``v`` (returned) ``= Σ_n Var_n / N²``.
    """
    n = jac.shape[0]
    mean = 0.0
    var = 0.0
    for i in range(n):
        x = torch.einsum("tco,sc,sd,tdp->sop", jac[i], grads[i], grads[i], jac[i])  # (S, out, out)
        m = torch.einsum("s,sop->op", probs[i], x)
        mean = mean + m
        var = var + float(torch.einsum("s,sop->", probs[i], x**2) - (m**2).sum())
    return mean / n, var / n**2


def projected_factor_moments(jac: Tensor, sqrt: Tensor) -> tuple[Tensor, float]:
    """As :func:`sampled_factor_moments` for random projections ``d = S v``, ``v ~ N(0, I)``.

    Entry ``(a, b)`` of ``X = Σ_t J_tᵀ S v vᵀ Sᵀ J_t`` is the quadratic form ``vᵀ Q_ab v`` whose variance is
    ``2 tr(sym(Q_ab)²)``.
    """
    n = jac.shape[0]
    mean = 0.0
    var = 0.0
    for i in range(n):
        m_t = torch.einsum("tco,ck->tok", jac[i], sqrt[i])  # (T, out, K)
        q = torch.einsum("tak,tbl->abkl", m_t, m_t)
        qs = 0.5 * (q + q.transpose(-1, -2))
        mean = mean + torch.einsum("abkk->ab", q)
        var = var + float(2 * torch.einsum("abkl,ablk->", qs, qs))
    return mean / n, var / n**2
