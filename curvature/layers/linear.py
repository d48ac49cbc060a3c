"""``nn.Linear``: ``h = W a + b`` applied to the last dimension.

Extra dimensions between the batch and the features (sequences, tokens) are treated as ``T`` locations,
with the same convention as convolutions.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import LayerHandler, append_ones


class LinearHandler(LayerHandler):
    module_type = nn.Linear

    def input_rows(self, module: nn.Module, inputs: Tensor) -> Tensor:
        # (n, ..., in) -> (n, T, in[+1])
        rows = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
        return append_ones(rows) if module.bias is not None else rows

    def output_rows(self, module: nn.Module, output_vectors: Tensor) -> Tensor:
        # (K, n, ..., out) -> (K, n, T, out)
        k, n = output_vectors.shape[:2]
        return output_vectors.reshape(k, n, -1, output_vectors.shape[-1])
