"""One backward engine for KFAC, KFLR, random projections and the diagonal estimators.

Every estimator here follows the same pattern (thesis §4.3): a forward pass records each layer's input
``â``; the likelihood supplies ``K`` vectors per example in output space (columns of ``Λ``'s square root for
KFLR, sampled-target gradients for KFAC, random projections of the square root); one batched backward pass
carries them to every layer's output (``c_l = ∂h_L/∂h_lᵀ c_L``, eq. 4.6) without computing any parameter
gradient. Factors are then formed with one matrix product per layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..layers import Layer, find_layers
from ..likelihoods import Likelihood
from .common import (
    Data,
    DiagonalFactors,
    KroneckerFactors,
    LayerFactors,
    Progress,
    count_examples,
    gram,
    iterate_batches,
    model_device_dtype,
)

OutputVectors = Callable[[Tensor, Tensor | None], Tensor]  # (f, y) -> (n, C, K)


@contextmanager
def record_layers(layers: list[Layer]):
    """Record each layer's input and output (the output kept in the autograd graph) during a forward pass.

    The rest of the network receives a copy of the output, so that in-place operations downstream (e.g.
    ``nn.ReLU(inplace=True)``) cannot overwrite the recorded pre-activation. A layer called more than once in
    one forward pass (shared weights) is refused: its curvature is not that of a single application.
    """
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    handles = []
    for layer in layers:

        def hook(module, args, output, name=layer.name):
            if name in outputs:
                raise ValueError(
                    f"Layer {name!r} is called more than once in a forward pass; shared layers are not supported."
                )
            inputs[name] = args[0].detach()
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            outputs[name] = output
            return output.clone()

        handles.append(layer.module.register_forward_hook(hook))
    try:
        yield inputs, outputs
    finally:
        for h in handles:
            h.remove()


def backprop_vectors(f: Tensor, outputs: list[Tensor], vectors: Tensor) -> list[Tensor]:
    """Pull output-space vectors back to the given intermediate outputs.

    Args:
        f: network output (n, C).
        outputs: intermediate tensors in ``f``'s graph.
        vectors: (n, C, K).
    Returns:
        For each intermediate, (K, n, *shape): ``(∂f/∂h)ᵀ v_k`` per example.
    """
    k = vectors.shape[-1]
    gv = vectors.permute(2, 0, 1).reshape(k, *f.shape)
    if k == 1:
        grads = torch.autograd.grad(f, outputs, gv[0], allow_unused=True)
        grads = [None if g is None else g.unsqueeze(0) for g in grads]
    else:
        grads = torch.autograd.grad(f, outputs, gv, is_grads_batched=True, allow_unused=True)
    result = []
    for g, o in zip(grads, outputs, strict=True):
        result.append(torch.zeros(k, *o.shape, dtype=o.dtype, device=o.device) if g is None else g)
    return result


def _output_vectors(
    likelihood: Likelihood, method: str, mc_samples: int, generator: torch.Generator | None
) -> OutputVectors:
    if method == "kfac":
        return lambda f, y: likelihood.sampled_gradients(f, mc_samples, generator)
    if method == "kflr":
        return lambda f, y: likelihood.hessian_sqrt(f, y)
    if method == "rp":
        return lambda f, y: likelihood.random_projection(f, y, mc_samples, generator)
    raise ValueError(f"Unknown backward-engine method {method!r}.")


def output_layer_name(f: Tensor, outputs: dict[str, Tensor]) -> str | None:
    """The recorded layer whose output is the network output ``f`` itself (``f`` is the hook's copy), if any.

    Its Jacobian ``∂f/∂h`` is the identity, so its ``G`` needs no backward pass: it is ``E[Λ]`` directly.
    """
    fn = f.grad_fn
    if fn is None or fn.name() != "CloneBackward0" or not fn.next_functions:
        return None
    source = fn.next_functions[0][0]
    for name, out in outputs.items():
        if out.grad_fn is not None and out.grad_fn is source and out.shape == f.shape:
            return name
    return None


def _sweep(
    model: nn.Module,
    layers: list[Layer],
    data: Data,
    output_vectors: OutputVectors,
    batch_size: int,
    device,
    progress: Progress | None,
    label: str,
    consume,
    batch_context: dict | None = None,
) -> int:
    """Run forward + batched backward over the data, handing each batch's rows to ``consume``.

    ``batch_context``, when given, receives the batch's detached output ``f``, targets ``y`` and the name of the
    layer whose output is ``f`` (``output_layer``) before ``consume`` is called.
    """
    dev, dtype = model_device_dtype(model)
    device = dev if device is None else torch.device(device)
    total = count_examples(data)
    n_seen = 0
    was_training = model.training
    model.eval()
    try:
        for x, y in iterate_batches(data, batch_size, device=device, dtype=dtype):
            with torch.enable_grad(), record_layers(layers) as (inputs, outputs):
                f = model(x)
                if f.dim() == 1:
                    f = f.unsqueeze(-1)
                vectors = output_vectors(f.detach(), y)
                if batch_context is not None:
                    batch_context.update(f=f.detach(), y=y, output_layer=output_layer_name(f, outputs))
                pulled = backprop_vectors(f, [outputs[layer.name] for layer in layers], vectors)
            for layer, g in zip(layers, pulled, strict=True):
                a_rows = layer.handler.input_rows(layer.module, inputs[layer.name])  # (n, T, in+1)
                g_rows = layer.handler.output_rows(layer.module, g.detach())  # (K, n, T, out)
                consume(layer, a_rows, g_rows)
            n_seen += x.shape[0]
            if progress is not None:
                progress(min(1.0, n_seen / total) if total else math.nan, f"{label}: {n_seen} examples")
    finally:
        model.train(was_training)
    if n_seen == 0:
        raise ValueError("No data: the data iterable yielded no batch.")
    return n_seen


def fit_kronecker_backward(
    model: nn.Module,
    data: Data,
    likelihood: Likelihood,
    method: str = "kfac",
    mc_samples: int = 1,
    batch_size: int = 512,
    device=None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    layers: list[Layer] | None = None,
) -> KroneckerFactors:
    """KFAC, KFLR or random-projection Kronecker factors (thesis §4.3.1, §4.3.3, §4.3.4).

    ``A = E_n[(1/T) Σ_t â_t â_tᵀ]`` and ``G = E_n[Σ_k Σ_t g_tk g_tkᵀ]`` where ``g_·k`` are the output-space
    vectors pulled back to the layer output.
    """
    if method in ("kfac", "rp") and mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}.")
    layers = find_layers(model) if layers is None else layers
    a_sum: dict[str, Tensor] = {}
    g_sum: dict[str, Tensor] = {}
    context: dict = {}

    def consume(layer: Layer, a_rows: Tensor, g_rows: Tensor) -> None:
        t = a_rows.shape[1]
        a2 = a_rows.reshape(-1, a_rows.shape[-1])
        a = gram(a2)
        if t != 1:
            a = a / t
        if method == "kflr" and t == 1 and layer.name == context.get("output_layer"):
            # the output layer's vectors are the square roots themselves: Σ_k s_k s_kᵀ = Λ in closed form
            g = likelihood.output_curvature_sum(context["f"], context["y"])
        else:
            g = gram(g_rows.reshape(-1, g_rows.shape[-1]))
        if layer.name in a_sum:
            a_sum[layer.name] += a
            g_sum[layer.name] += g
        else:
            a_sum[layer.name], g_sum[layer.name] = a, g

    vectors = _output_vectors(likelihood, method, mc_samples, generator)
    n = _sweep(model, layers, data, vectors, batch_size, device, progress, method, consume, context)
    factors = {layer.name: LayerFactors(A=a_sum[layer.name] / n, G=g_sum[layer.name] / n) for layer in layers}
    return KroneckerFactors(factors, n_data=n, method=method)


def fit_diagonal(
    model: nn.Module,
    data: Data,
    likelihood: Likelihood,
    method: str = "ggn",
    mc_samples: int = 1,
    batch_size: int = 512,
    device=None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    exclude=(),
    include=None,
) -> DiagonalFactors:
    """Diagonal of the Gauss-Newton (``method="ggn"``, exact) or Monte-Carlo Fisher (``"fisher"``, eq. 5.10).

    Per example the curvature of ``Ŵ`` is ``Σ_k vec(Σ_t g_tk â_tᵀ) vec(·)ᵀ``; its diagonal is the sum of squared
    per-example, per-vector gradients. For ``T = 1`` this is ``(Σ_k g_k²) ⊗ â²`` (one matrix product).
    """
    vec_method = {"ggn": "kflr", "fisher": "kfac"}.get(method)
    if vec_method is None:
        raise ValueError(f"Unknown diagonal method {method!r}; choose 'ggn' or 'fisher'.")
    layers = find_layers(model, exclude=exclude, include=include)
    sums: dict[str, Tensor] = {}

    def consume(layer: Layer, a_rows: Tensor, g_rows: Tensor) -> None:
        if a_rows.shape[1] == 1:
            d = (g_rows[:, :, 0] ** 2).sum(0).T @ (a_rows[:, 0] ** 2)
        else:
            # k vector, n example, t location, o out, i in
            per_example = torch.einsum("knto,nti->knoi", g_rows, a_rows)
            d = (per_example**2).sum((0, 1))
        sums[layer.name] = sums[layer.name] + d if layer.name in sums else d

    vectors = _output_vectors(likelihood, vec_method, mc_samples, generator)
    n = _sweep(model, layers, data, vectors, batch_size, device, progress, f"diag-{method}", consume)
    return DiagonalFactors({name: s / n for name, s in sums.items()}, n_data=n, method=method)
