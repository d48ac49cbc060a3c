"""Writing a network the service trained (or the example) as an ONNX model the importer reads back."""

from __future__ import annotations

import io
import warnings

import torch
from torch import nn


def export_onnx(net: nn.Module, example: torch.Tensor) -> bytes:
    """``torch.onnx.export`` of ``net`` (input ``x``, output ``logits``) with a dynamic batch dimension and the
    weights embedded in the model (no external data)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            buf,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    return buf.getvalue()
