"""The one mapping of errors to HTTP.

:func:`install_error_handlers` turns domain errors (:mod:`app.domain.errors`), request-validation errors,
model-import errors and framework HTTP errors into the single JSON shape
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

from app.domain.errors import ServiceError
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

    @app.exception_handler(ModelImportError)
    async def _model_import(_: Request, exc: ModelImportError) -> JSONResponse:
        return error_response(import_error_status(exc.code), exc.code, exc.message, exc.detail)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal server error")
