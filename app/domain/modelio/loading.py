"""Entry point for uploaded models: size limits, format detection, import and the dry run."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .errors import ModelImportError
from .onnx_archive import is_onnx_archive, is_zip

#: Default upper bound on an upload and on the total uncompressed size of an archive's members.
DEFAULT_MAX_BYTES = 256 * 2**20
#: Upper bound on the elements of the dry run's largest activation (batch size times per-example size).
MAX_PROBE_ELEMENTS = 2**26

_PICKLE_EXTENSIONS = (".pkl", ".pickle", ".pt", ".pth", ".ckpt")


@dataclass
class ImportedModel:
    """A validated, rebuilt model ready for the curvature core.

    Attributes:
        module: ``nn.Sequential`` of real layers when the graph is a chain, else a ``GraphProgram``;
            eval mode, float32, returning logits (or regression outputs) of shape ``(batch, output_dim)``.
        input_shape: Shape of one example, without the batch dimension.
        output_dim: Number of outputs per example.
        format: ``"onnx"`` or ``"pt2"``.
        output_activation: The final activation stripped from the graph (``"softmax"``,
            ``"log_softmax"``, ``"sigmoid"``) or ``None``.
        sha256: Hex digest of the uploaded bytes.
    """

    module: nn.Module
    input_shape: tuple[int, ...]
    output_dim: int
    format: str
    output_activation: str | None
    sha256: str


def detect_format(data: bytes, filename: str) -> str:
    """Choose the importer from magic bytes, falling back to the file extension.

    Args:
        data: The uploaded bytes.
        filename: The client's file name (only its extension is used).

    Returns:
        ``"onnx"`` (an ONNX model, or a zip archive holding one with its external data) or ``"pt2"``.

    Raises:
        ModelImportError: ``pickle_refused`` for a (non-zip) pickle, ``not_a_pt2`` for a ``.pt2`` name
            that is not a zip archive, ``unknown_format`` otherwise.
    """
    ext = os.path.splitext(filename.lower())[1]
    if data[:1] == b"\x80" and len(data) > 1 and 2 <= data[1] <= 5:
        raise ModelImportError("pickle_refused", "Python pickles are never loaded; export with torch.export or ONNX")
    if is_zip(data):
        return "onnx" if is_onnx_archive(data) else "pt2"
    if ext == ".pt2":
        raise ModelImportError("not_a_pt2", "a .pt2 file must be a torch.export zip archive")
    if ext == ".onnx" or data[:1] == b"\x08":
        return "onnx"
    if ext in _PICKLE_EXTENSIONS:
        raise ModelImportError(
            "pickle_refused", f"{ext} files are pickles and are never loaded; export with torch.export or ONNX"
        )
    raise ModelImportError(
        "unknown_format", "expected an ONNX model (.onnx) or a torch.export archive (.pt2)", {"filename": filename}
    )


def load_model(
    data: bytes,
    filename: str,
    input_shape: tuple[int, ...] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    seed: int = 0,
) -> ImportedModel:
    """Import an uploaded ONNX model or torch.export archive as a torch module of real layers.

    The rebuilt module is checked by a dry run: on a seeded random probe of the input shape it must
    reproduce the original graph (run by ``onnx.reference`` for ONNX, by the graph's own aten operators
    for ``.pt2``), with finite outputs, and the same outputs for an example alone as within a batch.

    Args:
        data: The uploaded bytes: an ONNX model, a zip archive holding one with its external-data files, or a
            torch.export archive.
        filename: The client's file name (its extension helps pick the format).
        input_shape: Per-example input shape; required only when the graph leaves it dynamic.
        max_bytes: Upper bound on the upload and on an archive's total uncompressed size.
        seed: Seed of the dry-run probe.

    Returns:
        The imported model.

    Raises:
        ModelImportError: For anything wrong with the upload (see ``ERROR_CODES``).
    """
    if len(data) > max_bytes:
        raise ModelImportError(
            "too_large",
            f"upload of {len(data)} bytes exceeds the limit of {max_bytes}",
            {"size": len(data), "max_bytes": max_bytes},
        )
    fmt = detect_format(data, filename)
    if input_shape is not None:
        input_shape = tuple(input_shape)
    if fmt == "onnx":
        from .onnx_import import translate_onnx

        translation = translate_onnx(data, input_shape, max_bytes=max_bytes)
    else:
        from .pt2_import import translate_pt2

        translation = translate_pt2(data, input_shape, max_bytes=max_bytes)

    probe_elements = translation.probe_batch * translation.largest_activation
    if probe_elements > MAX_PROBE_ELEMENTS:
        raise ModelImportError(
            "too_large",
            f"a probe batch of {translation.probe_batch} examples of shape {translation.input_shape} is too large "
            "to verify; export with a dynamic or smaller batch size",
            {"probe_elements": probe_elements, "max_elements": MAX_PROBE_ELEMENTS},
        )
    module = translation.module.float().eval()
    for param in module.parameters():
        param.requires_grad_(True)
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn((translation.probe_batch, *translation.input_shape), generator=generator)
    try:
        with torch.no_grad():
            output = module(probe)
    except Exception as exc:  # settings that pass shape checks but fail to run
        raise ModelImportError("unsupported_graph", f"the rebuilt model fails on a probe input: {exc}") from None
    imported = ImportedModel(
        module=module,
        input_shape=translation.input_shape,
        output_dim=int(output.shape[-1]),
        format=fmt,
        output_activation=translation.output_activation,
        sha256=hashlib.sha256(data).hexdigest(),
    )
    verify_reproduces(imported, translation.reference, probe)
    return imported


def apply_output_activation(logits: Tensor, activation: str | None) -> Tensor:
    """Re-apply a stripped final activation to the rebuilt module's output."""
    if activation is None:
        return logits
    if activation == "softmax":
        return torch.softmax(logits, dim=-1)
    if activation == "log_softmax":
        return torch.log_softmax(logits, dim=-1)
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"unknown output activation {activation!r}")


def verify_reproduces(
    imported: ImportedModel,
    reference_fn: Callable[[Tensor], Tensor | np.ndarray],
    probe: Tensor,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> None:
    """Dry run: check that the rebuilt module reproduces a reference on ``probe``.

    The stripped final activation is re-applied before comparing, so ``reference_fn`` is the original
    graph end to end. Also checks that outputs are finite and that the first example alone gives the
    same output as inside the batch.

    Args:
        imported: The imported model.
        reference_fn: Maps a float32 batch to the original model's output.
        probe: A batch of inputs of shape ``(n, *imported.input_shape)``.
        rtol: Relative tolerance.
        atol: Absolute tolerance.

    Raises:
        ModelImportError: ``non_finite_output`` or ``output_mismatch``.
    """
    module = imported.module
    with torch.no_grad():
        logits = module(probe)
        got = apply_output_activation(logits, imported.output_activation).float()
        expected = torch.as_tensor(np.asarray(reference_fn(probe)), dtype=torch.float32)
        for label, value in (("the original model", expected), ("the rebuilt model", got)):
            if not torch.isfinite(value).all():
                raise ModelImportError(
                    "non_finite_output",
                    f"{label} produces NaN or infinite outputs on a random probe",
                    {"probe_shape": list(probe.shape)},
                )
        if got.shape != expected.shape:
            raise ModelImportError(
                "output_mismatch",
                f"rebuilt output shape {tuple(got.shape)} differs from the original {tuple(expected.shape)}",
                {"rebuilt_shape": list(got.shape), "original_shape": list(expected.shape)},
            )
        _compare(got, expected, rtol, atol, "the rebuilt model does not reproduce the original graph")
        if probe.shape[0] > 1:
            single = module(probe[:1])
            _compare(single, logits[:1], rtol, atol, "the rebuilt model's output for one example depends on the batch")


def _compare(got: Tensor, expected: Tensor, rtol: float, atol: float, message: str) -> None:
    if torch.allclose(got, expected, rtol=rtol, atol=atol):
        return
    error = (got - expected).abs()
    worst = int(torch.argmax(error - rtol * expected.abs()))
    raise ModelImportError(
        "output_mismatch",
        message,
        {
            "max_abs_error": float(error.max()),
            "worst_index": _unravel(worst, tuple(got.shape)),
            "rebuilt": float(got.reshape(-1)[worst]),
            "original": float(expected.reshape(-1)[worst]),
            "rtol": rtol,
            "atol": atol,
        },
    )


def _unravel(index: int, shape: Sequence[int]) -> list[int]:
    return [int(i) for i in np.unravel_index(index, shape)]
