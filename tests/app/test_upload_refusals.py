"""Uploads the curvature core cannot fit are refused at ``POST /v1/models`` with a 422 that says why; what
users export every day (SiLU, padding="same", weights in external data) uploads.

Requests go over HTTP to the real app under uvicorn, on the real test Redis.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from app.api.main import create_app


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("upload-refusals") / "data"


@pytest.fixture(scope="module")
def server(store_root: Path, make_settings, run_server) -> Iterator[object]:
    with run_server(create_app(make_settings(store_root))) as running:
        yield running


@pytest.fixture
def client(redis_db, server, tenant_headers) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120, headers=tenant_headers["a"]) as c:
        yield c


def _upload(client: httpx.Client, data: bytes, filename: str) -> httpx.Response:
    return client.post("/v1/models", files={"file": (filename, data)}, data={"task": "classification"})


def _refusal(response: httpx.Response, code: str) -> dict:
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "detail"}, body
    assert body["error"]["code"] == code, body
    return body["error"]


def _grouped_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_grouped_convolution_is_refused_with_a_reason(
    fmt: str, client: httpx.Client, exporters, store_root: Path, snapshot_store
) -> None:
    torch.manual_seed(0)
    data = exporters[fmt](_grouped_cnn(), torch.zeros(2, 4, 8, 8))
    before = snapshot_store(store_root)
    error = _refusal(_upload(client, data, f"grouped.{fmt}"), "unsupported_layer")
    assert "grouped convolution (groups=2)" in error["message"] and "groups=1" in error["message"]
    assert error["detail"]["groups"] == 2 and error["detail"]["op"] in ("Conv", "aten.conv2d.default")
    assert snapshot_store(store_root) == before
    assert client.get("/v1/models").json() == []


@pytest.mark.parametrize("kernel", [3, 4])
def test_padding_same_from_pt2_uploads(kernel: int, client: httpx.Client, exporters) -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 3, kernel, padding="same"), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 3))
    response = _upload(client, exporters["pt2"](net.eval(), torch.zeros(2, 2, 6, 6)), "same.pt2")
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["input_shape"] == [2, 6, 6] and model["output_dim"] == 3
    assert "kflr" in model["curvatures"] and "kfra" not in model["curvatures"]


def test_silu_mlp_from_onnx_uploads_with_kfra(client: httpx.Client, exporters) -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 3))
    response = _upload(client, exporters["onnx"](net.eval(), torch.zeros(2, 8)), "silu.onnx")
    assert response.status_code == 201, response.text
    assert {"kfac", "kflr", "kfra"} <= set(response.json()["curvatures"])


def test_onnx_with_external_data_uploads_as_a_zip(client: httpx.Client, tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 8),), tmp_path / "model.onnx", input_names=["x"])
    alone = _refusal(_upload(client, (tmp_path / "model.onnx").read_bytes(), "model.onnx"), "invalid_onnx")
    assert alone["detail"]["missing"] == ["model.onnx.data"]

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in ("model.onnx", "model.onnx.data"):
            archive.write(tmp_path / name, name)
    response = _upload(client, buf.getvalue(), "model.zip")
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "onnx" and "kfra" in response.json()["curvatures"]

    hostile = io.BytesIO()
    with zipfile.ZipFile(hostile, "w") as archive:
        archive.write(tmp_path / "model.onnx", "model.onnx")
        archive.write(tmp_path / "model.onnx.data", "../model.onnx.data")
    _refusal(_upload(client, hostile.getvalue(), "model.zip"), "unsafe_archive")
