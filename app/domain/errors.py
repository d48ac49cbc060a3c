"""Domain errors: what the service reports to clients, whichever front end reports it.

The HTTP API maps them to statuses and the JSON error envelope (:mod:`app.api.errors`); job code records
them on the job (a :class:`ServiceError` raised by a job's run function ends the job with its code).
"""

from __future__ import annotations

from typing import Any


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



class ServiceUnavailable(ServiceError):
    """A dependency (Redis, the store) is unreachable; the client should retry after ``retry_after_s``."""

    status = 503
    code = "unavailable"

    def __init__(
        self, message: str, *, code: str | None = None, detail: Any = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message, code=code, detail=detail)
        self.retry_after_s = retry_after_s


class InternalError(ServiceError):
    """A fault of the service itself (e.g. an unreadable stored artifact)."""

    status = 500
    code = "internal_error"
