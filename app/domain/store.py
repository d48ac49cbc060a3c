"""Artifact store: content-addressed blobs plus small JSON records, on disk under ``KRONLAP_DATA_DIR``.

Layout::

    <root>/blobs/<sha[:2]>/<sha>        immutable bytes (model files, canonical datasets, posteriors)
    <root>/records/<kind>/<id>.json     one record per model / dataset / fit / job checkpoint / job's artifacts,
                                        naming its blobs by sha256
    <root>/tmp/                         staging area for atomic writes (same file system as the rest)
    <root>/store-id                     random id of this store, written once (see :class:`StoreIdentity`)

Every write goes to ``tmp/`` first, is flushed and fsync-ed, then ``os.replace``-d into place, so readers
never see a partial file and a crash leaves at most an orphan in ``tmp/``. Blobs are written once: storing
bytes whose hash already exists is a no-op, which makes re-delivered jobs idempotent. The interface is small
(put/get blob, put/get/delete/list record, :class:`Store`); :class:`app.domain.objectstore.S3ArtifactStore`
implements it on S3-compatible object storage with the same layout, and :func:`app.domain.backend.open_store`
picks one from the settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

KINDS = ("models", "datasets", "fits", "checkpoints", "artifacts", "shards")
STORE_ID_FILE = "store-id"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,127}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def valid_id(value: str) -> bool:
    """Whether ``value`` is usable as a record id (and therefore as a file name)."""
    return bool(_ID.match(value))


def referenced_blobs(store: Store) -> set[str]:
    """Hashes named by any record of ``store`` (fields ``sha256``, ``posterior_sha256`` and the values of
    ``blobs``): the blobs garbage collection keeps, on every backend."""
    refs: set[str] = set()
    for kind in KINDS:
        for record in store.records(kind):
            for field in ("sha256", "posterior_sha256"):
                if isinstance(record.get(field), str):
                    refs.add(record[field])
            blobs = record.get("blobs")
            if isinstance(blobs, dict):
                refs.update(sha for sha in blobs.values() if isinstance(sha, str))
    return refs


class Store(Protocol):
    """What every artifact store offers (the directory store here, object storage in :mod:`app.domain.objectstore`).

    Attributes:
        location: Where the store is, for people (an absolute directory, ``s3://bucket/prefix/``).
    """

    location: str

    def put_blob(self, data: bytes) -> str: ...
    def has_blob(self, sha: str) -> bool: ...
    def get_blob(self, sha: str, verify: bool = True) -> bytes: ...
    def delete_blob(self, sha: str) -> None: ...
    def blobs(self) -> Iterator[str]: ...
    def put_record(self, kind: str, record_id: str, record: dict[str, Any]) -> None: ...
    def get_record(self, kind: str, record_id: str) -> dict[str, Any] | None: ...
    def delete_record(self, kind: str, record_id: str) -> bool: ...
    def records(self, kind: str) -> Iterator[dict[str, Any]]: ...
    def referenced_blobs(self) -> set[str]: ...
    def collect_garbage(self, min_age_s: float = 3600.0) -> int: ...
    def ping(self) -> None: ...
    def store_id(self) -> str: ...


class ArtifactStore:
    """Directory-backed artifact store.

    Args:
        root: Directory holding the store; created if missing.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.location = str(self.root.resolve())
        self._tmp = self.root / "tmp"
        for sub in ("blobs", "tmp", *(f"records/{kind}" for kind in KINDS)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- blobs -------------------------------------------------------------------------------------------

    def blob_path(self, sha: str) -> Path:
        """Path of the blob with hash ``sha`` (whether or not it exists)."""
        if not _SHA.match(sha):
            raise ValueError(f"not a sha256 hex digest: {sha!r}")
        return self.root / "blobs" / sha[:2] / sha

    def put_blob(self, data: bytes) -> str:
        """Stores ``data`` under its sha256 and returns the hash; existing blobs are left untouched."""
        sha = sha256_hex(data)
        path = self.blob_path(sha)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._atomic_write(path, data)
        return sha

    def has_blob(self, sha: str) -> bool:
        """Whether a blob with hash ``sha`` is stored."""
        return self.blob_path(sha).is_file()

    def get_blob(self, sha: str, verify: bool = True) -> bytes:
        """Reads a blob.

        Args:
            sha: Its sha256.
            verify: Re-hash the bytes and refuse a blob whose content no longer matches its name.

        Raises:
            FileNotFoundError: No such blob.
            ValueError: The blob is corrupt.
        """
        data = self.blob_path(sha).read_bytes()
        if verify and sha256_hex(data) != sha:
            raise ValueError(f"blob {sha} is corrupt (content hash differs)")
        return data

    def delete_blob(self, sha: str) -> None:
        """Removes a blob if present."""
        self.blob_path(sha).unlink(missing_ok=True)

    def blobs(self) -> Iterator[str]:
        """Hashes of every stored blob."""
        for path in (self.root / "blobs").glob("*/*"):
            if _SHA.match(path.name):
                yield path.name

    # -- records -----------------------------------------------------------------------------------------

    def _record_path(self, kind: str, record_id: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}")
        if not valid_id(record_id):
            raise ValueError(f"invalid id {record_id!r}")
        return self.root / "records" / kind / f"{record_id}.json"

    def put_record(self, kind: str, record_id: str, record: dict[str, Any]) -> None:
        """Atomically writes (or overwrites) the JSON record ``kind/record_id``."""
        data = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        self._atomic_write(self._record_path(kind, record_id), data)

    def get_record(self, kind: str, record_id: str) -> dict[str, Any] | None:
        """Reads a record, or ``None`` when absent (or the id is not a valid id)."""
        if not valid_id(record_id):
            return None
        try:
            return json.loads(self._record_path(kind, record_id).read_bytes())
        except FileNotFoundError:
            return None

    def delete_record(self, kind: str, record_id: str) -> bool:
        """Deletes a record; returns whether it existed."""
        path = self._record_path(kind, record_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def records(self, kind: str) -> Iterator[dict[str, Any]]:
        """Every record of ``kind`` (unordered)."""
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}")
        for path in (self.root / "records" / kind).glob("*.json"):
            try:
                yield json.loads(path.read_bytes())
            except (FileNotFoundError, json.JSONDecodeError):
                continue

    # -- maintenance -------------------------------------------------------------------------------------

    def referenced_blobs(self) -> set[str]:
        """Hashes named by any record (see :func:`referenced_blobs`)."""
        return referenced_blobs(self)

    def collect_garbage(self, min_age_s: float = 3600.0) -> int:
        """Deletes blobs no record refers to, older than ``min_age_s`` (a blob written just before its
        record is not garbage); also clears stale staging files. Returns the number of blobs removed."""
        refs = self.referenced_blobs()
        now = time.time()
        removed = 0
        for sha in list(self.blobs()):
            path = self.blob_path(sha)
            if sha not in refs and now - path.stat().st_mtime >= min_age_s:
                path.unlink(missing_ok=True)
                removed += 1
        for path in self._tmp.iterdir():
            if now - path.stat().st_mtime >= min_age_s:
                path.unlink(missing_ok=True)
        return removed

    def ping(self) -> None:
        """Checks that the store is writable (raises ``OSError`` otherwise)."""
        fd, name = tempfile.mkstemp(dir=self._tmp, prefix=".ping-")
        os.close(fd)
        os.unlink(name)

    def disk_free_bytes(self) -> int:
        """Free space on the store's file system."""
        return shutil.disk_usage(self.root).free

    def store_id(self) -> str:
        """The store's random id, written on first use; processes compare it to tell whether they share it."""
        path = self.root / STORE_ID_FILE
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            pass
        candidate = secrets.token_hex(16)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # another process wrote it first
            return path.read_text().strip()
        with os.fdopen(fd, "w") as fh:
            fh.write(candidate + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return candidate

    def _atomic_write(self, path: Path, data: bytes) -> None:
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix=path.name[:32] + ".")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


class StoreMismatch(RuntimeError):
    """A process sees another artifact store than the one recorded in Redis by the API."""


class StoreIdentity:
    """The id of the artifact store the service uses, recorded in Redis so every process can check it.

    The API records its store (``{"id", "path"}`` under ``<namespace>:store``) when it starts; a worker
    compares its own store's id with the recorded one and refuses to run jobs against another store (a
    worker started from another directory, or without the API's volume, would otherwise see an empty store
    and fail every job with "not found"). A worker that starts before any API records its store itself.

    Args:
        client: Redis client.
        namespace: Key prefix of the service.
        store: This process's store.
    """

    def __init__(self, client: Any, namespace: str, store: Store) -> None:
        self.client = client
        self.key = f"{namespace}:store"
        self.store = store

    def mine(self) -> dict[str, str]:
        """This process's store as recorded: its id and absolute path."""
        return {"id": self.store.store_id(), "path": self.store.location}

    def recorded(self) -> dict[str, str] | None:
        """The store recorded in Redis, or ``None``."""
        raw = self.client.get(self.key)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) and "id" in value else None

    def record(self) -> dict[str, str] | None:
        """Records this store (the API's); returns the store recorded before when it was another one."""
        mine = self.mine()
        previous = self.recorded()
        self.client.set(self.key, json.dumps(mine))
        return previous if previous is not None and previous.get("id") != mine["id"] else None

    def verify(self) -> dict[str, str]:
        """Checks that this store is the recorded one (recording it when none is); returns it.

        Raises:
            StoreMismatch: Redis names another store.
        """
        mine = self.mine()
        self.client.set(self.key, json.dumps(mine), nx=True)
        recorded = self.recorded() or mine
        if recorded.get("id") != mine["id"]:
            raise StoreMismatch(
                f"this process's artifact store {mine['path']} (id {mine['id'][:8]}) is not the service's store "
                f"{recorded.get('path', '?')} (id {str(recorded.get('id'))[:8]}) recorded in Redis; point "
                "KRONLAP_DATA_DIR at the API's store (an absolute path, or the same shared volume)"
            )
        return mine
