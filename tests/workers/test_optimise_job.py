"""Optimise jobs over HTTP with real worker processes: hostile requests are refused before queueing, a job
trains and registers a model that can be fitted and served, an autoencoder trains on unlabelled data, and a
worker SIGKILLed mid-run is resumed from the last checkpoint, not from step 0."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from app.api.main import create_app
from tests.jobhelpers import is_final, npz_bytes, upload, wait_job

pytestmark = pytest.mark.slow


def _data(client: httpx.Client, h: dict, **arrays: np.ndarray) -> str:
    return upload(client, h, "/v1/datasets", "d.npz", npz_bytes(**arrays))


def _autoencoder_onnx(exporters, width: int = 16) -> bytes:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(width, 8), nn.Tanh(), nn.Linear(8, 4), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, width)
    )
    return exporters["onnx"](net, torch.zeros(1, width))


def test_inconsistent_requests_are_refused_before_queueing(
    redis_db, data_dir: Path, make_settings, trained_models, tenant_headers, run_server, exporters
) -> None:
    settings = make_settings(data_dir)
    h = tenant_headers["a"]
    m = trained_models
    with run_server(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        mlp = upload(client, h, "/v1/models", "mlp.onnx", m.mlp_onnx)
        cnn = upload(client, h, "/v1/models", "cnn.pt2", m.cnn_pt2)
        ae = upload(client, h, "/v1/models", "ae.onnx", _autoencoder_onnx(exporters))
        labelled = _data(client, h, x=m.x_train[:50].numpy(), y=m.y_train[:50].numpy())
        images = _data(client, h, x=m.x_train[:50].reshape(-1, 1, 28, 28).numpy(), y=m.y_train[:50].numpy())
        unlabelled = _data(client, h, x=np.random.default_rng(0).random((40, 16)).astype(np.float32))
        outside = _data(client, h, x=np.full((40, 16), 3.0, dtype=np.float32))
        narrow = _data(client, h, x=np.zeros((10, 10), dtype=np.float32), y=np.zeros(10, dtype=np.int64))
        floats = _data(client, h, x=m.x_train[:50].numpy(), y=np.zeros(50, dtype=np.float32))
        cases = [
            ({"model": "mdl_nope", "dataset": labelled}, 404, "not_found"),
            ({"model": mlp, "dataset": "ds_nope"}, 404, "not_found"),
            ({"model": mlp, "dataset": labelled, "method": "newton"}, 422, "validation_error"),
            ({"model": mlp, "dataset": labelled, "method": "kfra", "lr": 0.1}, 422, "validation_error"),
            ({"model": mlp, "dataset": labelled, "steps": 5, "epochs": 1}, 422, "validation_error"),
            ({"model": mlp, "dataset": labelled, "seed": 2**64}, 422, "validation_error"),
            ({"model": mlp, "dataset": labelled, "batch_size": 0}, 422, "validation_error"),
            ({"model": mlp, "dataset": labelled, "extra": 1}, 422, "validation_error"),
            ({"model": cnn, "dataset": images, "method": "kfra"}, 422, "unsupported_curvature"),
            ({"model": mlp, "dataset": narrow}, 422, "incompatible_dataset"),
            ({"model": mlp, "dataset": unlabelled}, 422, "incompatible_dataset"),
            ({"model": ae, "dataset": unlabelled, "likelihood": "classification"}, 422, "incompatible_targets"),
            ({"model": ae, "dataset": outside, "likelihood": "binary"}, 422, "incompatible_targets"),
            ({"model": mlp, "dataset": floats}, 422, "incompatible_targets"),
            ({"model": mlp, "dataset": labelled, "likelihood": "binary_mixture"}, 422, "incompatible_targets"),
        ]
        for body, status, code in cases:
            r = client.post("/v1/jobs/optimise", json=body, headers=h)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["code"] == code, (body, r.json())
        assert client.get("/v1/jobs", headers=h).json() == []
        other = client.post("/v1/jobs/optimise", json={"model": mlp, "dataset": labelled}, headers=tenant_headers["b"])
        assert other.status_code == 404


def test_optimise_job_trains_a_model_that_can_be_fitted_and_served(
    redis_db, data_dir: Path, make_settings, start_worker, trained_models, tenant_headers, run_server, exporters
) -> None:
    settings = make_settings(data_dir)
    h = tenant_headers["a"]
    m = trained_models
    start_worker(settings).wait_ready()
    with run_server(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        mlp = upload(client, h, "/v1/models", "mlp.onnx", m.mlp_onnx)
        data = _data(
            client,
            h,
            x=m.x_train[:600].numpy(),
            y=m.y_train[:600].numpy(),
            x_val=m.x_val[:200].numpy(),
            y_val=m.y_val[:200].numpy(),
        )
        r = client.post(
            "/v1/jobs/optimise",
            json={"model": mlp, "dataset": data, "method": "kfac", "steps": 30, "batch_size": 100},
            headers=h,
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]["id"]
        seen: list[dict] = []
        done = wait_job(client, h, job_id, lambda j: seen.append(j) or is_final(j))
        assert done["status"] == "succeeded", done
        assert any((j.get("details") or {}).get("loss") is not None for j in seen)
        result = done["result"]
        assert result["steps"] == 30 and np.isfinite(result["final_loss"]) and result["resumed_from_step"] is None
        trained = client.get(result["links"]["model"], headers=h).json()
        assert trained["parent"] == {"model": mlp, "job": job_id} and trained["input_shape"] == [784]
        curve = client.get(result["links"]["curve"], headers=h).json()["curve"]
        assert [c["step"] for c in curve] == list(range(1, 31))
        assert {"loss", "seconds", "alpha", "tau", "zeta", "rho"} <= set(curve[0])
        png = client.get(result["links"]["curve_png"], headers=h)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
        assert client.get(f"/v1/jobs/{job_id}/artifacts", headers=h).json() == ["curve.json", "curve.png"]
        assert client.get(result["links"]["curve"], headers=tenant_headers["b"]).status_code == 404

        fit = client.post(f"/v1/models/{trained['id']}/fits", json={"dataset": data, "samples": 20}, headers=h)
        assert fit.status_code == 202, fit.text
        fitted = wait_job(client, h, fit.json()["job"]["id"], is_final)
        assert fitted["status"] == "succeeded", fitted["error"]
        pred = client.post(f"/v1/models/{trained['id']}/predict", json={"inputs": m.x_test[:4].tolist()}, headers=h)
        assert pred.status_code == 200 and len(pred.json()["results"]) == 4

        ae = upload(client, h, "/v1/models", "ae.onnx", _autoencoder_onnx(exporters))
        x = (np.random.default_rng(1).random((400, 16)) < 0.3).astype(np.float32)
        images = _data(client, h, x=x)
        losses = {}
        for method in ("kfra", "adam"):
            r = client.post(
                "/v1/jobs/optimise",
                json={"model": ae, "dataset": images, "likelihood": "binary", "method": method, "steps": 40},
                headers=h,
            )
            assert r.status_code == 202, r.text
            job = wait_job(client, h, r.json()["job"]["id"], is_final)
            assert job["status"] == "succeeded", job
            curve = client.get(job["result"]["links"]["curve"], headers=h).json()["curve"]
            assert curve[-1]["loss"] < curve[0]["loss"]
            losses[method] = job["result"]["final_loss"]
        assert losses["kfra"] < losses["adam"]


def test_sigkilled_optimise_job_resumes_from_its_checkpoint(
    redis_db, data_dir: Path, make_settings, start_worker, trained_models, tenant_headers, run_server
) -> None:
    settings = make_settings(data_dir)
    h = tenant_headers["a"]
    m = trained_models
    first = start_worker(settings).wait_ready()
    with run_server(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        mlp = upload(client, h, "/v1/models", "mlp.onnx", m.mlp_onnx)
        data = _data(client, h, x=m.x_train[:1000].numpy(), y=m.y_train[:1000].numpy())
        r = client.post(
            "/v1/jobs/optimise",
            json={
                "model": mlp,
                "dataset": data,
                "method": "kflr",
                "steps": 400,
                "batch_size": 50,
                "checkpoint_every": 10,
            },
            headers=h,
        )
        job_id = r.json()["job"]["id"]
        wait_job(client, h, job_id, lambda j: (j.get("details") or {}).get("step", 0) >= 25 or is_final(j))
        first.kill()
        stalled = client.get(f"/v1/jobs/{job_id}", headers=h).json()
        assert stalled["status"] == "running" and stalled["attempts"] == 1, stalled
        killed_at = stalled["details"]["step"]

        start_worker(settings).wait_ready()
        done = wait_job(client, h, job_id, is_final, timeout_s=300)
        assert done["status"] == "succeeded" and done["attempts"] == 2, done
        resumed = done["result"]["resumed_from_step"]
        assert resumed is not None and resumed >= 20 and resumed % 10 == 0 and resumed <= killed_at
        curve = client.get(done["result"]["links"]["curve"], headers=h).json()["curve"]
        assert [c["step"] for c in curve] == list(range(1, 401))
