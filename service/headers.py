"""Security headers on every response: `X-Content-Type-Options: nosniff` (a browser takes a body
only as the type it is sent as, never sniffs JSON or text into a script or a page) and
`Referrer-Policy: no-referrer` (a link followed from the page does not tell the other site the
service's address). The page and its files add a Content-Security-Policy and `X-Frame-Options`
of their own (service/ui.py). A 500 for an unhandled error is sent from outside this middleware
(Starlette's outermost one), so its handler sets these headers itself (service/errors.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
_RAW = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in HEADERS.items()]


class SecurityHeaders:
    """Pure ASGI middleware (module docstring); a header a response sets itself is kept."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {k.lower() for k, _ in headers}
                message = {**message, "headers": headers + [h for h in _RAW if h[0] not in present]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
