"""Fit submission (a job on the queue) and fit lookup."""

from __future__ import annotations

import math

from fastapi import APIRouter, status

from app.catalog import DatasetRecord, ModelRecord, new_id
from app.deps import ServicesDep, TenantDep
from app.errors import InvalidInput, NotFound
from app.schemas import ERROR_RESPONSES, FitOut, FitRequest, FitSubmitted, JobOut
from app.services import Services
from workers.actors import FIT_ACTOR
from workers.jobs import FIT_KIND, FitParams

router = APIRouter(prefix="/v1", tags=["fits"])


def _check_dataset(model: ModelRecord, data: DatasetRecord, label: str) -> None:
    row = math.prod(data.x_shape)
    if data.x_shape != model.input_shape and row != math.prod(model.input_shape):
        raise InvalidInput(
            f"{label} {data.id!r} has rows of shape {data.x_shape}; model {model.id!r} expects {model.input_shape}",
            code="incompatible_dataset",
        )
    if model.task == "classification":
        if data.y_kind != "int":
            raise InvalidInput(
                f"{label} {data.id!r} has float targets; a classifier needs integer labels", code="incompatible_dataset"
            )
        if (data.num_classes or 0) > model.output_dim:
            raise InvalidInput(
                f"{label} {data.id!r} has labels up to {data.num_classes - 1}; the model has {model.output_dim} outputs",
                code="incompatible_dataset",
            )
    else:
        width = data.y_shape[0] if data.y_shape else 1
        if data.y_kind != "float" or width != model.output_dim:
            raise InvalidInput(
                f"{label} {data.id!r}: a regressor with {model.output_dim} outputs needs float targets of that width",
                code="incompatible_dataset",
            )


def submit_fit(services: Services, tenant: str, model_id: str, request: FitRequest) -> FitSubmitted:
    """Checks a fit request, records its job and enqueues it; the code path of ``POST .../fits``."""
    catalog = services.catalog
    model = catalog.get_model(model_id, tenant)
    data = catalog.get_dataset(request.dataset, tenant)
    _check_dataset(model, data, "dataset")
    validation = None
    if request.validation:
        validation = catalog.get_dataset(request.validation, tenant)
        _check_dataset(model, validation, "validation dataset")
    has_validation = validation is not None or data.n_val > 0
    tuning = request.tuning or ("validation" if has_validation else "marglik")
    if tuning == "validation" and not has_validation:
        raise InvalidInput(
            "tuning='validation' needs a validation split: pass 'validation' or upload x_val/y_val with the data",
            code="missing_validation",
        )
    config = request.model_dump(exclude={"dataset", "validation"})
    config.update(tuning=tuning, likelihood=model.task)
    fit_id, job_id = new_id("fit"), new_id("job")
    params = FitParams(
        job_id=job_id,
        fit_id=fit_id,
        tenant=tenant,
        model_id=model.id,
        dataset_id=data.id,
        validation_id=validation.id if validation else None,
        config=config,
    )
    job = services.jobs.create(FIT_KIND, tenant, params.model_dump(), job_id=job_id)
    services.jobs.link_fit(fit_id, job_id)
    services.broker.get_actor(FIT_ACTOR).send(params.model_dump())
    services.metrics.jobs_submitted.labels(FIT_KIND).inc()
    return FitSubmitted(
        fit_id=fit_id,
        job=JobOut.of(job),
        links={"fit": f"/v1/fits/{fit_id}", "job": f"/v1/jobs/{job_id}"},
    )


@router.post(
    "/models/{model_id}/fits",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=FitSubmitted,
    responses=ERROR_RESPONSES,
)
def create_fit(model_id: str, request: FitRequest, services: ServicesDep, tenant: TenantDep) -> FitSubmitted:
    """Queues a Laplace fit of the model on an uploaded dataset; poll the returned job."""
    return submit_fit(services, tenant, model_id, request)


@router.get("/fits/{fit_id}", response_model=FitOut, responses=ERROR_RESPONSES)
def get_fit(fit_id: str, services: ServicesDep, tenant: TenantDep) -> FitOut:
    """A fit: its record once ready, else the state of the job producing it."""
    record = services.catalog.find_fit(fit_id, tenant)
    if record is not None:
        return FitOut.of(record)
    job = services.jobs.job_for_fit(fit_id)
    if job is None or job.tenant != tenant:
        raise NotFound(f"fit {fit_id!r} not found", detail={"fit": fit_id})
    return FitOut.pending(fit_id, job)
