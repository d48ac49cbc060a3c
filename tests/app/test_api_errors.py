"""The HTTP surface without fits: uploads, bad input, limits, ids, auth, health, metrics, embedded mode.

Requests go over HTTP to the real app under uvicorn, on the real test Redis. Every rejection must be a 4xx
JSON error and leave the artifact store untouched.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from starlette.requests import Request
from torch import nn

from app.api.auth import authenticate
from app.api.main import create_app
from app.domain.errors import Forbidden
from app.domain.settings import Settings
from workers.embedded import start_embedded

KEY_A = "tenant-a-key-" + "a" * 24
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": "Bearer tenant-b-key-" + "b" * 24}
METRICS_TOKEN = "scrape-token-" + "m" * 20


@pytest.fixture(autouse=True)
def _same_keys_as_conftest(tenant_headers: dict[str, dict[str, str]]) -> None:
    assert tenant_headers == {"a": A, "b": B}


@pytest.fixture(scope="module")
def tiny_onnx(exporters) -> bytes:
    torch.manual_seed(0)
    return exporters["onnx"](nn.Sequential(nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10)), torch.zeros(1, 784))


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The artifact store of this module's server."""
    return tmp_path_factory.mktemp("api-errors") / "data"


@pytest.fixture
def data_dir(store_root: Path) -> Path:
    """The module server's store, emptied of blobs and records before each test."""
    for area in ("blobs", "records"):
        for path in (store_root / area).rglob("*"):
            if path.is_file():
                path.unlink()
    return store_root


@pytest.fixture(scope="module")
def server(store_root: Path, make_settings, run_server) -> Iterator[object]:
    """One API server for the module (each test starts from an empty store and a flushed namespace)."""
    settings = make_settings(
        store_root, max_request_bytes=64 * 1024, max_upload_bytes=2 * 2**20, metrics_token=METRICS_TOKEN
    )
    with run_server(create_app(settings)) as running:
        yield running


@pytest.fixture
def client(redis_db, data_dir: Path, server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _npz(**arrays: object) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy_bytes(x: np.ndarray, shape_text: bytes | None = None) -> bytes:
    """``np.save`` bytes of ``x``, the header's shape text optionally replaced (same length or not)."""
    buf = io.BytesIO()
    np.save(buf, x)
    raw = buf.getvalue()
    return raw if shape_text is None else raw.replace(str(x.shape).encode(), shape_text, 1)


def _raw_npz(members: dict[str, bytes], compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(f"{name}.npy", data)
    return buf.getvalue()


def _corrupt_deflate() -> bytes:
    data = bytearray(
        _raw_npz({"x": _npy_bytes(np.arange(4000.0).reshape(1000, 4)), "y": _npy_bytes(np.arange(1000))}, True)
    )
    middle = len(data) // 3
    data[middle : middle + 16] = bytes(range(16))
    return bytes(data)


def _encrypted_flag() -> bytes:
    data = bytearray(_raw_npz({"x": _npy_bytes(np.ones((2, 2))), "y": _npy_bytes(np.arange(2))}))
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local and central headers
        at = data.find(signature)
        while at >= 0:
            data[at + flag_at] |= 1
            at = data.find(signature, at + 4)
    return bytes(data)


def _upload_model(client: httpx.Client, data: bytes, name: str = "m.onnx", headers=A, **form: str):
    return client.post("/v1/models", files={"file": (name, data)}, data=form, headers=headers)


def _assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"code", "message", "detail"} <= set(body["error"]), body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def test_upload_model_and_dataset(client: httpx.Client, tiny_onnx: bytes) -> None:
    r = _upload_model(client, tiny_onnx, task="classification", class_names=",".join("abcdefghij"))
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["format"] == "onnx" and model["input_shape"] == [784] and model["output_dim"] == 10
    assert client.get(f"/v1/models/{model['id']}", headers=A).json()["class_names"][0] == "a"
    assert [m["id"] for m in client.get("/v1/models", headers=A).json()] == [model["id"]]
    x = np.random.default_rng(0).random((30, 784)).astype(np.float64)
    r = client.post("/v1/datasets", files={"file": ("d.npz", _npz(x=x, y=np.arange(30) % 10))}, headers=A)
    assert r.status_code == 201, r.text
    assert r.json()["n"] == 30 and r.json()["num_classes"] == 10 and r.json()["x_shape"] == [784]


def _pickled_pt() -> bytes:
    buf = io.BytesIO()
    torch.save(nn.Linear(784, 10), buf)
    return buf.getvalue()


BAD_MODELS: dict[str, Callable[[bytes], tuple[str, bytes, dict]]] = {
    "pickled .pt": lambda onnx: ("model.pt", _pickled_pt(), {}),
    "raw pickle": lambda onnx: ("model.pkl", pickle.dumps({"weights": [1, 2, 3]}), {}),
    "truncated onnx": lambda onnx: ("model.onnx", onnx[: len(onnx) // 2], {}),
    "random bytes": lambda onnx: ("model.onnx", bytes(range(256)) * 4, {}),
    "class names mismatch": lambda onnx: ("model.onnx", onnx, {"class_names": "a,b,c"}),
    "bad metadata": lambda onnx: ("model.onnx", onnx, {"metadata": "{not json"}),
    "bad task": lambda onnx: ("model.onnx", onnx, {"task": "ranking"}),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_uploads_are_4xx_and_store_nothing(
    case: str, client: httpx.Client, tiny_onnx: bytes, data_dir: Path, snapshot_store
) -> None:
    before = snapshot_store(data_dir)
    name, data, form = BAD_MODELS[case](tiny_onnx)
    r = _upload_model(client, data, name, **form)
    assert 400 <= r.status_code < 500, r.text
    _assert_error(r, r.status_code)
    assert snapshot_store(data_dir) == before


BAD_DATASETS = {
    "object array": lambda: _npz(x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4)),
    "not an npz": lambda: b"x,y\n1,2\n",
    "pickle": lambda: pickle.dumps({"x": [1.0], "y": [1]}),
    "1-d inputs": lambda: _npz(x=np.zeros(4), y=np.arange(4)),
    "row mismatch": lambda: _npz(x=np.zeros((4, 3)), y=np.arange(5)),
    "nan inputs": lambda: _npz(x=np.array([[1.0, np.nan]]), y=np.array([0])),
    "inf targets": lambda: _npz(x=np.ones((2, 2)), y=np.array([1.0, np.inf])),
    "string inputs": lambda: _npz(x=np.array([["a", "b"]]), y=np.array([0])),
    "val without y_val": lambda: _npz(x=np.ones((2, 2)), y=np.arange(2), x_val=np.ones((1, 2))),
    "val shape mismatch": lambda: _npz(x=np.ones((2, 2)), y=np.arange(2), x_val=np.ones((1, 3)), y_val=np.arange(1)),
    "empty": lambda: _npz(x=np.ones((0, 2)), y=np.zeros(0, dtype=np.int64)),
    # hostile member headers and archives: numpy's header parser and zlib fail in ways other than ValueError
    "unclosed header": lambda: _raw_npz({"x": _npy_bytes(np.ones((4, 3)), b"(4, 3("), "y": _npy_bytes(np.arange(4))}),
    "header expression": lambda: _raw_npz(
        {"x": _npy_bytes(np.ones((4, 3)), b"(4*1, 3)"), "y": _npy_bytes(np.arange(4))}
    ),
    "header claims 10^13 rows": lambda: _raw_npz(
        {"x": _npy_bytes(np.ones((4, 3)), b"(9999999999999, 3)"), "y": _npy_bytes(np.arange(4))}
    ),
    "negative dimension": lambda: _raw_npz(
        {"x": _npy_bytes(np.ones((0, 3)), b"(0, -3)"), "y": _npy_bytes(np.arange(0))}
    ),
    "corrupt deflate stream": _corrupt_deflate,
    "encrypted members": _encrypted_flag,
}


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_bad_datasets_are_422_and_store_nothing(
    case: str, client: httpx.Client, data_dir: Path, snapshot_store
) -> None:
    before = snapshot_store(data_dir)
    r = client.post("/v1/datasets", files={"file": ("d.npz", BAD_DATASETS[case]())}, headers=A)
    _assert_error(r, 422)
    assert snapshot_store(data_dir) == before


def test_predict_input_validation(client: httpx.Client, tiny_onnx: bytes, data_dir: Path, snapshot_store) -> None:
    model_id = _upload_model(client, tiny_onnx).json()["id"]
    url = f"/v1/models/{model_id}/predict"
    before = snapshot_store(data_dir)
    row = [0.0] * 784
    cases = [
        ({"inputs": [[0.0] * 783]}, "invalid_shape"),
        ({"inputs": [[[0.0] * 784]]}, "invalid_shape"),
        ({"inputs": []}, "empty_batch"),
        ({"inputs": [row, row[:10]]}, "invalid_shape"),
        ({"inputs": [["a"] * 784]}, "invalid_inputs"),
        ({"inputs": row}, "invalid_shape"),
        ({"samples": 10}, "validation_error"),
        ({"inputs": [row], "samples": 0}, "validation_error"),
        ({"inputs": [row], "predictive": "exact"}, "validation_error"),
        ({"inputs": [row], "unknown": 1}, "validation_error"),
    ]
    for body, code in cases:
        _assert_error(client.post(url, json=body, headers=A), 422, code)
    unbatched = _assert_error(client.post(url, json={"inputs": row}, headers=A), 422, "invalid_shape")
    assert "without its batch dimension" in unbatched["message"]
    _assert_error(client.post(url, json={"inputs": 0.5}, headers=A), 422, "invalid_inputs")
    nan = '{"inputs": [[NaN' + ", 0.0" * 783 + "]]}"
    err = _assert_error(client.post(url, content=nan, headers={**A, "Content-Type": "application/json"}), 422)
    assert err["code"] == "non_finite" and err["detail"]["rows"] == [0]
    inf = np.zeros((2, 784), dtype=np.float32)
    inf[1, 3] = np.inf
    buf = io.BytesIO()
    np.save(buf, inf)
    npy = {**A, "Content-Type": "application/x-npy"}
    _assert_error(client.post(url, content=buf.getvalue(), headers=npy), 422, "non_finite")
    buf = io.BytesIO()
    np.save(buf, np.float32(0.5))
    assert (
        "one number"
        in _assert_error(client.post(url, content=buf.getvalue(), headers=npy), 422, "invalid_shape")["message"]
    )
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _assert_error(client.post(url, content=buf.getvalue(), headers=npy), 422, "invalid_npy")
    for shape_text, x in (
        (b"(1, 784(", np.zeros((1, 784), np.float32)),
        (b"(0, -784)", np.zeros((0, 784), np.float32)),
    ):
        _assert_error(client.post(url, content=_npy_bytes(x, shape_text), headers=npy), 422, "invalid_npy")
    _assert_error(client.post(url, content=b"{not json", headers={**A, "Content-Type": "application/json"}), 422)
    _assert_error(client.post(url, content=b"a,b", headers={**A, "Content-Type": "text/csv"}), 415)
    _assert_error(client.post(url, json={"inputs": [row]}, headers=A), 409, "no_fit")
    assert snapshot_store(data_dir) == before


def test_unknown_ids_are_404(client: httpx.Client, tiny_onnx: bytes) -> None:
    model_id = _upload_model(client, tiny_onnx).json()["id"]
    for method, url, body in [
        ("GET", "/v1/models/mdl_missing", None),
        ("DELETE", "/v1/models/mdl_missing", None),
        ("POST", "/v1/models/mdl_missing/predict", {"inputs": [[0.0] * 784]}),
        ("POST", "/v1/models/mdl_missing/fits", {"dataset": "ds_x"}),
        ("POST", f"/v1/models/{model_id}/fits", {"dataset": "ds_missing"}),
        ("POST", f"/v1/models/{model_id}/predict", {"inputs": [[0.0] * 784], "fit": "fit_missing"}),
        ("GET", "/v1/fits/fit_missing", None),
        ("GET", "/v1/jobs/job_missing", None),
        ("DELETE", "/v1/jobs/job_missing", None),
        ("GET", "/v1/datasets/ds_missing", None),
        ("GET", "/v1/models/..%2F..%2Fetc", None),
    ]:
        _assert_error(client.request(method, url, json=body, headers=A), 404)
    _assert_error(client.get("/v1/nothing-here", headers=A), 404)


def test_fit_request_validation(client: httpx.Client, tiny_onnx: bytes) -> None:
    model_id = _upload_model(client, tiny_onnx).json()["id"]
    x = np.random.default_rng(0).random((10, 784))
    ds = client.post("/v1/datasets", files={"file": ("d.npz", _npz(x=x, y=np.arange(10)))}, headers=A).json()["id"]
    url = f"/v1/models/{model_id}/fits"
    _assert_error(client.post(url, json={"dataset": ds, "curvature": "bogus"}, headers=A), 422, "validation_error")
    _assert_error(client.post(url, json={"dataset": ds, "ood_quantile": 1.5}, headers=A), 422, "validation_error")
    _assert_error(client.post(url, json={"dataset": ds, "tuning": "validation"}, headers=A), 422, "missing_validation")
    small = client.post("/v1/datasets", files={"file": ("d.npz", _npz(x=np.ones((3, 5)), y=np.arange(3)))}, headers=A)
    _assert_error(client.post(url, json={"dataset": small.json()["id"]}, headers=A), 422, "incompatible_dataset")
    labels = _npz(x=x, y=np.arange(10) + 5)
    ds_big = client.post("/v1/datasets", files={"file": ("d.npz", labels)}, headers=A).json()["id"]
    _assert_error(client.post(url, json={"dataset": ds_big}, headers=A), 422, "incompatible_dataset")
    # the OOD threshold needs two held-out inputs: the validation set's, else the training rows
    one = _npz(x=x[:1], y=np.arange(1))
    ds_one = client.post("/v1/datasets", files={"file": ("d.npz", one)}, headers=A).json()["id"]
    _assert_error(client.post(url, json={"dataset": ds_one}, headers=A), 422, "too_few_rows")
    one_val = _npz(x=x, y=np.arange(10), x_val=x[:1], y_val=np.arange(1))
    ds_one_val = client.post("/v1/datasets", files={"file": ("d.npz", one_val)}, headers=A).json()["id"]
    _assert_error(client.post(url, json={"dataset": ds_one_val}, headers=A), 422, "too_few_rows")
    _assert_error(client.post(url, json={"dataset": ds, "validation": ds_one}, headers=A), 422, "too_few_rows")
    r = client.post(url, json={"dataset": ds_one, "validation": ds}, headers=A)
    assert r.status_code == 202, r.text


def test_oversized_bodies_are_413(client: httpx.Client, tiny_onnx: bytes, data_dir: Path, snapshot_store) -> None:
    model_id = _upload_model(client, tiny_onnx).json()["id"]
    before = snapshot_store(data_dir)
    big = {"inputs": [[0.5] * 784] * 30}  # ~ 94 kB of JSON, over the 64 kB request limit
    _assert_error(client.post(f"/v1/models/{model_id}/predict", json=big, headers=A), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:
        payload = json.dumps(big).encode()
        for start in range(0, len(payload), 8192):
            yield payload[start : start + 8192]

    streamed = client.post(
        f"/v1/models/{model_id}/predict", content=chunks(), headers={**A, "Content-Type": "application/json"}
    )
    _assert_error(streamed, 413, "payload_too_large")
    huge = np.zeros((800, 784), dtype=np.float32)  # 2.5 MB, over the 2 MiB upload limit
    r = client.post("/v1/datasets", files={"file": ("d.npz", _npz(x=huge, y=np.zeros(800, dtype=np.int64)))}, headers=A)
    _assert_error(r, 413)
    assert snapshot_store(data_dir) == before


def test_tenants_are_isolated(client: httpx.Client, tiny_onnx: bytes) -> None:
    model_id = _upload_model(client, tiny_onnx).json()["id"]
    x = np.random.default_rng(0).random((10, 784))
    ds = client.post("/v1/datasets", files={"file": ("d.npz", _npz(x=x, y=np.arange(10)))}, headers=A).json()["id"]
    assert client.get(f"/v1/models/{model_id}", headers=A).status_code == 200
    _assert_error(client.get(f"/v1/models/{model_id}", headers=B), 404)
    _assert_error(client.delete(f"/v1/models/{model_id}", headers=B), 404)
    _assert_error(client.post(f"/v1/models/{model_id}/predict", json={"inputs": [[0.0] * 784]}, headers=B), 404)
    _assert_error(client.post(f"/v1/models/{model_id}/fits", json={"dataset": ds}, headers=B), 404)
    _assert_error(client.get(f"/v1/datasets/{ds}", headers=B), 404)
    assert client.get("/v1/models", headers=B).json() == []
    # B cannot fit its own model on A's data either
    b_model = _upload_model(client, tiny_onnx, headers=B).json()["id"]
    _assert_error(client.post(f"/v1/models/{b_model}/fits", json={"dataset": ds}, headers=B), 404)
    err = _assert_error(client.get("/v1/models"), 401, "unauthorized")
    assert "Bearer" in err["message"]
    _assert_error(client.get("/v1/models", headers={"Authorization": "Bearer wrong-key-000000000000"}), 401)
    _assert_error(client.get("/v1/models", headers={"Authorization": f"Basic {KEY_A}"}), 401)
    assert client.delete(f"/v1/models/{model_id}", headers=A).status_code == 204
    _assert_error(client.get(f"/v1/models/{model_id}", headers=A), 404)


def test_later_job_kinds_answer_501(client: httpx.Client) -> None:
    _assert_error(client.post("/v1/jobs/optimise", json={"curvature": "kfra"}, headers=A), 422, "validation_error")
    _assert_error(client.post("/v1/jobs/online-laplace", json={}, headers=A), 422, "validation_error")
    _assert_error(client.post("/v1/jobs/optimise", json={}), 401)


def test_health_readiness_metrics_and_docs(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "store": "ok"}
    client.get("/v1/models/mdl_nope", headers=A)
    text = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    assert 'kronlap_http_requests_total{method="GET",model="-",route="/v1/models/{model_id}",status="404"}' in text
    assert 'kronlap_queue_depth_messages{queue="fits"}' in text
    assert "kronlap_http_request_duration_seconds_bucket" in text
    spec = client.get("/openapi.json").json()
    assert {"/v1/models", "/v1/models/{model_id}/predict", "/v1/jobs/{job_id}", "/readyz"} <= set(spec["paths"])
    predict_body = spec["paths"]["/v1/models/{model_id}/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/x-npy"} <= set(predict_body)
    assert client.get("/docs").status_code == 200


def test_readiness_reports_an_unreachable_redis(data_dir: Path, make_settings, run_server) -> None:
    settings = make_settings(data_dir, redis_url="redis://127.0.0.1:1/0")
    with run_server(create_app(settings)) as server, httpx.Client(base_url=server.url) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["redis"].startswith("unreachable")
        assert client.get("/healthz").status_code == 200


def test_embedded_mode_runs_open_for_local_clients_only(tmp_path: Path, run_server) -> None:
    settings = Settings(data_dir=tmp_path / "data", redis_namespace="kltest-embedded")
    assert settings.embedded and settings.open_access
    runtime = start_embedded(settings)  # what `kronlap serve` composes without KRONLAP_REDIS_URL
    app = create_app(settings, redis_url=runtime.redis_url, on_shutdown=runtime.stop)
    with run_server(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/readyz").json()["checks"] == {"redis": "ok", "store": "ok"}
        assert client.get("/v1/models").json() == []
    remote = Request({"type": "http", "headers": [], "client": ("203.0.113.9", 4000)})
    with pytest.raises(Forbidden):
        authenticate(remote, settings)
    local = Request({"type": "http", "headers": [], "client": ("127.0.0.1", 4000)})
    assert authenticate(local, settings) == "local"
    keyed = Settings(api_keys={KEY_A: "tenant-a"})
    with pytest.raises(Exception, match="missing API key"):
        authenticate(local, keyed)
