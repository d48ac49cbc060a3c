"""Job records in Redis: status, progress, message, timestamps, results and errors; the two exceptions that
end a job (:class:`JobCancelled`, :class:`PermanentJobError`).

One hash per job at ``<ns>:job:<id>``; a sorted set ``<ns>:jobs:<tenant>`` indexes a tenant's jobs by
creation time. Status moves ``queued -> running -> succeeded | failed``, and ``cancelled`` from any
non-final state. A re-delivered job (its worker died) goes ``running -> running`` again with ``attempts``
incremented. Transitions are single Lua scripts so a worker finishing and a client cancelling cannot
interleave into an inconsistent record.

Liveness: a worker names itself on every job it runs (``<ns>:job-worker:<job id>``) and refreshes its own
heartbeat (``<ns>:worker:<worker id>``, :class:`WorkerLiveness`) every quarter of the redelivery delay. Reading
a running job checks that heartbeat: a job whose worker missed two beats says ``worker_lost`` and when the
broker will hand it to another worker.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Any

import redis
from pydantic import BaseModel

from app.domain.catalog import new_id


class JobStatus(StrEnum):
    """Life-cycle states of a job."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


class JobRecord(BaseModel):
    """A job as stored in Redis."""

    id: str
    kind: str
    tenant: str
    status: JobStatus
    progress: float = 0.0
    message: str = ""
    attempts: int = 0
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    params: dict[str, Any] = {}
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    details: dict[str, Any] | None = None
    worker_lost: bool = False
    worker: dict[str, Any] | None = None

    @property
    def final(self) -> bool:
        """Whether the job reached a final state."""
        return self.status in FINAL


# KEYS[1] job hash. ARGV: allowed-from statuses (comma list), then field/value pairs.
# Returns the previous status when the transition happened, false otherwise.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return false end
local allowed = ',' .. ARGV[1] .. ','
if not string.find(allowed, ',' .. current .. ',', 1, true) then return false end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return current
"""

# Progress only while running; returns the current status either way.
_PROGRESS = """
local current = redis.call('HGET', KEYS[1], 'status')
if current == 'running' then
  redis.call('HSET', KEYS[1], 'progress', ARGV[1], 'message', ARGV[2], 'updated_at', ARGV[3])
end
return current
"""


_JSON_FIELDS = ("params", "result", "error", "details")
_DERIVED_FIELDS = ("worker_lost", "worker")  # computed on read, never stored in the hash

# Details only while running.
_DETAILS = """
if redis.call('HGET', KEYS[1], 'status') == 'running' then
  redis.call('HSET', KEYS[1], 'details', ARGV[1])
end
"""


class JobCancelled(Exception):
    """Raised inside a job when its record says it was cancelled; ends the run quietly."""


class PermanentJobError(Exception):
    """A job failure that a retry cannot fix (bad inputs, numerical errors); recorded and never retried."""

    def __init__(self, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail

    def as_dict(self) -> dict[str, Any]:
        """The error as stored on the job record."""
        return {"code": self.code, "message": self.message, "detail": self.detail}


class WorkerLiveness:
    """Worker heartbeats and the worker running each job, in Redis.

    Args:
        client: Redis client.
        namespace: Key prefix (the service's, not the broker's).
    """

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    def worker_key(self, worker_id: str) -> str:
        """Redis key of a worker's last heartbeat."""
        return f"{self.namespace}:worker:{worker_id}"

    def job_key(self, job_id: str) -> str:
        """Redis key naming the worker running a job."""
        return f"{self.namespace}:job-worker:{job_id}"

    def beat(self, worker_id: str, redelivery_s: float, interval_s: float) -> None:
        """Records a heartbeat of ``worker_id``; kept for twice the redelivery delay."""
        value = json.dumps({"beat": time.time(), "redelivery_s": redelivery_s, "interval_s": interval_s})
        self.client.set(self.worker_key(worker_id), value, px=max(1000, int(2000 * redelivery_s)))

    def forget_worker(self, worker_id: str) -> None:
        """Removes a worker's heartbeat (clean shutdown)."""
        self.client.delete(self.worker_key(worker_id))

    def claim(self, job_id: str, worker_id: str, ttl_s: int) -> None:
        """Records that ``worker_id`` runs ``job_id``."""
        self.client.set(self.job_key(job_id), worker_id, ex=ttl_s)

    def release(self, job_id: str, worker_id: str) -> None:
        """Forgets the claim of ``worker_id`` on ``job_id`` (another worker's later claim stays)."""
        key = self.job_key(job_id)
        current = self.client.get(key)
        if current is not None and _text(current) == worker_id:
            self.client.delete(key)

    def of_job(self, job_id: str, now: float | None = None) -> dict[str, Any] | None:
        """Liveness of the worker running ``job_id``: ``{"id", "alive", "last_beat", "retry_at"}``, or
        ``None`` when no worker claimed it.

        A worker is lost once its last beat is more than two beat intervals old (or its heartbeat expired);
        the broker re-delivers its jobs once the redelivery delay has passed since that beat.
        """
        worker_id = self.client.get(self.job_key(job_id))
        if worker_id is None:
            return None
        worker_id = _text(worker_id)
        raw = self.client.get(self.worker_key(worker_id))
        now = time.time() if now is None else now
        if raw is None:
            return {"id": worker_id, "alive": False, "last_beat": None, "retry_at": None}
        beat = json.loads(raw)
        last = float(beat["beat"])
        alive = now - last <= 2 * float(beat["interval_s"])
        return {"id": worker_id, "alive": alive, "last_beat": last, "retry_at": last + float(beat["redelivery_s"])}


def _clock(epoch_s: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(epoch_s))


class JobStore:
    """Reads and writes job records.

    Args:
        client: Redis client (``decode_responses`` may be either).
        namespace: Key prefix.
        ttl_s: Lifetime of a job record after its last write.
    """

    def __init__(self, client: redis.Redis, namespace: str, ttl_s: int) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self._transition = client.register_script(_TRANSITION)
        self._progress = client.register_script(_PROGRESS)
        self._details = client.register_script(_DETAILS)
        self.liveness = WorkerLiveness(client, namespace)

    def key(self, job_id: str) -> str:
        """Redis key of a job record."""
        return f"{self.namespace}:job:{job_id}"

    def _index(self, tenant: str) -> str:
        return f"{self.namespace}:jobs:{tenant}"

    def create(self, kind: str, tenant: str, params: dict[str, Any], job_id: str | None = None) -> JobRecord:
        """Creates a ``queued`` job record and returns it."""
        now = time.time()
        job = JobRecord(
            id=job_id or new_id("job"),
            kind=kind,
            tenant=tenant,
            status=JobStatus.queued,
            message="queued",
            created_at=now,
            updated_at=now,
            params=params,
        )
        pipe = self.client.pipeline()
        pipe.hset(self.key(job.id), mapping=self._encode(job))
        pipe.expire(self.key(job.id), self.ttl_s)
        pipe.zadd(self._index(tenant), {job.id: now})
        pipe.expire(self._index(tenant), self.ttl_s)
        pipe.execute()
        return job

    def get(self, job_id: str) -> JobRecord | None:
        """Reads a job record, or ``None``."""
        raw = self.client.hgetall(self.key(job_id))
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        for name in _JSON_FIELDS:
            fields[name] = json.loads(fields[name]) if fields.get(name) else None
        fields["params"] = fields["params"] or {}
        for name in ("started_at", "finished_at"):
            fields[name] = float(fields[name]) if fields.get(name) else None
        for name in _DERIVED_FIELDS:
            fields.pop(name, None)
        job = JobRecord.model_validate(fields)
        if job.status == JobStatus.running:
            self._check_worker(job)
        return job

    def _check_worker(self, job: JobRecord) -> None:
        worker = self.liveness.of_job(job.id)
        job.worker = worker
        if worker is None or worker["alive"]:
            return
        job.worker_lost = True
        since = f" at {_clock(worker['last_beat'])}" if worker["last_beat"] else ""
        if worker["retry_at"] is not None and worker["retry_at"] > time.time():
            when = f"will be retried at {_clock(worker['retry_at'])}"
        else:
            when = "will be retried by the next worker that checks the queue"
        job.message = f"worker_lost: worker {worker['id'][:8]} stopped heart-beating{since}; the job {when}"

    def list(self, tenant: str, limit: int = 100) -> list[JobRecord]:
        """The tenant's most recent jobs, newest first."""
        ids = self.client.zrevrange(self._index(tenant), 0, max(limit - 1, 0))
        jobs = [self.get(_text(i)) for i in ids]
        return [job for job in jobs if job is not None]

    def start(self, job: JobRecord) -> JobRecord | None:
        """Marks a job running (first delivery or re-delivery) and counts the attempt.

        A record lost with a Redis flush is re-created from ``job``. Returns ``None`` when the job must not
        run (cancelled or already finished).
        """
        key = self.key(job.id)
        if not self.client.exists(key):
            self.create(job.kind, job.tenant, job.params, job_id=job.id)
        now = time.time()
        previous = self._transition(
            keys=[key],
            args=[
                "queued,running",
                "status",
                "running",
                "progress",
                "0",
                "message",
                "started",
                "updated_at",
                now,
                "started_at",
                now,
            ],
        )
        if not previous:
            return None
        self.client.hincrby(key, "attempts", 1)
        self.client.expire(key, self.ttl_s)
        return self.get(job.id)

    def report(self, job_id: str, fraction: float, message: str) -> None:
        """Records progress of a running job.

        Raises:
            JobCancelled: The job was cancelled meanwhile.
        """
        fraction = min(max(float(fraction), 0.0), 1.0)
        status = self._progress(keys=[self.key(job_id)], args=[f"{fraction:.4f}", message[:500], time.time()])
        if status is not None and _text(status) == JobStatus.cancelled.value:
            raise JobCancelled(job_id)

    def set_details(self, job_id: str, details: dict[str, Any]) -> None:
        """Publishes a running job's kind-specific live fields (current step, loss, ...)."""
        self._details(keys=[self.key(job_id)], args=[json.dumps(details)])

    def succeed(self, job_id: str, result: dict[str, Any], message: str = "done") -> bool:
        """Marks a running job succeeded with its result; returns whether the transition happened."""
        now = time.time()
        return bool(
            self._transition(
                keys=[self.key(job_id)],
                args=[
                    "running",
                    "status",
                    "succeeded",
                    "progress",
                    "1",
                    "message",
                    message,
                    "result",
                    json.dumps(result),
                    "updated_at",
                    now,
                    "finished_at",
                    now,
                ],
            )
        )

    def fail(self, job_id: str, error: dict[str, Any], final: bool = True) -> bool:
        """Records an error; ``final=False`` keeps the job queued for a retry."""
        now = time.time()
        status = "failed" if final else "queued"
        fields = [
            "status",
            status,
            "message",
            str(error.get("message", ""))[:500],
            "error",
            json.dumps(error),
            "updated_at",
            now,
        ]
        if final:
            fields += ["finished_at", now]
        return bool(self._transition(keys=[self.key(job_id)], args=["queued,running", *fields]))

    def cancel(self, job_id: str) -> bool:
        """Cancels a queued or running job; returns whether it was cancellable."""
        now = time.time()
        return bool(
            self._transition(
                keys=[self.key(job_id)],
                args=[
                    "queued,running",
                    "status",
                    "cancelled",
                    "message",
                    "cancelled",
                    "updated_at",
                    now,
                    "finished_at",
                    now,
                ],
            )
        )

    def link_fit(self, fit_id: str, job_id: str) -> None:
        """Remembers which job produces ``fit_id``."""
        self.client.set(f"{self.namespace}:fit-job:{fit_id}", job_id, ex=self.ttl_s)

    def job_for_fit(self, fit_id: str) -> JobRecord | None:
        """The job producing ``fit_id``, if still recorded."""
        job_id = self.client.get(f"{self.namespace}:fit-job:{fit_id}")
        return self.get(_text(job_id)) if job_id is not None else None

    def status(self, job_id: str) -> JobStatus | None:
        """Current status, or ``None`` when the record is gone."""
        value = self.client.hget(self.key(job_id), "status")
        return JobStatus(_text(value)) if value is not None else None

    @staticmethod
    def _encode(job: JobRecord) -> dict[str, str]:
        data = job.model_dump(mode="json")
        out: dict[str, str] = {}
        for name, value in data.items():
            if name in _DERIVED_FIELDS:
                continue
            if name in _JSON_FIELDS:
                out[name] = json.dumps(value) if value is not None else ""
            elif value is None:
                out[name] = ""
            else:
                out[name] = str(value)
        return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
