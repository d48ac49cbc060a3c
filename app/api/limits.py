"""Request body limits: size, enforced before and while a body is read, and JSON nesting depth."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import BodyTooLarge, error_response
from app.domain.errors import InvalidInput


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


_STRING = re.compile(rb'"[^"]*"')
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_CHUNK = 1 << 20


def json_too_deep(body: bytes, limit: int) -> bool:
    """Whether the arrays and objects of a JSON text nest deeper than ``limit``.

    A scan in C speed and bounded memory, run before any recursive parser sees the text: escaped
    backslashes and quotes are dropped (pairs, left to right, as a JSON parser reads them), then every byte
    but ``[]{}"``, then the strings (brackets inside them do not count); the running depth is a cumulative
    sum over chunks of what is left. Malformed text is left for the parser to reject.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = body.translate(None, _NOT_STRUCTURE)
    if b'"' in structure:
        structure = _STRING.sub(b"", structure)
    brackets = np.frombuffer(structure, dtype=np.uint8)
    depth = 0
    for start in range(0, brackets.size, _CHUNK):
        chunk = brackets[start : start + _CHUNK]
        steps = np.where((chunk == ord("[")) | (chunk == ord("{")), 1, -1).astype(np.int32)
        running = np.cumsum(steps) + depth
        if int(running.max()) > limit:
            return True
        depth = int(running[-1])
    return False


def too_deep_error(limit: int) -> InvalidInput:
    """The 422 error for a JSON body nested deeper than ``limit``."""
    return InvalidInput(
        f"the JSON body nests deeper than {limit} levels", code="json_too_deep", detail={"max_depth": limit}
    )


def is_json(content_type: str) -> bool:
    """Whether a ``Content-Type`` value names JSON (``application/json`` or ``*+json``)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class JsonDepthMiddleware:
    """Pure ASGI middleware answering 422 for JSON bodies nested deeper than ``max_depth``.

    The body is read (through the size limit, which wraps this middleware) and checked with
    :func:`json_too_deep` before the framework's JSON parser or pydantic recurse into it, then replayed.

    Args:
        app: The wrapped application.
        max_depth: Deepest accepted nesting.
        skip: Paths that check depth themselves (the predict route parses its own body).
    """

    def __init__(self, app: ASGIApp, max_depth: int, skip: Callable[[str], bool] = lambda _: False) -> None:
        self.app = app
        self.max_depth = max_depth
        self.skip = skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH") or self.skip(scope["path"]):
            await self.app(scope, receive, send)
            return
        content_type = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"content-type"), "")
        if not is_json(content_type):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    await self.app(scope, receive, send)
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        except BodyTooLarge as exc:
            response = error_response(
                413,
                "payload_too_large",
                f"request body exceeds the limit of {exc.limit} bytes",
                {"limit_bytes": exc.limit},
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        body = b"".join(chunks)
        if json_too_deep(body, self.max_depth):
            error = too_deep_error(self.max_depth)
            await error_response(422, error.code, error.message, error.detail)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
