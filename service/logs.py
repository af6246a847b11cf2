"""Log lines: one handler on the root logger that writes text or JSON (R2EC_LOG_FORMAT), for
every `r2ec` command and the service alike. uvicorn's loggers write through it too
(service/server.py gives uvicorn no logging config of its own), so its lifecycle lines carry a
timestamp like the rest. And `Throttled`: a WARNING that an incident repeats on every request
(the store down, the queue full) at most every few seconds, with the count it stands for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# faiss logs "Could not load library with AVX512 support due to: ModuleNotFoundError(...)" at
# INFO when it loads its AVX2 build, which is the one it has: not worth a line that reads as an error
QUIET = {"faiss.loader": logging.WARNING}


def formatter(fmt: str) -> logging.Formatter:
    """text: TEXT_FORMAT; json: one object a line with timestamp (ISO 8601, UTC), level, logger,
    message and the record's `extra` fields (the access log's request_id, route, status, ...)."""
    if fmt == "json":
        return JsonFormatter(
            "%(timestamp)s %(levelname)s %(name)s %(message)s",  # timestamp: set by `timestamp=True`
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp=True,
            # uvicorn's copy of its message with ANSI colours; Python 3.12's asyncio task name
            reserved_attrs=[*RESERVED_ATTRS, "color_message", "taskName"],
        )
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format must be text or json, got {fmt!r}")


def setup_logging(level: str | int, fmt: str = "text") -> None:
    """Log to stderr at `level` in `fmt`. Called again, it replaces its own handler; a root logger
    that someone else gave handlers (pytest's capture, a program embedding the app) is left as it
    is, as `logging.basicConfig` would."""
    handler_formatter = formatter(fmt)
    for name, quiet in QUIET.items():
        logging.getLogger(name).setLevel(quiet)
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "r2ec", False)]
    if len(ours) != len(root.handlers):
        return
    for h in ours:
        root.removeHandler(h)
    handler = logging.StreamHandler()
    handler.setFormatter(handler_formatter)
    handler.r2ec = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)


class Throttled:
    """`warn(message, *args)` logs a WARNING at most once per `every_s`, ending with how many
    calls the line stands for (the first call logs at once, standing for itself). Calls held
    back after a line and then a quiet spell of `every_s` are the previous incident's tail: the
    next line, a new incident's first, says so rather than counting them as its own."""

    def __init__(
        self, logger: logging.Logger, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.every_s = every_s
        self.clock = clock
        self._last: float | None = None  # the last line
        self._last_call: float | None = None
        self._held = 0  # calls since the last line, not logged

    def warn(self, message: str, *args: object) -> None:
        now = self.clock()
        quiet = None if self._last_call is None else now - self._last_call
        self._last_call = now
        if self._last is not None and now - self._last < self.every_s:
            self._held += 1
            return
        if quiet is not None and quiet >= self.every_s and self._held:
            tail = " (the first after %.0fs without one; %d more came after the previous line)"
            self.logger.warning(message + tail, *args, quiet, self._held)
        else:
            self.logger.warning(message + " (%d since the last such line)", *args, self._held + 1)
        self._last, self._held = now, 0
