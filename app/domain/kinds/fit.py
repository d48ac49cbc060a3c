"""The ``fit`` job kind: a tuned, OOD-calibrated Laplace posterior for an uploaded model.

Submitted by ``POST /v1/models/{id}/fits``. Checks before queueing: the model and datasets exist for the
tenant, each dataset fits the model (:func:`app.domain.datasets.check_compatible`), the curvature can be
fitted on this network (KFRA needs a chain of Linear layers), the options agree with each other and with the
task (``curvature.LaplaceConfig`` validates them), and validation tuning has a validation split.

The run loads the model and data from the store, calls ``curvature.fit_laplace`` with a progress callback,
stores the posterior bytes (content-addressed), caches them in Redis and writes the fit record.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

import curvature as cv
from app.domain.backend import Backend
from app.domain.catalog import FitRecord, ModelRecord, new_id
from app.domain.datasetio import Dataset, load_canonical
from app.domain.datasets import check_compatible
from app.domain.errors import InvalidInput
from app.domain.jobs import PermanentJobError
from app.domain.kinds.base import JobKind, JobParams, JobResult, JobRun
from app.domain.modelio import ModelImportError, load_model
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

logger = logging.getLogger(__name__)

_UNSUPPORTED_WHY = {Curvature.kfra: "KFRA needs a chain of Linear layers with element-wise activations"}
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
    mc_samples: int = Field(default=_LIBRARY.mc_samples, ge=1, le=100, description="Sampled targets per input for KFAC.")
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


def threshold_table(posterior: cv.LaplacePosterior) -> dict[str, dict[str, float]]:
    """OOD thresholds by predictive, then by score (``fit_laplace`` calibrates every predictive)."""
    return {
        str(p): {str(s): float(v) for s, v in t.items()}
        for p, t in posterior.ood_table.items()
        if p in tuple(Predictive) and t
    }


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
        if model.curvatures is not None and request.curvature not in model.curvatures:
            raise InvalidInput(
                f"curvature {request.curvature.value!r} cannot be fitted on model {model.id!r}: "
                + _UNSUPPORTED_WHY.get(request.curvature, "not supported for its layers"),
                code="unsupported_curvature",
                detail={"curvature": request.curvature.value, "supported": [c.value for c in model.curvatures]},
            )
        has_validation = validation is not None or data.n_val > 0
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
        catalog = backend.catalog
        run.progress(0.01, "loading model and data")
        model_rec = catalog.get_model(params.model_id, params.tenant)
        data_rec = catalog.get_dataset(params.dataset_id, params.tenant)
        val_rec = catalog.get_dataset(params.validation_id, params.tenant) if params.validation_id else None
        check_compatible(model_rec, data_rec, "dataset")
        module = load_network(backend, model_rec)
        data = load_canonical(backend.store.get_blob(data_rec.sha256))
        val: Dataset | None = None
        if val_rec is not None:
            check_compatible(model_rec, val_rec, "validation dataset")
            val = load_canonical(backend.store.get_blob(val_rec.sha256))
        elif data.x_val is not None and data.y_val is not None:
            val = Dataset(x=data.x_val, y=data.y_val)

        device = run.device()
        module = module.to(device).eval()
        x, y = _tensors(data.x, data.y, model_rec, device)
        x_val = y_val = None
        if val is not None:
            x_val, y_val = _tensors(val.x, val.y, model_rec, device)
        try:
            config = cv.LaplaceConfig(**params.config)
        except (TypeError, ValueError) as exc:
            raise PermanentJobError("invalid_config", f"invalid fit configuration: {exc}") from exc
        run.progress(0.05, f"fitting {config.curvature} on {device.type}")
        try:
            posterior = cv.fit_laplace(
                module, x, y, x_val=x_val, y_val=y_val, config=config, progress=run.reporter(0.05, 0.92)
            )
        except (ValueError, NotImplementedError, torch.linalg.LinAlgError) as exc:
            raise PermanentJobError("fit_failed", f"the fit failed: {exc}") from exc

        run.progress(0.97, "saving posterior")
        blob = posterior.to_bytes()
        run.check_cancelled()
        sha = backend.store.put_blob(blob)
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
            ood_score=str(config.ood_score),
            ood_thresholds=threshold_table(posterior),
            summary=summary if isinstance(summary, dict) else {},
            device=str(device),
            duration_s=time.monotonic() - run.started,
        )
        catalog.put_fit(fit)
        backend.cache.put(params.fit_id, blob)
        backend.cache.set_latest(params.model_id, params.fit_id)
        return JobResult({"fit": params.fit_id, "links": {"fit": f"/v1/fits/{params.fit_id}"}}, "fit ready")


FIT = FitKind()
