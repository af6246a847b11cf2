"""The request limits: the body's, enforced before anything parses a body, and the bound on
wrong API keys per client address (`AuthThrottle`, below).

A body over `R2EC_MAX_BODY_BYTES` is refused with 413 (the one error body, service/errors.py):
one whose Content-Length says so before a byte of it is read, a chunked one as soon as the bytes
read pass the limit. Nothing over the limit is ever buffered, parsed or validated, so a client
cannot make the event loop (and /healthz with it) parse 100 MB of JSON; what remains is at most
one limit's worth of parsing per request.

The body is read here, whole, before the app sees it, and each piece of it must arrive within
`R2EC_BODY_TIMEOUT_S` of the one before (the headers are uvicorn's: a proxy's
client_header_timeout bounds those). A client that stops sending gets 408 `body_timeout` and
its connection is closed, instead of holding a socket and a request in flight until it gives
up; a client that hangs up during its upload is logged and counted as 499
`client_disconnected`, as one that leaves while its answer is computed, not as a 400 it was
never sent.

`AuthThrottle`: a client address that sent `R2EC_AUTH_FAILURES` wrong X-API-Key values
within `R2EC_AUTH_FAILURE_WINDOW_S` gets 429 `auth_throttled` with Retry-After on every request
that carries a key, its key not compared (a right guess reads as a wrong one until then), and
regains one try every window / failures seconds (service/deps.py applies it). In this process
only: each replica bounds what reaches it, so N replicas behind a balancer let N times through;
a proxy or gateway in front is where a bound across replicas belongs (docs/operations.md, "Keys
and guessing"). The address is `scope["client"]`: the peer's, or the X-Forwarded-For one where
uvicorn trusts the peer as a proxy (its FORWARDED_ALLOW_IPS, 127.0.0.1 and ::1 by default);
IPv6 addresses count by their /64, what one host is usually given.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from collections.abc import Callable
from typing import Any

from service.buckets import TokenBuckets
from service.errors import error_response

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyLimit:
    """Pure ASGI middleware (module docstring). `on_refused()` is called once per 413,
    `on_timeout()` once per 408. `body_timeout_s` None: no limit on how long a body takes."""

    def __init__(
        self,
        app: Any,
        max_bytes: int,
        on_refused: Callable[[], None] = lambda: None,
        body_timeout_s: float | None = None,
        on_timeout: Callable[[], None] = lambda: None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_refused = on_refused
        self.body_timeout_s = body_timeout_s
        self.on_timeout = on_timeout

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:  # refused before a byte is read
            await self._refuse(scope, receive, send)
            return
        # Read the body up to the limit (the server holds a declared one to its length), each
        # piece within the timeout, then hand the app the body.
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    message = await receive()
            except TimeoutError:
                await self._timed_out(scope, receive, send, size)
                return
            if message["type"] == "http.disconnect":  # the client left during its upload
                await self._gone(scope, receive, send, size)
                return
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

    async def _timed_out(self, scope: Scope, receive: Callable, send: Callable, size: int) -> None:
        self.on_timeout()
        response = error_response(
            408,
            f"the request body stopped arriving: nothing for {self.body_timeout_s:g} s after "
            f"{size} bytes (R2EC_BODY_TIMEOUT_S)",
            headers={"Connection": "close"},  # uvicorn closes the connection after it
        )
        await response(scope, receive, send)

    async def _gone(self, scope: Scope, receive: Callable, send: Callable, size: int) -> None:
        """Nobody reads this answer (uvicorn drops it); it is the access line's and the latency
        metric's status and code, as for a client that leaves while its answer is computed."""
        message = f"client disconnected after {size} bytes of its request body"
        await error_response(499, message, code="client_disconnected")(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # servers refuse a malformed length before the app sees it
    return None


AUTH_CLIENTS = 65_536  # client addresses an AuthThrottle keeps, the least recently failed dropped


def client_address(scope: Scope) -> str:
    """The address a request's failures count against (module docstring): the client's, an IPv6
    one as its /64; "unknown" where the server gave none (a unix socket)."""
    client = scope.get("client")
    return _counted_as(client[0]) if client else "unknown"


@functools.lru_cache(maxsize=4096)  # parsing an address takes 5-20 us; clients come back
def _counted_as(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a name (some test transports): as it is
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d, an IPv4 client of a dual-stack socket
            return str(address.ipv4_mapped)
        return f"{ipaddress.IPv6Address(int(address) >> 64 << 64)}/64"
    return str(address)


class AuthThrottle:
    """Wrong API keys per client address (module docstring): `failures` per `window_s`, as a
    token bucket per address (service/buckets.py) that refills one try every window / failures
    seconds. At most AUTH_CLIENTS addresses are kept (~10 MB); one dropped starts over full."""

    def __init__(
        self,
        failures: int,
        window_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = AUTH_CLIENTS,
    ) -> None:
        self.failures = failures
        self.window_s = window_s
        self._buckets = TokenBuckets(failures / window_s, failures, max_keys=max_clients, clock=clock)

    def blocked(self, client: str) -> float:
        """Seconds until `client` may try a key again; 0: it may now."""
        return self._buckets.wait(client)

    def failed(self, client: str) -> None:
        """`client` sent a wrong key."""
        self._buckets.take(client)
