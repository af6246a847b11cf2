"""Thin HTTP handlers: read the input, call the service state, shape the reply (or, for
/recommend/stream, hand an accepted request to service/streaming.py).

The dependencies they ask for are the aliases in service/deps.py. /recommend is built per app
(`recommend_router(settings)`): its body carries the server's reasoning-token ceiling, so the
schema is the one place a request's `max_reasoning_tokens` is checked. For that nested handler
to see its body type, annotations here are evaluated at definition time (no
`from __future__ import annotations`).
"""

import asyncio
import json
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.convertors import Convertor, register_url_convertor

from model.backbone_digest import BackboneCheck
from model.backbone_digest import label as backbone_label
from service import schemas
from service.catalog import ItemBatchError, ItemTextError
from service.config import Settings
from service.deadline import DESCRIPTION as DEADLINE_DESCRIPTION
from service.deadline import HEADER as DEADLINE_HEADER
from service.deadline import PATTERN, Deadline, request_deadline
from service.deps import Admin, CatalogDep, MaybeStateDep, StateDep, StoreDep, UserData
from service.errors import documented
from service.request_id import request_id
from service.state import ServiceState, confine_checkpoint
from service.store import Event, stamped
from service.streaming import (
    MODEL_HEADERS,
    EventStream,
    RecommendStream,
    model_headers,
    model_out,
    recommended_items,
)
from service.types import Query, Result

router = APIRouter()  # every route but /recommend


class _IdConvertor(Convertor[str]):
    """A path segment holding an id: like Starlette's `path` convertor it takes "/" (the server
    decodes %2F before routing), and unlike it ("." stops at a line break) any character, so an
    id the body rules refuse (a control character) gets their 422 naming the field, not a bare
    404 from a route that did not match. Not empty: "/items/" is redirected to the search, as
    Starlette does for a trailing "/". Otherwise the whole rest of the path up to the route's
    fixed tail is the id, a trailing "/" included (ids may end in one, e.g. URLs):
    "/items/i1/" names the item "i1/", not "i1"."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class _UserConvertor(_IdConvertor):
    """A user id that ends the path (DELETE /users/{user_id}): any id but one ending in
    "/events" or "/history", which are the user's events and history, each a route of its own,
    or in those and a "/", which the server redirects there (as it always did). So a URL belongs
    to one route, as with every other id route: DELETE /users/alice/history is a 405, not the
    erasure of a user called "alice/history" while alice stays; POST /users/x/events/ is still
    redirected to the events, and /users//events (no id) is still no route. An id with such an
    ending is erased with `r2ec user erase` (cli/user.py)."""

    regex = r"[\s\S]+(?<!/events)(?<!/history)(?<!/events/)(?<!/history/)"


register_url_convertor("id", _IdConvertor())
register_url_convertor("user", _UserConvertor())

# The same id rules as in bodies (service/schemas.py `PathId`), so a path id and a body id agree. Every id
# segment uses the `id` convertor (`{user_id:id}`), which takes the rest of the path up to the
# route's fixed tail ("/events", "/history"); an id that is itself "x/history" still reaches its
# user, as "/users/x/history/events". The OpenAPI document and the metrics' route labels use the
# path without the convertor ("/items/{item_id}").
UserIdPath = Annotated[
    schemas.PathId, Path(description="A user id (same rules as in bodies; a '/' in it may be sent as %2F).")
]
ItemIdPath = Annotated[
    schemas.PathId, Path(description="An item id (same rules as in bodies; a '/' in it may be sent as %2F).")
]


def _events(items: list[schemas.Interaction] | None) -> list[Event] | None:
    if items is None:
        return None
    return [Event(i.item_id, i.rating, i.timestamp) for i in items]


async def _wait_disconnect(request: Request) -> None:
    """Resolves when the client disconnects (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------- recommend
def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


STREAM_EXAMPLE = (  # the OpenAPI example of a stream, the README's answer in events
    _sse("reasoning", {"text": "Likes Action, Adventure and Sci-Fi, mostly 1980s and 1970s."})
    + _sse("reasoning", {"text": " Rated highest: Star Wars; Empire Strikes Back, The."})
    + _sse(
        "items",
        {
            "items": [{"item_id": "127", "title": "Godfather, The", "score": 41.64, "rank": 1}],
            "model_version": "20261207-102039-87d819",
            "model": {
                "version": "20261207-102039-87d819",
                "checkpoint": "20261207-102039-87d819",
                "fingerprint": "ed3496b3c78e7360",
                "variant": None,
            },
            "history_source": "request",
            "read_items": ["50", "172", "181"],
        },
    )
    + _sse(
        "done",
        {
            "reasoning_tokens": 40,
            "reasoning_cut": False,
            "cache": "miss",
            "timings": {"queue_ms": 3.2, "generate_ms": 716.8, "score_ms": 0.8, "total_ms": 721.6},
        },
    )
)


def _deadline(
    request: Request,
    _: Annotated[
        # `str`, not `str | None`: the schema then says a string or nothing (nullable, it let a
        # client generated from it send the text "null"); the pattern documents the valid
        # values, and the dependency checks them (a 400, not a 422)
        str,
        Header(
            alias=DEADLINE_HEADER, description=DEADLINE_DESCRIPTION, json_schema_extra={"pattern": PATTERN}
        ),
    ] = None,
) -> Deadline | None:
    """The client's deadline (service/deadline.py): the parameter documents the header in the
    OpenAPI document; every value sent is read here, so one sent twice is refused, not the last
    taken. Counted from when the request began to arrive (service/access_log.py)."""
    received = request.scope.get("state", {}).get("received_at")
    return request_deadline(request.headers.getlist(DEADLINE_HEADER), received)


DeadlineDep = Annotated[Deadline | None, Depends(_deadline)]


# the OpenAPI description of the MODEL_HEADERS every answer carries
MODEL_HEADERS_DOC = {
    name: {"description": text, "schema": {"type": "string"}} for name, text in MODEL_HEADERS.items()
}


def recommend_router(settings: Settings) -> APIRouter:
    """POST /recommend, its body bounded by `settings.reasoning_token_limit`."""
    body_type = schemas.recommend_request(settings.reasoning_token_limit)
    stream_item = schemas.stream_item_schema()
    api = APIRouter()

    @api.post(
        "/recommend",
        response_model=schemas.RecommendResponse,
        tags=["recommend"],
        dependencies=UserData,
        responses={
            200: {
                "description": "The ranked items and the model that ranked them.",
                "headers": MODEL_HEADERS_DOC,
            },
            **documented(400, 401, 403, 408, 413, 422, 429, 500, 503, 504),
        },
    )
    async def recommend(
        body: body_type, request: Request, response: Response, state: StateDep, deadline: DeadlineDep
    ) -> schemas.RecommendResponse:
        """Ranked items for a history (inline, or the user's stored one), with the reasoning.
        503 with Retry-After when R2EC_MAX_QUEUE requests already wait, or while shutting down;
        504 when the caller's X-Request-Timeout passes first. The answer names its model: the
        body's `model`, and the X-Model-Version, X-Model-Fingerprint and (with R2EC_VARIANT set)
        X-R2ec-Variant headers."""
        started = time.perf_counter()
        query = await _query(body, state, started)
        result = await state.recommend(
            query, wait_disconnect=lambda: _wait_disconnect(request), deadline=deadline
        )
        variant = state.settings.variant
        response.headers.update(model_headers(result.model_version, result.fingerprint, variant))
        reply = _reply(result, _source(query), (time.perf_counter() - started) * 1e3, variant)
        # the answer is decided: its exposure-log entry is queued, written after (service/exposure.py)
        rid = request_id(request.scope)
        state.record_served(rid, body.user_id, "/recommend", query, result, reply.history_source)
        return reply

    @api.post(
        "/recommend/stream",
        response_class=EventStream,
        tags=["recommend"],
        responses={
            200: {
                "description": "Server-Sent Events: `reasoning` pieces, then `items` and `done`; "
                "or `error` (the error body) if the answer fails after the stream began. The "
                "headers name the model serving as the stream began; the `items` event's `model` "
                "the one that answered (another only where a reload came in between).",
                "headers": MODEL_HEADERS_DOC,
                "content": {
                    "text/event-stream": {
                        # OpenAPI 3.2's reading: `itemSchema` is one event, `schema` the whole
                        # stream read as a list of events (what schemathesis checks it against
                        # where `itemSchema` is given). FastAPI merges this into its default
                        # `schema`, {"type": "string"}, which every stream failed: "type" replaces it
                        "schema": {"type": "array", "items": stream_item},
                        "itemSchema": stream_item,
                        "example": STREAM_EXAMPLE,
                    }
                },
            },
            **documented(400, 401, 403, 408, 413, 422, 429, 500, 503, 504, by_reference=True),
        },
        dependencies=UserData,
    )
    async def recommend_stream(
        body: body_type, request: Request, state: StateDep, deadline: DeadlineDep
    ) -> EventStream:
        """POST /recommend's answer as Server-Sent Events: the reasoning as it is written, then
        the items. The body and every refusal (4xx, 503) are /recommend's, as JSON, before any
        event; a client that disconnects cancels its request. An X-Request-Timeout that passes
        once the stream has begun (the request is queued) ends it with an `error` event holding
        the 504 body."""
        query = await _query(body, state, time.perf_counter())
        stream = RecommendStream(
            state, query, request, _source(query), user_id=body.user_id, deadline=deadline
        )
        await stream.accept()
        return stream.response()

    return api


async def _query(body: schemas.RecommendRequest, state: ServiceState, started: float) -> Query:
    """The request's query: its history resolved (inline or stored), the server's defaults in."""
    server = state.settings
    budget = body.max_reasoning_tokens
    history, stored_user, seen = await state.resolve_history(
        body.user_id, _events(body.history), seen=body.exclude_history
    )
    return Query(
        history=history,
        k=body.k,
        exclude_history=body.exclude_history,
        reasoning=server.reasoning if body.reasoning is None else body.reasoning,
        max_reasoning_tokens=server.max_reasoning_tokens if budget is None else budget,
        stored_user=stored_user,
        seen_items=seen,
        exclude_items=frozenset(body.exclude_items),
        candidates=None if body.candidates is None else frozenset(body.candidates),
        submitted_at=started,
    )


def _source(query: Query) -> str:
    return "request" if query.stored_user is None else "store"


def _reply(result: Result, source: str, total_ms: float, variant: str) -> schemas.RecommendResponse:
    t = result.timings
    return schemas.RecommendResponse(
        items=recommended_items(result),
        reasoning=result.reasoning,
        model_version=result.model_version,
        model=model_out(result, variant),
        history_source=source,
        read_items=list(result.read_items),
        cache=result.cache,
        reasoning_tokens=result.reasoning_tokens,
        reasoning_cut=result.reasoning_cut,
        timings=schemas.TimingsOut(
            queue_ms=t.queue_ms, generate_ms=t.generate_ms, score_ms=t.score_ms, total_ms=total_ms
        ),
    )


# ---------------------------------------------------------------------- users
@router.post(
    "/users/{user_id:id}/events",
    response_model=schemas.EventsResponse,
    tags=["users"],
    dependencies=UserData,
    responses=documented(400, 401, 403, 408, 413, 422, 429, 500, 503),
)
async def append_events(
    user_id: UserIdPath, body: schemas.EventsRequest, state: StateDep
) -> schemas.EventsResponse:
    """Add interactions to the user's history (kept in timestamp order, so a late event takes
    its place among older ones) and to the event stream retraining reads.
    Idempotent: an event whose `event_id` the user already has is not stored again (`new`:
    false), so a client may retry a failed or timed-out post as it was. An event's `request_id`
    names the recommendation it came from (the X-Request-ID of that /recommend), kept in the
    event stream for joining with the exposure log. A user's events are bounded by
    R2EC_USER_EVENTS_PER_S after a burst of R2EC_USER_EVENTS_BURST: over it, 429 `rate_limited`
    with Retry-After, none of the request's stored."""
    rate = state.event_rate
    if rate is not None and len(body.events) > rate.burst:  # would never fit: not a 429 to retry
        why = f"at most {rate.burst} events per request for one user (R2EC_USER_EVENTS_BURST)"
        raise RequestValidationError([{"type": "value_error", "loc": ("body", "events"), "msg": why}])
    now = int(time.time())
    events = [_stamped(user_id, e, now) for e in body.events]
    done = await state.append_events(user_id, events)
    state.metrics.events_appended(done.appended, len(events) - done.appended)
    return schemas.EventsResponse(
        user_id=user_id,
        appended=done.appended,
        duplicates=len(events) - done.appended,
        history_length=done.history_length,
        events=[
            schemas.EventOutcome(event_id=i, new=n) for i, n in zip(done.event_ids, done.new, strict=True)
        ],
    )


def _stamped(user_id: str, e: schemas.EventIn, now: int) -> Event:
    """The event to store: its id (the client's, else a hash of the event as sent, so a retry
    without a timestamp gets the same id) and its time (the client's, else now)."""
    return stamped(user_id, Event(e.item_id, e.rating, e.timestamp, e.event_id, e.request_id), now)


@router.get(
    "/users/{user_id:id}/history",
    response_model=schemas.HistoryResponse,
    tags=["users"],
    dependencies=UserData,
    responses=documented(401, 403, 422, 429, 500, 503),
)
async def get_history(user_id: UserIdPath, store: StoreDep, catalog: CatalogDep) -> schemas.HistoryResponse:
    """The stored history, oldest first (title null for items since deleted)."""
    events = await store.get_history(user_id)
    return schemas.HistoryResponse(
        user_id=user_id,
        history=[
            schemas.HistoryItemOut(
                item_id=e.item_id,
                title=(catalog.item(e.item_id) or {}).get("title"),
                rating=e.rating,
                timestamp=e.timestamp,
                event_id=e.event_id,
            )
            for e in events
        ],
    )


@router.delete(
    "/users/{user_id:user}",
    response_model=schemas.UserErasure,
    tags=["admin"],
    dependencies=Admin,
    responses=documented(401, 403, 422, 429, 500, 503),
)
async def erase_user(user_id: UserIdPath, state: StateDep) -> schemas.UserErasure:
    """Erase a user (GDPR Art. 17; admin): their stored history, seen items, event ids, their
    entries in the event stream retraining reads and in the exposure log, and the reasonings
    cached for requests that read their stored history; recorded in the ledger the next
    retraining run honours. The receipt counts what went and lists in `remains` what this call
    cannot remove. An unknown user is not an error (0 removed); a repeat is harmless. Events
    the user posts afterwards are kept."""
    erased = await state.erase_user(user_id)
    return schemas.UserErasure(
        user_id=user_id,
        erased_at=erased.erased_at,
        history_events=erased.history_events,
        seen_items=erased.seen_items,
        stream_entries=erased.stream_entries,
        cached_reasonings=erased.cached_reasonings,
        served_entries=erased.served_entries,
        remains=state.erasure_remains(),
    )


# ---------------------------------------------------------------------- items
@router.get(
    "/items/{item_id:id}",
    response_model=schemas.Item,
    tags=["items"],
    responses=documented(404, 422, 500, 503),
)
async def get_item(item_id: ItemIdPath, catalog: CatalogDep) -> schemas.Item:
    item = catalog.item(item_id)
    if item is None:
        raise HTTPException(404, f"item {item_id!r} not found")
    return schemas.Item(**item)


@router.put(
    "/items/{item_id:id}",
    response_model=schemas.ItemUpsertResponse,
    tags=["admin"],
    dependencies=Admin,
    responses={
        201: {"model": schemas.ItemUpsertResponse, "description": "Created."},
        **documented(400, 401, 403, 408, 413, 422, 429, 500, 503, 507),
    },
)
async def put_item(
    item_id: ItemIdPath, body: schemas.ItemUpsert, state: StateDep, response: Response
) -> schemas.ItemUpsertResponse:
    """Encode the item's text with the model and add or replace it in the index (admin)."""
    try:
        catalog, replaced = await state.upsert_item(item_id, body.model_dump(exclude_none=True))
    except ItemTextError as exc:  # a 422 naming the field, as the schema's own checks are
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body", exc.field), "msg": exc.message}]
        ) from None
    response.status_code = 200 if replaced else 201
    if (item := catalog.item(item_id)) is None:  # a DELETE came in between
        raise HTTPException(404, f"item {item_id!r} was deleted while it was being written")
    return schemas.ItemUpsertResponse(
        item=schemas.Item(**item), created=not replaced, index_size=len(catalog.index)
    )


# A custom method on the collection (`:batch`, as Google's AIP-136 names them): no item id can
# be this path, so `/items:batch` stays the item whose id is "batch" for every method (an
# OpenAPI document with one path for both would be ambiguous: schemathesis flags it).
@router.post(
    "/items:batch",
    response_model=schemas.ItemBatchResponse,
    tags=["admin"],
    dependencies=Admin,
    responses=documented(400, 401, 403, 408, 413, 422, 429, 500, 503, 507),
)
async def edit_items(body: schemas.ItemBatch, state: StateDep) -> schemas.ItemBatchResponse:
    """Add, replace and remove many items at once (admin): a catalog sync in one call instead of
    one PUT or DELETE per item. All or nothing: every entry is checked first (the schema, a
    special token in a text, an id twice in the batch: a 422 naming `upsert.N.field`), then the
    upserts are encoded in chunks of 8 (recommendations run between them) and everything is
    applied at once, in one pass over the index, and saved in one append to the edit log. An id
    to delete that the catalog does not hold is not an error: it is listed in `not_found`."""
    if duplicates := body.duplicate_fields():
        raise RequestValidationError(duplicates)
    upserts = {u.item_id: u.model_dump(exclude_none=True, exclude={"item_id"}) for u in body.upsert}
    try:
        catalog, done = await state.edit_items(upserts, body.delete)
    except ItemBatchError as exc:  # a 422 naming each field, as the schema's own checks are
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body", *e.loc), "msg": e.message} for e in exc.errors]
        ) from None
    not_found = set(done.not_found)
    results = [
        schemas.ItemBatchOutcome(item_id=i, result="replaced" if replaced else "created")
        for i, replaced in done.replaced.items()
    ]
    results += [
        schemas.ItemBatchOutcome(item_id=i, result="not_found" if i in not_found else "deleted")
        for i in body.delete
    ]
    replaced = sum(done.replaced.values())
    return schemas.ItemBatchResponse(
        created=len(done.replaced) - replaced,
        replaced=replaced,
        deleted=len(done.deleted),
        not_found=done.not_found,
        index_size=len(catalog.index),
        results=results,
    )


@router.delete(
    "/items/{item_id:id}",
    response_model=schemas.ItemDeleteResponse,
    tags=["admin"],
    dependencies=Admin,
    responses=documented(401, 403, 404, 422, 429, 500, 503, 507),
)
async def delete_item(item_id: ItemIdPath, state: StateDep) -> schemas.ItemDeleteResponse:
    """Remove an item from the index and the catalog (admin)."""
    try:
        catalog = await state.remove_item(item_id)
    except KeyError:
        raise HTTPException(404, f"item {item_id!r} not found") from None
    return schemas.ItemDeleteResponse(deleted=item_id, index_size=len(catalog.index))


# ---------------------------------------------------------------------- admin
@router.post(
    "/admin/reload",
    response_model=schemas.ReloadResponse,
    tags=["admin"],
    dependencies=Admin,
    responses=documented(400, 401, 403, 408, 409, 413, 422, 429, 500, 503),
)
async def reload(state: StateDep, body: schemas.ReloadRequest | None = None) -> schemas.ReloadResponse:
    """Load a checkpoint beside the running model and swap it in; on failure keep the old. A
    `checkpoint` must lie under the checkpoint root (R2EC_CHECKPOINT where it is a versions
    root, else its directory): a version name, or a path inside it; anything else is a 422."""
    started = time.perf_counter()
    path = None
    if body is not None and body.checkpoint is not None:
        try:
            path = confine_checkpoint(state.settings.checkpoint, body.checkpoint)
        except ValueError as exc:
            raise RequestValidationError(
                [{"loc": ("body", "checkpoint"), "msg": str(exc), "type": "value_error"}]
            ) from None
    old, new = await state.reload(path)
    return schemas.ReloadResponse(
        previous_version=old.version,
        model_version=new.version,
        checkpoint=str(new.checkpoint.path),
        items=len(new.catalog.index),
        seconds=round(time.perf_counter() - started, 3),
    )


# ---------------------------------------------------------------------- probes
@router.head("/healthz", include_in_schema=False)  # load balancers probe with HEAD too
@router.get(
    "/healthz",
    response_model=schemas.Health,
    tags=["probes"],
    responses=documented(500),
)
async def healthz() -> schemas.Health:
    """Liveness: the process answers."""
    return schemas.Health(status="ok")


@router.head("/readyz", include_in_schema=False)  # load balancers probe with HEAD too
@router.get(
    "/readyz",
    response_model=schemas.Readiness,
    tags=["probes"],
    responses={
        503: {"model": schemas.Readiness, "description": "Not ready: `reasons` says why."},
        **documented(500),
    },
)
async def readyz(state: MaybeStateDep) -> JSONResponse:
    """Readiness: model and index loaded, batcher running (not shutting down). An unreachable
    store leaves it ready but "degraded" (200, `store: down`): every replica shares the store,
    so failing on it would take them all out of a load balancer at once, while requests with
    an inline history still get answers (those that need the store get a 503 that says so)."""
    reasons = ["starting: model not loaded yet"] if state is None else await state.readiness()
    engine = None if state is None else state.engine
    store_down = any(r.startswith("store") for r in reasons)
    blocking = [r for r in reasons if not r.startswith("store")]
    body = schemas.Readiness(
        status="not ready" if blocking else "degraded" if store_down else "ready",
        model_version=engine.version if engine else None,
        items=len(engine.catalog.index) if engine else None,
        index=engine.catalog.index.describe() if engine else None,
        store="down" if store_down else "ok",
        reasons=reasons,
        backbone=_backbone(engine.checkpoint.backbone) if engine else None,
    )
    return JSONResponse(body.model_dump(), status_code=503 if blocking else 200)


def _backbone(check: BackboneCheck) -> schemas.BackboneOut:
    return schemas.BackboneOut(
        status=check.status, loaded=backbone_label(check.loaded), recorded=backbone_label(check.recorded)
    )


@router.get(
    "/metrics",
    tags=["probes"],
    response_class=PlainTextResponse,
    responses={
        200: {"description": "Prometheus text exposition."},
        **documented(500, 503, by_reference=True),
    },
)
async def metrics(state: StateDep) -> Response:
    """Prometheus exposition."""
    await state.read_stream_info()  # one short script in Redis (XINFO STREAM)
    # off the event loop: a scrape reads retraining's state file on the shared volume
    body = await asyncio.to_thread(state.metrics.render)
    return Response(body, media_type=state.metrics.content_type)
