"""The one mapping of errors to HTTP.

:func:`install_error_handlers` turns domain errors (:mod:`app.domain.errors`), request-validation errors,
model-import errors and framework HTTP errors into the single JSON shape
``{"error": {"code": ..., "message": ..., "detail": ...}}``. A Redis outage met anywhere in a request
(a ``redis.RedisError`` or the broker's connection error) becomes one
:class:`~app.domain.errors.ServiceUnavailable`: 503 with ``Retry-After``.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq.errors
import redis
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.domain.errors import ServiceError, ServiceUnavailable
from app.domain.modelio import ModelImportError

logger = logging.getLogger(__name__)


class BodyTooLarge(StarletteHTTPException):
    """Raised while streaming a request body past its limit; mapped to 413 like :class:`PayloadTooLarge`."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail={"limit_bytes": limit})
        self.limit = limit


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    429: "too_many_requests",
}

# ModelImportError codes that are not plain "unusable content" (422).
_IMPORT_STATUS = {"too_large": 413, "unknown_format": 415}


def error_body(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    """Builds the JSON error envelope shared by every 4xx/5xx response."""
    return {"error": {"code": code, "message": message, "detail": jsonable_encoder(detail)}}


def error_response(status: int, code: str, message: str, detail: Any = None, **kwargs: Any) -> JSONResponse:
    """Returns a :class:`JSONResponse` holding :func:`error_body`."""
    return JSONResponse(error_body(code, message, detail), status_code=status, **kwargs)


def validation_detail(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reduces pydantic error dicts to ``loc`` / ``msg`` / ``type`` (inputs may be huge or binary)."""
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]


def import_error_status(code: str) -> int:
    """HTTP status for a :class:`app.domain.modelio.ModelImportError` code."""
    return _IMPORT_STATUS.get(code, 422)


REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, dramatiq.errors.BrokerConnectionError)
"""Exceptions that mean Redis (job records, queue, cache) is unreachable."""


def redis_unavailable(exc: BaseException, retry_after_s: int) -> ServiceUnavailable:
    """The 503 error for a Redis outage met while serving a request."""
    return ServiceUnavailable(
        "the job store (Redis) is unreachable; retry later",
        code="redis_unavailable",
        detail={"cause": type(exc).__name__},
        retry_after_s=retry_after_s,
    )


def install_error_handlers(app: FastAPI, retry_after_s: int = 5) -> None:
    """Registers the exception handlers that implement the error mapping on ``app``.

    Args:
        app: The application.
        retry_after_s: ``Retry-After`` of 503 answers to Redis outages.
    """

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        headers: dict[str, str] | None = None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        elif isinstance(exc, ServiceUnavailable):
            headers = {"Retry-After": str(exc.retry_after_s or retry_after_s)}
        return error_response(exc.status, exc.code, exc.message, exc.detail, headers=headers)

    async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
        logger.warning("Redis unreachable during %s %s: %s", request.method, request.url.path, exc)
        return await _service_error(request, redis_unavailable(exc, retry_after_s))

    for error_type in REDIS_ERRORS:
        app.add_exception_handler(error_type, _redis_error)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(
            422, "validation_error", "the request does not match the schema", validation_detail(exc.errors())
        )

    @app.exception_handler(ValidationError)
    async def _pydantic_validation(_: Request, exc: ValidationError) -> JSONResponse:
        return error_response(
            422, "validation_error", "the request does not match the schema", validation_detail(exc.errors())
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        if isinstance(exc, BodyTooLarge):
            message = f"request body exceeds the limit of {exc.limit} bytes"
            detail: Any = exc.detail
        else:
            message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
            detail = None if isinstance(exc.detail, str) else exc.detail
        return error_response(exc.status_code, code, message, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(ModelImportError)
    async def _model_import(_: Request, exc: ModelImportError) -> JSONResponse:
        return error_response(import_error_status(exc.code), exc.code, exc.message, exc.detail)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal server error")
