"""Running Dramatiq workers: a stand-alone process (``kronlap worker``) or threads inside another process."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from app.domain.backend import Backend
from app.domain.jobs import PermanentJobError
from app.domain.kinds.base import describe_device, select_device
from app.domain.settings import Settings, get_settings
from app.domain.store import StoreIdentity, StoreMismatch
from workers.broker import make_worker_broker

logger = logging.getLogger(__name__)


def start_worker(broker: RedisBroker, settings: Settings) -> dramatiq.Worker:
    """Starts a Dramatiq worker (consumer and worker threads) on ``broker`` and returns it.

    Each worker thread prefetches exactly one message, so queued fits stay available to other workers
    instead of waiting behind a long fit in this worker's memory.
    """
    worker = dramatiq.Worker(broker, worker_threads=settings.worker_threads, worker_timeout=1000)
    worker.queue_prefetch = settings.worker_threads
    worker.start()
    return worker


def check_store(settings: Settings, redis_url: str) -> dict[str, str]:
    """Checks that this worker's artifact store is the API's (recording it when no API has yet).

    Raises:
        StoreMismatch: Redis names another store.
        redis.RedisError: Redis is unreachable.
    """
    backend = Backend.connect(settings, redis_url=redis_url)
    try:
        return StoreIdentity(backend.redis, settings.redis_namespace, backend.store).verify()
    finally:
        backend.close()


def run_worker(settings: Settings | None = None) -> int:
    """Runs a worker process until SIGTERM / SIGINT; returns the exit status.

    Args:
        settings: Service settings; read from the environment when omitted. ``KRONLAP_REDIS_URL`` is
            required (embedded mode runs its worker inside ``kronlap serve``).

    Returns:
        0 after a requested stop; 2 when the configuration is unusable (no Redis URL, or an artifact store
        that is not the API's).
    """
    settings = settings or get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.embedded:
        logger.error("KRONLAP_REDIS_URL is not set: a stand-alone worker needs the shared Redis")
        return 2
    try:
        store = check_store(settings, settings.redis_url or "")
    except StoreMismatch as exc:
        logger.error("refusing to start: %s", exc)
        return 2
    except redis.RedisError as exc:
        logger.error("refusing to start: Redis at KRONLAP_REDIS_URL is unreachable (%s)", exc)
        return 2
    logger.info("artifact store %s (id %s)", store["path"], store["id"][:8])
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        from app.domain.metrics import get_metrics

        get_metrics()
        start_http_server(settings.worker_metrics_port)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    try:
        device = select_device(settings.device)
    except PermanentJobError as exc:
        logger.error("refusing to start: %s", exc)
        return 2
    device_name = describe_device(device)
    from app.domain.metrics import get_metrics

    get_metrics().worker_device.labels(str(device), device_name).set(1)
    logger.info("compute device %s (%s)", device, device_name)
    heartbeat: Path | None = settings.worker_heartbeat_file
    broker = make_worker_broker(settings, heartbeat_path=heartbeat)
    dramatiq.set_broker(broker)
    stop = threading.Event()

    def _request_stop(signum: int, _frame: object) -> None:
        logger.info("signal %s: stopping after the running job", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    worker = start_worker(broker, settings)
    logger.info("worker ready (threads=%d, queues=%s)", settings.worker_threads, sorted(broker.get_declared_queues()))
    try:
        while not stop.wait(0.5):
            pass
    finally:
        worker.stop(timeout=max(settings.heartbeat_timeout_ms, 10_000))
        broker.close()
    return 0


def heartbeat_age_s(path: Path) -> float:
    """Seconds since the worker heartbeat file was last touched (``inf`` if missing)."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")
