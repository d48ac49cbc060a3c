"""Inputs far outside the training range, infinite or NaN-producing, over HTTP: never a 500, never a non-finite
number in the answer, always flagged as out of distribution — for every predictive and OOD score, alone and
in a batch with ordinary digits."""

from __future__ import annotations

import io
import math

import httpx
import numpy as np
import pytest

import curvature as cv
from app.api.main import create_app
from app.domain.backend import Backend
from app.domain.catalog import new_id
from app.domain.fits import save_fit
from app.domain.models import ModelMetadata, register_model
from curvature.options import OodScore, Predictive


def _extreme_inputs(digit: np.ndarray) -> dict[str, np.ndarray]:
    cases = {f"x{scale:g}": digit * scale for scale in (1e3, 1e10, 1e20, 1e30, 1e38, -1e38)}
    plus_minus = digit.copy()
    plus_minus[0], plus_minus[1] = np.inf, -np.inf
    one_nan = digit.copy()
    one_nan[5] = np.nan
    cases.update(
        plus_minus_inf=plus_minus,
        one_nan=one_nan,
        all_nan=np.full_like(digit, np.nan),
        all_inf=np.full_like(digit, np.inf),
    )
    return cases


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def _finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


@pytest.fixture(scope="module")
def served(tmp_path_factory, make_settings, trained_models, run_server, redis_url, redis_namespace):
    from tests.conftest import flush_namespace

    flush_namespace(redis_url, redis_namespace)
    settings = make_settings(tmp_path_factory.mktemp("extreme") / "data")
    m = trained_models
    backend = Backend.connect(settings)
    record = register_model(backend, "tenant-a", m.mlp_onnx, "mlp.onnx", ModelMetadata())
    from app.domain.kinds.fit import load_network

    net = load_network(backend, record)
    post = cv.fit_laplace(net, m.x_train[:1000], m.y_train[:1000], m.x_val, m.y_val, cv.LaplaceConfig(samples=20))
    for predictive in (Predictive.glm, Predictive.mc):
        cv.calibrate_ood(post, m.x_val, samples=20, predictive=predictive.value)
    config = {"predictive": Predictive.glm.value, "samples": 20, "curvature": "kfac"}
    save_fit(
        backend,
        post,
        id=new_id("fit"),
        tenant="tenant-a",
        model_id=record.id,
        dataset_id="ds_none",
        config=config,
        ood_score=OodScore.entropy.value,
    )
    backend.close()
    with run_server(create_app(settings)) as server:
        yield server.url, record.id
    flush_namespace(redis_url, redis_namespace)


@pytest.mark.parametrize("predictive", [p.value for p in Predictive])
@pytest.mark.parametrize("score", [s.value for s in OodScore])
def test_extreme_inputs_are_flagged_finite_and_never_500(
    served, trained_models, tenant_headers, predictive: str, score: str
) -> None:
    url, model_id = served
    digit = trained_models.x_test[0].numpy().astype(np.float32)
    cases = _extreme_inputs(digit)
    huge = {name: x for name, x in cases.items() if np.isfinite(x).all()}
    query = {"predictive": predictive, "ood_score": score, "samples": "20", "seed": "1"}
    headers = {**tenant_headers["a"], "Content-Type": "application/x-npy"}
    with httpx.Client(base_url=url, timeout=120) as client:
        batch = np.stack([digit, *huge.values(), trained_models.x_test[1].numpy()]).astype(np.float32)
        r = client.post(f"/v1/models/{model_id}/predict", content=_npy(batch), params=query, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert _finite(body), body
        results = body["results"]
        flags = [(name, res["ood"]) for name, res in zip(huge, results[1:-1], strict=True)]
        assert all(flag for _, flag in flags), flags
        for res in results:
            assert abs(sum(res["probs"]) - 1) < 1e-3
        for name, x in cases.items():
            one = client.post(f"/v1/models/{model_id}/predict", content=_npy(x[None]), params=query, headers=headers)
            if name in huge:
                assert one.status_code == 200, (name, one.text)
                assert _finite(one.json()) and one.json()["results"][0]["ood"], (name, one.json())
            else:  # NaN or infinity in the input itself: refused, with the reason
                assert one.status_code == 422 and one.json()["error"]["code"] == "non_finite", (name, one.text)


def test_json_numbers_beyond_float32_are_refused_not_500(served, tenant_headers) -> None:
    url, model_id = served
    with httpx.Client(base_url=url, timeout=60) as client:
        for value in ("1e308", "NaN", "Infinity", "-1e39"):
            body = '{"inputs": [[' + ",".join([value] + ["0"] * 783) + "]]}"
            r = client.post(
                f"/v1/models/{model_id}/predict",
                content=body,
                headers={**tenant_headers["a"], "Content-Type": "application/json"},
            )
            assert 400 <= r.status_code < 500 and r.json()["error"]["code"], (value, r.text)
        r = client.post(f"/v1/models/{model_id}/predict", json={"inputs": [[3e38] * 784]}, headers=tenant_headers["a"])
        assert r.status_code == 200 and _finite(r.json()) and r.json()["results"][0]["ood"], r.text
