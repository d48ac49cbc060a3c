"""Job status, cancellation, and the job kinds of later versions."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import ServicesDep, TenantDep
from app.api.schemas import ERROR_RESPONSES, JobOut, JobSubmitted
from app.api.services import Services
from app.domain.errors import Conflict, NotFound
from app.domain.jobs import JobRecord
from app.domain.kinds import ONLINE_LAPLACE, OPTIMISE, submit
from app.domain.kinds.base import Artifacts
from app.domain.kinds.online import OnlineLaplaceRequest
from app.domain.kinds.optimise import OptimiseRequest

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

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


@router.post("/optimise", status_code=202, response_model=JobSubmitted, responses=ERROR_RESPONSES)
def submit_optimise(request: OptimiseRequest, services: ServicesDep, tenant: TenantDep) -> JobSubmitted:
    """Trains an uploaded model with the second-order optimiser (KFRA / KFLR / KFAC / diagonal Gauss-Newton) or
    an Adam / SGD baseline; the result is a new model plus its training curve. Poll the returned job."""
    job, _ = submit(services, OPTIMISE, tenant, request)
    return JobSubmitted.of(job)


@router.get("/{job_id}/artifacts", response_model=list[str], responses=ERROR_RESPONSES)
def list_artifacts(job_id: str, services: ServicesDep, tenant: TenantDep) -> list[str]:
    """Names of the files a job published (``curve.json``, ``curve.png``, ...)."""
    _job(services, job_id, tenant)
    return Artifacts(services).names(job_id, tenant)


@router.get(
    "/{job_id}/artifacts/{name}",
    responses={**ERROR_RESPONSES, 200: {"content": {"application/json": {}, "image/png": {}, "text/csv": {}}}},
)
def get_artifact(job_id: str, name: str, services: ServicesDep, tenant: TenantDep) -> Response:
    """One published file of a job (a training curve as JSON, its plot as PNG, ...)."""
    data, media_type = Artifacts(services).get(job_id, tenant, name)
    return Response(data, media_type=media_type)


@router.post("/online-laplace", status_code=202, response_model=JobSubmitted, responses=ERROR_RESPONSES)
def submit_online_laplace(request: OnlineLaplaceRequest, services: ServicesDep, tenant: TenantDep) -> JobSubmitted:
    """Learns a sequence of tasks (one dataset each, with validation splits) without forgetting: online / EWC /
    non-online Laplace, Synaptic Intelligence, fine-tuning or joint training. The result is the accuracy matrix,
    the final model with its posterior ready for predict, and the learner's state for ``continue_from``."""
    job, _ = submit(services, ONLINE_LAPLACE, tenant, request)
    return JobSubmitted.of(job)
