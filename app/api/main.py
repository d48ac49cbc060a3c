"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api.errors import install_error_handlers
from app.api.limits import BodyLimitMiddleware
from app.api.metrics import MetricsMiddleware
from app.api.routes import datasets, fits, health, jobs, models, predict
from app.api.services import Services
from app.domain.metrics import get_metrics
from app.domain.settings import Settings, get_settings

logger = logging.getLogger(__name__)

UPLOAD_PATHS = ("/v1/models", "/v1/datasets")


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
        services = Services.build(settings, url, metrics)
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
    install_error_handlers(app)
    for router in (models.router, datasets.router, fits.router, predict.router, jobs.router, health.router):
        app.include_router(router)

    def limit_for(method: str, path: str) -> int:
        if method == "POST" and path.rstrip("/") in UPLOAD_PATHS:
            return settings.max_upload_bytes
        return settings.max_request_bytes

    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
