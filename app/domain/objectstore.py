"""Artifact store on S3-compatible object storage (AWS S3, MinIO, Ceph), selected by ``KRONLAP_STORE_URL``.

Same interface and layout as the directory store (:class:`app.domain.store.ArtifactStore`), under the URL's
prefix::

    s3://<bucket>/<prefix>/blobs/<sha[:2]>/<sha>        immutable bytes, named by their sha256
    s3://<bucket>/<prefix>/records/<kind>/<id>.json     JSON records naming blobs
    s3://<bucket>/<prefix>/store-id                     random id of this store, written once

Publication is atomic without a staging area: an S3 PUT makes the whole object visible at once or not at all,
so no reader ever sees half a blob or half a record. Callers write blobs before the records that name them (as
on disk), so a record never names a missing blob. Blobs are verified against their name on read, as on disk.
The store id is created with a conditional PUT (``If-None-Match: *``) so two processes starting together agree.
Tenant scoping is the catalog's, on records, exactly as on disk.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.domain.store import _SHA, KINDS, STORE_ID_FILE, referenced_blobs, sha256_hex, valid_id

_MISSING = ("404", "NoSuchKey", "NotFound")
_READ_AHEAD = 16  # concurrent GETs when listing records (boto3 clients are thread-safe)


def parse_store_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")`` (the prefix empty or ending in ``/``)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in _MISSING


class S3ArtifactStore:
    """Artifact store in an S3 bucket under a key prefix.

    Args:
        url: ``s3://bucket/prefix``.
        endpoint_url: Endpoint of an S3-compatible server (``None``: AWS, or ``AWS_ENDPOINT_URL_S3``).
        client: A boto3 S3 client to use instead of building one (credentials from the environment).
    """

    def __init__(self, url: str, endpoint_url: str | None = None, client: Any = None) -> None:
        self.bucket, self.prefix = parse_store_url(url)
        self.location = f"s3://{self.bucket}/{self.prefix}"
        if client is None:
            config = Config(
                retries={"max_attempts": 5, "mode": "standard"},
                s3={"addressing_style": "path" if endpoint_url else "auto"},
            )
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        self.client = client

    # -- keys --------------------------------------------------------------------------------------------

    def _blob_key(self, sha: str) -> str:
        if not _SHA.match(sha):
            raise ValueError(f"not a sha256 hex digest: {sha!r}")
        return f"{self.prefix}blobs/{sha[:2]}/{sha}"

    def _record_key(self, kind: str, record_id: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}")
        if not valid_id(record_id):
            raise ValueError(f"invalid id {record_id!r}")
        return f"{self.prefix}records/{kind}/{record_id}.json"

    def _get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    def _exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _missing(exc):
                return False
            raise
        return True

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            yield from page.get("Contents", ())

    # -- blobs -------------------------------------------------------------------------------------------

    def put_blob(self, data: bytes) -> str:
        """Stores ``data`` under its sha256 and returns the hash; existing blobs are left untouched."""
        sha = sha256_hex(data)
        key = self._blob_key(sha)
        if not self._exists(key):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, Metadata={"sha256": sha})
        return sha

    def has_blob(self, sha: str) -> bool:
        """Whether a blob with hash ``sha`` is stored."""
        return self._exists(self._blob_key(sha))

    def get_blob(self, sha: str, verify: bool = True) -> bytes:
        """Reads a blob (see :meth:`app.domain.store.ArtifactStore.get_blob`).

        Raises:
            FileNotFoundError: No such blob.
            ValueError: The blob is corrupt.
        """
        data = self._get(self._blob_key(sha))
        if data is None:
            raise FileNotFoundError(f"blob {sha} is not in {self.location}")
        if verify and sha256_hex(data) != sha:
            raise ValueError(f"blob {sha} is corrupt (content hash differs)")
        return data

    def delete_blob(self, sha: str) -> None:
        """Removes a blob if present."""
        self.client.delete_object(Bucket=self.bucket, Key=self._blob_key(sha))

    def blobs(self) -> Iterator[str]:
        """Hashes of every stored blob."""
        for item in self._list(f"{self.prefix}blobs/"):
            name = item["Key"].rsplit("/", 1)[-1]
            if _SHA.match(name):
                yield name

    # -- records -----------------------------------------------------------------------------------------

    def put_record(self, kind: str, record_id: str, record: dict[str, Any]) -> None:
        """Writes (or overwrites) the JSON record ``kind/record_id`` in one PUT."""
        data = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        self.client.put_object(
            Bucket=self.bucket, Key=self._record_key(kind, record_id), Body=data, ContentType="application/json"
        )

    def get_record(self, kind: str, record_id: str) -> dict[str, Any] | None:
        """Reads a record, or ``None`` when absent (or the id is not a valid id)."""
        if not valid_id(record_id):
            return None
        data = self._get(self._record_key(kind, record_id))
        return None if data is None else json.loads(data)

    def delete_record(self, kind: str, record_id: str) -> bool:
        """Deletes a record; returns whether it existed."""
        key = self._record_key(kind, record_id)
        if not self._exists(key):
            return False
        self.client.delete_object(Bucket=self.bucket, Key=key)
        return True

    def records(self, kind: str) -> Iterator[dict[str, Any]]:
        """Every record of ``kind`` (unordered), fetched ``_READ_AHEAD`` at a time in parallel (one GET each)."""
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}")
        keys = [item["Key"] for item in self._list(f"{self.prefix}records/{kind}/")]
        if not keys:
            return
        with ThreadPoolExecutor(max_workers=min(_READ_AHEAD, len(keys))) as pool:
            for data in pool.map(self._get, keys):
                if data is None:
                    continue
                try:
                    yield json.loads(data)
                except json.JSONDecodeError:
                    continue

    # -- maintenance -------------------------------------------------------------------------------------

    def referenced_blobs(self) -> set[str]:
        """Hashes named by any record (the same scan as on disk, :func:`app.domain.store.referenced_blobs`)."""
        return referenced_blobs(self)

    def collect_garbage(self, min_age_s: float = 3600.0) -> int:
        """Deletes blobs no record refers to, last written more than ``min_age_s`` ago (a blob written just
        before its record is not garbage). Returns the number of blobs removed."""
        refs = self.referenced_blobs()
        now = time.time()
        removed = 0
        for item in self._list(f"{self.prefix}blobs/"):
            name = item["Key"].rsplit("/", 1)[-1]
            modified: datetime = item["LastModified"]
            if _SHA.match(name) and name not in refs and now - modified.timestamp() >= min_age_s:
                self.client.delete_object(Bucket=self.bucket, Key=item["Key"])
                removed += 1
        return removed

    def ping(self) -> None:
        """Checks that the bucket answers with these credentials (raises ``OSError`` otherwise)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise OSError(f"object store {self.location} is unreachable: {exc}") from exc

    def store_id(self) -> str:
        """The store's random id, created once (conditional PUT); see :meth:`ArtifactStore.store_id`."""
        key = f"{self.prefix}{STORE_ID_FILE}"
        data = self._get(key)
        if data is not None:
            return data.decode().strip()
        candidate = secrets.token_hex(16)
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=(candidate + "\n").encode(), IfNoneMatch="*")
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) not in ("PreconditionFailed", "412"):
                raise
            return (self._get(key) or b"").decode().strip()  # another process wrote it first
        return candidate
