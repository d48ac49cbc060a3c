"""Request body size limits, enforced before and while a body is read."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import BodyTooLarge, error_response


class BodyLimitMiddleware:
    """Pure ASGI middleware answering 413 for bodies over a per-path limit.

    A declared ``Content-Length`` over the limit is refused before the app runs; a body that streams past
    the limit (chunked, or lying about its length) raises :class:`~app.domain.errors.BodyTooLarge` from
    ``receive``, which the error handlers turn into the same 413 response.

    Args:
        app: The wrapped application.
        limit_for: Maps ``(method, path)`` to the limit in bytes.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    response = error_response(
                        413,
                        "payload_too_large",
                        f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                        {"limit_bytes": limit, "content_length": declared},
                        headers={"Connection": "close"},
                    )
                    await response(scope, receive, send)
                    return
                break
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)
