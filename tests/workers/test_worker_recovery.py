"""Workers: a SIGKILLed fit finishes on another worker, re-runs are idempotent, failures are recorded.

Real worker processes (``python -m workers``) consume the real test Redis; the heartbeat timeout is 2 s so a
dead worker's message is re-delivered quickly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from app.api.main import create_app
from app.domain.backend import Backend
from app.domain.catalog import Catalog
from app.domain.jobs import JobStatus, PermanentJobError
from app.domain.kinds import FIT, execute
from app.domain.kinds.fit import FitParams
from app.domain.store import ArtifactStore
from tests.jobhelpers import npz_bytes, wait_job

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)




def _upload(client: httpx.Client, headers: dict, model: tuple[str, bytes], data: dict) -> tuple[str, str]:
    r = client.post("/v1/models", files={"file": model}, headers=headers)
    assert r.status_code == 201, r.text
    d = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(**data))}, headers=headers)
    assert d.status_code == 201, d.text
    return r.json()["id"], d.json()["id"]




def test_sigkilled_fit_completes_on_another_worker(
    redis_db, data_dir: Path, make_settings, start_worker, trained_models, tenant_headers, run_server
) -> None:
    settings = make_settings(data_dir)
    h = tenant_headers["a"]
    m = trained_models
    first = start_worker(settings).wait_ready()
    with run_server(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        model_id, dataset_id = _upload(
            client,
            h,
            ("mlp.onnx", m.mlp_onnx),
            {
                "x": m.x_train[:3000].numpy(),
                "y": m.y_train[:3000].numpy(),
                "x_val": m.x_val.numpy(),
                "y_val": m.y_val.numpy(),
            },
        )
        r = client.post(f"/v1/models/{model_id}/fits", json={"dataset": dataset_id, "samples": 50}, headers=h)
        job_id, fit_id = r.json()["job"]["id"], r.json()["fit_id"]
        running = wait_job(client, h, job_id, lambda j: j["status"] != "queued" and j["progress"] >= 0.05)
        assert running["status"] == "running", running
        first.kill()
        time.sleep(0.5)
        stale = client.get(f"/v1/jobs/{job_id}", headers=h).json()
        assert stale["status"] == "running" and stale["attempts"] == 1
        assert client.get(f"/v1/fits/{fit_id}", headers=h).json()["status"] == "running"
        # Within the heartbeat timeout the record says its worker is gone and when the job will be retried.
        lost = wait_job(client, h, job_id, lambda j: j["worker_lost"], timeout_s=settings.heartbeat_timeout_ms / 1000)
        assert lost["status"] == "running" and lost["worker"]["alive"] is False, lost
        assert "worker_lost" in lost["message"] and "will be retried" in lost["message"], lost

        start_worker(settings).wait_ready()
        done = wait_job(client, h, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        assert not done["worker_lost"]
        fit = client.get(f"/v1/fits/{fit_id}", headers=h).json()
        assert fit["status"] == "succeeded"
        r = client.post(f"/v1/models/{model_id}/predict", json={"inputs": m.x_test[:3].tolist()}, headers=h)
        assert r.status_code == 200 and len(r.json()["results"]) == 3

        # A deterministic failure in the core is recorded once, not retried.
        cnn_id, images_id = _upload(
            client,
            h,
            ("cnn.pt2", m.cnn_pt2),
            {"x": m.x_train[:64].reshape(-1, 1, 28, 28).numpy(), "y": m.y_train[:64].numpy()},
        )
        r = client.post(f"/v1/models/{cnn_id}/fits", json={"dataset": images_id, "curvature": "kfra"}, headers=h)
        assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_curvature", r.text
        assert "kfra" not in r.json()["error"]["detail"]["supported"]
        # A record written before curvatures were recorded is not refused up front; the core's error ends the job.
        catalog = Catalog(ArtifactStore(data_dir))
        catalog.put_model(catalog.get_model(cnn_id, None).model_copy(update={"curvatures": None}))
        r = client.post(f"/v1/models/{cnn_id}/fits", json={"dataset": images_id, "curvature": "kfra"}, headers=h)
        failed = wait_job(client, h, r.json()["job"]["id"], lambda j: j["status"] in ("succeeded", "failed"))
        assert failed["status"] == "failed" and failed["attempts"] == 1, failed
        assert failed["error"]["code"] == "fit_failed" and "kfra" in failed["error"]["message"].lower()
        fit = client.get(f"/v1/fits/{r.json()['fit_id']}", headers=h).json()
        assert fit["status"] == "failed" and fit["error"]["code"] == "fit_failed"


def test_redelivered_job_recomputes_and_overwrites_the_same_fit(
    redis_db, data_dir: Path, make_settings, trained_models, tenant_headers, run_server
) -> None:
    settings = make_settings(data_dir)
    m = trained_models
    with run_server(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        model_id, dataset_id = _upload(
            client,
            tenant_headers["a"],
            ("mlp.onnx", m.mlp_onnx),
            {"x": m.x_train[:200].numpy(), "y": m.y_train[:200].numpy()},
        )
    ctx = Backend.connect(settings)
    params = FitParams(
        job_id="job_redelivery",
        fit_id="fit_redelivery",
        tenant="tenant-a",
        model_id=model_id,
        dataset_id=dataset_id,
        config={"curvature": "kfac", "tuning": "none", "likelihood": "classification", "samples": 5},
    )
    body = params.model_dump()
    ctx.jobs.create("fit", "tenant-a", body, job_id=params.job_id)
    assert execute(FIT, body, ctx) is not None
    first = ctx.catalog.get_fit(params.fit_id, "tenant-a")
    catalog = Catalog(ArtifactStore(data_dir))
    blobs = set(catalog.store.blobs())
    # The worker died after writing but before acknowledging: the broker delivers the message again.
    ctx.jobs.client.hset(ctx.jobs.key(params.job_id), "status", "running")
    assert execute(FIT, body, ctx) is not None
    second = ctx.catalog.get_fit(params.fit_id, "tenant-a")
    assert second.id == first.id and second.posterior_sha256 == first.posterior_sha256
    assert [f.id for f in catalog.fits_of(model_id)] == ["fit_redelivery"]
    assert set(catalog.store.blobs()) == blobs
    job = ctx.jobs.get(params.job_id)
    assert job.status is JobStatus.succeeded and job.attempts == 2
    # A delivery after success is skipped.
    assert execute(FIT, body, ctx) is None


def test_missing_inputs_fail_permanently(redis_db, data_dir: Path, make_settings) -> None:
    ctx = Backend.connect(make_settings(data_dir))
    params = FitParams(
        job_id="job_missing", fit_id="fit_missing", tenant="t", model_id="mdl_gone", dataset_id="ds_gone", config={}
    )
    ctx.jobs.create("fit", "t", params.model_dump(), job_id=params.job_id)
    with pytest.raises(PermanentJobError):
        execute(FIT, params.model_dump(), ctx)
    job = ctx.jobs.get(params.job_id)
    assert job.status is JobStatus.failed and job.error["code"] == "not_found"
