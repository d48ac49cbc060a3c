"""ONNX models with external data, uploaded as one zip archive and read in memory.

``torch.onnx.export(model, args, "model.onnx")`` (torch's default exporter) writes the weights to
``model.onnx.data`` beside the model, and each tensor of the model refers to that file by a ``location``
relative to the model file, an ``offset`` and a ``length``. An upload is one file, so such a model comes as a
``.zip`` holding ``model.onnx`` and its data files. Exporting with ``external_data=False`` embeds the weights
and needs no archive.

Nothing is extracted to disk and no path is ever opened: the archive is read from the uploaded bytes; every
member name is checked (relative, no ``..``, no backslashes or drive letters, no links, no duplicates) and the
sizes its directory declares are bounded before any member is read (reads stop at the declared size, so a
zip bomb unpacks no further than the limit); a ``location`` must itself be a safe relative path and resolves
only to a member of the same archive; and the bytes copied into tensors are bounded too, since many tensors
may point at the same member.
"""

from __future__ import annotations

import io
import math
import posixpath
import re
import stat
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ModelImportError

if TYPE_CHECKING:  # onnx is imported where models are parsed, not by format detection
    import onnx

#: Upper bound on the members of an uploaded archive.
MAX_MEMBERS = 1_000

#: Leading bytes of a zip archive (a local file header, or the end record of an empty archive).
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_IGNORED_PREFIXES = ("__MACOSX/",)  # resource forks that macOS's archiver adds beside every file
_DRIVE = re.compile(r"^[A-Za-z]:")


def _unsafe(message: str, **detail: Any) -> ModelImportError:
    return ModelImportError("unsafe_archive", message, detail)


def unsafe_path_reason(path: str) -> str | None:
    """Why ``path`` could point outside the upload (``None`` when it is a plain relative path)."""
    if not path:
        return "is empty"
    if "\x00" in path or "\\" in path:
        return "contains a NUL byte or a backslash"
    if path.startswith("/") or _DRIVE.match(path):
        return "is absolute"
    if ":" in path:
        return "contains ':' (a drive, URL scheme or stream name)"
    if ".." in path.split("/"):
        return "climbs out with '..'"
    return None


def is_zip(data: bytes) -> bool:
    """Whether ``data`` starts like a zip archive."""
    return data[:4] in ZIP_MAGIC


def is_onnx_archive(data: bytes) -> bool:
    """Whether ``data`` is a zip archive holding an ``.onnx`` model and no torch.export layout (nothing is read)."""
    if not is_zip(data):
        return False
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except Exception:  # zipfile raises several types on corrupt input
        return False
    if any(n == "archive_format" or n.endswith("/archive_format") for n in names):
        return False
    return any(n.lower().endswith(".onnx") and not n.startswith(_IGNORED_PREFIXES) for n in names)


@dataclass
class OnnxArchive:
    """An uploaded zip archive holding one ONNX model and the files its tensors refer to.

    Attributes:
        model_path: The model's member name.
        model: The model's bytes.
    """

    model_path: str
    model: bytes
    _zip: zipfile.ZipFile = field(repr=False)
    _members: dict[str, zipfile.ZipInfo] = field(repr=False)
    _cache: dict[str, bytes] = field(default_factory=dict, repr=False)

    def member_for(self, location: str) -> str | None:
        """The member an external-data ``location`` refers to, or ``None`` if the archive lacks it.

        Raises:
            ModelImportError: ``unsafe_archive`` when ``location`` is not a plain relative path.
        """
        reason = unsafe_path_reason(location)
        if reason is not None:
            raise _unsafe(
                f"external-data location {location!r} {reason}; it must name a file in the archive",
                location=location,
            )
        path = posixpath.normpath(posixpath.join(posixpath.dirname(self.model_path), location))
        return path if path in self._members else None

    def read(self, path: str) -> bytes:
        """The bytes of member ``path`` (one returned by :meth:`member_for`)."""
        if path not in self._cache:
            self._cache[path] = _read_member(self._zip, self._members[path])
        return self._cache[path]


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        return archive.read(info)
    except Exception as exc:  # bad CRC, truncated data, unsupported compression
        raise ModelImportError(
            "invalid_onnx", f"archive member {info.filename!r} cannot be read: {exc}", {"member": info.filename}
        ) from None


def read_onnx_archive(data: bytes, *, max_bytes: int) -> OnnxArchive:
    """Open an uploaded zip archive holding one ONNX model, checking every member before reading any.

    Args:
        data: The archive bytes.
        max_bytes: Upper bound on the total uncompressed size of its members.

    Returns:
        The archive, with the model's bytes read.

    Raises:
        ModelImportError: ``unsafe_archive`` for a member name that is absolute, climbs out with ``..``, is a
            link or appears twice; ``too_large`` over the member or size limits; ``invalid_onnx`` for an
            unreadable or encrypted archive or one without exactly one ``.onnx`` model.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except Exception as exc:  # zipfile raises several types on corrupt input
        raise ModelImportError("invalid_onnx", f"not a readable zip archive: {exc}") from None
    if len(infos) > MAX_MEMBERS:
        raise ModelImportError(
            "too_large",
            f"the archive has {len(infos)} members, over the limit of {MAX_MEMBERS}",
            {"members": len(infos), "max_members": MAX_MEMBERS},
        )
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        reason = unsafe_path_reason(name)
        if reason is not None:
            raise _unsafe(f"archive member name {name!r} {reason}", member=name)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise _unsafe(f"archive member {name!r} is a symbolic link", member=name)
        if info.flag_bits & 0x1:
            raise ModelImportError("invalid_onnx", f"archive member {name!r} is encrypted", {"member": name})
        if info.is_dir() or name.startswith(_IGNORED_PREFIXES):
            continue
        if name in members:
            raise _unsafe(f"archive member {name!r} appears twice", member=name)
        members[name] = info
    total = sum(i.file_size for i in members.values())
    if total > max_bytes:
        raise ModelImportError(
            "too_large",
            f"the archive unpacks to {total} bytes, over the limit of {max_bytes}",
            {"size": total, "max_bytes": max_bytes},
        )
    models = sorted(n for n in members if n.lower().endswith(".onnx"))
    if len(models) != 1:
        raise ModelImportError(
            "invalid_onnx",
            f"an ONNX archive must hold exactly one .onnx model, found {len(models)}",
            {"models": models[:10]},
        )
    model = _read_member(archive, members[models[0]])
    return OnnxArchive(model_path=models[0], model=model, _zip=archive, _members=members)


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _int_entry(tensor: onnx.TensorProto, entries: dict[str, str], key: str) -> int | None:
    if key not in entries:
        return None
    value = entries[key]
    if not re.fullmatch(r"[0-9]{1,19}", value):
        raise ModelImportError(
            "invalid_onnx", f"tensor {tensor.name!r}: external-data {key} {value!r} is not a non-negative integer"
        )
    return int(value)


def inline_external_data(tensors: Iterable[onnx.TensorProto], archive: OnnxArchive | None, *, max_bytes: int) -> None:
    """Copy the external data of ``tensors`` from the archive's members into the tensors themselves.

    Args:
        tensors: Every tensor stored in the model (initializers, attributes, sparse parts).
        archive: The uploaded archive, or ``None`` when the model was uploaded alone.
        max_bytes: Upper bound on the bytes copied into tensors in all.

    Raises:
        ModelImportError: ``invalid_onnx`` naming the files when the model refers to external data that was
            not uploaded, or for malformed entries and sizes; ``unsafe_archive`` for a location that is not a
            plain relative path; ``too_large`` when the inlined data exceed ``max_bytes``.
    """
    import onnx

    external = [t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data)]
    if not external:
        return
    proto = onnx.TensorProto
    item_bytes = {proto.FLOAT: 4, proto.DOUBLE: 8, proto.FLOAT16: 2, proto.BFLOAT16: 2, proto.INT8: 1,
                  proto.UINT8: 1, proto.BOOL: 1, proto.INT16: 2, proto.UINT16: 2, proto.INT32: 4, proto.UINT32: 4,
                  proto.INT64: 8, proto.UINT64: 8}  # fmt: skip
    locations = {t.name: _entries(t).get("location", "") for t in external}
    wanted = sorted(set(locations.values()))
    if archive is None:
        raise ModelImportError(
            "invalid_onnx",
            f"the model's tensors refer to external data file(s) {', '.join(map(repr, wanted))}, which were not "
            "uploaded: upload a .zip archive holding the .onnx model and these files, or export with "
            "torch.onnx.export(..., external_data=False) to embed the weights",
            {"missing": wanted, "tensors": sorted(locations)[:20]},
        )
    paths = {location: archive.member_for(location) for location in wanted}
    missing = [location for location, path in paths.items() if path is None]
    if missing:
        raise ModelImportError(
            "invalid_onnx",
            f"the archive lacks the external data file(s) {', '.join(map(repr, missing))} that the model refers to "
            f"(relative to {archive.model_path!r})",
            {"missing": missing, "model": archive.model_path},
        )
    inlined = 0
    for tensor in external:
        entries = _entries(tensor)
        item = item_bytes.get(tensor.data_type)
        if item is None:
            raise ModelImportError(
                "invalid_onnx",
                f"tensor {tensor.name!r}: external data of type "
                f"{onnx.TensorProto.DataType.Name(tensor.data_type)} is not supported",
                {"tensor": tensor.name},
            )
        expected = math.prod(tensor.dims) * item
        offset = _int_entry(tensor, entries, "offset") or 0
        length = _int_entry(tensor, entries, "length")
        blob = archive.read(paths[entries["location"]])  # type: ignore[index]
        end = len(blob) if length is None else offset + length
        if expected != end - offset or end > len(blob):
            raise ModelImportError(
                "invalid_onnx",
                f"tensor {tensor.name!r} needs {expected} bytes, its external data gives {max(end, offset) - offset} "
                f"at offset {offset} of a {len(blob)}-byte file",
                {"tensor": tensor.name, "expected_bytes": expected, "offset": offset, "length": length},
            )
        inlined += expected
        if inlined > max_bytes:
            raise ModelImportError(
                "too_large",
                f"the model's external data add up to more than {max_bytes} bytes",
                {"max_bytes": max_bytes},
            )
        tensor.raw_data = blob[offset:end]
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
