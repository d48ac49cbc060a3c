"""Sharded fits on real worker processes: the same posterior as one message, and a SIGKILLed shard is redone.

Two ``python -m workers`` processes consume the test Redis; a fit over more than ``fit_shard_size`` examples
runs as a Dramatiq group of shard messages with the reduce step as its completion callback. The reference is
the single-message fit of the same request, run in this process by the same job code.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

import curvature as cv
from app.api.main import create_app
from app.domain.backend import Backend
from app.domain.jobs import FINAL, JobStatus
from app.domain.kinds import FIT, execute
from app.domain.kinds.fit import (
    SHARD_RECORDS,
    FitParams,
    decode_factors,
    encode_factors,
    load_network,
    shard_bounds,
)
from tests.conftest import free_port
from tests.jobhelpers import npz_bytes, wait_job

pytestmark = pytest.mark.slow

N_TRAIN = 2400
SHARD_SIZE = 600  # four shards
# Marginal-likelihood tuning: validation tuning also picks the null-space prior by a tolerance rule on the
# validation NLL, which round-off may tip either way for directions the validation data barely excites.
REQUEST = {"curvature": "kflr", "batch_size": 4, "samples": 20, "tuning": "marglik"}


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)






def _upload(client: httpx.Client, headers: dict, m) -> tuple[str, str]:
    r = client.post("/v1/models", files={"file": ("mlp.onnx", m.mlp_onnx)}, headers=headers)
    assert r.status_code == 201, r.text
    data = {"x": m.x_train[:N_TRAIN].numpy(), "y": m.y_train[:N_TRAIN].numpy()}
    data |= {"x_val": m.x_val.numpy(), "y_val": m.y_val.numpy()}
    d = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(**data))}, headers=headers)
    assert d.status_code == 201, d.text
    return r.json()["id"], d.json()["id"]


def _single_message_fit(settings, sharded_fit_id: str, tenant: str) -> cv.LaplacePosterior:
    """The same fit request as one message (shard size above the data size), run by the job code here; a
    regression fit estimates its own noise scale (the sharded fit's config records the one it used)."""
    backend = Backend.connect(settings.model_copy(update={"fit_shard_size": 10**9}))
    sharded = backend.catalog.get_fit(sharded_fit_id, tenant)
    config = {k: v for k, v in sharded.config.items() if k != "sigma"}
    params = FitParams(
        job_id="job_single",
        fit_id="fit_single",
        tenant=tenant,
        model_id=sharded.model_id,
        dataset_id=sharded.dataset_id,
        config=config,
    )
    body = params.model_dump(mode="json")
    backend.jobs.create("fit", tenant, body, job_id=params.job_id)
    result = execute(FIT, body, backend)
    assert result is not None and not result.pending
    return _posterior(backend, "fit_single", tenant)


def _posterior(backend: Backend, fit_id: str, tenant: str) -> cv.LaplacePosterior:
    fit = backend.catalog.get_fit(fit_id, tenant)
    module = load_network(backend, backend.catalog.get_model(fit.model_id, tenant))
    return cv.LaplacePosterior.from_bytes(backend.store.get_blob(fit.posterior_sha256), module)


def _assert_same_posterior(got: cv.LaplacePosterior, want: cv.LaplacePosterior, x: torch.Tensor) -> None:
    """Equal to float32 round-off: factors (through the blocks' eigenvalues), hyper-parameters, predictions and
    OOD thresholds."""
    assert set(got.blocks) == set(want.blocks)
    assert got.n_eff == pytest.approx(want.n_eff, rel=1e-4)
    for name, tau in want.prior_precision.items():
        assert got.prior_precision[name] == pytest.approx(tau, rel=1e-4)
        torch.testing.assert_close(
            got.eigenvalues(name), want.eigenvalues(name), rtol=1e-4, atol=1e-6 * float(want.eigenvalues(name).max())
        )
    # The linearised predictive is deterministic. (Monte-Carlo weight draws are not compared draw by draw: the same
    # noise maps through eigenvectors that round-off may rotate within near-degenerate eigenspaces.)
    a, b = got.predict(x, predictive="glm"), want.predict(x, predictive="glm")
    keys = ("mean", "variance") if "mean" in b else ("probs", "entropy", "mutual_information")
    for key in keys:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-4, msg=lambda m, k=key: f"{k}: {m}")
    assert set(got.ood_table) == set(want.ood_table)
    assert got.ood_table["glm"] == pytest.approx(want.ood_table["glm"], rel=1e-3)


def test_sharded_fit_on_two_workers_equals_the_single_message_fit(
    redis_db, data_dir: Path, make_settings, start_worker, trained_models, tenant_headers, run_server
) -> None:
    settings = make_settings(data_dir, fit_shard_size=SHARD_SIZE)
    assert len(shard_bounds(N_TRAIN, SHARD_SIZE)) == 4
    metrics_port = free_port()
    workers = [start_worker(settings.model_copy(update={"worker_metrics_port": metrics_port})), start_worker(settings)]
    for worker in workers:
        worker.wait_ready()
    # Each worker names its device in its log and in its metrics.
    metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    assert 'kronlap_worker_device_info{device="cpu"' in metrics
    assert all("compute device cpu" in worker.log() for worker in workers)
    m, h = trained_models, tenant_headers["a"]
    with run_server(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        model_id, dataset_id = _upload(client, h, m)
        r = client.post(f"/v1/models/{model_id}/fits", json={"dataset": dataset_id, **REQUEST}, headers=h)
        assert r.status_code in (201, 202), r.text
        job_id, fit_id = r.json()["job"]["id"], r.json()["fit_id"]
        seen: list[float] = []

        def finished(job: dict) -> bool:
            seen.append(job["progress"])
            return job["status"] in ("succeeded", "failed", "cancelled")

        done = wait_job(client, h, job_id, finished)
        assert done["status"] == "succeeded", (done, workers[0].log(), workers[1].log())
        assert done["result"]["fit"] == fit_id and done["details"] == {"shards": 4, "device": "cpu"}
        assert any(0.05 < p < 0.65 for p in seen)  # progress moved while the shards ran
        fit = client.get(f"/v1/fits/{fit_id}", headers=h).json()
        assert fit["status"] == "succeeded"
        p = client.post(f"/v1/models/{model_id}/predict", json={"inputs": m.x_test[:3].tolist()}, headers=h)
        assert p.status_code == 200, p.text

    backend = Backend.connect(settings)
    record = backend.catalog.get_fit(fit_id, "tenant-a")
    parts = record.summary["shards"]["parts"]
    assert [part["rows"] for part in parts] == [list(b) for b in shard_bounds(N_TRAIN, SHARD_SIZE)]
    assert record.summary["shards"]["examples"] == N_TRAIN and record.device == "cpu"
    assert {part["device"] for part in parts} == {"cpu"} and len({part["worker"] for part in parts}) <= 2
    assert list(backend.store.records(SHARD_RECORDS)) == []  # the reduce step cleared its shard records
    reference = _single_message_fit(settings, fit_id, "tenant-a")
    _assert_same_posterior(_posterior(backend, fit_id, "tenant-a"), reference, m.x_test[:100])


def test_a_sigkilled_shard_is_redone_and_the_result_is_unchanged(
    redis_db, data_dir: Path, make_settings, start_worker, trained_models, tenant_headers, run_server
) -> None:
    settings = make_settings(data_dir, fit_shard_size=SHARD_SIZE)
    first = start_worker(settings).wait_ready()
    m, h = trained_models, tenant_headers["a"]
    with run_server(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        model_id, dataset_id = _upload(client, h, m)
        r = client.post(f"/v1/models/{model_id}/fits", json={"dataset": dataset_id, **REQUEST}, headers=h)
        job_id, fit_id = r.json()["job"]["id"], r.json()["fit_id"]
        backend = Backend.connect(settings)

        def one_shard_stored(job: dict) -> bool:
            return any(True for _ in backend.store.records(SHARD_RECORDS)) or job["status"] in FINAL

        running = wait_job(client, h, job_id, one_shard_stored)
        first.kill()
        killed_at = time.time()
        assert running["status"] == "running", running
        before = {r["index"]: r for r in backend.store.records(SHARD_RECORDS)}
        assert 1 <= len(before) < 4, before

        second = start_worker(settings).wait_ready()
        done = wait_job(client, h, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
        assert done["status"] == "succeeded", (done, second.log())

    parts = {p["index"]: p for p in backend.catalog.get_fit(fit_id, "tenant-a").summary["shards"]["parts"]}
    for index, record in before.items():  # finished before the kill: kept, not recomputed
        assert parts[index]["worker"] == record["worker"] and parts[index]["finished_at"] == record["finished_at"]
    redone = [p for i, p in parts.items() if i not in before]
    assert redone and all(p["finished_at"] > killed_at for p in redone)
    assert {p["worker"] for p in redone}.isdisjoint({r["worker"] for r in before.values()})
    assert backend.jobs.get(job_id).status is JobStatus.succeeded
    reference = _single_message_fit(settings, fit_id, "tenant-a")
    _assert_same_posterior(_posterior(backend, fit_id, "tenant-a"), reference, m.x_test[:100])


def test_sharded_regression_fit_estimates_its_noise_once(
    redis_db, data_dir: Path, make_settings, start_worker, exporters, tenant_headers, run_server
) -> None:
    """A regression fit's shards share the noise scale estimated on all the data, as the single-message fit's."""
    from curvature.data import toy_regression

    x, y = toy_regression(n=1200, seed=0)
    x, y = x / 4, y / 50
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        optimiser.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        optimiser.step()
    settings = make_settings(data_dir, fit_shard_size=400)
    start_worker(settings).wait_ready()
    start_worker(settings).wait_ready()
    h = tenant_headers["a"]
    with run_server(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        onnx = exporters["onnx"](net.eval(), torch.zeros(1, 1))
        r = client.post("/v1/models", files={"file": ("reg.onnx", onnx)}, data={"task": "regression"}, headers=h)
        assert r.status_code == 201, r.text
        d = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(x=x.numpy(), y=y.numpy()))}, headers=h)
        assert d.status_code == 201, d.text
        body = {"dataset": d.json()["id"], "curvature": "kflr", "tuning": "marglik", "samples": 20}
        f = client.post(f"/v1/models/{r.json()['id']}/fits", json=body, headers=h)
        assert f.status_code == 202, f.text
        done = wait_job(client, h, f.json()["job"]["id"], lambda j: j["status"] in FINAL)
        assert done["status"] == "succeeded", done
    backend = Backend.connect(settings)
    fit_id = f.json()["fit_id"]
    assert backend.catalog.get_fit(fit_id, "tenant-a").summary["shards"]["count"] == 3
    sharded, reference = _posterior(backend, fit_id, "tenant-a"), _single_message_fit(settings, fit_id, "tenant-a")
    assert sharded.likelihood.sigma == reference.likelihood.sigma
    _assert_same_posterior(sharded, reference, torch.linspace(-1, 1, 50).reshape(-1, 1))


def test_shards_cover_the_data_and_factor_blobs_round_trip() -> None:
    assert shard_bounds(10, 20) == [(0, 10)]
    bounds = shard_bounds(10_001, 2_500)
    assert len(bounds) == 5 and bounds[0][0] == 0 and bounds[-1][1] == 10_001
    assert all(a == b for (_, a), (b, _) in zip(bounds, bounds[1:], strict=False))
    assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    for factors in (
        cv.fit_kronecker(net, (x, y), cv.CrossEntropy(), method="kflr"),
        cv.fit_diagonal(net, (x, y), cv.CrossEntropy()),
    ):
        back = decode_factors(encode_factors(factors), torch.device("cpu"))
        assert type(back) is type(factors) and back.n_data == 30 and back.method == factors.method
        assert list(back) == list(factors)
        for name in factors:
            got, want = back[name], factors[name]
            pairs = [(got.A, want.A), (got.G, want.G)] if isinstance(factors, cv.KroneckerFactors) else [(got, want)]
            assert all(torch.equal(g, w) for g, w in pairs)
