"""Dramatiq broker on Redis, configured from :class:`~app.settings.Settings`.

Delivery is at least once. A worker announces itself on every broker command and, through
:class:`WorkerHeartbeat`, at a fixed interval even while it is busy with a long fit; a worker silent for
``heartbeat_timeout`` is presumed dead and queue maintenance (run on ``maintenance_chance`` out of a million
commands of the surviving workers) puts its unacknowledged messages back on the queue, so a SIGKILLed fit is
picked up by another worker. dramatiq 2.x folds the old ``requeue_deadline`` / ``requeue_interval`` options
into this heartbeat sweep. Dead-lettered messages are kept for ``dead_message_ttl``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Middleware,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from app.settings import Settings

logger = logging.getLogger(__name__)

FIT_QUEUE = "fits"
QUEUES = (FIT_QUEUE,)
HEARTBEAT_FILE = "worker-heartbeat"


def dramatiq_namespace(settings: Settings) -> str:
    """Key prefix of the broker's Redis keys."""
    return f"{settings.redis_namespace}.dramatiq"


class WorkerHeartbeat(Middleware):
    """Keeps a busy worker visibly alive and leaves a heartbeat file for container health checks.

    dramatiq's Redis broker refreshes a worker's heartbeat only when the worker sends a command; a worker
    whose prefetch budget is used up by one long fit sends none, and after ``heartbeat_timeout`` its
    message would be handed to another worker while the first still runs it. This middleware issues a
    cheap command every quarter of the timeout from a daemon thread of the worker process.

    Args:
        interval_s: Seconds between heartbeats.
        heartbeat_path: File touched on each beat (``None`` to skip).
    """

    def __init__(self, interval_s: float, heartbeat_path: Path | None = None) -> None:
        self.interval_s = interval_s
        self.heartbeat_path = heartbeat_path
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def after_worker_boot(self, broker: RedisBroker, worker: object) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(broker,), name="kronlap-heartbeat", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: RedisBroker, worker: object) -> None:
        self._stop.set()

    def _run(self, broker: RedisBroker) -> None:
        while not self._stop.is_set():
            try:
                for queue in QUEUES:
                    broker.do_qsize(queue)
                if self.heartbeat_path is not None:
                    self.heartbeat_path.parent.mkdir(parents=True, exist_ok=True)
                    self.heartbeat_path.write_text(f"{time.time():.3f}\n")
            except (redis.RedisError, OSError) as exc:
                logger.warning("worker heartbeat failed: %s", exc)
            self._stop.wait(self.interval_s)


def make_broker(settings: Settings, *, url: str | None = None, heartbeat_path: Path | None = None) -> RedisBroker:
    """Builds the Redis broker and declares the job actors on it.

    Args:
        settings: Service settings (Redis URL, heartbeat and maintenance knobs, time limits).
        url: Redis URL overriding ``settings.redis_url`` (the embedded Redis).
        heartbeat_path: File the worker heartbeat touches, for health checks.

    Returns:
        A broker whose actors (see :mod:`workers.actors`) are declared.
    """
    redis_url = url or settings.redis_url
    if not redis_url:
        raise ValueError("no Redis URL: set KRONLAP_REDIS_URL or start the embedded Redis first")
    middleware = [
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        Retries(max_retries=settings.fit_max_retries, min_backoff=1000, max_backoff=60_000),
        CurrentMessage(),
        WorkerHeartbeat(interval_s=settings.heartbeat_timeout_ms / 4000, heartbeat_path=heartbeat_path),
    ]
    broker = RedisBroker(
        url=redis_url,
        namespace=dramatiq_namespace(settings),
        middleware=middleware,
        heartbeat_timeout=settings.heartbeat_timeout_ms,
        dead_message_ttl=settings.dead_message_ttl_ms,
        maintenance_chance=settings.maintenance_chance,
    )
    from workers.actors import declare_actors

    declare_actors(broker, settings, redis_url)
    return broker


def queue_depth(broker: RedisBroker, queue: str = FIT_QUEUE) -> int:
    """Messages waiting (not yet fetched) on ``queue``."""
    return int(broker.client.llen(f"{broker.namespace}:{queue}"))
