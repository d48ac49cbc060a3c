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
    iterate_batches,
    model_device_dtype,
)

ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
)


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
        if isinstance(m, nn.Linear | nn.Flatten) or isinstance(m, ELEMENTWISE):
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
    chain, linears = kfra_chain(model)
    layers = find_layers(model) if layers is None else layers
    wanted = {id(layer.module): layer.name for layer in layers}
    if any(id(m) not in {id(x) for x in linears} for m in (layer.module for layer in layers)):
        raise ValueError("KFRA supports Linear layers only.")

    dev, dtype = model_device_dtype(model)
    device = dev if device is None else torch.device(device)
    n_lin = len(linears)
    a_sum: list[Tensor | None] = [None] * n_lin
    d_sum: list[Tensor | None] = [None] * (n_lin - 1)  # E[φ' φ'ᵀ] between linear l and l+1
    lam_sum: Tensor | None = None
    total = count_examples(data)
    n_seen = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in iterate_batches(data, batch_size, device=device, dtype=dtype):
                h = x
                li = -1
                deriv: Tensor | None = None
                for m in chain:
                    if isinstance(m, nn.Linear):
                        if li >= 0:
                            dd = deriv.T @ deriv if deriv is not None else None
                            if dd is None:
                                dd = torch.full(
                                    (h.shape[1], h.shape[1]),
                                    float(h.shape[0]),
                                    dtype=h.dtype,
                                    device=h.device,
                                )
                            d_sum[li] = dd if d_sum[li] is None else d_sum[li] + dd
                        li += 1
                        if h.dim() != 2:
                            raise ValueError(
                                f"KFRA needs flat (n, features) inputs to Linear layers, got {tuple(h.shape)}."
                            )
                        a_hat = torch.cat([h, torch.ones_like(h[:, :1])], 1) if m.bias is not None else h
                        aa = a_hat.T @ a_hat
                        a_sum[li] = aa if a_sum[li] is None else a_sum[li] + aa
                        h = m(h)
                        deriv = None
                    elif isinstance(m, nn.Flatten):
                        if li >= 0 and h.dim() != 2:
                            raise ValueError("KFRA supports Flatten only before the first Linear layer.")
                        h = m(h)
                    else:
                        if li < 0:
                            h = m(h)
                            continue
                        with torch.enable_grad():
                            hh = h.detach().requires_grad_(True)
                            out = m(hh.clone())  # the copy lets in-place activations run on a non-leaf
                            (d,) = torch.autograd.grad(out.sum(), hh)
                        deriv = d if deriv is None else deriv * d
                        h = out.detach()
                f = h
                lam = likelihood.output_curvature_sum(f, y)
                lam_sum = lam if lam_sum is None else lam_sum + lam
                n_seen += x.shape[0]
                if progress is not None:
                    progress(min(1.0, n_seen / total) if total else math.nan, f"kfra: {n_seen} examples")
    finally:
        model.train(was_training)
    if n_seen == 0:
        raise ValueError("No data: the data iterable yielded no batch.")

    g = lam_sum / n_seen
    gs: list[Tensor] = [g]
    for li in range(n_lin - 2, -1, -1):
        w = linears[li + 1].weight.detach()
        g = (w.T @ g @ w) * (d_sum[li] / n_seen)
        gs.append(g)
    gs.reverse()
    factors = {}
    for li, m in enumerate(linears):
        if id(m) in wanted:
            factors[wanted[id(m)]] = LayerFactors(A=a_sum[li] / n_seen, G=gs[li])
    ordered = {layer.name: factors[layer.name] for layer in layers}
    return KroneckerFactors(ordered, n_data=n_seen, method="kfra")
