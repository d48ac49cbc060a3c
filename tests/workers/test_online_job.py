"""Online-Laplace jobs over HTTP with real worker processes: inconsistent requests are refused before queueing, a
two-task job finishes with its accuracy matrix and a servable model, ``continue_from`` adds a third task, and a
worker SIGKILLed mid-job resumes at the task it was on."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from app.api.main import create_app
from tests.jobhelpers import is_final, npz_bytes, upload, wait_job

pytestmark = pytest.mark.slow


def _tasks(client: httpx.Client, h: dict, m, count: int, n: int = 300) -> list[str]:
    """Permuted-MNIST tasks: task 0 is the plain digits, task t a fixed seeded pixel permutation."""
    ids = []
    for t in range(count):
        perm = torch.arange(784) if t == 0 else torch.randperm(784, generator=torch.Generator().manual_seed(t))
        x, y = m.x_train[t * n : (t + 1) * n][:, perm], m.y_train[t * n : (t + 1) * n]
        xv, yv = m.x_val[:100][:, perm], m.y_val[:100]
        data = npz_bytes(x=x.numpy(), y=y.numpy(), x_val=xv.numpy(), y_val=yv.numpy())
        ids.append(upload(client, h, "/v1/datasets", f"task{t}.npz", data))
    return ids


def test_online_laplace_job_learns_tasks_serves_the_result_and_continues(
    redis_db, data_dir: Path, make_settings, start_worker, trained_models, tenant_headers, run_server
) -> None:
    settings = make_settings(data_dir)
    h = tenant_headers["a"]
    m = trained_models
    start_worker(settings).wait_ready()
    with run_server(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        mlp = upload(client, h, "/v1/models", "mlp.onnx", m.mlp_onnx)
        tasks = _tasks(client, h, m, 3)
        no_val = upload(
            client, h, "/v1/datasets", "d.npz", npz_bytes(x=m.x_train[:50].numpy(), y=m.y_train[:50].numpy())
        )
        refused = [
            ({"datasets": tasks[:1]}, "validation_error"),
            ({"model": mlp, "continue_from": "job_x", "datasets": tasks[:1]}, "validation_error"),
            ({"model": mlp, "datasets": []}, "validation_error"),
            ({"model": mlp, "datasets": tasks[:1], "method": "bayes"}, "validation_error"),
            ({"model": mlp, "datasets": tasks[:1], "strength": -1.0}, "validation_error"),
            ({"model": mlp, "datasets": [no_val]}, "missing_validation"),
            ({"model": mlp, "datasets": ["ds_missing"]}, "not_found"),
            ({"continue_from": "job_missing", "datasets": tasks[:1]}, "cannot_continue"),
        ]
        for body, code in refused:
            r = client.post("/v1/jobs/online-laplace", json=body, headers=h)
            assert 400 <= r.status_code < 500 and r.json()["error"]["code"] == code, (body, r.text)
        assert client.get("/v1/jobs", headers=h).json() == []

        body = {"model": mlp, "datasets": tasks[:2], "method": "online", "curvature": "kflr", "strength": 10.0}
        r = client.post("/v1/jobs/online-laplace", json={**body, "epochs": 8, "lr": 5e-3}, headers=h)
        assert r.status_code == 202, r.text
        first = wait_job(client, h, r.json()["job"]["id"], is_final)
        assert first["status"] == "succeeded", first
        R = first["result"]["accuracy"]
        assert [len(row) for row in R] == [1, 2] and all(0 <= a <= 1 for row in R for a in row)
        assert R[1][1] > 0.4  # the permuted task was learned (chance: 0.1)
        links = first["result"]["links"]
        png = client.get(links["accuracy_png"], headers=h)
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        assert client.get(links["accuracy"], headers=h).json()["accuracy"] == R
        model = client.get(links["model"], headers=h).json()
        assert model["parent"]["job"] == first["id"]
        fit = client.get(links["fit"], headers=h).json()
        assert fit["status"] == "succeeded" and fit["ood_thresholds"]
        pred = client.post(f"/v1/models/{model['id']}/predict", json={"inputs": m.x_test[:3].tolist()}, headers=h)
        assert pred.status_code == 200, pred.text
        assert all(abs(sum(res["probs"]) - 1) < 1e-4 for res in pred.json()["results"])

        clash = client.post(
            "/v1/jobs/online-laplace",
            json={"continue_from": first["id"], "datasets": tasks[2:], "method": "ewc"},
            headers=h,
        )
        assert clash.status_code == 422 and clash.json()["error"]["code"] == "inconsistent_continuation"
        other = client.post(
            "/v1/jobs/online-laplace",
            json={"continue_from": first["id"], "datasets": tasks[2:]},
            headers=tenant_headers["b"],
        )
        assert other.status_code in (404, 409)
        r = client.post(
            "/v1/jobs/online-laplace",
            json={"continue_from": first["id"], "datasets": tasks[2:], "epochs": 3},
            headers=h,
        )
        assert r.status_code == 202, r.text
        second = wait_job(client, h, r.json()["job"]["id"], is_final)
        assert second["status"] == "succeeded", second
        R2 = second["result"]["accuracy"]
        assert [len(row) for row in R2] == [1, 2, 3] and R2[:2] == R
        served = second["result"]["model"]
        pred = client.post(f"/v1/models/{served}/predict", json={"inputs": m.x_test[:3].tolist()}, headers=h)
        assert pred.status_code == 200, pred.text


def test_sigkilled_online_laplace_job_resumes_at_its_task(
    redis_db, data_dir: Path, make_settings, start_worker, trained_models, tenant_headers, run_server
) -> None:
    settings = make_settings(data_dir)
    h = tenant_headers["a"]
    m = trained_models
    first = start_worker(settings).wait_ready()
    with run_server(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        mlp = upload(client, h, "/v1/models", "mlp.onnx", m.mlp_onnx)
        tasks = _tasks(client, h, m, 3, n=600)
        r = client.post(
            "/v1/jobs/online-laplace",
            json={
                "model": mlp,
                "datasets": tasks,
                "method": "online",
                "curvature": "kfac",
                "strength": 3.0,
                "epochs": 15,
            },
            headers=h,
        )
        job_id = r.json()["job"]["id"]
        wait_job(client, h, job_id, lambda j: (j.get("details") or {}).get("task", 0) >= 1 or is_final(j))
        first.kill()
        stalled = client.get(f"/v1/jobs/{job_id}", headers=h).json()
        assert stalled["status"] == "running" and stalled["attempts"] == 1, stalled
        done_tasks = stalled["details"]["task"]

        start_worker(settings).wait_ready()
        done = wait_job(client, h, job_id, is_final)
        assert done["status"] == "succeeded" and done["attempts"] == 2, done
        resumed = done["result"]["resumed_at"]
        assert resumed is not None and resumed["task"] >= done_tasks >= 1
        assert [len(row) for row in done["result"]["accuracy"]] == [1, 2, 3]
