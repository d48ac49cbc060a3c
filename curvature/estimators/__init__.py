"""Curvature estimators: KFAC, KFLR, KFRA, random projections, diagonals and exact references."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..layers import find_layers
from ..likelihoods import Likelihood
from ..options import Curvature
from .backward import backprop_vectors, fit_diagonal, fit_kronecker_backward, record_layers
from .common import Data, DiagonalFactors, KroneckerFactors, LayerFactors, Progress, iterate_batches, merge_factors
from .exact import (
    block_slices,
    exact_curvature,
    exact_fisher,
    exact_ggn,
    flatten_matrices,
    functional_model,
    ggn_vector_product,
    layer_matrices,
    unflatten_vector,
)
from .kfra import fit_kflr_chain, fit_kfra, kfra_chain

KRONECKER_METHODS = ("kfac", "kflr", "kfra", "rp")


def supported_curvatures(model: nn.Module) -> tuple[Curvature, ...]:
    """The curvatures the estimators can fit on ``model``.

    KFAC, KFLR, random projections and the diagonal work on every network whose layers are registered; KFRA
    only on chains of Linear layers with element-wise activations (:func:`kfra_chain`).
    """
    find_layers(model)
    try:
        kfra_chain(model)
    except ValueError:
        return tuple(c for c in Curvature if c != Curvature.kfra)
    return tuple(Curvature)


def _is_linear_chain(model: nn.Module, layers) -> bool:
    """Whether KFLR can take the backward-free chain recursion: a KFRA chain whose wanted layers are all Linear."""
    try:
        _, linears = kfra_chain(model)
    except ValueError:
        return False
    ids = {id(m) for m in linears}
    return all(id(layer.module) in ids for layer in layers)


def fit_kronecker(
    model: nn.Module,
    data: Data,
    likelihood: Likelihood,
    method: str = "kfac",
    mc_samples: int = 1,
    batch_size: int = 512,
    device=None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    exclude: Iterable[str] = (),
    include: Iterable[str] | None = None,
) -> KroneckerFactors:
    """Kronecker factors ``A``, ``G`` of every trainable Linear / Conv2d layer, averaged over the data.

    Args:
        model: the network; its output is the likelihood's input.
        data: ``(x, y)`` tensors or an iterable of ``(x, y)`` batches.
        likelihood: e.g. :class:`~curvature.CrossEntropy`.
        method: ``"kfac"`` (sampled Fisher, eq. 4.9), ``"kflr"`` (exact low rank, §4.3.1), ``"kfra"``
            (recursive, eq. 4.7) or ``"rp"`` (random projections, eq. 4.11).
        mc_samples: samples per example for ``kfac`` and ``rp``.
        batch_size: examples per forward/backward pass when ``data`` is given as tensors.
        device: where to compute (default: the model's device).
        generator: random generator for ``kfac`` / ``rp``.
        progress: ``callable(fraction, message)`` called after each batch.
        exclude / include: layer names to leave out / to keep.
    """
    layers = find_layers(model, exclude=exclude, include=include)
    if method == "kfra":
        return fit_kfra(model, data, likelihood, batch_size=batch_size, device=device, progress=progress, layers=layers)
    if method not in KRONECKER_METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {KRONECKER_METHODS}.")
    if method == "kflr" and _is_linear_chain(model, layers):
        return fit_kflr_chain(
            model, data, likelihood, batch_size=batch_size, device=device, progress=progress, layers=layers
        )
    return fit_kronecker_backward(
        model, data, likelihood, method, mc_samples, batch_size, device, generator, progress, layers
    )


__all__ = [
    "KRONECKER_METHODS",
    "DiagonalFactors",
    "KroneckerFactors",
    "LayerFactors",
    "backprop_vectors",
    "block_slices",
    "exact_curvature",
    "exact_fisher",
    "exact_ggn",
    "fit_diagonal",
    "fit_kflr_chain",
    "fit_kfra",
    "fit_kronecker_backward",
    "fit_kronecker",
    "flatten_matrices",
    "functional_model",
    "ggn_vector_product",
    "iterate_batches",
    "layer_matrices",
    "merge_factors",
    "record_layers",
    "unflatten_vector",
]
