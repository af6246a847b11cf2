"""X-Request-ID: every response carries one, so a client's log line and the server's can be
matched. A request's own id is echoed when it is a plain token (1-128 characters of letters,
digits and ``-_.:/+=``, as load balancers and tracing headers write them); otherwise, or without
one, the server makes one (32 hex digits). Inside the request it is `current()`, which the log
line of an unhandled error names (service/errors.py).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

HEADER = b"x-request-id"
_TOKEN = re.compile(rb"[A-Za-z0-9\-_.:/+=]{1,128}")
_current: ContextVar[str | None] = ContextVar("r2ec_request_id", default=None)


def current() -> str | None:
    """The id of the request being handled (None outside one)."""
    return _current.get()


class RequestId:
    """Pure ASGI middleware (module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = next((v for k, v in scope.get("headers", ()) if k == HEADER), b"")
        rid = sent.decode("ascii") if _TOKEN.fullmatch(sent) else uuid.uuid4().hex
        token = _current.set(rid)

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, rid.encode("ascii"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)
