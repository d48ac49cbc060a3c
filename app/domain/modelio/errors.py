"""The one error type raised for anything wrong with an uploaded model."""

from __future__ import annotations

from typing import Any

#: Machine-readable codes carried by :class:`ModelImportError`, with their meaning.
ERROR_CODES: dict[str, str] = {
    "too_large": "the upload, an archive member or the probe input exceeds a size limit",
    "unknown_format": "neither an ONNX model nor a torch.export archive",
    "invalid_onnx": "the bytes do not decode to a valid ONNX model, or it refers to external data not uploaded",
    "unsafe_archive": "an archive member's name, or an external-data location, is absolute, climbs out with '..', "
    "is a link, or otherwise points outside the upload",
    "not_a_pt2": "a zip archive (or a .pt2 name) without the torch.export archive layout",
    "invalid_pt2": "a torch.export archive whose contents are malformed or not a plain exported program",
    "pickle_refused": "the file, or a payload inside the archive, is a Python pickle",
    "unsupported_op": "the graph uses an operator, or operator settings, outside the supported set",
    "unsupported_graph": "the graph's structure cannot be rebuilt from supported layers",
    "unsupported_layer": "a layer the curvature core cannot fit (a grouped or depthwise convolution)",
    "bad_input_shape": "the input shape is missing, inconsistent with the graph, or malformed",
    "output_mismatch": "the rebuilt module does not reproduce the original graph on a probe input",
    "non_finite_output": "the model produces NaN or infinite outputs on a probe input",
}


class ModelImportError(ValueError):
    """An uploaded model that cannot be imported; the client's fault (HTTP 4xx).

    Attributes:
        code: Machine-readable reason, one of :data:`ERROR_CODES`.
        message: Human-readable explanation.
        detail: JSON-serialisable context (op name, shapes, limits, ...).
    """

    def __init__(self, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown model import error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail: dict[str, Any] = dict(detail or {})

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """The error in the service's JSON error shape (the value of the ``"error"`` key)."""
        return {"code": self.code, "message": self.message, "detail": self.detail}
