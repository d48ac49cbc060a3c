"""Kronecker Factored Recursive Approximation (thesis §4.3.2, eq. 4.7).

``Ḡ_L = E[Λ]`` and ``Ḡ_l = (W_{l+1}ᵀ Ḡ_{l+1} W_{l+1}) ⊙ E[φ'(h_l) φ'(h_l)ᵀ]``, with every expectation over the
whole data set (so the result does not depend on the batch size). Defined for chains of ``nn.Linear`` layers
with element-wise activations between them; exact for deep linear networks (Lemma 4.1 conditions).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..layers import Layer, find_layers
from ..likelihoods import Likelihood
from .common import (
    Data,
    KroneckerFactors,
    LayerFactors,
    Progress,
    count_examples,
    gram,
    iterate_batches,
    model_device_dtype,
)

#: Modules KFRA propagates through: each output entry depends on its own input entry only. Any other module
#: declaring a true ``elementwise`` attribute is taken as element-wise too.
ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Hardtanh,  # and nn.ReLU6
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Identity,
    nn.Dropout,
)


def is_elementwise(module: nn.Module) -> bool:
    """Whether KFRA can propagate through ``module`` as an element-wise map."""
    return isinstance(module, ELEMENTWISE) or getattr(module, "elementwise", False) is True


def _chain(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Linear):
        return [model]
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"KFRA needs an nn.Sequential chain of Linear layers and element-wise activations, got "
            f"{type(model).__name__}; use method='kflr' or 'kfac' for other architectures."
        )
    chain: list[nn.Module] = []
    for child in model:
        chain.extend(_chain(child) if isinstance(child, nn.Sequential) else [child])
    return chain


def kfra_chain(model: nn.Module) -> tuple[list[nn.Module], list[nn.Linear]]:
    """The modules of a network KFRA can propagate through, and its Linear layers.

    Raises:
        ValueError: The network is not a chain of Linear layers with element-wise activations (and a leading
            Flatten) ending in a Linear layer, or it reuses a Linear layer.
    """
    chain = _chain(model)
    linears = [m for m in chain if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("KFRA found no Linear layer in the chain.")
    for i, m in enumerate(chain):
        if isinstance(m, nn.Linear | nn.Flatten) or is_elementwise(m):
            continue
        raise ValueError(
            f"KFRA cannot propagate through {type(m).__name__} (position {i}); it supports Linear layers, "
            f"element-wise activations and a leading Flatten."
        )
    if not isinstance(chain[-1], nn.Linear):
        raise ValueError("KFRA needs the network to end with a Linear layer (the likelihood's input).")
    if len({id(m) for m in linears}) != len(linears):
        raise ValueError("KFRA does not support a Linear layer used more than once in the chain (shared weights).")
    return chain, linears


def _walk(chain: list[nn.Module], x: Tensor) -> tuple[list[Tensor], list[Tensor | None], Tensor]:
    """One forward pass through a KFRA chain.

    Returns:
        The homogeneous input ``â`` (n, in[+1]) of every Linear layer, the element-wise derivative
        ``φ'(h_l)`` (n, d_l) between Linear ``l`` and ``l+1`` (``None`` where nothing but the identity lies between
        them) and the network output.
    """
    a_hats: list[Tensor] = []
    derivs: list[Tensor | None] = []
    h = x
    deriv: Tensor | None = None
    for m in chain:
        if isinstance(m, nn.Linear):
            if a_hats:
                derivs.append(deriv)
            if h.dim() != 2:
                raise ValueError(f"KFRA needs flat (n, features) inputs to Linear layers, got {tuple(h.shape)}.")
            a_hats.append(torch.cat([h, torch.ones_like(h[:, :1])], 1) if m.bias is not None else h)
            h = m(h)
            deriv = None
        elif isinstance(m, nn.Flatten):
            if a_hats and h.dim() != 2:
                raise ValueError("KFRA supports Flatten only before the first Linear layer.")
            h = m(h)
        elif not a_hats:
            h = m(h)
        else:
            with torch.enable_grad():
                hh = h.detach().requires_grad_(True)
                out = m(hh.clone())  # the copy lets in-place activations run on a non-leaf
                (d,) = torch.autograd.grad(out.sum(), hh)
            deriv = d if deriv is None else deriv * d
            h = out.detach()
    return a_hats, derivs, h


def _chain_sweep(
    model: nn.Module,
    data: Data,
    batch_size: int,
    device,
    progress: Progress | None,
    label: str,
    layers: list[Layer] | None,
    consume,
) -> tuple[list[nn.Linear], list[Tensor], dict[int, str], list[Layer], int]:
    """Stream the data through a KFRA chain, handing each batch's ``(linears, derivs, f, y)`` to ``consume``.

    Returns the chain's Linear layers, ``Σ_n â âᵀ`` per Linear layer, the wanted layers' names by module id, the
    layers and the number of examples.
    """
    chain, linears = kfra_chain(model)
    layers = find_layers(model) if layers is None else layers
    wanted = {id(layer.module): layer.name for layer in layers}
    if any(id(m) not in {id(x) for x in linears} for m in (layer.module for layer in layers)):
        raise ValueError(f"{label.upper()} on a chain supports Linear layers only.")
    dev, dtype = model_device_dtype(model)
    device = dev if device is None else torch.device(device)
    a_sum: list[Tensor | None] = [None] * len(linears)
    total = count_examples(data)
    n_seen = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in iterate_batches(data, batch_size, device=device, dtype=dtype):
                a_hats, derivs, f = _walk(chain, x)
                for li, a_hat in enumerate(a_hats):
                    aa = gram(a_hat)
                    a_sum[li] = aa if a_sum[li] is None else a_sum[li] + aa
                consume(linears, derivs, f, y)
                n_seen += x.shape[0]
                if progress is not None:
                    progress(min(1.0, n_seen / total) if total else math.nan, f"{label}: {n_seen} examples")
    finally:
        model.train(was_training)
    if n_seen == 0:
        raise ValueError("No data: the data iterable yielded no batch.")
    return linears, a_sum, wanted, layers, n_seen


def _factors(linears, a_sum, gs, wanted, layers, n_seen: int, method: str) -> KroneckerFactors:
    factors = {}
    for li, m in enumerate(linears):
        if id(m) in wanted:
            factors[wanted[id(m)]] = LayerFactors(A=a_sum[li] / n_seen, G=gs[li])
    ordered = {layer.name: factors[layer.name] for layer in layers}
    return KroneckerFactors(ordered, n_data=n_seen, method=method)


def fit_kfra(
    model: nn.Module,
    data: Data,
    likelihood: Likelihood,
    batch_size: int = 512,
    device=None,
    progress: Progress | None = None,
    layers: list[Layer] | None = None,
) -> KroneckerFactors:
    """KFRA factors for every trainable Linear layer of a sequential chain."""
    d_sum: list[Tensor | None] = []  # E[φ' φ'ᵀ] between linear l and l+1
    lam: list[Tensor] = []

    def consume(linears, derivs, f, y) -> None:
        if not d_sum:
            d_sum.extend([None] * len(derivs))
        n = f.shape[0]
        for li, deriv in enumerate(derivs):
            if deriv is None:
                d = linears[li].out_features
                dd = torch.full((d, d), float(n), dtype=f.dtype, device=f.device)
            else:
                dd = gram(deriv)
            d_sum[li] = dd if d_sum[li] is None else d_sum[li] + dd
        s = likelihood.output_curvature_sum(f, y)
        lam[:] = [s if not lam else lam[0] + s]

    linears, a_sum, wanted, layers, n_seen = _chain_sweep(
        model, data, batch_size, device, progress, "kfra", layers, consume
    )
    g = lam[0] / n_seen
    gs: list[Tensor] = [g]
    for li in range(len(linears) - 2, -1, -1):
        w = linears[li + 1].weight.detach()
        g = (w.T @ g @ w) * (d_sum[li] / n_seen)
        gs.append(g)
    gs.reverse()
    return _factors(linears, a_sum, gs, wanted, layers, n_seen, "kfra")


#: Elements of per-example state held at once by the KFLR chain recursion (rows are processed in chunks).
_CHAIN_ELEMENTS = 1 << 24


def fit_kflr_chain(
    model: nn.Module,
    data: Data,
    likelihood: Likelihood,
    batch_size: int = 512,
    device=None,
    progress: Progress | None = None,
    layers: list[Layer] | None = None,
) -> KroneckerFactors:
    """Exact KFLR factors (thesis §4.3.1) of a KFRA chain by the per-example recursion, without backward passes.

    ``G_{L,n} = Λ_n`` and ``G_{l,n} = D_{l,n} W_{l+1}ᵀ G_{l+1,n} W_{l+1} D_{l,n}`` with ``D = diag φ'(h_l)``;
    ``G_l = E_n[G_{l,n}]``. This is KFRA's recursion (eq. 4.7) without averaging inside it, so the factors equal
    the backward engine's KFLR. Each example carries a square root ``U`` (``G = U Uᵀ``) while it has fewer
    columns than the layer has units, and the matrix ``G_{l,n}`` itself after that: the cost per example is
    bounded by the layer widths, not by the number of outputs, and a diagonal ``Λ`` (Bernoulli, Gaussian) is a
    row scaling.
    """
    g_sum: list[Tensor | None] = []

    def add(li: int, g: Tensor) -> None:
        g_sum[li] = g if g_sum[li] is None else g_sum[li] + g

    def consume(linears, derivs, f, y) -> None:
        if not g_sum:
            g_sum.extend([None] * len(linears))
        add(len(linears) - 1, likelihood.output_curvature_sum(f, y))
        if len(linears) == 1:
            return
        diag = likelihood.hessian_sqrt_diagonal(f, y)
        sqrt = likelihood.hessian_sqrt(f, y) if diag is None else None
        k = f.shape[-1] if diag is not None else sqrt.shape[-1]
        # elements per example: a K × d_l square root while K ≤ d_l, a d_l × d_l matrix after that
        per_example, rows, matrix = 1, k, False
        for m in reversed(linears[:-1]):
            d_l = m.out_features
            per_example = max(per_example, rows * d_l)  # the product with W_{l+1}
            matrix = matrix or rows > d_l
            rows = d_l if matrix else rows
            per_example = max(per_example, rows * d_l)
        chunk = max(1, _CHAIN_ELEMENTS // per_example)
        for lo in range(0, f.shape[0], chunk):
            hi = lo + chunk
            # v = Uᵀ (n, K, d): every product below is a batch of rows times a weight matrix
            v: Tensor | None = None
            g: Tensor | None = None
            for li in range(len(linears) - 2, -1, -1):
                w = linears[li + 1].weight.detach()  # (d_{l+1}, d_l)
                if g is not None:
                    g = (g @ w).transpose(1, 2) @ w  # Wᵀ G W (G symmetric)
                elif v is not None:
                    v = v @ w
                elif diag is not None:
                    v = diag[lo:hi, :, None] * w  # (n, C, d_l): rows of W scaled by √Λ
                else:
                    v = sqrt[lo:hi].transpose(1, 2) @ w
                d = derivs[li]
                if d is not None:
                    d = d[lo:hi]
                    if g is not None:
                        g = d[:, :, None] * g * d[:, None, :]
                    else:
                        v = v * d[:, None, :]
                if g is None and v.shape[1] > v.shape[2]:
                    g = v.transpose(1, 2) @ v
                    v = None
                if g is not None:
                    add(li, g.sum(0))
                else:
                    add(li, gram(v.reshape(-1, v.shape[-1])))

    linears, a_sum, wanted, layers, n_seen = _chain_sweep(
        model, data, batch_size, device, progress, "kflr", layers, consume
    )
    gs = [g / n_seen for g in g_sum]
    return _factors(linears, a_sum, gs, wanted, layers, n_seen, "kflr")
