"""Job functions: parse, load from the store, call :mod:`curvature`, persist, record.

They are plain typed functions (no Dramatiq here; :mod:`workers.actors` wraps them) and idempotent: a
re-delivered job recomputes and overwrites the same fit record, and the posterior blob is
content-addressed, so running a job twice leaves the store as running it once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
import torch
from pydantic import BaseModel

from app.cache import PosteriorCache
from app.catalog import Catalog, FitRecord
from app.datasetio import Dataset, load_canonical
from app.errors import NotFound
from app.jobs import JobCancelled, JobRecord, JobStore
from app.metrics import get_metrics
from app.settings import Settings
from app.store import ArtifactStore

logger = logging.getLogger(__name__)

OOD_SCORES = ("entropy", "mutual_information", "max_prob")
PREDICTIVES = ("mc", "glm")
FIT_KIND = "fit"


class PermanentJobError(Exception):
    """A job failure that a retry cannot fix (bad inputs, numerical errors); never retried."""

    def __init__(self, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail

    def as_dict(self) -> dict[str, Any]:
        """The error as stored on the job record."""
        return {"code": self.code, "message": self.message, "detail": self.detail}


class FitParams(BaseModel):
    """Everything a fit job needs; the message body and the job record's ``params``."""

    job_id: str
    fit_id: str
    tenant: str
    model_id: str
    dataset_id: str
    validation_id: str | None = None
    config: dict[str, Any]


@dataclass
class JobContext:
    """Connections a job function works with.

    Attributes:
        settings: Service settings.
        store: Artifact store.
        jobs: Job records.
        cache: Posterior cache.
    """

    settings: Settings
    store: ArtifactStore
    jobs: JobStore
    cache: PosteriorCache

    @classmethod
    def from_settings(cls, settings: Settings, redis_url: str | None = None) -> JobContext:
        """Opens Redis and the store as configured."""
        client = redis.Redis.from_url(redis_url or settings.redis_url or "")
        return cls(
            settings=settings,
            store=ArtifactStore(settings.data_dir),
            jobs=JobStore(client, settings.redis_namespace, settings.job_ttl_s),
            cache=PosteriorCache(client, settings.redis_namespace, settings.posterior_cache_ttl_s),
        )


def select_device(preference: str) -> torch.device:
    """Picks the compute device inside the worker process (CUDA is never touched in the API)."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PermanentJobError("no_cuda", f"KRONLAP_DEVICE={preference} but CUDA is not available")
    return device


class ProgressReporter:
    """Throttled progress writer handed to ``cv.fit_laplace`` as its ``progress`` callback.

    Maps the core's fraction into ``[lo, hi]`` of the job's overall progress, writes at most every
    ``interval_s`` (and always at the end), and raises :class:`JobCancelled` once the job is cancelled.
    """

    def __init__(self, jobs: JobStore, job_id: str, lo: float, hi: float, interval_s: float = 0.2) -> None:
        self.jobs = jobs
        self.job_id = job_id
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
        self.jobs.report(self.job_id, self.lo + (self.hi - self.lo) * fraction, message or "fitting")


def _tensors(
    x: np.ndarray, y: np.ndarray, input_shape: tuple[int, ...], task: str, output_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    xt = torch.from_numpy(np.ascontiguousarray(x)).reshape(x.shape[0], *input_shape).to(device)
    yt = torch.from_numpy(np.ascontiguousarray(y))
    if task == "regression":
        yt = yt.to(torch.float32)
        if yt.ndim == 1:
            yt = yt.reshape(-1, 1)
    return xt, yt.to(device)


def check_compatible(data: Dataset, input_shape: tuple[int, ...], task: str, output_dim: int, label: str) -> None:
    """Checks that a dataset fits a model (row size, target kind, label range).

    Raises:
        PermanentJobError: With code ``incompatible_dataset``.
    """
    row = int(np.prod(data.x.shape[1:]))
    if tuple(data.x.shape[1:]) != input_shape and row != int(np.prod(input_shape)):
        raise PermanentJobError(
            "incompatible_dataset",
            f"{label} rows have shape {list(data.x.shape[1:])}, the model expects {list(input_shape)}",
        )
    if task == "classification":
        if data.y_kind != "int":
            raise PermanentJobError("incompatible_dataset", f"{label}: classification needs integer labels in y")
        if (data.num_classes or 0) > output_dim:
            raise PermanentJobError(
                "incompatible_dataset",
                f"{label}: labels reach {data.num_classes - 1} but the model has {output_dim} outputs",
            )
    else:
        width = 1 if data.y.ndim == 1 else data.y.shape[1]
        if data.y_kind != "float" or width != output_dim:
            raise PermanentJobError(
                "incompatible_dataset",
                f"{label}: regression needs float targets of width {output_dim}, got {data.y.dtype} width {width}",
            )


def threshold_table(posterior: Any) -> dict[str, dict[str, float]]:
    """OOD thresholds by predictive, then by score (``fit_laplace`` calibrates every predictive).

    Args:
        posterior: The fitted ``cv.LaplacePosterior``.

    Returns:
        Thresholds by predictive, then by score; predictives without any threshold are left out.
    """
    return {p: {s: float(v) for s, v in t.items()} for p, t in posterior.ood_table.items() if p in PREDICTIVES and t}


def run_fit(params: FitParams, ctx: JobContext, *, final_attempt: bool = True) -> FitRecord | None:
    """Fits a Laplace posterior for an uploaded model and stores it.

    Steps: mark the job running; load the model and data from the store; call ``cv.fit_laplace`` with a
    progress callback writing to the job record; write the posterior bytes to the store, cache them in
    Redis, write the fit record; mark the job succeeded.

    Args:
        params: The job's parameters.
        ctx: Store and Redis handles.
        final_attempt: Whether a transient failure now is the last try (then the job is marked failed;
            otherwise it stays queued for the broker's retry).

    Returns:
        The fit record, or ``None`` when the job was cancelled (before or during the fit).

    Raises:
        PermanentJobError: Inputs unusable or the fit failed deterministically; recorded on the job.
        Exception: Transient failures (I/O, Redis) after recording them; the broker may retry.
    """
    import curvature as cv
    from app.modelio import ModelImportError, load_model

    metrics = get_metrics()
    started = time.monotonic()
    record = JobRecord(
        id=params.job_id,
        kind=FIT_KIND,
        tenant=params.tenant,
        status="queued",
        created_at=time.time(),
        updated_at=time.time(),
        params=params.model_dump(),
    )
    running = ctx.jobs.start(record)
    if running is None:
        logger.info("job %s is cancelled or finished; skipping", params.job_id)
        return None
    outcome = "failed"
    try:
        catalog = Catalog(ctx.store)
        ctx.jobs.report(params.job_id, 0.01, "loading model and data")
        try:
            model_rec = catalog.get_model(params.model_id, params.tenant)
            data_rec = catalog.get_dataset(params.dataset_id, params.tenant)
            val_rec = catalog.get_dataset(params.validation_id, params.tenant) if params.validation_id else None
        except NotFound as exc:
            raise PermanentJobError("not_found", exc.message, exc.detail) from exc
        input_shape = tuple(model_rec.input_shape)
        try:
            imported = load_model(
                ctx.store.get_blob(model_rec.sha256),
                model_rec.filename,
                input_shape=input_shape,
                max_bytes=ctx.settings.max_model_bytes,
            )
        except ModelImportError as exc:
            raise PermanentJobError(exc.code, exc.message, exc.detail) from exc
        data = load_canonical(ctx.store.get_blob(data_rec.sha256))
        check_compatible(data, input_shape, model_rec.task, model_rec.output_dim, "dataset")
        val: Dataset | None = None
        if val_rec is not None:
            val = load_canonical(ctx.store.get_blob(val_rec.sha256))
            check_compatible(val, input_shape, model_rec.task, model_rec.output_dim, "validation dataset")
        elif data.x_val is not None and data.y_val is not None:
            val = Dataset(x=data.x_val, y=data.y_val)

        device = select_device(ctx.settings.device)
        module = imported.module.to(device).eval()
        x, y = _tensors(data.x, data.y, input_shape, model_rec.task, model_rec.output_dim, device)
        x_val = y_val = None
        if val is not None:
            x_val, y_val = _tensors(val.x, val.y, input_shape, model_rec.task, model_rec.output_dim, device)

        try:
            config = cv.LaplaceConfig(**params.config)
        except (TypeError, ValueError) as exc:
            raise PermanentJobError("invalid_config", f"invalid fit configuration: {exc}") from exc
        ctx.jobs.report(params.job_id, 0.05, f"fitting {config.curvature} on {device.type}")
        reporter = ProgressReporter(ctx.jobs, params.job_id, 0.05, 0.92)
        try:
            posterior = cv.fit_laplace(module, x, y, x_val=x_val, y_val=y_val, config=config, progress=reporter)
        except (ValueError, NotImplementedError, torch.linalg.LinAlgError) as exc:
            raise PermanentJobError("fit_failed", f"the fit failed: {exc}") from exc

        thresholds = threshold_table(posterior)
        ctx.jobs.report(params.job_id, 0.97, "saving posterior")
        blob = posterior.to_bytes()
        if ctx.jobs.status(params.job_id) == "cancelled":
            raise JobCancelled(params.job_id)
        sha = ctx.store.put_blob(blob)
        summary = posterior.summary()
        fit = FitRecord(
            id=params.fit_id,
            tenant=params.tenant,
            model_id=params.model_id,
            dataset_id=params.dataset_id,
            validation_id=params.validation_id,
            job_id=params.job_id,
            config=params.config,
            posterior_sha256=sha,
            size_bytes=len(blob),
            ood_score=str(params.config.get("ood_score", "entropy")),
            ood_thresholds=thresholds,
            summary=summary if isinstance(summary, dict) else {},
            device=str(device),
            duration_s=time.monotonic() - started,
        )
        catalog.put_fit(fit)
        ctx.cache.put(params.fit_id, blob)
        ctx.cache.set_latest(params.model_id, params.fit_id)
        if not ctx.jobs.succeed(
            params.job_id, {"fit": params.fit_id, "links": {"fit": f"/v1/fits/{params.fit_id}"}}, "fit ready"
        ):
            logger.info("job %s changed state while finishing", params.job_id)
        outcome = "succeeded"
        return fit
    except JobCancelled:
        outcome = "cancelled"
        logger.info("job %s cancelled during the fit", params.job_id)
        return None
    except PermanentJobError as exc:
        ctx.jobs.fail(params.job_id, exc.as_dict(), final=True)
        raise
    except Exception as exc:
        error = {"code": "job_error", "message": f"{type(exc).__name__}: {exc}", "detail": None}
        if not final_attempt:
            outcome = "retried"
            error["message"] = "retrying after " + error["message"]
        ctx.jobs.fail(params.job_id, error, final=final_attempt)
        raise
    except BaseException as exc:
        # Interrupts from the broker (time limit) end the job for good.
        ctx.jobs.fail(params.job_id, {"code": type(exc).__name__, "message": str(exc) or type(exc).__name__})
        raise
    finally:
        metrics.jobs.labels(FIT_KIND, outcome).inc()
        metrics.job_duration.labels(FIT_KIND, outcome).observe(time.monotonic() - started)
