"""The workers' broker: the shared queue contract plus a heartbeat, with every job kind's actor declared.

dramatiq's Redis broker refreshes a worker's heartbeat only when the worker sends a command; a worker whose
prefetch budget is used up by one long job sends none, and after ``heartbeat_timeout`` its message would be
handed to another worker while the first still runs it. :class:`WorkerHeartbeat` keeps a busy worker
visibly alive, leaves a heartbeat file for container health checks, and publishes the worker's liveness
for the job records (:class:`app.domain.jobs.WorkerLiveness`): each beat refreshes the worker's heartbeat
key, and each job it runs names it, so ``GET /v1/jobs/{id}`` can tell a running job from an orphaned one.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware

from app.domain.jobs import WorkerLiveness
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
        namespace: The service's Redis namespace (for the liveness keys); ``None`` publishes none.
        redelivery_s: The broker's heartbeat timeout, after which a silent worker's jobs are re-delivered.
        claim_ttl_s: Lifetime of a job's "run by" key.
    """

    def __init__(
        self,
        interval_s: float,
        heartbeat_path: Path | None = None,
        *,
        namespace: str | None = None,
        redelivery_s: float = 60.0,
        claim_ttl_s: int = 86_400,
    ) -> None:
        self.interval_s = interval_s
        self.heartbeat_path = heartbeat_path
        self.namespace = namespace
        self.redelivery_s = redelivery_s
        self.claim_ttl_s = claim_ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._liveness: WorkerLiveness | None = None

    def _liveness_of(self, broker: RedisBroker) -> WorkerLiveness | None:
        if self._liveness is None and self.namespace is not None:
            self._liveness = WorkerLiveness(broker.client, self.namespace)
        return self._liveness

    def after_worker_boot(self, broker: RedisBroker, worker: object) -> None:
        self._stop.clear()
        self._beat(broker)
        self._thread = threading.Thread(target=self._run, args=(broker,), name="kronlap-heartbeat", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: RedisBroker, worker: object) -> None:
        self._stop.set()

    def after_worker_shutdown(self, broker: RedisBroker, worker: object) -> None:
        liveness = self._liveness_of(broker)
        if liveness is not None:
            try:
                liveness.forget_worker(broker.broker_id)
            except redis.RedisError as exc:
                logger.warning("could not clear the worker heartbeat: %s", exc)

    def before_process_message(self, broker: RedisBroker, message: object) -> None:
        job_id = _job_id(message)
        liveness = self._liveness_of(broker)
        if job_id is not None and liveness is not None:
            try:
                liveness.claim(job_id, broker.broker_id, self.claim_ttl_s)
            except redis.RedisError as exc:
                logger.warning("could not record the worker of job %s: %s", job_id, exc)

    def after_process_message(
        self, broker: RedisBroker, message: object, *, result: object = None, exception: object = None
    ) -> None:
        job_id = _job_id(message)
        liveness = self._liveness_of(broker)
        if job_id is not None and liveness is not None:
            try:
                liveness.release(job_id, broker.broker_id)
            except redis.RedisError as exc:
                logger.warning("could not clear the worker of job %s: %s", job_id, exc)

    after_skip_message = after_process_message

    def _beat(self, broker: RedisBroker) -> None:
        try:
            liveness = self._liveness_of(broker)
            if liveness is not None:
                liveness.beat(broker.broker_id, self.redelivery_s, self.interval_s)
        except redis.RedisError as exc:
            logger.warning("worker heartbeat failed: %s", exc)

    def _run(self, broker: RedisBroker) -> None:
        while not self._stop.is_set():
            try:
                for queue in QUEUES:
                    broker.do_qsize(queue)
                self._beat(broker)
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
    heartbeat = WorkerHeartbeat(
        interval_s=settings.heartbeat_timeout_ms / 4000,
        heartbeat_path=heartbeat_path,
        namespace=settings.redis_namespace,
        redelivery_s=settings.heartbeat_timeout_ms / 1000,
        claim_ttl_s=settings.job_ttl_s,
    )
    broker = make_broker(settings, url=url, extra=[heartbeat])
    declare_actors(broker, settings, url or settings.redis_url or "")
    return broker


def _job_id(message: object) -> str | None:
    args = getattr(message, "args", None)
    if args and isinstance(args[0], dict) and isinstance(args[0].get("job_id"), str):
        return args[0]["job_id"]
    return None
