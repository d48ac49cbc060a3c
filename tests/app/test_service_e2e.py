"""End to end over HTTP: a real uvicorn server, a real worker process, the real test Redis.

Upload an ONNX MLP and a ``.pt2`` CNN, upload MNIST-5k slices, fit (KFAC, KFLR) on the worker while polling
progress, then predict digits and letters; compare HTTP answers with the in-process posterior.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch

from app.api.main import create_app
from app.domain.kinds import QUEUES
from app.domain.queue import dramatiq_namespace
from tests.conftest import flush_namespace
from tests.jobhelpers import npz_bytes

pytestmark = pytest.mark.slow

METRICS_TOKEN = "e2e-scrape-token-" + "t" * 20
SCRAPE = {"Authorization": f"Bearer {METRICS_TOKEN}"}


@dataclass
class Service:
    url: str
    settings: object
    client: httpx.Client
    data_dir: Path
    headers: dict[str, str]
    fits: dict[str, dict] = field(default_factory=dict)




def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def service(
    tmp_path_factory, make_settings, redis_url, redis_namespace, tenant_headers, run_server
) -> Iterator[Service]:
    from tests.conftest import WorkerProcess

    root = tmp_path_factory.mktemp("e2e")
    data_dir = root / "data"
    settings = make_settings(data_dir, predict_max_wait_ms=5.0, metrics_token=METRICS_TOKEN)
    flush_namespace(redis_url, redis_namespace)
    worker = WorkerProcess(settings, root / "worker.log", root / "worker.heartbeat")
    try:
        with run_server(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=120) as client:
            worker.wait_ready()
            yield Service(server.url, settings, client, data_dir, tenant_headers["a"])
    finally:
        worker.stop()
        flush_namespace(redis_url, redis_namespace)


def _poll(service: Service, job_id: str, timeout_s: float = 150) -> tuple[dict, list[float]]:
    seen: list[float] = []
    deadline = time.monotonic() + timeout_s
    while True:
        job = service.client.get(f"/v1/jobs/{job_id}", headers=service.headers).json()
        seen.append(job["progress"])
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job, seen
        assert time.monotonic() < deadline, f"job {job_id} stuck: {job}"
        time.sleep(0.05)


def _wait_until(condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _queue_drained(service: Service) -> bool:
    client = redis.Redis.from_url(service.settings.redis_url)
    try:
        namespace = dramatiq_namespace(service.settings)
        waiting = sum(client.llen(f"{namespace}:{queue}") for queue in QUEUES)
        unacked = sum(client.scard(key) for key in client.scan_iter(f"{namespace}:__acks__.*"))
        return waiting == 0 and unacked == 0
    finally:
        client.close()


def _fit(
    service: Service, model_file: tuple[str, bytes], meta: dict, data: dict, fit: dict, validation: dict | None = None
) -> dict:
    h = service.headers
    r = service.client.post("/v1/models", files={"file": model_file}, data=meta, headers=h)
    assert r.status_code == 201, r.text
    model = r.json()
    r = service.client.post("/v1/datasets", files={"file": ("train.npz", npz_bytes(**data))}, headers=h)
    assert r.status_code == 201, r.text
    dataset = r.json()
    body = {"dataset": dataset["id"], **fit}
    if validation is not None:
        r = service.client.post("/v1/datasets", files={"file": ("val.npz", npz_bytes(**validation))}, headers=h)
        assert r.status_code == 201, r.text
        body["validation"] = r.json()["id"]
    r = service.client.post(f"/v1/models/{model['id']}/fits", json=body, headers=h)
    assert r.status_code == 202, r.text
    submitted = r.json()
    job, seen = _poll(service, submitted["job"]["id"])
    assert job["status"] == "succeeded", job
    return {"model": model, "fit_id": submitted["fit_id"], "job": job, "progress": seen}


@pytest.fixture(scope="module")
def mlp_fit(service: Service, trained_models) -> dict:
    m = trained_models
    return _fit(
        service,
        ("mlp.onnx", m.mlp_onnx),
        {"task": "classification", "class_names": ",".join(str(d) for d in range(10))},
        {
            "x": m.x_train[:1000].numpy(),
            "y": m.y_train[:1000].numpy(),
            "x_val": m.x_val[:150].numpy(),
            "y_val": m.y_val[:150].numpy(),
        },
        {"curvature": "kfac", "samples": 20, "ood_score": "entropy"},
    )


@pytest.fixture(scope="module")
def cnn_fit(service: Service, trained_models) -> dict:
    m = trained_models
    images = m.x_train[:1000].reshape(-1, 1, 28, 28).numpy()
    return _fit(
        service,
        ("cnn.pt2", m.cnn_pt2),
        {"metadata": '{"task": "classification", "name": "cnn"}'},
        {"x": images, "y": m.y_train[:1000].numpy()},
        {"curvature": "kflr", "samples": 20, "ood_score": "mutual_information"},
        validation={"x": m.x_val[:150].reshape(-1, 1, 28, 28).numpy(), "y": m.y_val[:150].numpy()},
    )


def _predict(service: Service, model_id: str, x: np.ndarray, npy: bool = False, **options) -> dict:
    url = f"/v1/models/{model_id}/predict"
    if npy:
        params = {k: str(v) for k, v in options.items()}
        r = service.client.post(
            url, content=_npy(x), params=params, headers={**service.headers, "Content-Type": "application/x-npy"}
        )
    else:
        r = service.client.post(url, json={"inputs": x.tolist(), **options}, headers=service.headers)
    assert r.status_code == 200, r.text
    return r.json()


def test_fit_jobs_report_progress_and_produce_fits(service: Service, mlp_fit: dict, cnn_fit: dict) -> None:
    for fitted in (mlp_fit, cnn_fit):
        seen = fitted["progress"]
        assert all(0.0 <= p <= 1.0 for p in seen)
        assert any(0.0 < p < 1.0 for p in seen), seen
        assert seen[-1] == 1.0
        job = fitted["job"]
        assert job["result"]["fit"] == fitted["fit_id"] and job["links"]["fit"] == f"/v1/fits/{fitted['fit_id']}"
        assert job["attempts"] == 1 and job["finished_at"] >= job["started_at"] >= job["created_at"]
        fit = service.client.get(f"/v1/fits/{fitted['fit_id']}", headers=service.headers).json()
        assert fit["status"] == "succeeded" and fit["model_id"] == fitted["model"]["id"]
        # The fit's own predictive is always calibrated (the other one only when it was tuned as well).
        own = fit["config"]["predictive"]
        assert own in fit["ood_thresholds"] and set(fit["ood_thresholds"]) <= {"mc", "glm"}
        assert set(fit["ood_thresholds"][own]) >= {"entropy", "mutual_information", "max_prob"}
        listed = service.client.get(f"/v1/models/{fitted['model']['id']}/fits", headers=service.headers).json()
        assert [f["id"] for f in listed] == [fitted["fit_id"]]
    assert mlp_fit["job"]["result"] and cnn_fit["model"]["input_shape"] == [1, 28, 28]
    from app.cli import wait

    key = service.headers["Authorization"].removeprefix("Bearer ")
    assert wait(mlp_fit["job"]["id"], service.url, key, interval_s=0.01) == 0
    assert (
        service.client.get(f"/v1/fits/{cnn_fit['fit_id']}", headers=service.headers).json()["config"]["curvature"]
        == "kflr"
    )


@pytest.mark.montecarlo
@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_letters_are_flagged_ood_far_more_often_than_digits(
    which: str, service: Service, mlp_fit: dict, cnn_fit: dict, trained_models
) -> None:
    fitted = mlp_fit if which == "mlp" else cnn_fit
    shape = (-1, *fitted["model"]["input_shape"])
    digits = trained_models.x_test.reshape(shape).numpy()
    letters = trained_models.letters.reshape(shape).numpy()
    use_npy = which == "cnn"
    out_digits = _predict(service, fitted["model"]["id"], digits, npy=use_npy, samples=30, seed=1)
    out_letters = _predict(service, fitted["model"]["id"], letters, npy=use_npy, samples=30, seed=1)
    rate_digits = np.mean([r["ood"] for r in out_digits["results"]])
    rate_letters = np.mean([r["ood"] for r in out_letters["results"]])
    assert out_digits["ood_score"] == ("entropy" if which == "mlp" else "mutual_information")
    assert rate_letters > 2.5 * rate_digits and rate_letters - rate_digits > 0.08, (rate_digits, rate_letters)
    accuracy = np.mean([r["predicted_class"] for r in out_digits["results"]] == trained_models.y_test.numpy())
    assert accuracy > 0.8
    first = out_digits["results"][0]
    assert {"probs", "entropy", "expected_entropy", "mutual_information", "ood", "ood_score", "ood_threshold"} <= set(
        first
    )
    assert abs(sum(first["probs"]) - 1) < 1e-4
    assert first["mutual_information"] == pytest.approx(first["entropy"] - first["expected_entropy"], abs=1e-5)


def _in_process(service: Service, fitted: dict):
    import curvature as cv
    from app.domain.catalog import Catalog
    from app.domain.modelio import load_model
    from app.domain.store import ArtifactStore

    catalog = Catalog(ArtifactStore(service.data_dir))
    model = catalog.get_model(fitted["model"]["id"], None)
    fit = catalog.get_fit(fitted["fit_id"], None)
    module = load_model(catalog.store.get_blob(model.sha256), model.filename, tuple(model.input_shape)).module
    return cv.LaplacePosterior.from_bytes(catalog.store.get_blob(fit.posterior_sha256), module)


@pytest.mark.parametrize("predictive", ["mc", "glm"])
def test_http_equals_in_process_predict_for_the_same_seed(
    predictive: str, service: Service, mlp_fit: dict, trained_models
) -> None:
    posterior = _in_process(service, mlp_fit)
    x = torch.cat([trained_models.x_test[:12], trained_models.letters[:12]])
    local = posterior.predict(x, samples=25, predictive=predictive, ood_score="mutual_information", seed=11)
    remote = _predict(
        service,
        mlp_fit["model"]["id"],
        x.numpy(),
        samples=25,
        predictive=predictive,
        ood_score="mutual_information",
        seed=11,
    )
    assert remote["ood_score"] == "mutual_information" and remote["predictive"] == predictive
    results = remote["results"]
    np.testing.assert_allclose([r["probs"] for r in results], local["probs"].numpy(), rtol=1e-5, atol=1e-6)
    for name in ("entropy", "expected_entropy", "mutual_information", "ood_score"):
        np.testing.assert_allclose([r[name] for r in results], local[name].numpy(), rtol=1e-5, atol=1e-6)
    assert [r["ood"] for r in results] == local["ood"].tolist()
    if "mutual_information" in posterior.ood_table.get(predictive, {}):
        assert remote["ood_threshold"] == pytest.approx(posterior.ood_threshold("mutual_information", predictive))
    else:  # a predictive the fit did not calibrate: no threshold, and the flag only for out-of-range inputs
        assert remote["ood_threshold"] is None
    assert all(r["ood_threshold"] == remote["ood_threshold"] for r in results)


def test_npy_body_matches_json_body(service: Service, cnn_fit: dict, trained_models) -> None:
    x = trained_models.x_test[:8].reshape(-1, 1, 28, 28).numpy()
    as_json = _predict(service, cnn_fit["model"]["id"], x, samples=10, seed=3)
    as_npy = _predict(service, cnn_fit["model"]["id"], x, npy=True, samples=10, seed=3)
    flat = _predict(service, cnn_fit["model"]["id"], x.reshape(8, -1), samples=10, seed=3)
    assert as_json["results"] == as_npy["results"] == flat["results"]


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_concurrent_requests_are_micro_batched(service: Service, mlp_fit: dict, trained_models) -> None:
    model_id = mlp_fit["model"]["id"]
    rows = trained_models.x_test[:24].numpy()
    before = service.client.get("/metrics", headers=SCRAPE).text

    def one(i: int) -> dict:
        with httpx.Client(base_url=service.url, timeout=60) as client:
            r = client.post(
                f"/v1/models/{model_id}/predict",
                json={"inputs": [rows[i].tolist()], "samples": 20},
                headers=service.headers,
            )
            assert r.status_code == 200, r.text
            return r.json()

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(24)))
    assert all(len(a["results"]) == 1 for a in answers)
    after = service.client.get("/metrics", headers=SCRAPE).text
    calls = _metric(after, "kronlap_predict_batch_requests_count") - _metric(
        before, "kronlap_predict_batch_requests_count"
    )
    merged = _metric(after, "kronlap_predict_batch_requests_sum") - _metric(
        before, "kronlap_predict_batch_requests_sum"
    )
    assert merged == 24 and calls < 24, (calls, merged)
    assert 'kronlap_predict_inputs_total{model="' + model_id in after
    assert "kronlap_predict_mc_samples_bucket" in after


def test_predict_survives_a_redis_flush(
    service: Service, mlp_fit: dict, trained_models, redis_url, redis_namespace, run_server
) -> None:
    x = trained_models.x_test[:5].numpy()
    before = _predict(service, mlp_fit["model"]["id"], x, samples=10, seed=5)
    flush_namespace(redis_url, redis_namespace)
    # A fresh API process (no predictor in memory, nothing in Redis) must reload the fit from the store.
    with run_server(create_app(service.settings)) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        loads = _metric(c.get("/metrics", headers=SCRAPE).text, 'kronlap_predictor_loads_total{source="store"}')
        r = c.post(
            f"/v1/models/{mlp_fit['model']['id']}/predict",
            json={"inputs": x.tolist(), "samples": 10, "seed": 5},
            headers=service.headers,
        )
        assert r.status_code == 200, r.text
        assert r.json()["results"] == before["results"]
        assert _metric(c.get("/metrics", headers=SCRAPE).text, 'kronlap_predictor_loads_total{source="store"}') == loads + 1
        fit = c.get(f"/v1/fits/{mlp_fit['fit_id']}", headers=service.headers).json()
        assert fit["status"] == "succeeded"


def test_cancelling_a_fit(service: Service, mlp_fit: dict, trained_models) -> None:
    h = service.headers
    m = trained_models
    ds = service.client.post(
        "/v1/datasets", files={"file": ("d.npz", npz_bytes(x=m.x_train[:300].numpy(), y=m.y_train[:300].numpy()))}, headers=h
    ).json()["id"]
    r = service.client.post(f"/v1/models/{mlp_fit['model']['id']}/fits", json={"dataset": ds, "samples": 5}, headers=h)
    job_id, fit_id = r.json()["job"]["id"], r.json()["fit_id"]
    cancelled = service.client.delete(f"/v1/jobs/{job_id}", headers=h)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = service.client.delete(f"/v1/jobs/{job_id}", headers=h)
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    assert service.client.get(f"/v1/fits/{fit_id}", headers=h).json()["status"] == "cancelled"
    # The worker still receives the message; wait until it has taken and acknowledged it (queue and
    # acknowledgement sets empty), then the record must still say cancelled.
    _wait_until(lambda: _queue_drained(service), "the worker never took the cancelled message")
    assert service.client.get(f"/v1/jobs/{job_id}", headers=h).json()["status"] == "cancelled"
    assert service.client.get(f"/v1/fits/{fit_id}", headers=h).json()["status"] == "cancelled"
    listed = service.client.get(f"/v1/models/{mlp_fit['model']['id']}/fits", headers=h).json()
    assert fit_id not in [f["id"] for f in listed]


def test_regression_model_end_to_end(service: Service, exporters) -> None:
    from curvature.data import toy_regression

    x, y = toy_regression(n=40, seed=0)
    x, y = x / 4, y / 50
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(800):
        optimiser.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        optimiser.step()
    fitted = _fit(
        service,
        ("regressor.onnx", exporters["onnx"](net.eval(), torch.zeros(1, 1))),
        {"task": "regression"},
        {"x": x.numpy(), "y": y.numpy()},
        {"curvature": "kflr", "tuning": "marglik", "samples": 20},
    )
    assert fitted["model"]["task"] == "regression" and fitted["model"]["output_dim"] == 1
    out = _predict(service, fitted["model"]["id"], np.array([[0.0], [0.5], [3.0]], dtype=np.float32), seed=0)
    assert out["task"] == "regression" and len(out["results"]) == 3
    for row in out["results"]:
        assert {"mean", "variance", "aleatoric_variance", "epistemic_variance", "ood", "ood_score"} <= set(row)
        assert "probs" not in row
        total = np.ravel(row["variance"])[0]
        parts = np.ravel(row["aleatoric_variance"])[0] + np.ravel(row["epistemic_variance"])[0]
        assert total == pytest.approx(parts, rel=1e-4)
    labels = service.client.post(
        "/v1/datasets", files={"file": ("l.npz", npz_bytes(x=x.numpy(), y=np.arange(40)))}, headers=service.headers
    ).json()["id"]
    r = service.client.post(
        f"/v1/models/{fitted['model']['id']}/fits", json={"dataset": labels}, headers=service.headers
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "incompatible_dataset"


def test_layer_norm_prelu_selu_model_end_to_end(service: Service, trained_models, exporters) -> None:
    """A model with LayerNorm, PReLU and SELU between its layers: uploaded as ``.pt2``, fitted with no options,
    predicted over HTTP; KFRA (which needs element-wise activations) is refused for it by name."""
    m = trained_models
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(784, 32), torch.nn.LayerNorm(32), torch.nn.PReLU(32), torch.nn.Linear(32, 32),
        torch.nn.SELU(), torch.nn.Linear(32, 10),
    )  # fmt: skip
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    for i in range(0, 2000, 100):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(net(m.x_train[i : i + 100]), m.y_train[i : i + 100]).backward()
        optimiser.step()
    fitted = _fit(
        service,
        ("ln.pt2", exporters["pt2"](net.eval(), torch.zeros(2, 784))),
        {"task": "classification"},
        {"x": m.x_train[:600].numpy(), "y": m.y_train[:600].numpy()},
        {"samples": 20},
        validation={"x": m.x_val[:150].numpy(), "y": m.y_val[:150].numpy()},
    )
    assert "kfra" not in fitted["model"]["curvatures"]
    out = _predict(service, fitted["model"]["id"], m.x_val[:5].numpy(), seed=0)
    for row in out["results"]:
        assert sum(row["probs"]) == pytest.approx(1.0, abs=1e-5) and np.isfinite(row["ood_score"])
    data = npz_bytes(x=m.x_train[:50].numpy(), y=m.y_train[:50].numpy())
    dataset = service.client.post("/v1/datasets", files={"file": ("d.npz", data)}, headers=service.headers).json()
    r = service.client.post(
        f"/v1/models/{fitted['model']['id']}/fits",
        json={"dataset": dataset["id"], "curvature": "kfra"},
        headers=service.headers,
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_curvature", r.text
