"""Reading a ``torch.export.save`` archive (``.pt2``) without unpickling or evaluating anything.

Safety note: ``torch.export.load`` is not used, because in torch 2.13 it is unsafe for untrusted files
(read in ``torch/export/pt2_archive/_package.py`` and ``torch/_export/serde/serialize.py``):

- weights and tensor constants saved with ``use_pickle`` are read with ``torch.load(weights_only=False)``;
- custom-class constants go through ``torch._C._pickle_load_obj`` and opaque constants through
  ``pickle.loads``;
- the sample inputs (``data/sample_inputs/*.pt``) are a pickle, loaded with ``weights_only=True`` but with a
  fallback to ``weights_only=False`` when that fails;
- symbolic shape expressions (``expr_str`` of dynamic dimensions) are parsed with ``sympy.sympify``,
  which evaluates the string with ``eval`` (checked: an archive whose ``expr_str`` reaches
  ``__import__`` through ``sympify.__globals__`` runs that code inside ``torch.export.load``);
- ``data/aotinductor/`` members are loaded as compiled shared libraries.

So this module opens the zip with :mod:`zipfile`, parses the JSON members with :func:`json.loads`, and
builds weights from the raw little-endian tensor payloads described by the JSON configs (dtype, sizes,
strides, offset; bounds-checked). Pickled payloads, custom or opaque objects, legacy ``.pt`` weight files
and compiled artefacts are refused; the sample inputs are never read; symbolic expressions are never
evaluated (a symbolic leading dimension is treated as the batch size).
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import ModelImportError

#: ``torch._export.serde.schema.ScalarType`` codes accepted for weights and constants.
SCALAR_TYPES: dict[int, torch.dtype] = {
    1: torch.uint8,
    2: torch.int8,
    3: torch.int16,
    4: torch.int32,
    5: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    12: torch.bool,
    13: torch.bfloat16,
}
_MAX_MEMBERS = 100_000
_PAYLOAD_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_COMPILED_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")


@dataclass
class Pt2Archive:
    """The parts of a ``.pt2`` archive the importer uses.

    Attributes:
        program: The exported program, as parsed JSON (``models/<name>.json``).
        weights: Parameters and persistent buffers by fully qualified name.
        constants: Tensor constants and non-persistent buffers by fully qualified name.
    """

    program: dict[str, Any]
    weights: dict[str, Tensor]
    constants: dict[str, Tensor]


def invalid(message: str, **detail: Any) -> ModelImportError:
    """A ``ModelImportError("invalid_pt2")``."""
    return ModelImportError("invalid_pt2", message, detail)


def read_pt2(data: bytes, *, max_bytes: int) -> Pt2Archive:
    """Open a ``.pt2`` archive safely.

    Args:
        data: The archive bytes.
        max_bytes: Upper bound on the total uncompressed size of its members.

    Returns:
        The parsed program and its tensors.

    Raises:
        ModelImportError: ``not_a_pt2``, ``pickle_refused``, ``invalid_pt2`` or ``too_large``.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except Exception as exc:  # zipfile raises several types on corrupt input
        raise ModelImportError("not_a_pt2", f"not a readable zip archive: {exc}") from None
    if len(infos) > _MAX_MEMBERS:
        raise invalid(f"archive has {len(infos)} members", members=len(infos))
    total = sum(i.file_size for i in infos)
    if total > max_bytes:
        raise ModelImportError(
            "too_large",
            f"archive unpacks to {total} bytes, over the limit of {max_bytes}",
            {"size": total, "max_bytes": max_bytes},
        )
    members = _members_by_path(infos)
    if "archive_format" not in members:
        if any(path == "data.pkl" or path.endswith(".pkl") for path in members):
            raise ModelImportError(
                "pickle_refused",
                "this is a torch.save checkpoint (a pickle); export the model with torch.export.save instead",
            )
        raise ModelImportError("not_a_pt2", "zip archive without the torch.export layout (no archive_format)")
    reader = _Reader(archive, members)
    if reader.read("archive_format").strip() != b"pt2":
        raise ModelImportError("not_a_pt2", "archive_format is not 'pt2'")
    if "archive_version" in members and reader.read("archive_version").strip() not in (b"0", b""):
        raise invalid("unsupported .pt2 archive version")
    if "byteorder" in members and reader.read("byteorder").strip() != b"little":
        raise invalid("only little-endian archives are supported")
    compiled = sorted(p for p in members if p.startswith(_COMPILED_DIRS))
    if compiled:
        raise invalid("compiled artefacts (AOTInductor and similar) are not accepted", members=compiled[:5])

    models = sorted(p for p in members if re.fullmatch(r"models/[^/]+\.json", p))
    if len(models) != 1:
        raise invalid(f"expected exactly one exported program, found {len(models)}", models=models)
    name = models[0][len("models/") : -len(".json")]
    for legacy in (f"data/weights/{name}.pt", f"data/constants/{name}.pt"):
        if legacy in members:
            raise ModelImportError("pickle_refused", f"{legacy} is a pickle (legacy format); re-export the model")
    program = reader.json(models[0])
    if not isinstance(program, dict):
        raise invalid("the exported program is not a JSON object")
    weights = _payloads(reader, f"data/weights/{name}_weights_config.json", "data/weights/", constants=False)
    constants = _payloads(reader, f"data/constants/{name}_constants_config.json", "data/constants/", constants=True)
    return Pt2Archive(program=program, weights=weights, constants=constants)


def _members_by_path(infos: list[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
    """Members keyed by their path below the archive's single top-level folder."""
    roots = {i.filename.split("/", 1)[0] for i in infos}
    if len(roots) != 1 or any("/" not in i.filename for i in infos):
        return {i.filename: i for i in infos}
    return {i.filename.split("/", 1)[1]: i for i in infos if not i.is_dir()}


class _Reader:
    def __init__(self, archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo]) -> None:
        self.archive = archive
        self.members = members

    def read(self, path: str) -> bytes:
        info = self.members.get(path)
        if info is None:
            raise invalid(f"archive member {path!r} is missing", member=path)
        try:
            return self.archive.read(info)
        except Exception as exc:
            raise invalid(f"archive member {path!r} cannot be read: {exc}", member=path) from None

    def json(self, path: str) -> Any:
        try:
            return json.loads(self.read(path).decode("utf-8"))
        except ModelImportError:
            raise
        except Exception as exc:  # bad UTF-8, bad JSON, excessive nesting
            raise invalid(f"archive member {path!r} is not valid JSON: {exc}", member=path) from None


def _payloads(reader: _Reader, config_path: str, folder: str, *, constants: bool) -> dict[str, Tensor]:
    if config_path not in reader.members:
        return {}
    config = reader.json(config_path)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise invalid(f"{config_path} has no 'config' mapping")
    tensors: dict[str, Tensor] = {}
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise invalid(f"{config_path}: malformed entry for {fqn!r}")
        path_name = meta["path_name"]
        if meta.get("use_pickle"):
            raise ModelImportError(
                "pickle_refused", f"{fqn!r} is stored as a pickle; re-export without pickled tensors", {"fqn": fqn}
            )
        if constants and not path_name.startswith("tensor_"):
            raise ModelImportError(
                "pickle_refused",
                f"constant {fqn!r} is a serialised Python or script object, which is never loaded",
                {"fqn": fqn},
            )
        if not _PAYLOAD_NAME.match(path_name):
            raise invalid(f"{config_path}: bad payload name {path_name!r}")
        tensors[fqn] = tensor_from_payload(reader.read(folder + path_name), meta.get("tensor_meta"), fqn)
    return tensors


def sym_int(value: Any) -> int | None:
    """A serialised ``SymInt``: its integer, or ``None`` for a symbolic expression (never evaluated)."""
    if isinstance(value, dict) and len(value) == 1:
        if "as_int" in value and isinstance(value["as_int"], int) and not isinstance(value["as_int"], bool):
            return value["as_int"]
        if "as_expr" in value:
            return None
    raise invalid(f"malformed symbolic integer {str(value)[:80]!r}")


def tensor_from_payload(raw: bytes, meta: Any, fqn: str) -> Tensor:
    """Build a tensor from its raw bytes and serialised ``TensorMeta`` (bounds-checked, copied).

    Args:
        raw: The payload bytes (a flat storage).
        meta: The ``tensor_meta`` JSON object (dtype, sizes, strides, storage_offset).
        fqn: Name for error messages.

    Returns:
        A new contiguous CPU tensor.
    """
    if not isinstance(meta, dict):
        raise invalid(f"{fqn!r} has no tensor_meta")
    dtype = SCALAR_TYPES.get(meta.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise invalid(f"{fqn!r} has unsupported dtype code {meta.get('dtype')!r}")
    try:
        sizes = [sym_int(s) for s in meta["sizes"]]
        strides = [sym_int(s) for s in meta["strides"]]
        offset = sym_int(meta.get("storage_offset", {"as_int": 0}))
    except (KeyError, TypeError):
        raise invalid(f"{fqn!r} has malformed sizes or strides") from None
    if None in sizes or None in strides or offset is None or len(sizes) != len(strides):
        raise invalid(f"{fqn!r} must have static sizes and strides")
    if any(s < 0 for s in sizes) or any(s < 0 for s in strides) or offset < 0:
        raise invalid(f"{fqn!r} has negative sizes, strides or offset")
    numel = math.prod(sizes)
    if numel == 0 or not raw:
        return torch.zeros(sizes, dtype=dtype)
    element = torch.empty((), dtype=dtype).element_size()
    if len(raw) % element:
        raise invalid(f"{fqn!r}: payload of {len(raw)} bytes is not a multiple of {element}")
    storage = len(raw) // element
    last = offset + sum((size - 1) * stride for size, stride in zip(sizes, strides, strict=True))
    if last >= storage:
        raise invalid(f"{fqn!r}: sizes and strides reach beyond its payload", fqn=fqn)
    flat = torch.frombuffer(bytearray(raw), dtype=dtype)
    return torch.as_strided(flat, sizes, strides, offset).clone()
