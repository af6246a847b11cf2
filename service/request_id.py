"""X-Request-ID: every response carries one, so a client's log line and the server's can be
matched. A request's own id is echoed when it is a plain token (1-128 characters of letters,
digits and ``-_.:/+=``, as load balancers and tracing headers write them); otherwise, or without
one, the server makes one (32 hex digits). The id is kept in the request's scope state
(`request_id`), where the handler of an unhandled error reads it: Starlette sends that 500 from
its outermost middleware, outside this one, so the handler sets the header itself and names
the id in its log line (service/errors.py).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

HEADER = "x-request-id"
_TOKEN = re.compile(rb"[A-Za-z0-9\-_.:/+=]{1,128}")


def request_id(scope: dict[str, Any]) -> str | None:
    """The id `RequestId` gave this request (None where it did not run)."""
    return scope.get("state", {}).get("request_id")


class RequestId:
    """Pure ASGI middleware (module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = next((v for k, v in scope.get("headers", ()) if k == HEADER.encode()), b"")
        rid = sent.decode("ascii") if _TOKEN.fullmatch(sent) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        header = (HEADER.encode(), rid.encode("ascii"))

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != header[0]]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        await self.app(scope, receive, send_with_id)
