"""What the curvature core needs to know about one parameterised layer type.

Conventions shared by every handler (docs/design.md §3):

* A layer's parameters are a weight ``W`` (out × in, convolution kernels flattened) and an optional bias
  ``b``. We work with ``Ŵ = [W b]`` (out × (in+1)), flattened row-major as PyTorch does, so the Kronecker
  block of the layer is ``G ⊗ A`` with ``A`` of size (in+1) and ``G`` of size out.
* A layer is applied at ``T`` locations per example (``T = 1`` for a Linear on flat inputs, the number of
  output pixels for a convolution). ``input_rows`` returns the augmented inputs ``â_t = [a_t; 1]`` as a
  tensor (n, T, in+1) and ``output_rows`` the output-side vectors ``g_t`` as (..., n, T, out).
* KFC convention (Grosse & Martens): ``A = E_n[(1/T) Σ_t â_t â_tᵀ]`` (patch average) and
  ``G = E_n[Σ_t g_t g_tᵀ]`` (spatial sum), so that ``G ⊗ A`` is exact for ``T = 1``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


class LayerHandler(ABC):
    """Shape and index knowledge for one layer type."""

    module_type: type[nn.Module]

    @abstractmethod
    def input_rows(self, module: nn.Module, inputs: Tensor) -> Tensor:
        """Augmented layer inputs â, shaped (n, T, in+1) (the trailing 1 only when the layer has a bias)."""

    @abstractmethod
    def output_rows(self, module: nn.Module, output_vectors: Tensor) -> Tensor:
        """Vectors w.r.t. the layer output, (K, n, *out_shape) → (K, n, T, out)."""

    def weight_matrix(self, module: nn.Module) -> Tensor:
        """``Ŵ = [W b]`` as an (out, in+1) matrix (no bias column when the layer has none)."""
        w = module.weight.reshape(module.weight.shape[0], -1)
        if module.bias is None:
            return w
        return torch.cat([w, module.bias.unsqueeze(1)], dim=1)

    def set_weight_matrix(self, module: nn.Module, matrix: Tensor) -> None:
        """Write an (out, in+1) matrix back into ``weight`` and ``bias`` in place."""
        n_in = module.weight[0].numel()
        with torch.no_grad():
            module.weight.copy_(matrix[:, :n_in].reshape(module.weight.shape))
            if module.bias is not None:
                module.bias.copy_(matrix[:, n_in])

    def split_matrix(self, module: nn.Module, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split (..., out, in+1) into weight-shaped and bias-shaped tensors (leading dims kept)."""
        n_in = module.weight[0].numel()
        lead = matrix.shape[:-2]
        w = matrix[..., :n_in].reshape(*lead, *module.weight.shape)
        b = matrix[..., n_in] if module.bias is not None else None
        return w, b

    def matrix_shape(self, module: nn.Module) -> tuple[int, int]:
        out = module.weight.shape[0]
        n_in = module.weight[0].numel() + (1 if module.bias is not None else 0)
        return out, n_in


def append_ones(rows: Tensor) -> Tensor:
    """Append a constant 1 to the last dimension: ``a → [a; 1]``."""
    ones = torch.ones(*rows.shape[:-1], 1, dtype=rows.dtype, device=rows.device)
    return torch.cat([rows, ones], dim=-1)
