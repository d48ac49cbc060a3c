"""The artifact store suite, run on both backends: the directory store and S3 (moto's real S3 server).

Content addressing, digests, corruption detection, records, atomic publication, garbage collection, tenant
scoping through the catalog and the store identity behave the same on both. The last test runs a fit on a
worker process whose data directory the API never sees: only the bucket is shared.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.domain.backend import open_store
from app.domain.catalog import Catalog, ModelRecord
from app.domain.errors import NotFound
from app.domain.objectstore import S3ArtifactStore, parse_store_url
from app.domain.store import ArtifactStore, Store, StoreIdentity, StoreMismatch, sha256_hex


@pytest.fixture(params=["local", "s3"])
def open_new(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """``open_new()``: a store at a fresh location; ``open_new.again()`` reopens the same location."""
    if request.param == "local":
        root = tmp_path / "store"

        def make_local() -> Store:
            return ArtifactStore(root)

        return make_local
    server = request.getfixturevalue("s3_server")
    url = f"s3://{server.new_bucket()}/team/kronlap"

    def make_s3() -> Store:
        return S3ArtifactStore(url, endpoint_url=server.endpoint_url)

    return make_s3


def _corrupt(store: Store, sha: str, data: bytes) -> None:
    if isinstance(store, ArtifactStore):
        store.blob_path(sha).write_bytes(data)
    else:
        assert isinstance(store, S3ArtifactStore)
        store.client.put_object(Bucket=store.bucket, Key=store._blob_key(sha), Body=data)


def test_blobs_are_content_addressed_and_verified(open_new) -> None:
    store = open_new()
    sha = store.put_blob(b"posterior bytes")
    assert sha == sha256_hex(b"posterior bytes")
    assert store.put_blob(b"posterior bytes") == sha
    assert store.has_blob(sha) and store.get_blob(sha) == b"posterior bytes"
    assert list(store.blobs()) == [sha]
    assert open_new().get_blob(sha) == b"posterior bytes"  # another process on the same location
    with pytest.raises(FileNotFoundError):
        store.get_blob(sha256_hex(b"never stored"))
    with pytest.raises(ValueError):
        store.has_blob("not-a-digest")
    _corrupt(store, sha, b"posterior bytez")
    with pytest.raises(ValueError, match="corrupt"):
        store.get_blob(sha)
    store.delete_blob(sha)
    assert not store.has_blob(sha)


def test_records_round_trip_and_refuse_bad_ids(open_new) -> None:
    store = open_new()
    store.put_record("models", "m1", {"id": "m1", "v": 1})
    store.put_record("models", "m1", {"id": "m1", "v": 2})
    store.put_record("models", "m2", {"id": "m2", "v": 1})
    assert store.get_record("models", "m1") == {"id": "m1", "v": 2}
    assert sorted(r["id"] for r in store.records("models")) == ["m1", "m2"]
    assert store.get_record("models", "missing") is None
    assert store.get_record("models", "../../etc/passwd") is None
    with pytest.raises(ValueError):
        store.put_record("models", "../escape", {})
    with pytest.raises(ValueError):
        store.put_record("secrets", "x", {})
    assert store.delete_record("models", "m1") is True
    assert store.delete_record("models", "m1") is False
    assert [r["id"] for r in store.records("models")] == ["m2"]


def test_publication_is_atomic_under_concurrent_reads(open_new) -> None:
    """A reader sees a whole previous version or a whole new one, never part of a record."""
    store, reader = open_new(), open_new()
    versions = [{"v": i, "payload": "x" * (200_000 + i)} for i in range(12)]
    store.put_record("fits", "f", versions[0])
    seen: list[int] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            record = reader.get_record("fits", "f")
            assert record is not None and record["payload"] == "x" * (200_000 + record["v"])
            seen.append(record["v"])

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for version in versions[1:]:
            store.put_record("fits", "f", version)
    finally:
        done.set()
        thread.join(timeout=30)
    assert seen and set(seen) <= set(range(12))
    assert reader.get_record("fits", "f")["v"] == 11


def test_garbage_collection_keeps_referenced_blobs(open_new) -> None:
    store = open_new()
    kept, dropped, listed = store.put_blob(b"kept"), store.put_blob(b"dropped"), store.put_blob(b"listed")
    store.put_record("fits", "f1", {"posterior_sha256": kept})
    store.put_record("shards", "s1", {"blobs": {"part": listed}})
    assert store.referenced_blobs() >= {kept, listed}
    assert store.collect_garbage(min_age_s=3600) == 0
    assert store.collect_garbage(min_age_s=0) == 1
    assert store.has_blob(kept) and store.has_blob(listed) and not store.has_blob(dropped)


def test_catalog_scopes_tenants_the_same(open_new) -> None:
    catalog = Catalog(open_new())
    sha = catalog.store.put_blob(b"model")
    for tenant, model_id in (("tenant-a", "mdl_a"), ("tenant-b", "mdl_b")):
        catalog.put_model(
            ModelRecord(
                id=model_id,
                tenant=tenant,
                name=model_id,
                filename="m.onnx",
                format="onnx",
                sha256=sha,
                size_bytes=5,
                task="classification",
                input_shape=[4],
                output_dim=3,
                created_at=time.time(),
            )
        )
    assert [m.id for m in catalog.models("tenant-a")] == ["mdl_a"]
    assert catalog.get_model("mdl_b", "tenant-b").id == "mdl_b"
    with pytest.raises(NotFound):
        catalog.get_model("mdl_b", "tenant-a")


def test_store_identity_is_shared_through_the_store(open_new, redis_db, redis_namespace: str) -> None:
    store = open_new()
    store_id = store.store_id()
    assert len(store_id) == 32 and open_new().store_id() == store_id
    assert StoreIdentity(redis_db, redis_namespace, store).record() is None
    assert StoreIdentity(redis_db, redis_namespace, open_new()).verify()["id"] == store_id


def test_identity_tells_buckets_and_prefixes_apart(s3_server, redis_db, redis_namespace: str, tmp_path) -> None:
    bucket = s3_server.new_bucket()
    api = S3ArtifactStore(f"s3://{bucket}/a", endpoint_url=s3_server.endpoint_url)
    StoreIdentity(redis_db, redis_namespace, api).record()
    for other in (
        S3ArtifactStore(f"s3://{bucket}/b", endpoint_url=s3_server.endpoint_url),
        ArtifactStore(tmp_path / "local"),
    ):
        with pytest.raises(StoreMismatch):
            StoreIdentity(redis_db, redis_namespace, other).verify()


def test_settings_choose_the_backend(make_settings, s3_server, tmp_path: Path) -> None:
    assert isinstance(open_store(make_settings(tmp_path)), ArtifactStore)
    bucket = s3_server.new_bucket()
    s3 = open_store(make_settings(tmp_path, store_url=f"s3://{bucket}/p/q", s3_endpoint_url=s3_server.endpoint_url))
    assert isinstance(s3, S3ArtifactStore) and s3.location == f"s3://{bucket}/p/q/"
    s3.ping()
    assert parse_store_url(f"s3://{bucket}") == (bucket, "")
    with pytest.raises(ValueError):
        make_settings(tmp_path, store_url="file:///tmp/x")


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.slow
def test_fit_on_an_s3_worker_serves_from_an_api_on_another_disk(
    redis_db, make_settings, s3_server, start_worker, trained_models, tenant_headers, run_server, tmp_path: Path
) -> None:
    """API and worker share only the bucket: two different data directories, one S3 store."""
    from app.api.main import create_app

    url = f"s3://{s3_server.new_bucket()}/shared"
    common = dict(store_url=url, s3_endpoint_url=s3_server.endpoint_url)
    api_dir, worker_dir = tmp_path / "api-disk", tmp_path / "worker-disk"
    api_dir.mkdir()
    worker_dir.mkdir()
    worker = start_worker(make_settings(worker_dir, **common)).wait_ready()
    m, h = trained_models, tenant_headers["a"]
    with (
        run_server(create_app(make_settings(api_dir, **common))) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        r = client.post("/v1/models", files={"file": ("mlp.onnx", m.mlp_onnx)}, headers=h)
        assert r.status_code == 201, r.text
        model_id = r.json()["id"]
        data = {"x": m.x_train[:1500].numpy(), "y": m.y_train[:1500].numpy()}
        data |= {"x_val": m.x_val.numpy(), "y_val": m.y_val.numpy()}
        d = client.post("/v1/datasets", files={"file": ("d.npz", _npz(**data))}, headers=h)
        assert d.status_code == 201, d.text
        f = client.post(f"/v1/models/{model_id}/fits", json={"dataset": d.json()["id"], "curvature": "kflr"}, headers=h)
        assert f.status_code == 202, f.text
        job_id = f.json()["job"]["id"]
        deadline = time.monotonic() + 180
        while (state := client.get(f"/v1/jobs/{job_id}", headers=h).json())["status"] not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline, (state, worker.log())
            time.sleep(0.05)
        assert state["status"] == "succeeded", (state["error"], worker.log()[-3000:])
        redis_db.delete(*redis_db.keys(f"{make_settings(api_dir).redis_namespace}:posterior:*"))  # no cache
        p = client.post(
            f"/v1/models/{model_id}/predict", json={"inputs": m.x_test[:4].tolist(), "samples": 20}, headers=h
        )
        assert p.status_code == 200, p.text
        assert len(p.json()["results"]) == 4
    for disk in (api_dir, worker_dir):
        assert not any(p.is_file() and p.parts[-2] != "cache" for p in (disk.rglob("*"))), sorted(disk.rglob("*"))
    assert state["result"]["fit"] == f.json()["fit_id"]
