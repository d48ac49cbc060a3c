"""The workers' broker: the shared queue contract plus a heartbeat, with every job kind's actor declared.

dramatiq's Redis broker refreshes a worker's heartbeat only when the worker sends a command; a worker whose
prefetch budget is used up by one long job sends none, and after ``heartbeat_timeout`` its message would be
handed to another worker while the first still runs it. :class:`WorkerHeartbeat` keeps a busy worker
visibly alive and leaves a heartbeat file for container health checks.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware

from app.domain.kinds import QUEUES
from app.domain.queue import make_broker
from app.domain.settings import Settings
from workers.actors import declare_actors

logger = logging.getLogger(__name__)


class WorkerHeartbeat(Middleware):
    """Issues a cheap broker command every ``interval_s`` from a daemon thread of the worker process.

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


def make_worker_broker(
    settings: Settings, *, url: str | None = None, heartbeat_path: Path | None = None
) -> RedisBroker:
    """The queue contract's broker with the heartbeat middleware and every job kind's actor declared.

    Args:
        settings: Service settings (Redis URL, heartbeat and maintenance knobs, time limits).
        url: Redis URL overriding ``settings.redis_url`` (the embedded Redis).
        heartbeat_path: File the worker heartbeat touches, for health checks.
    """
    heartbeat = WorkerHeartbeat(interval_s=settings.heartbeat_timeout_ms / 4000, heartbeat_path=heartbeat_path)
    broker = make_broker(settings, url=url, extra=[heartbeat])
    declare_actors(broker, settings, url or settings.redis_url or "")
    return broker
