"""The FastAPI application factory."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from app.api.errors import REDIS_ERRORS, install_error_handlers
from app.api.limits import BodyLimitMiddleware, JsonDepthMiddleware
from app.api.metrics import MetricsMiddleware
from app.api.routes import datasets, fits, health, jobs, models, predict
from app.api.schemas import ERROR_DESCRIPTIONS, error_responses
from app.api.services import Services
from app.domain.metrics import get_metrics
from app.domain.settings import Settings, get_settings
from app.domain.store import StoreIdentity

logger = logging.getLogger(__name__)

UPLOAD_PATHS = ("/v1/models", "/v1/datasets")
GIL_SWITCH_INTERVAL_S = 0.001


def _is_predict(path: str) -> bool:
    return path.startswith("/v1/models/") and path.rstrip("/").endswith("/predict")


def statuses_of(path: str, method: str, operation: dict[str, Any]) -> set[int]:
    """Error statuses every ``/v1`` operation can answer, from its shape.

    Any: 401 and 403 (auth), 503 (Redis down); with a path parameter: 404; with parameters or a body: 422;
    with a body: 400 (unparseable), 413 (too large) and 415 (content type).
    """
    if not path.startswith("/v1"):
        return set()
    statuses = {401, 403, 503}
    if "{" in path:
        statuses.add(404)
    if operation.get("parameters") or operation.get("requestBody"):
        statuses.add(422)
    if operation.get("requestBody") or method == "post":
        statuses |= {400, 413, 415, 422}
    return statuses


def document_errors(app: FastAPI) -> None:
    """Makes the OpenAPI document list every error status each route can answer (see :func:`statuses_of`);
    statuses a route documents itself keep its description. Also adds the request bodies routes document by
    reference (predict reads its own body, so FastAPI does not know its model)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in predict.REQUEST_SCHEMAS:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in body.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components[model.__name__] = body
        ref = {"$ref": "#/components/schemas/ErrorResponse"}
        for path, item in schema.get("paths", {}).items():
            for method, operation in item.items():
                responses = operation.setdefault("responses", {})
                wanted = statuses_of(path, method, operation)
                conflict = ERROR_DESCRIPTIONS[409]
                if method == "delete" and path.startswith("/v1/jobs/"):
                    wanted.add(409)
                    conflict = "The job already finished"
                elif method == "post" and path.startswith("/v1/jobs/"):
                    wanted.add(409)  # a job kind's checks may find the state it builds on unusable
                for status, entry in error_responses(*sorted(wanted), s409=conflict).items():
                    if str(status) in responses:
                        continue
                    doc = {"description": entry["description"], "content": {"application/json": {"schema": ref}}}
                    if "headers" in entry:
                        doc["headers"] = entry["headers"]
                    responses[str(status)] = doc
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def record_store(services: Services) -> None:
    """Records the API's artifact store in Redis for the workers' check (a Redis outage only logs)."""
    identity = StoreIdentity(services.redis, services.settings.redis_namespace, services.store)
    try:
        previous = identity.record()
    except REDIS_ERRORS as exc:
        logger.warning("could not record the artifact store in Redis (%s); workers check it once it is", exc)
        return
    if previous is not None:
        logger.warning(
            "Redis named another artifact store (%s); it now names this API's store %s: workers still on the old "
            "one must be restarted with KRONLAP_DATA_DIR=%s",
            previous.get("path"),
            services.store.location,
            services.store.location,
        )


def create_app(
    settings: Settings | None = None,
    *,
    redis_url: str | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> FastAPI:
    """Builds the API.

    Args:
        settings: Settings to use (also served by the ``get_settings`` dependency); read from the
            environment when omitted.
        redis_url: Redis to use instead of ``settings.redis_url`` (the embedded Redis started by the CLI,
            which composes embedded mode: ``kronlap serve``).
        on_shutdown: Called when the server shuts down (the CLI stops its embedded Redis there: the server
            re-raises SIGTERM once it has shut down, so code after it would not run).

    Returns:
        The application; its lifespan connects to Redis and the store.

    Raises:
        app.domain.settings.InsecureSettingsError: Insecure configuration outside embedded mode.
        ValueError: No Redis URL (neither ``redis_url`` nor ``KRONLAP_REDIS_URL``).
    """
    settings = settings or get_settings()
    settings.enforce_secure()
    url = redis_url or settings.redis_url
    if url is None:
        raise ValueError("no Redis URL: set KRONLAP_REDIS_URL, or run `kronlap serve` for the embedded mode")
    metrics = get_metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        # The event loop and the predict threads take turns holding the GIL; a short switch interval keeps
        # a small request's latency low while a large one computes (Python's default is 5 ms).
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        services = Services.build(settings, url, metrics)
        record_store(services)
        app.state.services = services
        try:
            yield
        finally:
            services.close()
            if on_shutdown is not None:
                on_shutdown()

    app = FastAPI(
        title="kronlap",
        version="0.1.0",
        summary="Post-hoc Kronecker-factored Laplace uncertainty for trained networks.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app, settings.retry_after_s)
    for router in (models.router, datasets.router, fits.router, predict.router, jobs.router, health.router):
        app.include_router(router)
    document_errors(app)

    def limit_for(method: str, path: str) -> int:
        if method == "POST" and path.rstrip("/") in UPLOAD_PATHS:
            return settings.max_upload_bytes
        return settings.max_request_bytes

    app.add_middleware(JsonDepthMiddleware, max_depth=settings.max_json_depth, skip=_is_predict)
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
