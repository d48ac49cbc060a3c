"""Containers for fitted curvature and the data-streaming helpers every estimator shares."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

Progress = Callable[[float, str], None]
Data = tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]


@dataclass
class LayerFactors:
    """Kronecker factors of one layer: the layer's Gauss-Newton block of the summed loss is ``N·(G ⊗ A)``."""

    A: Tensor  # (in+1, in+1), E[â âᵀ]
    G: Tensor  # (out, out), E[g gᵀ]


@dataclass
class KroneckerFactors(Mapping[str, LayerFactors]):
    """Per-layer Kronecker factors, data averages over ``n_data`` points, in forward order."""

    layers: dict[str, LayerFactors]
    n_data: int
    method: str
    extras: dict[str, object] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerFactors:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


@dataclass
class DiagonalFactors(Mapping[str, Tensor]):
    """Per-layer diagonal of the curvature, as data averages shaped like ``Ŵ = [W b]`` (out, in+1)."""

    layers: dict[str, Tensor]
    n_data: int
    method: str

    def __getitem__(self, name: str) -> Tensor:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def iterate_batches(
    data: Data, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(x, y)`` batches from a ``(x, y)`` tuple of tensors or from an iterable of batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
        if y is not None and len(y) != len(x):
            raise ValueError(f"x and y have different lengths ({len(x)} vs {len(y)}).")
        batches: Iterable = (
            (x[i : i + batch_size], None if y is None else y[i : i + batch_size]) for i in range(0, len(x), batch_size)
        )
    else:
        batches = data
    for batch in batches:
        if not isinstance(batch, tuple | list) or len(batch) < 2:
            raise ValueError("Each batch must be an (x, y) pair.")
        xb, yb = batch[0], batch[1]
        if device is not None or dtype is not None:
            xb = xb.to(device=device, dtype=dtype if xb.is_floating_point() else None)
            if yb is not None:
                yb = yb.to(device=device)
        yield xb, yb


def count_examples(data: Data) -> int | None:
    """Number of examples when known in advance (for progress), else ``None``."""
    if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], Tensor):
        return len(data[0])
    dataset = getattr(data, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def gram(x: Tensor, block: int = 256) -> Tensor:
    """``xᵀ x`` computing only the blocks on and above the diagonal (about half the work for wide ``x``)."""
    d = x.shape[1]
    if d <= 2 * block:
        return x.T @ x
    edges = list(range(0, d, block)) + [d]
    out = x.new_empty(d, d)
    for i in range(len(edges) - 1):
        rows = slice(edges[i], edges[i + 1])
        xi = x[:, rows]
        # one product for the diagonal block and everything to its right
        strip = xi.T @ x[:, edges[i] :]
        out[rows, edges[i] :] = strip
        out[edges[i + 1] :, rows] = strip[:, edges[i + 1] - edges[i] :].T
    return out


def merge_factors(parts: Iterable[KroneckerFactors | DiagonalFactors]) -> KroneckerFactors | DiagonalFactors:
    """Factors over the union of disjoint data shards, from each shard's factors.

    Kronecker factors and diagonals are data averages, so the sums ``n_s · F_s`` add across shards:
    ``F = Σ_s n_s F_s / Σ_s n_s`` (``n_s`` = ``n_data`` of shard ``s``). This is exact for KFLR, KFAC, random
    projections and diagonals (up to float round-off in the summation order); KFRA's ``G`` multiplies averages
    in its recursion (thesis eq. 4.7), so KFRA factors do not merge and are refused.

    Args:
        parts: Factors of every shard, all of one kind (Kronecker or diagonal), method and layer set.

    Raises:
        ValueError: No parts, mixed kinds, methods or layers, or KFRA factors.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_factors needs at least one part.")
    first = parts[0]
    if any(type(p) is not type(first) or p.method != first.method or list(p) != list(first) for p in parts):
        raise ValueError("merge_factors needs parts of one kind, method and layer set.")
    if isinstance(first, KroneckerFactors) and first.method == "kfra":
        raise ValueError("KFRA factors do not merge across shards: its G recursion multiplies data averages.")
    n = sum(p.n_data for p in parts)
    if n <= 0:
        raise ValueError("merge_factors needs parts with data.")

    def weighted(get: Callable[[KroneckerFactors | DiagonalFactors], Tensor]) -> Tensor:
        total = sum(get(p) * p.n_data for p in parts)
        return total / n

    if isinstance(first, KroneckerFactors):
        layers = {
            name: LayerFactors(A=weighted(lambda p, k=name: p[k].A), G=weighted(lambda p, k=name: p[k].G))
            for name in first
        }
        return KroneckerFactors(layers, n_data=n, method=first.method)
    return DiagonalFactors({name: weighted(lambda p, k=name: p[k]) for name in first}, n_data=n, method=first.method)
