"""Reading and checking uploaded ``.npz`` datasets without ever unpickling.

An upload is a zip of ``.npy`` members named ``x``, ``y`` and optionally ``x_val``, ``y_val``; an unlabelled
dataset (an autoencoder's, whose target is its input) holds only ``x`` and optionally ``x_val``. Before numpy
touches it the archive is inspected: member names, declared uncompressed sizes (so a zip bomb is refused
unopened), and each member's ``.npy`` header against the member's size (so no header makes numpy allocate).
Arrays are then read with ``allow_pickle=False`` (object arrays are refused) and converted to the canonical
dtypes: ``x`` float32 and ``y`` int64 (labels) or float32 (targets). The canonical arrays are re-serialised as
an uncompressed ``.npz`` and that is what the store keeps.
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format

from app.domain.errors import InvalidInput, PayloadTooLarge

ALLOWED_MEMBERS = ("x", "y", "x_val", "y_val")


@dataclass(frozen=True)
class Dataset:
    """Canonical arrays of a dataset.

    Attributes:
        x: Inputs, float32 ``(n, *x_shape)``.
        y: Targets, int64 ``(n,)`` labels or float32 ``(n,)`` / ``(n, k)`` values; ``None`` when unlabelled.
        x_val: Optional validation inputs.
        y_val: Optional validation targets.
    """

    x: np.ndarray
    y: np.ndarray | None
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    @property
    def y_kind(self) -> str:
        """``"int"`` for class labels, ``"float"`` for regression targets, ``"none"`` when unlabelled."""
        if self.y is None:
            return "none"
        return "int" if self.y.dtype.kind == "i" else "float"

    @property
    def num_classes(self) -> int | None:
        """``max label + 1`` over all splits for integer targets, else ``None``."""
        if self.y_kind != "int":
            return None
        top = int(self.y.max()) if self.y.size else -1
        if self.y_val is not None and self.y_val.size:
            top = max(top, int(self.y_val.max()))
        return top + 1

    def to_npz(self) -> bytes:
        """Canonical uncompressed ``.npz`` bytes."""
        arrays = {"x": self.x}
        for name in ("y", "x_val", "y_val"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()


def read_npy_header(buf: BinaryIO, code: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from an ``.npy`` stream's header (version 1.0 or 2.0), leaving ``buf`` at
    the array data. Nothing is allocated from what the header declares.

    Raises:
        InvalidInput: (with ``code``) whatever numpy's header parser rejects, however it fails (its tokenizer
            and literal evaluator raise more than ``ValueError`` on hostile bytes), or a negative dimension.
    """
    try:
        version = npy_format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(buf)
        else:
            raise ValueError(f"unsupported .npy version {version[0]}.{version[1]}")
    except Exception as exc:  # noqa: BLE001  (untrusted bytes: any failure of the parser is a bad header)
        raise InvalidInput(f"unreadable .npy header: {type(exc).__name__}: {exc}", code=code) from exc
    if any(d < 0 for d in shape):
        raise InvalidInput(f"the .npy header declares a negative dimension: {list(shape)}", code=code)
    return shape, fortran, dtype


def _check_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """A member's ``.npy`` header, checked against the member's declared size before numpy reads it."""
    try:
        member = archive.open(info)
    except (RuntimeError, NotImplementedError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidInput(f"unreadable member {info.filename!r}: {exc}", code="invalid_npz") from exc
    with member:
        shape, _, dtype = read_npy_header(member, code="invalid_npz")
        if dtype.hasobject:
            raise InvalidInput(
                "the .npz holds object (pickled) arrays; only numeric arrays are accepted", code="pickled_data"
            )
        declared = member.tell() + math.prod(shape) * dtype.itemsize
    if declared != info.file_size:
        raise InvalidInput(
            f"member {info.filename!r} declares shape {list(shape)} of {dtype} ({declared} bytes with its header)"
            f" but holds {info.file_size} bytes",
            code="invalid_npz",
            detail={"member": info.filename, "shape": list(shape), "dtype": str(dtype)},
        )


def _inspect_archive(data: bytes, max_bytes: int) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise InvalidInput(
            "the dataset must be a .npz archive (numpy.savez) holding arrays x, y and optionally x_val, y_val",
            code="invalid_npz",
        ) from exc
    with archive:
        names = []
        total = 0
        for info in archive.infolist():
            stem = info.filename[:-4] if info.filename.endswith(".npy") else None
            if stem not in ALLOWED_MEMBERS:
                raise InvalidInput(
                    f"unexpected member {info.filename!r} in the .npz; allowed: "
                    + ", ".join(f"{m}.npy" for m in ALLOWED_MEMBERS),
                    code="invalid_npz",
                    detail={"member": info.filename},
                )
            names.append(stem)
            total += info.file_size
        if total > max_bytes:
            raise PayloadTooLarge(
                f"the dataset holds {total} bytes uncompressed, over the limit of {max_bytes}",
                detail={"uncompressed_bytes": total, "limit_bytes": max_bytes},
            )
        for info in archive.infolist():
            _check_member(archive, info)
    if "x" not in names:
        raise InvalidInput("the .npz lacks array x", code="invalid_npz")
    if "y" in names and ("x_val" in names) != ("y_val" in names):
        raise InvalidInput("x_val and y_val must be given together", code="invalid_npz")
    if "y" not in names and "y_val" in names:
        raise InvalidInput("y_val without y: an unlabelled dataset holds x and x_val only", code="invalid_npz")


def _as_inputs(name: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind not in "fiu":
        raise InvalidInput(
            f"{name} must hold real numbers, got dtype {arr.dtype}", code="invalid_dtype", detail={name: str(arr.dtype)}
        )
    if arr.ndim < 2:
        raise InvalidInput(f"{name} must have shape (n, ...features), got {list(arr.shape)}", code="invalid_shape")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise InvalidInput(f"{name} holds NaN or infinite values (after conversion to float32)", code="non_finite")
    return out


def _as_targets(name: str, arr: np.ndarray, n: int) -> np.ndarray:
    if arr.dtype.kind in "iu":
        if arr.ndim != 1:
            raise InvalidInput(
                f"integer labels {name} must have shape (n,), got {list(arr.shape)}", code="invalid_shape"
            )
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int64).max):
            raise InvalidInput(f"labels {name} must be non-negative", code="invalid_labels")
        out = arr.astype(np.int64)
    elif arr.dtype.kind == "f":
        if arr.ndim not in (1, 2):
            raise InvalidInput(
                f"targets {name} must have shape (n,) or (n, k), got {list(arr.shape)}", code="invalid_shape"
            )
        out = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(out).all():
            raise InvalidInput(f"{name} holds NaN or infinite values", code="non_finite")
    else:
        raise InvalidInput(
            f"{name} must hold integer labels or float targets, got dtype {arr.dtype}",
            code="invalid_dtype",
            detail={name: str(arr.dtype)},
        )
    if out.shape[0] != n:
        raise InvalidInput(
            f"{name} has {out.shape[0]} rows but its inputs have {n}",
            code="invalid_shape",
            detail={"rows": out.shape[0], "expected": n},
        )
    return out


def parse_npz(data: bytes, max_bytes: int) -> Dataset:
    """Parses and checks an uploaded ``.npz``.

    Args:
        data: The uploaded bytes.
        max_bytes: Limit on the summed uncompressed size of the arrays.

    Returns:
        The canonical :class:`Dataset`.

    Raises:
        InvalidInput: Not an npz, unexpected members, object arrays, wrong dtypes, shapes or non-finite values.
        PayloadTooLarge: The arrays exceed ``max_bytes`` once decompressed.
    """
    _inspect_archive(data, max_bytes)
    raw: dict[str, np.ndarray] = {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for key in npz.files:
                raw[key] = npz[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise InvalidInput(
                "the .npz holds object (pickled) arrays; only numeric arrays are accepted", code="pickled_data"
            ) from exc
        raise InvalidInput(f"unreadable .npz: {exc}", code="invalid_npz") from exc
    except Exception as exc:  # noqa: BLE001  (corrupt members: zlib, CRC, truncated data, ...)
        raise InvalidInput(f"unreadable .npz: {type(exc).__name__}: {exc}", code="invalid_npz") from exc

    x = _as_inputs("x", raw["x"])
    if x.shape[0] == 0:
        raise InvalidInput("the dataset is empty", code="invalid_shape")
    y = _as_targets("y", raw["y"], x.shape[0]) if "y" in raw else None
    x_val = y_val = None
    if "x_val" in raw:
        x_val = _as_inputs("x_val", raw["x_val"])
        if x_val.shape[1:] != x.shape[1:]:
            raise InvalidInput(
                f"x_val rows have shape {list(x_val.shape[1:])}, x rows {list(x.shape[1:])}", code="invalid_shape"
            )
    if y is not None and x_val is not None:
        y_val = _as_targets("y_val", raw["y_val"], x_val.shape[0])
        if y_val.dtype != y.dtype or y_val.shape[1:] != y.shape[1:]:
            raise InvalidInput("y_val must have the dtype kind and row shape of y", code="invalid_shape")
    return Dataset(x=x, y=y, x_val=x_val, y_val=y_val)


def load_canonical(data: bytes) -> Dataset:
    """Loads a dataset the store holds in canonical form (already checked at upload)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    return Dataset(x=arrays["x"], y=arrays.get("y"), x_val=arrays.get("x_val"), y_val=arrays.get("y_val"))
