"""``nn.Conv2d`` with the KFC convention (Grosse & Martens, 2016).

The input factor uses unfolded patches: for every output location ``t`` the patch ``a_t`` (in = C_in/groups ·
kh · kw values, ordered like ``weight.reshape(out, -1)``) is augmented to ``[a_t; 1]``; the output factor uses the
output-gradient vector ``g_t`` (out channels) at that location. ``A = E_n[(1/T) Σ_t â_t â_tᵀ]``,
``G = E_n[Σ_t g_t g_tᵀ]``. Grouped convolutions are refused: their block is not a single Kronecker product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerHandler, append_ones


class Conv2dHandler(LayerHandler):
    module_type = nn.Conv2d

    @staticmethod
    def check(module: nn.Conv2d) -> None:
        if module.groups != 1:
            raise ValueError(f"Conv2d with groups={module.groups} is not supported (only groups=1).")
        if module.padding_mode != "zeros":
            raise ValueError(f"Conv2d with padding_mode={module.padding_mode!r} is not supported (only 'zeros').")
        if isinstance(module.padding, str):
            raise ValueError("Conv2d with string padding is not supported; use explicit integer padding.")

    def input_rows(self, module: nn.Module, inputs: Tensor) -> Tensor:
        self.check(module)
        # (n, C, H, W) -> patches (n, C*kh*kw, T) -> (n, T, C*kh*kw[+1])
        patches = F.unfold(
            inputs, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
        ).transpose(1, 2)
        return append_ones(patches) if module.bias is not None else patches

    def output_rows(self, module: nn.Module, output_vectors: Tensor) -> Tensor:
        # (K, n, out, Ho, Wo) -> (K, n, T, out)
        k, n, out = output_vectors.shape[:3]
        return output_vectors.reshape(k, n, out, -1).transpose(2, 3)


def unfold_reference(module: nn.Conv2d, inputs: Tensor) -> Tensor:
    """Patches by explicit loops over output locations (slow; for tests and documentation)."""
    kh, kw = module.kernel_size
    sh, sw = module.stride
    ph, pw = module.padding
    dh, dw = module.dilation
    x = F.pad(inputs, (pw, pw, ph, ph))
    n, c, h, w = x.shape
    ho = (h - dh * (kh - 1) - 1) // sh + 1
    wo = (w - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(ho):
        for j in range(wo):
            patch = x[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
            rows.append(patch.reshape(n, -1))
    return torch.stack(rows, dim=1)
