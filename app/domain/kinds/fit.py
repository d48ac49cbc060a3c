"""The ``fit`` job kind: a tuned, OOD-calibrated Laplace posterior for an uploaded model.

Submitted by ``POST /v1/models/{id}/fits``. Checks before queueing: the model and datasets exist for the
tenant, each dataset fits the model (:func:`app.domain.datasets.check_compatible`), the curvature can be
fitted on this network (KFRA needs a chain of Linear layers), the options agree with each other and with the
task (``curvature.LaplaceConfig`` validates them), and validation tuning has a validation split.

The run loads the model and data from the store, calls ``curvature.fit_laplace`` with a progress callback,
stores the posterior bytes (content-addressed), caches them in Redis and writes the fit record.

A fit over more than ``KRONLAP_FIT_SHARD_SIZE`` training examples is sharded: the run sends a Dramatiq group
of shard messages (``fit_shard``: one shard's curvature factors, on any worker) whose completion callback is
the reduce step (``fit_reduce``: merge the factors, then damping, tuning and OOD calibration), and the job
stays running until the reduce step ends it. A regression fit first estimates its noise scale on all the data,
as a single-message fit does. KFRA fits stay one message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import dramatiq
import numpy as np
import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field

import curvature as cv
from app.domain.backend import Backend
from app.domain.catalog import ModelRecord, new_id
from app.domain.datasetio import Dataset, load_canonical
from app.domain.datasets import check_compatible
from app.domain.errors import InvalidInput, NotFound, ServiceError
from app.domain.fits import save_fit
from app.domain.jobs import JobCancelled, JobStatus, PermanentJobError
from app.domain.kinds.base import JobKind, JobParams, JobResult, JobRun, Stage
from app.domain.modelio import ModelImportError, load_model
from app.domain.models import require_curvature
from curvature.options import (
    DEFAULT_CURVATURE,
    MAX_SEED,
    Curvature,
    Damping,
    OodScore,
    Predictive,
    Subset,
    Task,
    Tuning,
)
from curvature.posterior import estimate_sigma

logger = logging.getLogger(__name__)

_LIBRARY = cv.LaplaceConfig()


class FitRequest(BaseModel):
    """Body of ``POST /v1/models/{id}/fits``: which data and which Laplace approximation.

    ``tuning`` defaults to ``validation`` when a validation split is available (``validation`` dataset or
    ``x_val``/``y_val`` inside ``dataset``), else ``marglik``. Every other default is the library's
    (``curvature.LaplaceConfig``).
    """

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="Training dataset id.")
    validation: str | None = Field(default=None, description="Optional validation dataset id.")
    curvature: Curvature = DEFAULT_CURVATURE
    damping: Damping = _LIBRARY.damping
    tuning: Tuning | None = None
    subset: Subset = _LIBRARY.subset
    mc_samples: int = Field(
        default=_LIBRARY.mc_samples, ge=1, le=100, description="Sampled targets per input for KFAC."
    )
    batch_size: int = Field(default=_LIBRARY.batch_size, ge=1, le=65536)
    prior_precision: float = Field(default=_LIBRARY.prior_precision, gt=0, allow_inf_nan=False)
    n_eff: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    ood_score: OodScore = _LIBRARY.ood_score
    ood_quantile: float = Field(default=_LIBRARY.ood_quantile, gt=0, lt=1)
    predictive: Predictive = _LIBRARY.predictive
    samples: int = Field(default=_LIBRARY.samples, ge=1, le=10000, description="Default MC samples of predictions.")
    seed: int = Field(default=0, ge=0, le=MAX_SEED)


class FitParams(JobParams):
    """Everything a fit job needs; the message body and the job record's ``params``."""

    fit_id: str
    model_id: str
    dataset_id: str
    validation_id: str | None = None
    config: dict[str, Any]


def _tensors(x: np.ndarray, y: np.ndarray, model: ModelRecord, device: torch.device) -> tuple[torch.Tensor, ...]:
    xt = torch.from_numpy(np.ascontiguousarray(x)).reshape(x.shape[0], *model.input_shape).to(device)
    yt = torch.from_numpy(np.ascontiguousarray(y))
    if model.task == Task.regression:
        yt = yt.to(torch.float32)
        if yt.ndim == 1:
            yt = yt.reshape(-1, 1)
    return xt, yt.to(device)


def load_network(backend: Backend, model: ModelRecord) -> torch.nn.Module:
    """The stored network of ``model``, rebuilt by the importer (eval mode, float32, CPU)."""
    try:
        imported = load_model(
            backend.store.get_blob(model.sha256),
            model.filename,
            input_shape=tuple(model.input_shape),
            max_bytes=backend.settings.max_model_bytes,
        )
    except ModelImportError as exc:
        raise PermanentJobError(exc.code, exc.message, exc.detail) from exc
    return imported.module


class FitKind(JobKind[FitRequest, FitParams]):
    """Laplace fits."""

    name = "fit"
    queue = "fits"
    actor = "fit_laplace"
    request_model: ClassVar[type[BaseModel]] = FitRequest
    params_model: ClassVar[type[JobParams]] = FitParams

    def prepare(self, backend: Backend, tenant: str, job_id: str, request: FitRequest, **context: Any) -> FitParams:
        catalog = backend.catalog
        model = catalog.get_model(context["model_id"], tenant)
        data = catalog.get_dataset(request.dataset, tenant)
        check_compatible(model, data, "dataset")
        validation = None
        if request.validation:
            validation = catalog.get_dataset(request.validation, tenant)
            check_compatible(model, validation, "validation dataset")
        require_curvature(model, request.curvature)
        has_validation = validation is not None or data.n_val > 0
        # the inputs the OOD threshold is calibrated on
        if validation is not None:
            held_out, source = validation.n, "the validation dataset"
        elif data.n_val > 0:
            held_out, source = data.n_val, "the dataset's validation split"
        else:
            held_out, source = data.n, "the dataset (no validation split)"
        if held_out < 2:
            raise InvalidInput(
                f"the OOD threshold is calibrated on held-out inputs and needs at least two; {source} has {held_out}",
                code="too_few_rows",
                detail={"rows": held_out, "min_rows": 2},
            )
        tuning = request.tuning or (Tuning.validation if has_validation else Tuning.marglik)
        if tuning == Tuning.validation and not has_validation:
            raise InvalidInput(
                "tuning='validation' needs a validation split: pass 'validation' or upload x_val/y_val with the data",
                code="missing_validation",
            )
        config = request.model_dump(mode="json", exclude={"dataset", "validation"})
        config.update(tuning=tuning.value, likelihood=model.task.value)
        try:
            cv.LaplaceConfig(**config)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"invalid fit configuration: {exc}", code="invalid_config") from exc
        return FitParams(
            job_id=job_id,
            tenant=tenant,
            fit_id=new_id("fit"),
            model_id=model.id,
            dataset_id=data.id,
            validation_id=validation.id if validation else None,
            config=config,
        )

    def on_created(self, backend: Backend, params: FitParams) -> None:
        backend.jobs.link_fit(params.fit_id, params.job_id)

    def run(self, params: FitParams, run: JobRun) -> JobResult:
        backend = run.backend
        run.progress(0.01, "loading model and data")
        config = _config(params)
        data_rec = backend.catalog.get_dataset(params.dataset_id, params.tenant)
        bounds = shard_bounds(data_rec.n, backend.settings.fit_shard_size)
        if len(bounds) > 1 and shardable(config):
            if config.likelihood == Task.regression and config.sigma is None:
                params = with_noise_scale(params, _load(backend, params, run.device()))
            return dispatch_shards(self, params, run, bounds)
        inputs = _load(backend, params, run.device())
        run.progress(0.05, f"fitting {config.curvature} on {inputs.device.type}", device=str(inputs.device))
        posterior = _fit(inputs, config, run.reporter(0.05, 0.92))
        return _save(run, params, config, posterior, inputs.device)

    def stages(self) -> dict[str, Stage]:
        return {SHARD_ACTOR: run_shard, REDUCE_ACTOR: run_reduce}


# -- one fit's inputs, run and result ---------------------------------------------------------------------


@dataclass
class _Inputs:
    module: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor | None
    y_val: torch.Tensor | None
    device: torch.device


def _config(params: FitParams) -> cv.LaplaceConfig:
    try:
        return cv.LaplaceConfig(**params.config)
    except (TypeError, ValueError) as exc:
        raise PermanentJobError("invalid_config", f"invalid fit configuration: {exc}") from exc


def _load(backend: Backend, params: FitParams, device: torch.device, rows: slice | None = None) -> _Inputs:
    """The network and data of a fit on ``device``; ``rows`` selects training rows (a shard: no validation)."""
    catalog = backend.catalog
    model_rec = catalog.get_model(params.model_id, params.tenant)
    data_rec = catalog.get_dataset(params.dataset_id, params.tenant)
    check_compatible(model_rec, data_rec, "dataset")
    module = load_network(backend, model_rec).to(device).eval()
    data = load_canonical(backend.store.get_blob(data_rec.sha256))
    if rows is not None:
        x, y = _tensors(data.x[rows], data.y[rows], model_rec, device)
        return _Inputs(module, x, y, None, None, device)
    val: Dataset | None = None
    if params.validation_id:
        val_rec = catalog.get_dataset(params.validation_id, params.tenant)
        check_compatible(model_rec, val_rec, "validation dataset")
        val = load_canonical(backend.store.get_blob(val_rec.sha256))
    elif data.x_val is not None and data.y_val is not None:
        val = Dataset(x=data.x_val, y=data.y_val)
    x, y = _tensors(data.x, data.y, model_rec, device)
    x_val = y_val = None
    if val is not None:
        x_val, y_val = _tensors(val.x, val.y, model_rec, device)
    return _Inputs(module, x, y, x_val, y_val, device)


def _fit(inputs: _Inputs, config: cv.LaplaceConfig, progress: Any, factors: Any = None) -> cv.LaplacePosterior:
    try:
        return cv.fit_laplace(
            inputs.module,
            inputs.x,
            inputs.y,
            x_val=inputs.x_val,
            y_val=inputs.y_val,
            config=config,
            progress=progress,
            factors=factors,
        )
    except (ValueError, NotImplementedError, torch.linalg.LinAlgError) as exc:
        raise PermanentJobError("fit_failed", f"the fit failed: {exc}") from exc


def _save(
    run: JobRun,
    params: FitParams,
    config: cv.LaplaceConfig,
    posterior: cv.LaplacePosterior,
    device: torch.device,
    shards: dict[str, Any] | None = None,
) -> JobResult:
    """Stores the posterior (blob first, then the fit record naming it) and caches it in Redis."""
    run.progress(0.97, "saving posterior")
    if shards is not None:
        posterior.metadata["shards"] = shards
    run.check_cancelled()
    save_fit(
        run.backend,
        posterior,
        id=params.fit_id,
        tenant=params.tenant,
        model_id=params.model_id,
        dataset_id=params.dataset_id,
        validation_id=params.validation_id,
        job_id=params.job_id,
        config=params.config,
        ood_score=str(config.ood_score),
        device=str(device),
        duration_s=time.monotonic() - run.started,
    )
    return JobResult({"fit": params.fit_id, "links": {"fit": f"/v1/fits/{params.fit_id}"}}, "fit ready")


# -- sharded fits -------------------------------------------------------------------------------------------
#
# A fit over more than ``fit_shard_size`` examples runs as a Dramatiq group: one message per shard (any worker
# computes the shard's curvature factors, data averages with their count, stored content-addressed with a
# ``shards`` record), and a completion callback, the reduce step, that merges them (``cv.merge_factors``) and
# finishes the posterior (damping, tuning, OOD calibration) with ``cv.fit_laplace(..., factors=...)``. A
# re-delivered shard whose record already names a stored blob is not recomputed.

SHARD_ACTOR = "fit_shard"
REDUCE_ACTOR = "fit_reduce"
SHARD_RECORDS = "shards"


class ShardParams(BaseModel):
    """Message body of one shard: the fit's params and the shard's rows ``[start, stop)``."""

    fit: FitParams
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    start: int = Field(ge=0)
    stop: int = Field(ge=1)


class ReduceParams(FitParams):
    """Message body of the reduce step: the fit's params and its number of shards."""

    shards: int = Field(ge=1)


def shard_bounds(n: int, shard_size: int) -> list[tuple[int, int]]:
    """``ceil(n / shard_size)`` contiguous row ranges of near-equal size covering ``[0, n)``."""
    count = max(1, -(-n // shard_size))
    edges = [round(i * n / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def shardable(config: cv.LaplaceConfig) -> bool:
    """Whether shard factors add up to this fit's: not for KFRA (its ``G`` recursion multiplies data averages)."""
    return config.curvature != Curvature.kfra


def with_noise_scale(params: FitParams, inputs: _Inputs) -> FitParams:
    """A regression fit's params with the noise scale ``cv.fit_laplace`` would estimate from all the data, so
    every shard's Gaussian likelihood (and hence its ``G``) is the single-message fit's."""
    dtype = next(inputs.module.parameters()).dtype
    sigma = estimate_sigma(inputs.module, inputs.x.to(dtype), inputs.y.to(dtype))
    return params.model_copy(update={"config": {**params.config, "sigma": sigma}})


def shard_record_id(fit_id: str, index: int) -> str:
    """Store id of a shard's record."""
    return f"{fit_id}-{index}"


def dispatch_shards(kind: FitKind, params: FitParams, run: JobRun, bounds: list[tuple[int, int]]) -> JobResult:
    """Sends the shards as one Dramatiq group whose completion callback is the reduce step."""
    body = params.model_dump(mode="json")
    count = len(bounds)
    shards = [
        dramatiq.Message(
            queue_name=kind.queue,
            actor_name=SHARD_ACTOR,
            args=(ShardParams(fit=params, index=i, count=count, start=a, stop=b).model_dump(mode="json"),),
            kwargs={},
            options={},
        )
        for i, (a, b) in enumerate(bounds)
    ]
    reduce = dramatiq.Message(
        queue_name=kind.queue, actor_name=REDUCE_ACTOR, args=({**body, "shards": count},), kwargs={}, options={}
    )
    run.backend.redis.delete(_progress_key(run.backend, params.job_id))
    run.progress(0.05, f"{count} shards of about {bounds[0][1] - bounds[0][0]} examples queued", shards=count)
    group = dramatiq.group(shards, broker=run.backend.broker)
    group.add_completion_callback(reduce)
    group.run()
    return JobResult({"fit": params.fit_id, "shards": count}, pending=True)


def _progress_key(backend: Backend, job_id: str) -> str:
    return f"{backend.settings.redis_namespace}:fit-shards:{job_id}"


class _ShardProgress:
    """Each shard's fraction done in one Redis hash; the job's progress is their mean, mapped into [0.05, 0.65]."""

    def __init__(self, backend: Backend, job_id: str, index: int, count: int, interval_s: float = 0.5) -> None:
        self.backend, self.job_id, self.index, self.count = backend, job_id, index, count
        self.key = _progress_key(backend, job_id)
        self.interval_s = interval_s
        self._last = 0.0

    def __call__(self, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self._last < self.interval_s:
            return
        self._last = now
        client = self.backend.redis
        pipe = client.pipeline()
        pipe.hset(self.key, str(self.index), f"{min(max(float(fraction), 0.0), 1.0):.4f}")
        pipe.expire(self.key, self.backend.settings.job_ttl_s)
        pipe.hvals(self.key)
        values = [float(v) for v in pipe.execute()[-1]]
        done = sum(v >= 1.0 for v in values)
        mean = sum(values) / self.count
        self.backend.jobs.report(self.job_id, 0.05 + 0.6 * mean, f"curvature: {done}/{self.count} shards done")


def encode_factors(factors: cv.KroneckerFactors | cv.DiagonalFactors) -> bytes:
    """Factors as safetensors (CPU tensors) with their kind, method, count and layer order as metadata."""
    tensors: dict[str, torch.Tensor] = {}
    for name in factors:
        if isinstance(factors, cv.KroneckerFactors):
            tensors[f"A/{name}"] = factors[name].A.detach().cpu().contiguous()
            tensors[f"G/{name}"] = factors[name].G.detach().cpu().contiguous()
        else:
            tensors[f"D/{name}"] = factors[name].detach().cpu().contiguous()
    meta = {
        "kind": "kronecker" if isinstance(factors, cv.KroneckerFactors) else "diagonal",
        "method": factors.method,
        "n_data": str(factors.n_data),
        "layers": json.dumps(list(factors)),
    }
    return safetensors.torch.save(tensors, metadata=meta)


def decode_factors(blob: bytes, device: torch.device) -> cv.KroneckerFactors | cv.DiagonalFactors:
    """Inverse of :func:`encode_factors`, onto ``device``."""
    header_len = int.from_bytes(blob[:8], "little")  # safetensors: 8-byte length, JSON header, tensor data
    meta = json.loads(blob[8 : 8 + header_len])["__metadata__"]
    tensors = safetensors.torch.load(blob)
    layers = json.loads(meta["layers"])
    n, method = int(meta["n_data"]), meta["method"]
    if meta["kind"] == "kronecker":
        kron = {k: cv.LayerFactors(A=tensors[f"A/{k}"].to(device), G=tensors[f"G/{k}"].to(device)) for k in layers}
        return cv.KroneckerFactors(kron, n_data=n, method=method)
    return cv.DiagonalFactors({k: tensors[f"D/{k}"].to(device) for k in layers}, n_data=n, method=method)


def shard_factors(inputs: _Inputs, config: cv.LaplaceConfig, index: int, progress: Any) -> Any:
    """A shard's curvature factors, as ``cv.fit_laplace`` fits them on the whole data (same layers, likelihood
    and batch size; KFAC / random projections draw from a generator seeded per shard)."""
    include = [cv.find_layers(inputs.module)[-1].name] if config.subset == Subset.last_layer else None
    lik = cv.Gaussian(config.sigma) if config.likelihood == Task.regression else cv.CrossEntropy()
    x = inputs.x.to(next(inputs.module.parameters()).dtype)
    y = inputs.y.to(x.dtype) if config.likelihood == Task.regression else inputs.y
    if config.curvature == Curvature.diag:
        return cv.fit_diagonal(
            inputs.module, (x, y), lik, method="ggn", batch_size=config.batch_size, progress=progress, include=include
        )
    generator = torch.Generator().manual_seed((config.seed + 1_000_003 * (index + 1)) % MAX_SEED)
    return cv.fit_kronecker(
        inputs.module,
        (x, y),
        lik,
        method=config.curvature,
        mc_samples=config.mc_samples,
        batch_size=config.batch_size,
        generator=generator,
        progress=progress,
        include=include,
    )


def _stage_run(backend: Backend, params: FitParams) -> JobRun | None:
    """A :class:`JobRun` on the fit's job record, or ``None`` when the job is over (cancelled, failed)."""
    job = backend.jobs.get(params.job_id)
    if job is None or job.status != JobStatus.running:
        logger.info("job %s is %s; skipping its stage", params.job_id, job.status if job else "gone")
        return None
    return JobRun(backend=backend, job=job, details=dict(job.details or {}))


@contextlib.contextmanager
def _stage_outcome(backend: Backend, job_id: str, final_attempt: bool) -> Iterator[None]:
    """Records a stage's failure on the job as :func:`~app.domain.kinds.base.execute` does for a run: client
    faults and permanent errors fail the job (and are not retried), other errors only on the last attempt."""
    try:
        yield
    except JobCancelled:
        logger.info("job %s was cancelled during a stage", job_id)
    except PermanentJobError as exc:
        backend.jobs.fail(job_id, exc.as_dict(), final=True)
        raise
    except ServiceError as exc:
        if exc.status >= 500:
            if final_attempt:
                backend.jobs.fail(job_id, {"code": exc.code, "message": exc.message, "detail": exc.detail})
            raise
        error = PermanentJobError("not_found" if isinstance(exc, NotFound) else exc.code, exc.message, exc.detail)
        backend.jobs.fail(job_id, error.as_dict(), final=True)
        raise error from exc
    except Exception as exc:
        if final_attempt:
            backend.jobs.fail(job_id, {"code": "job_error", "message": f"{type(exc).__name__}: {exc}", "detail": None})
        raise


def run_shard(body: dict[str, Any], backend: Backend, final_attempt: bool) -> None:
    """One shard of a sharded fit: its factors, stored as a blob plus a ``shards`` record (skipped when done)."""
    shard = ShardParams.model_validate(body)
    params = shard.fit
    run = _stage_run(backend, params)
    if run is None:
        return
    record_id = shard_record_id(params.fit_id, shard.index)
    record = backend.store.get_record(SHARD_RECORDS, record_id)
    progress = _ShardProgress(backend, params.job_id, shard.index, shard.count)
    with _stage_outcome(backend, params.job_id, final_attempt):
        if (
            record is not None
            and record.get("rows") == [shard.start, shard.stop]
            and backend.store.has_blob(record["sha256"])
        ):
            logger.info("shard %d/%d of fit %s already done", shard.index + 1, shard.count, params.fit_id)
            progress(1.0)
            return
        started = time.monotonic()
        inputs = _load(backend, params, run.device(), rows=slice(shard.start, shard.stop))
        factors = shard_factors(inputs, _config(params), shard.index, progress)
        sha = backend.store.put_blob(encode_factors(factors))
        record = {
            "id": record_id,
            "fit_id": params.fit_id,
            "job_id": params.job_id,
            "tenant": params.tenant,
            "index": shard.index,
            "count": shard.count,
            "rows": [shard.start, shard.stop],
            "n": factors.n_data,
            "sha256": sha,
            "device": str(inputs.device),
            "worker": f"{socket.gethostname()}:{os.getpid()}",
            "seconds": round(time.monotonic() - started, 4),
            "finished_at": time.time(),
        }
        backend.store.put_record(SHARD_RECORDS, record_id, record)  # after its blob: never names a missing one
        progress(1.0)


def run_reduce(body: dict[str, Any], backend: Backend, final_attempt: bool) -> None:
    """The reduce step of a sharded fit: merges the shards' factors and finishes, stores and caches the
    posterior, then ends the job (the group's completion callback, sent once every shard succeeded)."""
    params = ReduceParams.model_validate(body)
    run = _stage_run(backend, params)
    if run is None:
        return
    with _stage_outcome(backend, params.job_id, final_attempt):
        records = [
            backend.store.get_record(SHARD_RECORDS, shard_record_id(params.fit_id, i)) for i in range(params.shards)
        ]
        missing = [i for i, r in enumerate(records) if r is None or not backend.store.has_blob(r["sha256"])]
        if missing:  # a shard delivered twice can release the group's barrier early: retry until all are stored
            raise RuntimeError(f"shards {missing} of fit {params.fit_id} are not stored yet")
        device = run.device()
        run.progress(0.66, f"merging {params.shards} shards on {device.type}", device=str(device))
        factors = cv.merge_factors(decode_factors(backend.store.get_blob(r["sha256"]), device) for r in records)
        inputs = _load(backend, params, device)
        config = _config(params)
        posterior = _fit(inputs, config, run.reporter(0.66, 0.95), factors=factors)
        parts = [
            {k: r.get(k) for k in ("index", "rows", "device", "worker", "seconds", "finished_at")} for r in records
        ]
        shards = {"count": params.shards, "examples": factors.n_data, "parts": parts}
        result = _save(run, params, config, posterior, device, shards=shards)
        if not backend.jobs.succeed(params.job_id, result.result, result.message):
            logger.info("job %s changed state while finishing", params.job_id)
            return
        for i in range(params.shards):
            backend.store.delete_record(SHARD_RECORDS, shard_record_id(params.fit_id, i))
        backend.redis.delete(_progress_key(backend, params.job_id))


FIT = FitKind()
