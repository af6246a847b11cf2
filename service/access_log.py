"""The access log: one line per HTTP request, from the app (uvicorn's own is off, service/server.py).

    INFO service.access: POST /recommend 503 store_unavailable 2.4 ms request=findme-1 path=/recommend

Method, route template (as r2ec_request_duration_seconds labels it: `/users/{user_id}/history`,
"unmatched" for a path no route serves), status, the error body's `code` for a 4xx/5xx, duration
in ms (until the last byte: a stream's whole life), the request id (X-Request-ID, kept in scope
state by service/request_id.py) and the raw path. With R2EC_LOG_FORMAT=json each of these is a key
of the line (`extra`). Probes and scrapes (/healthz, /readyz, /metrics) are logged at DEBUG, so
a pod's log is not half probes; R2EC_LOG_LEVEL=DEBUG shows them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from service.errors import CODES, printable
from service.metrics import route_template
from service.request_id import request_id

log = logging.getLogger("service.access")

PROBES = frozenset({"/healthz", "/readyz", "/metrics"})


class AccessLog:
    """Pure ASGI middleware (module docstring); inside RequestId, so the id is known."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # unless a response starts: an unhandled error's 500 is sent further out

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        crashed = True
        try:
            await self.app(scope, receive, send_wrapper)
            crashed = False
        finally:
            route = route_template(scope)
            code = scope.get("state", {}).get("error_code")
            if code is None and crashed:
                code = CODES[500]  # service/errors.py's handler answers it from outside this one
            fields = {
                "request_id": request_id(scope),
                "method": scope.get("method", ""),
                "route": route,
                "path": printable(scope.get("path", ""), 200),  # a %0A in a path is no new line
                "status": status,
                "code": code if status >= 400 else None,
                "duration_ms": round((time.perf_counter() - start) * 1e3, 1),
            }
            log.log(
                logging.DEBUG if route in PROBES else logging.INFO,
                "%s %s %d%s %.1f ms request=%s path=%s",
                fields["method"],
                route,
                status,
                f" {fields['code']}" if fields["code"] else "",
                fields["duration_ms"],
                fields["request_id"],
                fields["path"],
                extra=fields,
            )
