"""Fit submission (a job on the queue) and fit lookup."""

from __future__ import annotations

from fastapi import APIRouter, status

from app.api.deps import ServicesDep, TenantDep
from app.api.schemas import ERROR_RESPONSES, FitOut, FitSubmitted, JobOut
from app.api.services import Services
from app.domain.errors import NotFound
from app.domain.kinds import FIT, submit
from app.domain.kinds.fit import FitRequest

router = APIRouter(prefix="/v1", tags=["fits"])


def submit_fit(services: Services, tenant: str, model_id: str, request: FitRequest) -> FitSubmitted:
    """Checks a fit request, records its job and enqueues it."""
    job, params = submit(services, FIT, tenant, request, model_id=model_id)
    return FitSubmitted(
        fit_id=params.fit_id,
        job=JobOut.of(job),
        links={"fit": f"/v1/fits/{params.fit_id}", "job": f"/v1/jobs/{job.id}"},
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
