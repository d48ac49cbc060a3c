"""Store, job records, settings, auth and the micro-batcher, each against the real thing (disk, Redis)."""

from __future__ import annotations

import asyncio
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from app.api.main import create_app
from app.api.predictor import MicroBatcher, PredictOptions
from app.domain.datasetio import parse_npz
from app.domain.errors import InvalidInput, PayloadTooLarge
from app.domain.jobs import JobCancelled, JobStatus, JobStore
from app.domain.settings import InsecureSettingsError, Settings
from app.domain.store import ArtifactStore, sha256_hex


def test_store_is_content_addressed_and_atomic(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    sha = store.put_blob(b"posterior bytes")
    assert sha == sha256_hex(b"posterior bytes")
    assert store.put_blob(b"posterior bytes") == sha
    assert store.get_blob(sha) == b"posterior bytes"
    assert list((tmp_path / "tmp").iterdir()) == []
    store.put_record("models", "m1", {"id": "m1", "sha256": sha})
    store.put_record("models", "m1", {"id": "m1", "sha256": sha, "v": 2})
    assert store.get_record("models", "m1")["v"] == 2
    assert list((tmp_path / "tmp").iterdir()) == []


def test_store_refuses_path_traversal_and_detects_corruption(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(ValueError):
        store.put_record("models", "../escape", {})
    assert store.get_record("models", "../../etc/passwd") is None
    sha = store.put_blob(b"abc")
    store.blob_path(sha).write_bytes(b"abd")
    with pytest.raises(ValueError, match="corrupt"):
        store.get_blob(sha)


def test_store_garbage_collection_keeps_referenced_blobs(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    kept = store.put_blob(b"kept")
    dropped = store.put_blob(b"dropped")
    store.put_record("fits", "f1", {"posterior_sha256": kept})
    assert store.collect_garbage(min_age_s=0) == 1
    assert store.has_blob(kept) and not store.has_blob(dropped)


def test_job_lifecycle_in_redis(redis_db, redis_namespace: str) -> None:
    jobs = JobStore(redis_db, redis_namespace, ttl_s=600)
    job = jobs.create("fit", "tenant-a", {"fit_id": "fit_1"})
    assert jobs.get(job.id).status is JobStatus.queued
    running = jobs.start(job)
    assert running.status is JobStatus.running and running.attempts == 1
    jobs.report(job.id, 0.5, "half way")
    assert jobs.get(job.id).progress == pytest.approx(0.5)
    again = jobs.start(job)  # re-delivery after a worker died
    assert again.attempts == 2 and again.progress == 0.0
    assert jobs.succeed(job.id, {"fit": "fit_1"})
    done = jobs.get(job.id)
    assert done.status is JobStatus.succeeded and done.result == {"fit": "fit_1"} and done.finished_at
    assert not jobs.cancel(job.id)
    assert jobs.start(job) is None
    assert [j.id for j in jobs.list("tenant-a")] == [job.id]
    assert jobs.list("tenant-b") == []


def test_cancelled_job_stops_at_next_progress_report(redis_db, redis_namespace: str) -> None:
    jobs = JobStore(redis_db, redis_namespace, ttl_s=600)
    job = jobs.create("fit", "t", {})
    jobs.start(job)
    assert jobs.cancel(job.id)
    with pytest.raises(JobCancelled):
        jobs.report(job.id, 0.7, "still going")
    assert not jobs.succeed(job.id, {})
    assert jobs.get(job.id).status is JobStatus.cancelled


def test_settings_refuse_insecure_defaults_outside_embedded_mode(tmp_path: Path) -> None:
    with pytest.raises(InsecureSettingsError, match="KRONLAP_API_KEYS"):
        create_app(Settings(redis_url="redis://127.0.0.1:6379/13", data_dir=tmp_path))
    with pytest.raises(InsecureSettingsError, match="placeholder"):
        Settings(redis_url="redis://x", api_keys={"changethis": "t"}).enforce_secure()
    Settings(data_dir=tmp_path).enforce_secure()  # embedded mode may run open
    parsed = Settings(api_keys="team-a:" + "k" * 20 + ",team-b:" + "j" * 20)
    assert parsed.api_keys == {"k" * 20: "team-a", "j" * 20: "team-b"}


def _npz(**arrays: object) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_dataset_parsing_accepts_numbers_and_refuses_the_rest() -> None:
    x = np.random.default_rng(0).random((20, 4))
    data = parse_npz(_npz(x=x, y=np.arange(20) % 3, x_val=x[:5], y_val=np.arange(5) % 3), 10**6)
    assert data.x.dtype == np.float32 and data.y.dtype == np.int64 and data.num_classes == 3
    with pytest.raises(InvalidInput, match="object"):
        parse_npz(_npz(x=np.array([{"a": 1}] * 20, dtype=object), y=np.arange(20)), 10**6)
    with pytest.raises(InvalidInput, match="NaN"):
        parse_npz(_npz(x=np.full((3, 2), np.nan), y=np.arange(3)), 10**6)
    with pytest.raises(InvalidInput, match="rows"):
        parse_npz(_npz(x=x, y=np.arange(19)), 10**6)
    with pytest.raises(InvalidInput, match="unexpected member"):
        parse_npz(_npz(x=x, y=np.arange(20), extra=x), 10**6)
    with pytest.raises(PayloadTooLarge):
        parse_npz(_npz(x=np.zeros((1000, 100)), y=np.zeros(1000, dtype=np.int64)), 10**4)


def test_micro_batcher_merges_concurrent_requests_and_splits_results() -> None:
    calls: list[int] = []
    entered = threading.Event()
    release = threading.Event()

    def run(x: torch.Tensor, options: PredictOptions) -> dict[str, np.ndarray]:
        entered.set()
        assert release.wait(30), "never released"
        calls.append(int(x.shape[0]))
        return {"double": (2 * x).numpy(), "threshold": np.array(0.5)}

    async def scenario() -> list[dict[str, np.ndarray]]:
        executor = ThreadPoolExecutor(1)
        batcher = MicroBatcher(run, executor, max_batch=64, max_wait_s=0.05)
        opts = PredictOptions(10, "mc", "entropy", None)
        first = asyncio.ensure_future(batcher.submit(torch.full((1, 2), -1.0), opts))
        # The first batch is now blocked in `run` (its only thread); the rest queue up behind it.
        assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
        rest = [asyncio.ensure_future(batcher.submit(torch.full((i + 1, 2), float(i)), opts)) for i in range(8)]
        seeded = asyncio.ensure_future(batcher.submit(torch.ones(1, 2), opts._replace(seed=3)))
        for _ in range(100_000):  # until every submit has queued its request
            if len(batcher._queue) == 9:
                break
            await asyncio.sleep(0)
        release.set()
        results = await asyncio.gather(first, *rest, seeded)
        batcher.close()
        executor.shutdown()
        return results

    results = asyncio.run(scenario())
    assert calls[0] == 1 and calls[1] == sum(range(1, 9)) and calls[2] == 1
    for i, out in enumerate(results[1:9]):
        assert out["double"].shape == (i + 1, 2)
        assert np.all(out["double"] == 2.0 * i)
        assert float(out["threshold"]) == 0.5


def test_cli_serve_refuses_open_or_insecure_setups(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import serve

    assert serve("0.0.0.0", 0, False, settings=Settings(data_dir=tmp_path)) == 2
    assert "refusing to serve without API keys" in capsys.readouterr().err
    keyless = Settings(redis_url="redis://127.0.0.1:6379/13", data_dir=tmp_path)
    assert serve("127.0.0.1", 0, False, settings=keyless) == 2
    assert "KRONLAP_API_KEYS" in capsys.readouterr().err
