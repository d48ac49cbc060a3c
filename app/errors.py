"""Domain errors and their one mapping to HTTP.

Handlers and job code raise :class:`ServiceError` subclasses; :func:`install_error_handlers` turns them,
request-validation errors, model-import errors and framework HTTP errors into the single JSON shape
``{"error": {"code": ..., "message": ..., "detail": ...}}``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of every error the service reports to clients.

    Attributes:
        status: HTTP status code.
        code: Stable machine-readable error code.
        message: Human-readable explanation.
        detail: Optional JSON-able context (offending field, limits, ...).
    """

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        if code is not None:
            self.code = code


class NotFound(ServiceError):
    """An id that does not exist (or belongs to another tenant)."""

    status = 404
    code = "not_found"


class InvalidInput(ServiceError):
    """Well-formed request whose content is unusable (shapes, dtypes, non-finite values, ...)."""

    status = 422
    code = "invalid_input"


class PayloadTooLarge(ServiceError):
    """Body or file over the configured limit."""

    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    """Content type the endpoint does not read."""

    status = 415
    code = "unsupported_media_type"


class Unauthorized(ServiceError):
    """Missing or unknown API key."""

    status = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    """Authenticated (or open) access that is still not allowed."""

    status = 403
    code = "forbidden"


class Conflict(ServiceError):
    """Request that clashes with the current state (e.g. cancelling a finished job)."""

    status = 409
    code = "conflict"


class NotImplementedYet(ServiceError):
    """Endpoint declared in the service surface but not available in this version."""

    status = 501
    code = "not_implemented"


class ServiceUnavailable(ServiceError):
    """A dependency (Redis, the store) is unreachable."""

    status = 503
    code = "unavailable"


class InternalError(ServiceError):
    """A fault of the service itself (e.g. an unreadable stored artifact)."""

    status = 500
    code = "internal_error"


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
    """HTTP status for a :class:`app.modelio.ModelImportError` code."""
    return _IMPORT_STATUS.get(code, 422)


def install_error_handlers(app: FastAPI) -> None:
    """Registers the exception handlers that implement the error mapping on ``app``."""

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.code, exc.message, exc.detail, headers=headers)

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

    try:
        from app.modelio import ModelImportError
    except ImportError:  # pragma: no cover - model import lands separately
        ModelImportError = None  # type: ignore[assignment]  # noqa: N806

    if ModelImportError is not None:

        @app.exception_handler(ModelImportError)
        async def _model_import(_: Request, exc: Exception) -> JSONResponse:
            code = getattr(exc, "code", "invalid_model")
            return error_response(
                import_error_status(code), code, getattr(exc, "message", str(exc)), getattr(exc, "detail", None)
            )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal server error")
