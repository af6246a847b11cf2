"""uvicorn with a drain: on SIGTERM the app answers what it has before the process exits.

uvicorn alone stops accepting on SIGTERM, waits `timeout_graceful_shutdown` for open requests,
then cancels them (the client gets a plain-text 500 or a reset). Here the signal also starts
the app's drain (service/app.py `begin_drain`): queued recommendations go out at once, new ones
are refused with 503 + Retry-After, and everything still unanswered after
`R2EC_SHUTDOWN_GRACE_S` gets a JSON 503. uvicorn waits RESPONSE_MARGIN_S longer than that, so
those answers are written before it gives up.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from types import FrameType

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from transformers.utils import logging as hf_logging

from service.app import begin_drain
from service.config import Settings
from service.logs import setup_logging

log = logging.getLogger(__name__)

RESPONSE_MARGIN_S = 5.0  # after the grace: the last 503s are written, the lifespan shuts down
# a 1-minute load average this far above the CPUs the server's threads leave free means other
# processes keep a core busy (an idle host reads 0-0.3; below a whole core, nothing to say)
BUSY_MARGIN = 1.0


class DrainingServer(uvicorn.Server):
    """A uvicorn.Server whose first stop signal also drains the app."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:  # noqa: ANN001 (uvicorn's signature)
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first and self._loop is not None:
            # a signal handler runs between two bytecodes of the loop's thread: schedule, do not call
            self._loop.call_soon_threadsafe(begin_drain, self._app)


class StartupError(Exception):
    """The app did not start, for the reason its lifespan recorded (`app.state.startup_error`:
    a checkpoint file that is damaged or unreadable): one line for `r2ec serve` to print."""


def _no_trace_for_a_known_failure(app: FastAPI) -> ASGIApp:
    """`app` as uvicorn runs it: when the lifespan fails for a reason it recorded, Starlette's
    traceback is left out of the startup failure uvicorn logs (57 lines for a truncated
    adapter); `run` raises StartupError with the reason instead. Other failures keep theirs."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)

        async def quiet(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and _startup_error(app) is not None:
                message = {**message, "message": ""}
            await send(message)

        return await app(scope, receive, quiet)

    return asgi


def spin_warning(environ: Mapping[str, str], load_1m: float, cpus: int, threads: int) -> str | None:
    """A warning when OpenMP's threads spin between kernels (GOMP_SPINCOUNT set and not 0, as
    `r2ec serve` sets it: model.spin_between_kernels) on a host that other processes keep busy:
    the 1-minute load average (read before the model loads) is over the CPUs the server's
    `threads` leave free, by BUSY_MARGIN. Spinning threads then take time from those processes
    and wait for them: a decode step 2.4-4x slower (docs/operations.md, "Capacity planning")."""
    spin = environ.get("GOMP_SPINCOUNT", "").strip()
    if spin in ("", "0"):
        return None
    free = max(0, cpus - threads)
    if load_1m <= free + BUSY_MARGIN:
        return None
    return (
        f"GOMP_SPINCOUNT={spin}: OpenMP threads spin between kernels, but the 1-minute load average "
        f"is {load_1m:.1f} on {cpus} CPUs, {threads} of them for this server's threads: beside other "
        "busy processes spinning makes each decode step 2.4-4x slower (docs/operations.md, "
        '"Capacity planning"); set GOMP_SPINCOUNT=0 where the CPUs are shared'
    )


def _check_spinning(settings: Settings) -> None:
    try:
        load_1m = os.getloadavg()[0]
        cpus = len(os.sched_getaffinity(0))
    except (OSError, AttributeError):  # no load average (or affinity) on this platform
        return
    threads = settings.threads or cpus  # torch's default: a thread per CPU it may use
    warning = spin_warning(os.environ, load_1m, cpus, min(threads, cpus))
    if warning is not None:
        log.warning("%s", warning)


def run(app: FastAPI, settings: Settings, host: str, port: int) -> None:
    """Serve `app` until SIGTERM/SIGINT, then drain (module docstring). StartupError when the
    first load fails for a reason the app recorded."""
    setup_logging(settings.log_level, settings.log_format)
    _check_spinning(settings)  # before the model loads, whose own work would count
    # a server's log is read by a pipeline, not watched: transformers' "Loading weights" bar, at
    # each load and reload, would be a line that is neither a text log line nor JSON
    hf_logging.disable_progress_bar()
    config = uvicorn.Config(
        _no_trace_for_a_known_failure(app),
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        # uvicorn's loggers write through the root handler, in R2EC_LOG_FORMAT (service/logs.py);
        # its access lines are replaced by the app's (service/access_log.py)
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s + RESPONSE_MARGIN_S),
        # connection limits (README "Errors and limits"); the body's read timeout is the app's
        # (service/limits.py), uvicorn has none for headers or bodies
        limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        backlog=settings.backlog,
    )
    try:
        DrainingServer(config, app).run()
    except SystemExit:  # uvicorn's exit (3) when the lifespan fails (some versions return instead)
        if _startup_error(app) is None:
            raise
    if (reason := _startup_error(app)) is not None:
        raise StartupError(reason)


def _startup_error(app: FastAPI) -> str | None:
    return getattr(app.state, "startup_error", None)  # service/app.py sets it
