"""Job kinds: one abstraction for every long job (Laplace fits, optimiser runs, online Laplace).

A kind is one module holding a :class:`JobKind` subclass:

- ``Request``: the pydantic body a client posts (the route uses it, so OpenAPI lists its fields);
- ``Params``: a :class:`JobParams` subclass, the message body and the job record's ``params``;
- :meth:`JobKind.prepare`: every check that can run before queueing (ids exist, shapes fit, options agree),
  raising :class:`~app.domain.errors.ServiceError` 4xx errors, and returning the params;
- :meth:`JobKind.run`: the work, on a worker, reporting progress and saving checkpoints through a
  :class:`JobRun`, returning a :class:`JobResult`;
- ``name``, ``queue`` and ``actor``: the queue contract of the kind.

:func:`submit` (API side) and :func:`execute` (worker side) are the same for every kind: the record is
created ``queued`` before the message is sent; a run marks it ``running``, and ends it ``succeeded``,
``failed`` (with the error's code) or, when a client cancelled it, leaves it ``cancelled``. Job runs are
idempotent: a re-delivered message recomputes (from the last checkpoint, where the kind keeps them) and
overwrites the same artifacts.
"""

from __future__ import annotations

import logging
import platform
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch
from pydantic import BaseModel, ValidationError

from app.domain.backend import Backend
from app.domain.errors import NotFound, ServiceError
from app.domain.jobs import JobCancelled, JobRecord, JobStatus, PermanentJobError
from app.domain.metrics import get_metrics
from app.domain.queue import enqueue
from app.domain.settings import Settings

logger = logging.getLogger(__name__)


class JobParams(BaseModel):
    """Fields every job message carries; a kind's params extend it."""

    job_id: str
    tenant: str


RequestT = TypeVar("RequestT", bound=BaseModel)
ParamsT = TypeVar("ParamsT", bound=JobParams)


@dataclass
class JobResult:
    """What a finished run reports: the job record's ``result`` and its last message.

    ``pending`` marks a run that handed the job on to further messages (a sharded fit's shards and reduce
    step): the job stays ``running`` and the last of those messages ends it.
    """

    result: dict[str, Any]
    message: str = "done"
    pending: bool = False


Stage = Callable[[dict[str, Any], "Backend", bool], None]
"""A follow-up message handler of a kind: ``stage(body, backend, final_attempt)``; it ends the job itself."""


class Checkpoints:
    """Checkpoints of running jobs in the artifact store: one blob plus a JSON record per job.

    A checkpoint is written atomically (blob first, then the record naming it), so a reader sees either the
    previous checkpoint or the new one. Blobs are content-addressed: re-saving identical state is free.
    """

    KIND = "checkpoints"

    def __init__(self, backend: Backend) -> None:
        self.store = backend.store

    def save(self, job_id: str, blob: bytes, meta: dict[str, Any], blobs: dict[str, str] | None = None) -> None:
        """Stores ``blob`` as the job's latest checkpoint with JSON-able ``meta``; ``blobs`` names further stored
        blobs the checkpoint needs (kept from garbage collection while it exists)."""
        sha = self.store.put_blob(blob)
        record = {"sha256": sha, "meta": meta, "saved_at": time.time(), "blobs": dict(blobs or {})}
        self.store.put_record(self.KIND, job_id, record)

    def load(self, job_id: str) -> tuple[bytes, dict[str, Any]] | None:
        """The job's latest checkpoint ``(blob, meta)``, or ``None``."""
        record = self.store.get_record(self.KIND, job_id)
        if record is None or not self.store.has_blob(record["sha256"]):
            return None
        return self.store.get_blob(record["sha256"]), dict(record.get("meta") or {})

    def clear(self, job_id: str) -> None:
        """Forgets the job's checkpoint (its blob is collected with the store's garbage)."""
        self.store.delete_record(self.KIND, job_id)


class Artifacts:
    """Files a job publishes for clients (training curves, plots, matrices): blobs plus one record per job.

    The record ``artifacts/<job_id>`` maps each name (``curve.json``, ``curve.png``) to its blob and media type;
    it keeps the blobs from garbage collection after the job record expires from Redis.
    """

    KIND = "artifacts"
    MEDIA_TYPES = {
        ".json": "application/json",
        ".png": "image/png",
        ".csv": "text/csv",
        ".safetensors": "application/octet-stream",
    }

    def __init__(self, backend: Backend) -> None:
        self.store = backend.store

    def publish(self, job_id: str, tenant: str, name: str, data: bytes) -> str:
        """Stores ``data`` as the job's artifact ``name``; returns the URL path it is served at."""
        suffix = name[name.rfind(".") :] if "." in name else ""
        if suffix not in self.MEDIA_TYPES or not name[: -len(suffix)].replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"artifact names are [A-Za-z0-9_-] plus one of {sorted(self.MEDIA_TYPES)}: {name!r}")
        sha = self.store.put_blob(data)
        record = self.store.get_record(self.KIND, job_id) or {"job": job_id, "tenant": tenant, "blobs": {}}
        record["blobs"][name] = sha
        self.store.put_record(self.KIND, job_id, record)
        return f"/v1/jobs/{job_id}/artifacts/{name}"

    def get(self, job_id: str, tenant: str, name: str) -> tuple[bytes, str]:
        """The artifact's bytes and media type.

        Raises:
            NotFound: No such job, artifact, or the job belongs to another tenant.
        """
        record = self.store.get_record(self.KIND, job_id)
        sha = (record or {}).get("blobs", {}).get(name) if (record or {}).get("tenant") == tenant else None
        if sha is None or not self.store.has_blob(sha):
            raise NotFound(f"job {job_id!r} has no artifact {name!r}", detail={"job": job_id, "artifact": name})
        return self.store.get_blob(sha), self.MEDIA_TYPES[name[name.rfind(".") :]]

    def names(self, job_id: str, tenant: str) -> list[str]:
        """The job's artifact names (empty for another tenant's job)."""
        record = self.store.get_record(self.KIND, job_id) or {}
        return sorted(record.get("blobs", {})) if record.get("tenant") == tenant else []


class ProgressReporter:
    """Throttled progress writer mapping a phase's ``[0, 1]`` into ``[lo, hi]`` of the job's progress.

    Writes at most every ``interval_s`` (and always at 1.0); raises :class:`JobCancelled` once the job was
    cancelled, which is how a running job stops at its next report.
    """

    def __init__(self, run: JobRun, lo: float, hi: float, interval_s: float = 0.2) -> None:
        self.run = run
        self.lo = lo
        self.hi = hi
        self.interval_s = interval_s
        self._last = 0.0

    def __call__(self, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        fraction = min(max(float(fraction), 0.0), 1.0)
        if fraction < 1.0 and now - self._last < self.interval_s:
            return
        self._last = now
        self.run.progress(self.lo + (self.hi - self.lo) * fraction, message or "working")


def select_device(preference: str) -> torch.device:
    """Picks the compute device inside the worker process (CUDA is never touched in the API)."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PermanentJobError("no_cuda", f"KRONLAP_DEVICE={preference} but CUDA is not available")
    return device


def describe_device(device: torch.device) -> str:
    """A person's name for ``device``: the GPU's model for CUDA, the processor for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


@dataclass
class JobRun:
    """One delivery of a job to a worker: what a kind's :meth:`JobKind.run` works with.

    Attributes:
        backend: Store, catalog, Redis.
        job: The job record as marked running (``attempts`` counts deliveries).
        started: ``time.monotonic()`` at the start of this delivery.
        details: JSON-able fields the kind publishes on the job record (e.g. current step and loss).
    """

    backend: Backend
    job: JobRecord
    started: float = field(default_factory=time.monotonic)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self.job.id

    @property
    def checkpoints(self) -> Checkpoints:
        """The store's job checkpoints."""
        return Checkpoints(self.backend)

    def publish(self, name: str, data: bytes) -> str:
        """Publishes one of the job's artifacts (see :class:`Artifacts`); returns its URL path."""
        return Artifacts(self.backend).publish(self.job_id, self.job.tenant, name, data)

    def progress(self, fraction: float, message: str, **details: Any) -> None:
        """Records progress (0-1) and a message; ``details`` update the record's ``details``.

        Raises:
            JobCancelled: The job was cancelled meanwhile.
        """
        if details:
            self.details.update(details)
            self.backend.jobs.set_details(self.job_id, self.details)
        self.backend.jobs.report(self.job_id, fraction, message)

    def reporter(self, lo: float, hi: float, interval_s: float = 0.2) -> ProgressReporter:
        """A throttled ``progress(fraction, message)`` callback for the core, mapped into ``[lo, hi]``."""
        return ProgressReporter(self, lo, hi, interval_s)

    def check_cancelled(self) -> None:
        """Raises :class:`JobCancelled` when the job was cancelled."""
        if self.backend.jobs.status(self.job_id) == JobStatus.cancelled:
            raise JobCancelled(self.job_id)

    def device(self) -> torch.device:
        """The device configured for jobs (``KRONLAP_DEVICE``)."""
        return select_device(self.backend.settings.device)


class JobKind(ABC, Generic[RequestT, ParamsT]):
    """A kind of job: its request, params, checks before queueing, run, and queue contract.

    Subclasses set ``name``, ``queue``, ``actor``, ``request_model``, ``params_model`` and implement
    :meth:`prepare` and :meth:`run`.
    """

    name: ClassVar[str]
    queue: ClassVar[str]
    actor: ClassVar[str]
    request_model: ClassVar[type[BaseModel]]
    params_model: ClassVar[type[JobParams]]

    @abstractmethod
    def prepare(self, backend: Backend, tenant: str, job_id: str, request: RequestT, **context: Any) -> ParamsT:
        """Checks a request against the catalog and builds the job's params; raises 4xx errors.

        Args:
            backend: Store and catalog.
            tenant: The caller's tenant.
            job_id: The id the job will have.
            request: The client's request.
            context: Route parameters (e.g. ``model_id``).
        """

    @abstractmethod
    def run(self, params: ParamsT, run: JobRun) -> JobResult:
        """Does the work on a worker; raise :class:`PermanentJobError` for failures a retry cannot fix."""

    def on_created(self, backend: Backend, params: ParamsT) -> None:
        """Called after the record is created, before the message is sent (e.g. to index the job)."""

    def time_limit_s(self, settings: Settings) -> int:
        """Longest a single delivery may run."""
        return settings.fit_time_limit_s

    def max_retries(self, settings: Settings) -> int:
        """Deliveries after a transient failure (permanent failures are never retried)."""
        return settings.fit_max_retries

    def parse(self, body: dict[str, Any]) -> ParamsT:
        """Params from a message body."""
        return self.params_model.model_validate(body)  # type: ignore[return-value]

    def stages(self) -> dict[str, Stage]:
        """Further actors of the kind by actor name, on the kind's queue (e.g. a sharded fit's shard and reduce
        steps); the workers declare them beside :attr:`actor`, with the same time limit and retries."""
        return {}


def submit(
    backend: Backend, kind: JobKind[RequestT, ParamsT], tenant: str, request: RequestT, **context: Any
) -> tuple[JobRecord, ParamsT]:
    """Checks a request, records its job as ``queued`` and enqueues it.

    Returns:
        The job record and the params sent.

    Raises:
        ServiceError: The request cannot run (4xx); nothing is recorded or queued then.
    """
    from app.domain.catalog import new_id

    job_id = new_id("job")
    params = kind.prepare(backend, tenant, job_id, request, **context)
    body = params.model_dump(mode="json")
    job = backend.jobs.create(kind.name, tenant, body, job_id=job_id)
    kind.on_created(backend, params)
    enqueue(backend.broker, kind.queue, kind.actor, body)
    get_metrics().jobs_submitted.labels(kind.name).inc()
    return job, params


def execute(
    kind: JobKind[Any, ParamsT], body: dict[str, Any], backend: Backend, *, final_attempt: bool = True
) -> JobResult | None:
    """Runs one delivery of a job: marks it running, calls ``kind.run``, records the outcome.

    Args:
        kind: The job's kind.
        body: The message body (the kind's params as JSON).
        backend: Store and Redis handles.
        final_attempt: Whether a transient failure now is the last try (then the job is marked failed;
            otherwise it goes back to ``queued`` for the broker's retry).

    Returns:
        The result, or ``None`` when the job was cancelled (before or during the run) or already final.

    Raises:
        PermanentJobError: Inputs unusable or the run failed deterministically; recorded on the job.
        Exception: Transient failures (I/O, Redis) after recording them; the broker may retry.
    """
    metrics = get_metrics()
    started = time.monotonic()
    try:
        params = kind.parse(body)
    except ValidationError as exc:
        raise PermanentJobError("invalid_message", f"malformed {kind.name} message: {exc}") from exc
    now = time.time()
    record = JobRecord(
        id=params.job_id,
        kind=kind.name,
        tenant=params.tenant,
        status=JobStatus.queued,
        created_at=now,
        updated_at=now,
        params=body,
    )
    running = backend.jobs.start(record)
    if running is None:
        logger.info("job %s is cancelled or finished; skipping", params.job_id)
        return None
    outcome = "failed"
    run = JobRun(backend=backend, job=running)
    try:
        try:
            result = kind.run(params, run)
        except NotFound as exc:
            raise PermanentJobError("not_found", exc.message, exc.detail) from exc
        except ServiceError as exc:
            if exc.status >= 500:
                raise
            raise PermanentJobError(exc.code, exc.message, exc.detail) from exc
        run.check_cancelled()
        if result.pending:
            outcome = "dispatched"
            return result
        if not backend.jobs.succeed(params.job_id, result.result, result.message):
            logger.info("job %s changed state while finishing", params.job_id)
        outcome = "succeeded"
        return result
    except JobCancelled:
        outcome = "cancelled"
        logger.info("job %s cancelled during its run", params.job_id)
        return None
    except PermanentJobError as exc:
        backend.jobs.fail(params.job_id, exc.as_dict(), final=True)
        raise
    except Exception as exc:
        error = {"code": "job_error", "message": f"{type(exc).__name__}: {exc}", "detail": None}
        if not final_attempt:
            outcome = "retried"
            error["message"] = "retrying after " + error["message"]
        backend.jobs.fail(params.job_id, error, final=final_attempt)
        raise
    except BaseException as exc:
        # Interrupts from the broker (time limit) end the job for good.
        backend.jobs.fail(params.job_id, {"code": type(exc).__name__, "message": str(exc) or type(exc).__name__})
        raise
    finally:
        metrics.jobs.labels(kind.name, outcome).inc()
        metrics.job_duration.labels(kind.name, outcome).observe(time.monotonic() - started)
