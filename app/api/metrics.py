"""HTTP request metrics: an ASGI middleware recording into :class:`app.domain.metrics.Metrics`."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.domain.metrics import Metrics


class MetricsMiddleware:
    """Pure ASGI middleware counting and timing HTTP requests.

    The route label is the matched route template (``/v1/models/{model_id}/predict``), never the raw path,
    and the model label is the ``model_id`` path parameter of successful requests only, so unknown ids
    cannot blow up label cardinality.

    Args:
        app: The wrapped application.
        metrics: Where to record.
        skip: Paths not recorded (e.g. ``/metrics`` itself).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, skip: frozenset[str] = frozenset({"/metrics"})) -> None:
        self.app = app
        self.metrics = metrics
        self.skip = skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.skip:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            code = status["code"]
            model = "-"
            if code < 400:
                model = str((scope.get("path_params") or {}).get("model_id", "-"))
            method = scope.get("method", "")
            self.metrics.http_requests.labels(template, method, str(code), model).inc()
            self.metrics.http_latency.labels(template, method, model).observe(time.perf_counter() - start)
