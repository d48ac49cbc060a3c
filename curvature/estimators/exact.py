"""Exact dense references with ``torch.func`` for tiny networks: GGN, Fisher, Hessian, GGN-vector products.

Parameters are laid out layer by layer as ``Ŵ_l = [W_l b_l]`` flattened row-major, the same order as the
Kronecker blocks ``G ⊗ A``. The output curvature is obtained by automatic differentiation of the likelihood's
negative log-likelihood, independently of the closed forms in :mod:`curvature.likelihoods`.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, jvp, vjp

from ..layers import Layer, find_layers
from ..likelihoods import Bernoulli, BinaryMixture, CrossEntropy, Gaussian, Likelihood
from .common import Data, iterate_batches


def layer_matrices(layers: list[Layer]) -> dict[str, Tensor]:
    """Current ``Ŵ`` of each layer (detached)."""
    return {layer.name: layer.handler.weight_matrix(layer.module).detach() for layer in layers}


def flatten_matrices(layers: list[Layer], matrices: dict[str, Tensor]) -> Tensor:
    return torch.cat([matrices[layer.name].reshape(-1) for layer in layers])


def unflatten_vector(layers: list[Layer], theta: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for layer in layers:
        rows, cols = layer.shape
        out[layer.name] = theta[i : i + rows * cols].reshape(rows, cols)
        i += rows * cols
    return out


def block_slices(layers: list[Layer]) -> dict[str, slice]:
    """Where each layer's block sits in the flat parameter vector."""
    out, i = {}, 0
    for layer in layers:
        size = layer.shape[0] * layer.shape[1]
        out[layer.name] = slice(i, i + size)
        i += size
    return out


def functional_model(model: nn.Module, layers: list[Layer]):
    """``fn(matrices: dict[name, Ŵ], x) -> f`` evaluating ``model`` with the given layer matrices."""
    frozen = {k: v.detach() for k, v in itertools.chain(model.named_parameters(), model.named_buffers())}

    def fn(matrices: dict[str, Tensor], x: Tensor) -> Tensor:
        params = dict(frozen)
        for layer in layers:
            w, b = layer.handler.split_matrix(layer.module, matrices[layer.name])
            prefix = f"{layer.name}." if layer.name else ""
            params[prefix + "weight"] = w
            if b is not None:
                params[prefix + "bias"] = b
        f = functional_call(model, params, (x,))
        return f.unsqueeze(-1) if f.dim() == 1 else f

    return fn


def _discrete_support(likelihood: Likelihood, c: int) -> Tensor | None:
    if isinstance(likelihood, CrossEntropy):
        return torch.arange(c)
    if isinstance(likelihood, BinaryMixture):
        return torch.tensor([0.0, 1.0])
    if isinstance(likelihood, Bernoulli):
        return torch.tensor(list(itertools.product([0.0, 1.0], repeat=c)))
    return None


def output_curvature_reference(likelihood: Likelihood, f: Tensor, y: Tensor | None, kind: str) -> Tensor:
    """(C, C) output curvature of one example by automatic differentiation.

    ``kind="ggn"``: Hessian of the loss w.r.t. ``f`` (convex likelihoods) or, for the mixture, w.r.t. the mixture
    probability ``q`` chained through ``∇q``. ``kind="fisher"``: ``Σ_ŷ p(ŷ|f) ∇ℓ(ŷ) ∇ℓ(ŷ)ᵀ`` by enumeration
    (Gaussian: the Hessian, which equals its Fisher). ``kind="hessian"``: the plain Hessian of the loss.
    """

    def loss(ff, yy):
        return likelihood.nll(ff.unsqueeze(0), yy.unsqueeze(0))

    if kind == "hessian" or (kind == "ggn" and not isinstance(likelihood, BinaryMixture)):
        return hessian(loss, argnums=0)(f, y)
    if kind == "ggn":

        def q_of_f(ff):
            s = torch.sigmoid(ff)
            return s[0] * s[1] + (1 - s[0]) * s[2]

        def bern(q):
            return -(y * q.log() + (1 - y) * (1 - q).log())

        dq = jacrev(q_of_f)(f)
        return dq.outer(dq) * hessian(bern)(q_of_f(f))
    if kind == "fisher":
        if isinstance(likelihood, Gaussian):
            return hessian(loss, argnums=0)(f, y)
        support = _discrete_support(likelihood, f.shape[-1])
        if support is None:
            raise ValueError(f"No Fisher reference for {type(likelihood).__name__}.")
        total = torch.zeros(f.shape[-1], f.shape[-1], dtype=f.dtype)
        for yy in support:
            yy = yy.to(f.dtype) if yy.is_floating_point() else yy
            g = jacrev(loss, argnums=0)(f, yy)
            total = total + torch.exp(-loss(f, yy)) * g.outer(g)
        return total
    raise ValueError(f"Unknown curvature kind {kind!r}.")


def exact_curvature(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    likelihood: Likelihood,
    kind: str = "ggn",
    layers: list[Layer] | None = None,
) -> Tensor:
    """Dense (P, P) curvature of the summed loss over ``(x, y)``: ``Σ_n J_nᵀ Λ_n J_n`` (or the full Hessian).

    For tiny networks only: it forms the full Jacobian.
    """
    layers = find_layers(model) if layers is None else layers
    fn = functional_model(model, layers)
    theta = flatten_matrices(layers, layer_matrices(layers))

    def f_flat(th: Tensor, xx: Tensor) -> Tensor:
        return fn(unflatten_vector(layers, th), xx.unsqueeze(0))[0]

    if kind == "hessian":

        def total_loss(th):
            return likelihood.nll(fn(unflatten_vector(layers, th), x), y)

        return hessian(total_loss)(theta)
    p = theta.numel()
    out = torch.zeros(p, p, dtype=theta.dtype)
    for n in range(x.shape[0]):
        jac = jacrev(f_flat)(theta, x[n])  # (C, P)
        lam = output_curvature_reference(likelihood, f_flat(theta, x[n]).detach(), y[n], kind)
        out += jac.T @ lam @ jac
    return out


def exact_ggn(model: nn.Module, x: Tensor, y: Tensor, likelihood: Likelihood, layers=None) -> Tensor:
    """Dense Generalised Gauss-Newton of the summed loss (see :func:`exact_curvature`)."""
    return exact_curvature(model, x, y, likelihood, "ggn", layers)


def exact_fisher(model: nn.Module, x: Tensor, y: Tensor, likelihood: Likelihood, layers=None) -> Tensor:
    """Dense Fisher of the summed loss (see :func:`exact_curvature`)."""
    return exact_curvature(model, x, y, likelihood, "fisher", layers)


def ggn_vector_product(
    model: nn.Module,
    data: Data,
    likelihood: Likelihood,
    vectors: dict[str, Tensor],
    batch_size: int = 512,
    layers: list[Layer] | None = None,
) -> dict[str, Tensor]:
    """Full-network Gauss-Newton-vector product ``Ḡ v`` of the summed loss (the R-op, thesis §4.4).

    One forward-mode product ``J v``, the output curvature ``Λ (J v)`` via its square root, and one reverse-mode
    product ``Jᵀ(·)`` per batch; no matrix is formed.

    Args:
        vectors: per layer name, a tensor shaped like ``Ŵ`` (out, in+1).
    Returns:
        ``Ḡ v`` in the same layout.
    """
    layers = find_layers(model) if layers is None else layers
    fn = functional_model(model, layers)
    theta = layer_matrices(layers)
    missing = set(theta) - set(vectors)
    if missing:
        raise ValueError(f"Missing vectors for layers {sorted(missing)}.")
    device, dtype = theta[layers[0].name].device, theta[layers[0].name].dtype
    result = {name: torch.zeros_like(t) for name, t in theta.items()}
    tangent = {name: vectors[name].to(device=device, dtype=dtype) for name in theta}
    for x, y in iterate_batches(data, batch_size, device=device, dtype=dtype):
        f, jv = jvp(lambda th, x=x: fn(th, x), (theta,), (tangent,))
        u = likelihood.output_curvature_apply(f.detach(), y, jv)
        _, pull = vjp(lambda th, x=x: fn(th, x), theta)
        (contrib,) = pull(u)
        for name in result:
            result[name] += contrib[name]
    return result
