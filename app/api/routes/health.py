"""Liveness, readiness and Prometheus metrics.

``/healthz`` and ``/readyz`` are open to anyone (they reveal nothing but up or down); ``/metrics`` names
every tenant's models, so with API keys configured it needs the scrape token (:func:`app.api.auth.authorize_metrics`).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.auth import authorize_metrics
from app.api.deps import ServicesDep, SettingsDep
from app.api.services import Services
from app.domain.kinds import QUEUES
from app.domain.queue import queue_depth

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (no dependency checks)."""
    return {"status": "ok"}


def _readiness(services: Services) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        services.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    try:
        services.store.ping()
        checks["store"] = "ok"
    except OSError as exc:
        checks["store"] = f"not writable: {exc.strerror or exc}"
    return checks


@router.get(
    "/readyz",
    responses={503: {"description": "Redis or the store is unavailable (same body, status 'unavailable')"}},
)
async def readyz(services: ServicesDep) -> JSONResponse:
    """Redis answers and the artifact store is writable (503 otherwise)."""
    checks = await run_in_threadpool(_readiness, services)
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "unavailable", "checks": checks}, 200 if ready else 503)


def _scrape(services: Services) -> bytes:
    for queue in QUEUES:
        try:
            services.metrics.queue_depth.labels(queue).set(queue_depth(services.broker, queue))
        except Exception:  # Redis down: keep the last value; /readyz reports the outage
            pass
    return generate_latest(services.metrics.registry)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, services: ServicesDep, settings: SettingsDep) -> Response:
    """Prometheus exposition (``kronlap_*`` families); needs the scrape token when API keys are configured."""
    authorize_metrics(request, settings)
    return Response(await run_in_threadpool(_scrape, services), media_type=CONTENT_TYPE_LATEST)
