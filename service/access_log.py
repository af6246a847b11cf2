"""Each HTTP request's access line and its metrics, from one middleware that sees its status and
duration once (uvicorn's own access log is off, service/server.py):

- r2ec_request_duration_seconds{method,route,status} and r2ec_requests_in_flight (the route
  template, `/users/{user_id}/history`, not the raw path, so labels stay bounded; "unmatched"
  for a path no route serves);
- the line:

    INFO service.access: POST /recommend 503 store_unavailable 2.4 ms request=findme-1 path=/recommend

Method, route template, status, the error body's `code` for a 4xx/5xx, duration
in ms (until the last byte: a stream's whole life), the request id (X-Request-ID, kept in scope
state by service/request_id.py) and the raw path, except under /users/, where the path holds a
user id, personal data that would outlive the user's erasure in every log store: there the
route template stands for it ("/users/{user_id}/history"; "/users/..." where no route matched),
and the request id finds the request. With R2EC_LOG_FORMAT=json each of these is a key
of the line (`extra`). Probes and scrapes (/healthz, /readyz, /metrics) are logged at DEBUG, so
a pod's log is not half probes; R2EC_LOG_LEVEL=DEBUG shows them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from starlette.routing import BaseRoute

from service.errors import CODES, printable, route_template
from service.metrics import Metrics
from service.request_id import request_id

log = logging.getLogger("service.access")

PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
USERS = "/users/"  # the routes whose paths name a user


def logged_path(path: str, route: str) -> str:
    """The path as the access line shows it (module docstring): no user id."""
    if path.startswith(USERS):
        return route if route.startswith(USERS) else USERS + "..."
    return printable(path, 200)  # a %0A in a path is no new line


class AccessLog:
    """Pure ASGI middleware (module docstring); inside RequestId, so the id is known."""

    def __init__(self, app: Any, metrics: Metrics, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the app's (`route_template`): a list its routers are added to later

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # when the request began to arrive: a client's deadline counts from here (service/deadline.py)
        scope.setdefault("state", {})["received_at"] = start
        status = 500  # unless a response starts: an unhandled error's 500 is sent further out
        self.metrics.in_flight.inc()

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
            seconds = time.perf_counter() - start
            self.metrics.in_flight.dec()
            route = route_template(scope, self.routes)
            self.metrics.request_latency.labels(scope.get("method", ""), route, str(status)).observe(seconds)
            code = scope.get("state", {}).get("error_code")
            if code is None and crashed:
                code = CODES[500]  # service/errors.py's handler answers it from outside this one
            fields = {
                "request_id": request_id(scope),
                "method": scope.get("method", ""),
                "route": route,
                "path": logged_path(scope.get("path", ""), route),
                "status": status,
                "code": code if status >= 400 else None,
                "duration_ms": round(seconds * 1e3, 1),
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
