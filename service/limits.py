"""The request body limit, enforced before anything parses a body.

A body over `R2EC_MAX_BODY_BYTES` is refused with 413 (the one error body, service/errors.py):
one whose Content-Length says so before a byte of it is read, a chunked one as soon as the bytes
read pass the limit. Nothing over the limit is ever buffered, parsed or validated, so a client
cannot make the event loop (and /healthz with it) parse 100 MB of JSON; what remains is at most
one limit's worth of parsing per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service.errors import error_response

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyLimit:
    """Pure ASGI middleware (module docstring). `on_refused()` is called once per 413."""

    def __init__(self, app: Any, max_bytes: int, on_refused: Callable[[], None] = lambda: None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None:  # the server holds the body to this length
            if declared > self.max_bytes:
                await self._refuse(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        # No length given (chunked, or no body): read up to the limit, then hand the app the body.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the real channel: the app still sees a disconnect

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Callable, send: Callable) -> None:
        self.on_refused()
        response = error_response(
            413,
            f"request body larger than {self.max_bytes} bytes (R2EC_MAX_BODY_BYTES)",
            headers={"Connection": "close"},  # the unread rest of the body is not waited for
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # servers refuse a malformed length before the app sees it
    return None
