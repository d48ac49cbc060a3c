"""The Python client and the ``kronlap`` CLI against a real server, a real worker and the real test Redis:
upload a model and a dataset, fit and wait, predict from .npy and .npz files, list, show and delete."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from app.api.main import create_app
from app.cli import _details_text, main
from app.client import ApiError, Client

pytestmark = pytest.mark.slow


@dataclass
class Running:
    url: str
    key: str
    tmp: Path


@pytest.fixture
def running(redis_db, tmp_path: Path, make_settings, run_server, start_worker, tenant_headers) -> Iterator[Running]:
    settings = make_settings(tmp_path / "data")
    worker = start_worker(settings)
    key = tenant_headers["a"]["Authorization"].removeprefix("Bearer ")
    with run_server(create_app(settings)) as server:
        worker.wait_ready()
        yield Running(server.url, key, tmp_path)


def _cli(capsys, running: Running, *args: str) -> tuple[int, str, str]:
    code = main([*args[:2], "--url", running.url, "--api-key", running.key, *args[2:]])
    out = capsys.readouterr()
    return code, out.out, out.err


def _json(text: str):
    return json.loads(text)


def test_every_step_through_the_cli(capsys, running: Running, trained_models) -> None:
    m = trained_models
    onnx = running.tmp / "mlp.onnx"
    onnx.write_bytes(m.mlp_onnx)
    train = running.tmp / "train.npz"
    buf = io.BytesIO()
    np.savez(buf, x=m.x_train[:1000].numpy(), y=m.y_train[:1000].numpy())
    train.write_bytes(buf.getvalue())

    code, out, _ = _cli(capsys, running, "models", "upload", str(onnx), "--class-names", ",".join("0123456789"))
    assert code == 0, out
    model = _json(out)
    assert model["class_names"][3] == "3" and model["input_shape"] == [784]
    code, out, _ = _cli(capsys, running, "datasets", "upload", str(train), "--name", "digits")
    dataset = _json(out)
    assert code == 0 and dataset["n"] == 1000 and dataset["name"] == "digits"
    assert [d["id"] for d in _json(_cli(capsys, running, "datasets", "list")[1])] == [dataset["id"]]
    assert _json(_cli(capsys, running, "models", "get", model["id"])[1])["id"] == model["id"]

    args = ("fit", model["id"], dataset["id"], "--curvature", "kfac", "--tuning", "none", "--samples", "10")
    code, out, err = _cli(capsys, running, *args, "--option", "mc_samples=2", "--wait")
    assert code == 0, (out, err)
    fitted = _json(out)
    assert fitted["job"]["status"] == "succeeded" and fitted["job"]["progress"] == 1.0
    fit_id, job_id = fitted["fit_id"], fitted["job"]["id"]
    assert [f["id"] for f in _json(_cli(capsys, running, "fits", "list", model["id"])[1])] == [fit_id]
    assert _json(_cli(capsys, running, "fits", "get", fit_id)[1])["config"]["mc_samples"] == 2
    assert job_id in [j["id"] for j in _json(_cli(capsys, running, "jobs", "list")[1])]
    assert _json(_cli(capsys, running, "jobs", "get", job_id)[1])["status"] == "succeeded"
    code, out, _ = _cli(capsys, running, "wait", job_id)
    assert code == 0 and _json(out)["status"] == "succeeded"
    code, _, err = _cli(capsys, running, "jobs", "cancel", job_id)
    assert code == 1 and "409" in err and "job_finished" in err

    x = m.x_test[:5].numpy()
    npy = running.tmp / "x.npy"
    np.save(npy, x)
    npz = running.tmp / "batch.npz"
    np.savez(npz, images=x, labels=np.arange(5))
    code, out, _ = _cli(capsys, running, "predict", model["id"], str(npy), "--samples", "10", "--seed", "4")
    from_npy = _json(out)
    assert code == 0 and len(from_npy["results"]) == 5 and from_npy["fit"] == fit_id
    code, out, _ = _cli(
        capsys, running, "predict", model["id"], str(npz), "--key", "images", "--seed", "4", "--samples", "10"
    )
    assert code == 0 and _json(out)["results"] == from_npy["results"]
    code, out, err = _cli(capsys, running, "predict", model["id"], str(npz))
    assert code == 1 and "images" in err  # two arrays, none named x: the CLI asks which
    target = running.tmp / "answer.json"
    code, out, _ = _cli(capsys, running, "predict", model["id"], str(npy), "-o", str(target))
    assert code == 0 and "5 results" in out and len(json.loads(target.read_text())["results"]) == 5

    code, out, _ = _cli(capsys, running, "health")
    assert code == 0 and _json(out)["readyz"]["status"] == "ready"
    assert _cli(capsys, running, "datasets", "delete", dataset["id"])[0] == 0
    assert _cli(capsys, running, "models", "delete", model["id"])[0] == 0
    code, _, err = _cli(capsys, running, "models", "get", model["id"])
    assert code == 1 and "404" in err and "not_found" in err
    assert _json(_cli(capsys, running, "models", "list")[1]) == []


def test_the_python_client(running: Running, trained_models) -> None:
    m = trained_models
    client = Client(running.url, running.key)
    model = client.upload_model(m.mlp_onnx, filename="mlp.onnx", task="classification")
    buf = io.BytesIO()
    np.savez(buf, x=m.x_train[:1000].numpy(), y=m.y_train[:1000].numpy())
    dataset = client.upload_dataset(buf.getvalue())
    seen: list[dict] = []
    submitted = client.fit(model["id"], dataset["id"], curvature="kfac", tuning="none", samples=5)
    job = client.wait(submitted["job"]["id"], on_update=seen.append, interval_s=0.2)
    assert job["status"] == "succeeded" and seen[-1] == job
    answer = client.predict(model["id"], m.x_test[:2].tolist(), samples=5)
    assert len(answer["results"]) == 2 and answer["samples"] == 5
    with pytest.raises(ApiError) as caught:
        client.model("mdl_missing")
    assert caught.value.status == 404 and caught.value.code == "not_found"
    with pytest.raises(ApiError) as caught:
        Client(running.url, "wrong-key-0000000000000").models()
    assert caught.value.status == 401
    with pytest.raises(ApiError) as caught:
        Client("http://127.0.0.1:9", running.key, timeout_s=5).models()
    assert caught.value.status == 0 and caught.value.code == "unreachable"


def test_details_beside_the_progress_bar() -> None:
    assert _details_text({"step": 3, "loss": 0.123456, "curve": [1, 2]}) == "step=3 loss=0.1235"
    assert _details_text(None) == ""


def test_training_jobs_through_the_cli_and_the_client(capsys, running: Running, trained_models) -> None:
    m = trained_models
    client = Client(running.url, running.key)
    model = client.upload_model(m.mlp_onnx, filename="mlp.onnx")
    tasks = []
    for t in range(2):
        buf = io.BytesIO()
        rows = slice(300 * t, 300 * (t + 1))
        np.savez(
            buf,
            x=m.x_train[rows].numpy(),
            y=m.y_train[rows].numpy(),
            x_val=m.x_val[:60].numpy(),
            y_val=m.y_val[:60].numpy(),
        )
        tasks.append(client.upload_dataset(buf.getvalue())["id"])

    args = ("optimise", model["id"], tasks[0], "--method", "kfac", "--steps", "12", "--batch-size", "100")
    code, out, err = _cli(capsys, running, *args, "--option", "checkpoint_every=5", "--wait")
    assert code == 0, (out, err)
    job = _json(out)
    assert job["status"] == "succeeded"
    assert job["result"]["steps"] == 12 and job["details"]["step"] == 12
    code, out, _ = _cli(capsys, running, "artifact", job["id"])
    assert code == 0 and _json(out) == ["curve.json", "curve.png"]
    target = running.tmp / "curve.png"
    code = main(["artifact", job["id"], "curve.png", "-o", str(target), "--url", running.url, "--api-key", running.key])
    assert code == 0 and "written" in capsys.readouterr().out and target.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(client.artifact(job["id"], "curve.json"))["curve"][-1]["step"] == 12

    remote = ("--url", running.url, "--api-key", running.key)
    args = ("online", *tasks, *remote, "--model", model["id"], "--method", "online", "--strength", "10")
    code = main([*args, "--epochs", "2", "--wait"])
    out, err = capsys.readouterr()
    assert code == 0, (out, err)
    learned = _json(out)
    assert learned["status"] == "succeeded" and [len(row) for row in learned["result"]["accuracy"]] == [1, 2]
    code, _, err = _cli(capsys, running, "online", tasks[1], "--continue-from", learned["id"], "--method", "ewc")
    assert code == 1 and "inconsistent_continuation" in err
