"""Job status, cancellation, and the job kinds of later versions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body

from app.api.deps import ServicesDep, TenantDep
from app.api.schemas import ERROR_RESPONSES, JobOut
from app.api.services import Services
from app.domain.errors import Conflict, NotFound, NotImplementedYet
from app.domain.jobs import JobRecord

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_NOT_YET = {501: {"description": "Not available in this version", "model": ERROR_RESPONSES[404]["model"]}}


def _job(services: Services, job_id: str, tenant: str) -> JobRecord:
    job = services.jobs.get(job_id)
    if job is None or job.tenant != tenant:
        raise NotFound(f"job {job_id!r} not found", detail={"job": job_id})
    return job


@router.get("", response_model=list[JobOut])
def list_jobs(services: ServicesDep, tenant: TenantDep, limit: int = 50) -> list[JobOut]:
    """The caller's recent jobs, newest first."""
    return [JobOut.of(j) for j in services.jobs.list(tenant, limit=max(1, min(limit, 500)))]


@router.get("/{job_id}", response_model=JobOut, responses=ERROR_RESPONSES)
def get_job(job_id: str, services: ServicesDep, tenant: TenantDep) -> JobOut:
    """Status, progress (0-1), message, result links and error of a job."""
    return JobOut.of(_job(services, job_id, tenant))


@router.delete("/{job_id}", response_model=JobOut, responses={**ERROR_RESPONSES, 409: ERROR_RESPONSES[404]})
def cancel_job(job_id: str, services: ServicesDep, tenant: TenantDep) -> JobOut:
    """Cancels a queued or running job (a running fit stops at its next progress report)."""
    job = _job(services, job_id, tenant)
    if not services.jobs.cancel(job_id):
        current = services.jobs.get(job_id) or job
        raise Conflict(
            f"job {job_id!r} already {current.status.value}",
            code="job_finished",
            detail={"status": current.status.value},
        )
    return JobOut.of(services.jobs.get(job_id) or job)


@router.post("/optimise", responses=_NOT_YET, status_code=202)
def submit_optimise(tenant: TenantDep, body: dict[str, Any] = Body(default_factory=dict)) -> None:
    """Second-order optimiser jobs (KFAC / KFLR / KFRA training): planned, not available yet."""
    raise NotImplementedYet(
        "optimiser jobs are not available in this version; POST /v1/models/{id}/fits fits a posterior",
        detail={"kind": "optimise"},
    )


@router.post("/online-laplace", responses=_NOT_YET, status_code=202)
def submit_online_laplace(tenant: TenantDep, body: dict[str, Any] = Body(default_factory=dict)) -> None:
    """Online-Laplace (continual learning) jobs: planned, not available yet."""
    raise NotImplementedYet("online-Laplace jobs are not available in this version", detail={"kind": "online-laplace"})
