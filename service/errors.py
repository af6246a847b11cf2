"""The one error body every 4xx and 5xx carries, and the handlers that build it.

    {"error": {"status": 422, "code": "invalid_request",
               "message": "k: Input should be greater than or equal to 1",
               "fields": [{"field": "k", "message": "Input should be greater than or equal to 1"}]}}

`message` is one line for people; `code` is stable for programs; `fields` names each invalid
field (validation errors, and the header of a 400 `invalid_header`); `unknown_item_ids` lists
ids the catalog does not hold.

What a client sent is never copied back: a body may hold NaN or 1e999 (not JSON), a lone
UTF-16 surrogate (not UTF-8) or 100 MB. Messages are built from field names, pydantic's own
messages and ids that passed validation, every piece escaped to printable text and cut to a
bounded length, so an error body is always valid JSON of a few KB at most.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute

from service.batcher import BatcherClosed, BatchFailed, QueueFull, QueueTimeout
from service.deadline import DeadlineExceeded, InvalidHeader
from service.headers import HEADERS as SECURITY_HEADERS
from service.logs import Throttled
from service.metrics import Metrics
from service.request_id import HEADER, request_id
from service.schemas import ErrorResponse
from service.state import ClientDisconnected, EditNotSaved, ReloadError, ReloadInProgress
from service.store import StoreUnavailable, UserRateLimited
from service.types import EmptyHistoryError, QueryError, UnknownItemsError

log = logging.getLogger(__name__)

MAX_PART = 64  # characters of one field-path segment (a key a client made up may be long)
MAX_MESSAGE = 300  # characters of one field's message
MAX_FIELDS = 20  # field errors listed
MAX_IN_MESSAGE = 5  # field errors spelled out in the one-line message
SHUTDOWN_RETRY_AFTER_S = 5  # another replica (or this one, restarted) will answer by then
STORE_RETRY_AFTER_S = 2  # the store client reconnects on the next request
RELOAD_RETRY_AFTER_S = 10  # a reload loads and warms a model: seconds on 2 cores
STORE_DOWN = "history store unavailable"  # a 503 store_unavailable's whole message

CODES = {
    400: "invalid_body",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "body_too_large",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
    504: "deadline_exceeded",
    507: "not_saved",
}
DESCRIPTIONS = {
    400: "The body could not be decoded (not UTF-8, or nested too deeply), or a header is malformed "
    "(`invalid_header`, naming it: X-Request-Timeout).",
    401: "The X-API-Key header is missing.",
    403: "The API key is wrong; on an admin route, also while the admin API is disabled "
    "(R2EC_API_KEY unset).",
    404: "No such item.",
    408: "The body stopped arriving: nothing for R2EC_BODY_TIMEOUT_S; the connection is closed.",
    409: "A reload is already running (Retry-After).",
    413: "The body is larger than R2EC_MAX_BODY_BYTES.",
    422: "Invalid input; `message` and `fields` name the fields or the ids.",
    429: "Too many requests, with Retry-After: `auth_throttled`, this address sent too many wrong "
    "API keys (R2EC_AUTH_FAILURES per R2EC_AUTH_FAILURE_WINDOW_S), its key was not compared; "
    "`rate_limited` (POST /users/{id}/events), this user's events are over R2EC_USER_EVENTS_PER_S "
    "after a burst of R2EC_USER_EVENTS_BURST, none of the request's was stored.",
    500: 'An internal error: `message` is "internal error (request <id>)", the X-Request-ID '
    "the server's log has the details under.",
    503: "The service cannot answer now: starting, shutting down, overloaded (queue full) or its "
    "store is unavailable; all but starting with Retry-After.",
    504: "deadline_exceeded: the request's X-Request-Timeout passed before its answer; it was dropped "
    "(from the queue, with Retry-After; or from the decode, its slot freed).",
    507: "The edit is served by this replica from memory but the checkpoint volume refused to "
    "save it (full or read-only); it is saved at the next watch tick (R2EC_WATCH_INTERVAL_S) or "
    "item edit once the volume takes it.",
}


def route_template(scope: dict[str, Any], routes: Sequence[BaseRoute] = ()) -> str:
    """The template of the route that served a request (the access line's and the latency
    metric's `route`, service/access_log.py); else of the one of `routes` whose path and method
    it names: a request refused before routing (a body over the size limit), and FastAPI's own
    /docs and /openapi.json, which record no route; else "unmatched", a path no route serves."""
    route = scope.get("route")
    if route is None:
        path, method = scope.get("path", ""), scope.get("method")
        route = next(
            (
                r
                for r in routes
                if (regex := getattr(r, "path_regex", None)) is not None
                and regex.match(path)
                and method in (getattr(r, "methods", None) or ())
            ),
            None,
        )
    # path_format: the template without convertors ("/items/{item_id}", not "{item_id:id}")
    return getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched"


def documented(*statuses: int, by_reference: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for these error statuses, all with the one error body. A route whose
    own responses are not JSON (/metrics) refers to the schema by name, as application/json:
    FastAPI would file a `model` under the route's own media type."""
    if by_reference:
        json_body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        return {s: {"description": DESCRIPTIONS[s], "content": json_body} for s in statuses}
    return {s: {"model": ErrorResponse, "description": DESCRIPTIONS[s]} for s in statuses}


def printable(text: object, limit: int = MAX_MESSAGE) -> str:
    """`text` as printable, encodable text of at most `limit` characters: control characters and
    lone surrogates escaped (\\x00, \\ud800), the rest cut with an ellipsis."""
    s = str(text)
    if not s.isprintable():
        s = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)
    s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s if len(s) <= limit else s[: limit - 1] + "…"


class ErrorJSONResponse(JSONResponse):
    """An error body's response; sent, it leaves its `code` in the request's scope state
    (`error_code`), where the access log reads it (service/access_log.py)."""

    def __init__(self, body: dict[str, Any], headers: Mapping[str, str] | None) -> None:
        super().__init__({"error": body}, status_code=body["status"], headers=dict(headers or {}))
        self.code: str = body["code"]

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 (Starlette's signature)
        scope.setdefault("state", {})["error_code"] = self.code
        await super().__call__(scope, receive, send)


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    fields: Sequence[Mapping[str, str]] = (),
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """The error body (module docstring) as a response."""
    body: dict[str, Any] = {
        "status": status,
        "code": code or CODES.get(status, "error"),
        "message": printable(message, 2000),
        "fields": list(fields),
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    return ErrorJSONResponse(body, headers)


def _field_path(loc: Iterable[Any]) -> str:
    """('body', 'history', 0, 'item_id') -> 'history.0.item_id'; ('path', 'user_id') -> 'user_id'."""
    parts = list(loc)
    if parts and parts[0] in ("body", "path", "query", "header", "cookie"):
        parts = parts[1:]
    return ".".join(printable(p, MAX_PART) for p in parts) or "body"


def _field_message(e: Mapping[str, Any]) -> str:
    msg = str(e.get("msg", "invalid"))
    if msg.startswith("Value error, "):  # our validators' messages, without pydantic's prefix
        msg = msg[len("Value error, ") :]
    return printable(msg)


def validation_fields(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """pydantic / FastAPI errors -> [{field, message}], never with the `input` they carry."""
    out = []
    for e in errors[:MAX_FIELDS]:
        if e.get("type") == "json_invalid":  # loc = ("body", character offset)
            at = next((p for p in reversed(tuple(e.get("loc", ()))) if isinstance(p, int)), "?")
            why = printable((e.get("ctx") or {}).get("error", e.get("msg", "")), 100)
            out.append({"field": "body", "message": f"invalid JSON at character {at}: {why}"})
        else:
            out.append({"field": _field_path(e.get("loc", ())), "message": _field_message(e)})
    return out


def validation_message(fields: Sequence[Mapping[str, str]], total: int) -> str:
    """'k: Input should be ...; history.0.item_id: Field required (and 3 more)'."""
    shown = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:MAX_IN_MESSAGE])
    return shown + (f" (and {total - MAX_IN_MESSAGE} more)" if total > MAX_IN_MESSAGE else "")


def _json_type(content_type: str) -> bool:
    """Whether a Content-Type names JSON (application/json, or a +json type), as FastAPI reads it."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _allowed_methods(routes: Sequence[BaseRoute], path: str) -> list[str]:
    """Every method some route serves at this path (several routes may share one)."""
    methods: set[str] = set()
    for route in routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


async def error_body(request: Request, exc: Exception) -> bytes:
    """The JSON error body the app's own handler answers `exc` with (and its side effects: a log
    line, a metric). For a failure after a response has begun (POST /recommend/stream sends it
    as an `error` event): the same body a JSON error would have had."""
    handlers = request.app.exception_handlers
    handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers), None)
    if handler is None:  # add_error_handlers registers Exception, so only an app without it
        return error_response(500, internal_error(request_id(request.scope))).body
    return (await handler(request, exc)).body


def internal_error(rid: str | None) -> str:
    """A 500's whole message: the request id, never the exception, whose text may name a server
    path or an internal detail; the log line with the same id has it and its traceback."""
    return f"internal error (request {rid})" if rid else "internal error"


def add_error_handlers(app: FastAPI, metrics: Metrics, routes: Sequence[BaseRoute] = ()) -> None:
    """Every failure a client can cause is a 4xx naming the problem; service-side trouble is a
    503 (starting, store down, shutting down, overloaded: the last three with Retry-After) or a
    500 that names the request id its log line (with the exception and traceback) carries.
    `routes`: the app's routes, for a 405's Allow header. A store outage and queue-full
    shedding each log a WARNING every 10 s at most while they last."""
    shedding_log = Throttled(log)
    waited_log = Throttled(log)
    user_rate_log = Throttled(log)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names only the first route's methods
            headers["Allow"] = ", ".join(_allowed_methods(routes, request.url.path))
        # a subclass may name its own code (service/deps.py AuthThrottled)
        code = getattr(exc, "code", None)
        return error_response(exc.status_code, str(exc.detail), code=code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        fields = validation_fields(errors)
        sent = request.headers.get("content-type", "")
        if not _json_type(sent):
            # a body not sent as JSON (curl -d without -H): FastAPI did not parse it, so what it
            # says of the whole body is this; the other fields' errors stand
            this = printable(sent, 100) or "none"
            why = f"send it as JSON, with content-type: application/json (this one: {this})"
            fields = [{"field": "body", "message": why} if f["field"] == "body" else f for f in fields]
        return error_response(422, validation_message(fields, len(errors)), fields=fields)

    @app.exception_handler(UnknownItemsError)
    async def unknown_items(request: Request, exc: UnknownItemsError) -> JSONResponse:
        return error_response(422, str(exc), code="unknown_items", unknown_item_ids=exc.item_ids[:100])

    @app.exception_handler(EmptyHistoryError)
    async def empty_history(request: Request, exc: EmptyHistoryError) -> JSONResponse:
        hint = "" if exc.user_id is None else f"; send `history` or POST /users/{exc.user_id}/events first"
        return error_response(422, f"{exc}{hint}", code="empty_history")

    @app.exception_handler(QueryError)
    async def bad_query(request: Request, exc: QueryError) -> JSONResponse:
        return error_response(422, str(exc))

    @app.exception_handler(StoreUnavailable)
    async def store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        # the log line (store_failed) has the redacted URL and the driver's words; the client
        # gets nothing of the URL: not its host, port or db, nor a password in its query
        request.app.state.r2ec.store_failed(exc)
        headers = retry_after(STORE_RETRY_AFTER_S)
        return error_response(503, STORE_DOWN, code="store_unavailable", headers=headers)

    @app.exception_handler(UserRateLimited)
    async def user_rate(request: Request, exc: UserRateLimited) -> JSONResponse:
        # no user id in the line: the log outlives an erasure (service/access_log.py); the access
        # line's request id finds the request
        metrics.rejections.labels("user_event_rate").inc()
        user_rate_log.warn("a user's events are over R2EC_USER_EVENTS_PER_S (429 rate_limited): %s", exc)
        return error_response(429, str(exc), code="rate_limited", headers=retry_after(exc.retry_after_s))

    @app.exception_handler(ReloadError)
    async def reload_failed(request: Request, exc: ReloadError) -> JSONResponse:
        return error_response(422, str(exc), code="reload_failed")

    @app.exception_handler(EditNotSaved)
    async def not_saved(request: Request, exc: EditNotSaved) -> JSONResponse:
        return error_response(507, str(exc))

    @app.exception_handler(ReloadInProgress)
    async def reload_busy(request: Request, exc: ReloadInProgress) -> JSONResponse:
        return error_response(
            409, str(exc), code="reload_in_progress", headers=retry_after(RELOAD_RETRY_AFTER_S)
        )

    @app.exception_handler(QueueFull)
    async def overloaded(request: Request, exc: QueueFull) -> JSONResponse:
        metrics.rejections.labels("queue_full").inc()
        shedding_log.warn("queue full: shedding requests (503 overloaded): %s", exc)
        return error_response(503, str(exc), code="overloaded", headers=retry_after(exc.retry_after_s))

    @app.exception_handler(QueueTimeout)
    async def waited_too_long(request: Request, exc: QueueTimeout) -> JSONResponse:
        metrics.rejections.labels("queue_timeout").inc()
        waited_log.warn("queued past R2EC_MAX_QUEUE_WAIT_S: shedding requests (503 overloaded): %s", exc)
        return error_response(503, str(exc), code="overloaded", headers=retry_after(exc.retry_after_s))

    @app.exception_handler(InvalidHeader)
    async def bad_header(request: Request, exc: InvalidHeader) -> JSONResponse:
        fields = [{"field": exc.header, "message": exc.problem}]
        return error_response(400, str(exc), code="invalid_header", fields=fields)

    @app.exception_handler(DeadlineExceeded)
    async def past_deadline(request: Request, exc: DeadlineExceeded) -> JSONResponse:
        metrics.deadline_exceeded.labels(exc.stage).inc()
        headers = None if exc.retry_after_s is None else retry_after(exc.retry_after_s)
        return error_response(504, str(exc), headers=headers)

    @app.exception_handler(BatcherClosed)
    async def closed(request: Request, exc: BatcherClosed) -> JSONResponse:
        metrics.rejections.labels("shutting_down").inc()
        headers = retry_after(SHUTDOWN_RETRY_AFTER_S)
        return error_response(503, str(exc), code="shutting_down", headers=headers)

    @app.exception_handler(BatchFailed)
    async def batch_failed(request: Request, exc: BatchFailed) -> JSONResponse:
        # the batcher logged the failure with its traceback, once for the batch; this line ties
        # each request's id to it
        rid = request_id(request.scope)
        log.error("recommendation failed (request %s): %s", rid, exc)
        return error_response(500, internal_error(rid))

    @app.exception_handler(ClientDisconnected)
    async def gone(request: Request, exc: ClientDisconnected) -> JSONResponse:
        return error_response(499, "client disconnected", code="client_disconnected")  # nginx's convention

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request.scope)  # sent from outside RequestId: its header is set here
        # the route's template, not the path: a path under /users/ names a user (service/access_log.py)
        route = route_template(request.scope)
        log.exception("unhandled error on %s %s (request %s)", request.method, route, rid)
        # sent from outside every middleware of the app's own (service/request_id.py): the
        # headers they add are set here
        headers = {**SECURITY_HEADERS, **({HEADER: rid} if rid else {})}
        return error_response(500, internal_error(rid), headers=headers)
