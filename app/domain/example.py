"""The ``example`` model of ``kronlap serve --example``: a small MNIST-5k MLP with a KFAC fit.

The network is trained in a few seconds on the first run and cached as an ONNX file in the data directory;
it is then registered and fitted through the same code paths as ``POST /v1/models``, ``POST /v1/datasets``
and ``POST /v1/models/{id}/fits`` (the fit runs on a worker through the queue).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from app.domain.backend import Backend
from app.domain.catalog import FitRecord
from app.domain.datasetio import Dataset
from app.domain.datasets import store_dataset
from app.domain.errors import NotFound
from app.domain.jobs import JobRecord, JobStatus
from app.domain.kinds import FIT, submit
from app.domain.kinds.fit import FitRequest
from app.domain.modelio.export import export_onnx
from app.domain.models import ModelMetadata, register_model
from curvature.options import Curvature, Task

logger = logging.getLogger(__name__)

EXAMPLE_MODEL_ID = "example"
EXAMPLE_DATASET_ID = "example-mnist5k"
CLASS_NAMES = [str(d) for d in range(10)]


def train_classifier(net, x, y, epochs: int, seed: int, lr: float = 2e-3, batch_size: int = 64):
    """Adam on softmax cross-entropy, seeded shuffles; returns ``net`` in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            optimiser.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            optimiser.step()
    return net.eval()


def train_example_onnx(epochs: int = 4, hidden: int = 256, seed: int = 0) -> bytes:
    """Trains a 784-``hidden``-10 MLP on MNIST-5k's training split and exports it to ONNX bytes."""
    import torch
    from torch import nn

    from curvature.data import mnist5k

    torch.manual_seed(seed)
    splits = mnist5k(seed=seed, flat=True)
    x, y = splits.train.x, splits.train.y
    net = train_classifier(
        nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, 10)), x, y, epochs, seed
    )
    return export_onnx(net, torch.zeros(1, x.shape[1]))


def example_model_bytes(cache_dir: Path) -> bytes:
    """The cached example network, trained and cached on first use."""
    path = cache_dir / "example-mlp.onnx"
    if path.is_file():
        return path.read_bytes()
    data = train_example_onnx()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return data


def wait_for_job(
    backend: Backend, job_id: str, on_progress: Callable[[JobRecord], None] | None = None, timeout_s: float = 900
) -> JobRecord:
    """Polls a job record until it is final; returns the final record.

    Raises:
        TimeoutError: The job is not final after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        job = backend.jobs.get(job_id)
        if job is not None and on_progress is not None:
            on_progress(job)
        if job is not None and job.final:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} did not finish within {timeout_s:.0f}s")
        time.sleep(0.2)


def ensure_example(backend: Backend, on_progress: Callable[[JobRecord], None] | None = None) -> FitRecord:
    """Registers the example model, its data and a KFAC fit unless they already exist.

    Args:
        backend: Store, catalog and queue (a worker must consume the queue).
        on_progress: Called with the fit job's record while waiting.

    Returns:
        The example's fit.

    Raises:
        RuntimeError: The fit job failed.
    """
    from curvature.data import mnist5k

    settings = backend.settings
    tenant = settings.example_tenant
    catalog = backend.catalog
    try:
        catalog.get_model(EXAMPLE_MODEL_ID, tenant)
    except NotFound:
        data = example_model_bytes(settings.data_dir / "cache")
        meta = ModelMetadata(task=Task.classification, class_names=CLASS_NAMES, name="MNIST-5k MLP (example)")
        register_model(backend, tenant, data, "example-mlp.onnx", meta, model_id=EXAMPLE_MODEL_ID)
    existing = catalog.latest_fit(EXAMPLE_MODEL_ID)
    if existing is not None:
        return existing
    try:
        catalog.get_dataset(EXAMPLE_DATASET_ID, tenant)
    except NotFound:
        splits = mnist5k(seed=0, flat=True)
        store_dataset(
            backend,
            tenant,
            Dataset(
                x=splits.train.x.numpy(),
                y=splits.train.y.numpy(),
                x_val=splits.val.x.numpy(),
                y_val=splits.val.y.numpy(),
            ),
            name="MNIST-5k train/val",
            dataset_id=EXAMPLE_DATASET_ID,
        )
    request = FitRequest(dataset=EXAMPLE_DATASET_ID, curvature=Curvature.kfac, samples=100)
    submitted, params = submit(backend, FIT, tenant, request, model_id=EXAMPLE_MODEL_ID)
    job = wait_for_job(backend, submitted.id, on_progress)
    if job.status != JobStatus.succeeded:
        raise RuntimeError(f"the example fit {job.status.value}: {job.error or job.message}")
    return catalog.get_fit(params.fit_id, tenant)
