"""POST /recommend/stream: a request's answer as Server-Sent Events (docs/architecture.md §4.2.1).

A stream is opened only once its request is queued for a batch (`RecommendStream.accept`), so
everything that refuses a request (a bad body or history, a full queue, a drain, a down store)
is still the JSON error /recommend gives. From then on the answer is events:

    event: reasoning   data: {"text": "<the next piece>"}      zero or more
    event: items       data: {"items": [...], "model_version": ..., "model": {...},
                             "history_source": ..., "read_items": [...]}
    event: done        data: {"reasoning_tokens": ..., "reasoning_cut": ..., "cache": ..., "timings": {...}}

or, for a failure after the stream began, `event: error` with the JSON error body, and the end.
With the exposure log on (service/exposure.py), a stream records its entry as its `items` event
is handed to the server to send, before that send completes (as /recommend records its answer
once decided, before the reply is sent): a client that leaves while the items are being sent
still has its entry, and one already gone then (the items never reached it) has one too. A
stream cut by its client before that (during the reasoning) showed no items and records
nothing, nor does an `error` stream.

The pieces come from the model thread (`PreparedQuery.on_text`): each is handed to the event loop
with `call_soon_threadsafe` into an asyncio queue, ahead of the batch's result (the executor
resolves the batch's future with a later `call_soon_threadsafe`, and the loop runs its callbacks
in order), so every piece is queued before the result and the queue's end marker.
sse-starlette frames the events, sends a keep-alive comment every PING_S and watches for the
client leaving: it then sets the request's `wait_disconnect` and ends the response, whose close
hook cancels the request task too (the batcher drops a request whose future is cancelled; a
batch already running finishes, its answer for this request unused).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from service import schemas
from service.deadline import Deadline
from service.errors import error_body
from service.request_id import request_id
from service.state import ClientDisconnected, ServiceState
from service.types import Query, Result

PING_S = 15  # keep-alive comment interval: proxies close connections idle for 30-60 s
SHUTDOWN_MARGIN_S = 1.0  # after R2EC_SHUTDOWN_GRACE_S the drain has answered every request


class EventStream(EventSourceResponse):
    """sse-starlette's response with its media type on the class (where FastAPI reads the
    route's media type for the OpenAPI document) and an `on_close` hook that runs however the
    response ends, even if its event generator never started (a send that failed at once)."""

    media_type = "text/event-stream"
    on_close: Callable[[], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()


class RecommendStream:
    """One POST /recommend/stream request, from its acceptance to its last event."""

    def __init__(
        self,
        state: ServiceState,
        query: Query,
        request: Request,
        history_source: str,
        user_id: str | None = None,
        deadline: Deadline | None = None,
    ) -> None:
        self._state = state
        self._deadline = deadline  # the client's X-Request-Timeout (service/deadline.py)
        self._query = query
        self._request = request
        self._source = history_source
        self._user_id = user_id  # the body's, for the exposure log
        self._loop = asyncio.get_running_loop()
        self._pieces: asyncio.Queue[str | None] = asyncio.Queue()  # None: the answer is in
        self._queued = asyncio.Event()
        self._gone = asyncio.Event()  # the client left
        self._task: asyncio.Task[Result] | None = None
        self._outcome: str | None = None  # how the stream ended (r2ec_stream_requests_total)

    # ------------------------------------------------------------------ before the stream
    async def accept(self) -> None:
        """Submit the request and return once it is queued for a batch. Raises what refused it
        (QueryError, QueueFull, ShuttingDown, StoreUnavailable, ...), for the app's JSON error
        handlers; nothing has been sent yet."""
        self._task = asyncio.ensure_future(
            self._state.recommend(
                self._query,
                wait_disconnect=self._gone.wait,
                on_text=self._on_text,
                on_queued=self._queued.set,
                deadline=self._deadline,
            )
        )
        self._task.add_done_callback(self._answered)
        queued = asyncio.ensure_future(self._queued.wait())
        try:
            await asyncio.wait({self._task, queued}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._task.cancel()
            raise
        finally:
            queued.cancel()
        if not self._queued.is_set() and self._task.exception() is not None:
            raise self._task.exception()  # type: ignore[misc]
        # queued (or answered without a queue): the outcome, error or not, goes in the stream

    def _answered(self, task: asyncio.Task[Result]) -> None:
        """The request is over: the end marker goes in after every piece. Its error is marked
        seen here, since a stream whose client left never reads it."""
        self._pieces.put_nowait(None)
        if not task.cancelled():
            task.exception()

    def _on_text(self, piece: str) -> None:
        """PreparedQuery.on_text: runs on the model thread."""
        self._loop.call_soon_threadsafe(self._pieces.put_nowait, piece)

    def response(self) -> EventStream:
        # the headers go before any event: they name the model serving as the stream begins; the
        # `items` event names the one that answered (another where a reload came in between)
        engine = self._state.engine
        response = EventStream(
            self._events(),
            headers=model_headers(engine.version, engine.fingerprint, self._state.settings.variant),
            ping=PING_S,
            sep="\n",
            client_close_handler_callable=self._client_left,
            # On SIGTERM sse-starlette would cut every stream at once; the drain answers each
            # request (or refuses it with a 503 error event) within the grace, so let it.
            shutdown_grace_period=self._state.settings.shutdown_grace_s + SHUTDOWN_MARGIN_S,
        )
        response.on_close = self._closed
        return response

    async def _client_left(self, message: Any) -> None:
        self._gone.set()  # state.recommend drops the request (its wait_disconnect)

    def _closed(self) -> None:
        """The response is over: a request still waiting leaves the queue (a running batch's
        answer for it is dropped), and the stream is counted once."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        outcome = self._outcome or ("disconnected" if self._gone.is_set() else "cancelled")
        self._state.metrics.streams.labels(outcome).inc()

    # ------------------------------------------------------------------ the stream
    async def _events(self) -> AsyncIterator[ServerSentEvent]:
        """Pieces until the end marker, then the answer (or the error). A client that leaves
        cancels this generator; `_closed` then cancels the request."""
        assert self._task is not None, "accept() first"
        while (piece := await self._pieces.get()) is not None:
            if piece:
                yield _event("reasoning", schemas.StreamReasoning(text=piece))
        try:
            result = self._task.result()
        except ClientDisconnected:
            self._outcome = "disconnected"
            return
        except Exception as exc:
            self._outcome = "error"
            body = await error_body(self._request, exc)
            yield ServerSentEvent(data=bytes(body).decode(), event="error", sep="\n")
            return
        # the exposure-log entry, as the items event is handed to the server, not once this
        # generator resumes after it: a send that waits (a slow client's full socket buffer, an
        # ASGI server or middleware whose send awaits) and a client that leaves meanwhile close
        # the generator at the `yield`, with the items written, maybe seen. As /recommend
        # records once its reply is decided, before it is sent. A stream cut during its
        # reasoning showed no items and records nothing
        rid = request_id(self._request.scope)
        self._state.record_served(rid, self._user_id, "/recommend/stream", self._query, result, self._source)
        yield _event("items", _items(result, self._source, self._state.settings.variant))
        self._outcome = "ok"
        yield _event("done", _done(result, self._query))


def _event(name: str, data: Any) -> ServerSentEvent:
    return ServerSentEvent(data=data.model_dump_json(), event=name, sep="\n")  # framed as the docs show


# Response headers naming the model of every /recommend and /recommend/stream answer, for a
# gateway's or ingress' log to record without reading bodies (the body's `model` holds the same)
MODEL_HEADERS = {
    "X-Model-Version": "The answering model's version (the body's `model_version`).",
    "X-Model-Fingerprint": "The answering model's fingerprint (the body's `model.fingerprint`).",
    "X-R2ec-Variant": "The replica's R2EC_VARIANT (the body's `model.variant`); absent where it is unset.",
}


def model_headers(version: str, fingerprint: str, variant: str) -> dict[str, str]:
    """The MODEL_HEADERS of an answer (X-R2ec-Variant only where R2EC_VARIANT is set)."""
    headers = {"X-Model-Version": version, "X-Model-Fingerprint": fingerprint}
    return {**headers, "X-R2ec-Variant": variant} if variant else headers


def model_out(result: Result, variant: str) -> schemas.ModelOut:
    """The reply's `model`: the model that answered, and the replica's arm."""
    return schemas.ModelOut(
        version=result.model_version,
        checkpoint=result.checkpoint,
        fingerprint=result.fingerprint,
        variant=variant or None,
    )


def recommended_items(result: Result) -> list[schemas.RecommendedItem]:
    """The item list of /recommend's reply and of the `items` event."""
    return [
        schemas.RecommendedItem(item_id=i.item_id, title=i.title, score=i.score, rank=i.rank)
        for i in result.items
    ]


def _items(result: Result, source: str, variant: str) -> schemas.StreamItems:
    return schemas.StreamItems(
        items=recommended_items(result),
        model_version=result.model_version,
        model=model_out(result, variant),
        history_source=source,
        read_items=list(result.read_items),
    )


def _done(result: Result, query: Query) -> schemas.StreamDone:
    t = result.timings
    return schemas.StreamDone(
        reasoning_tokens=result.reasoning_tokens,
        reasoning_cut=result.reasoning_cut,
        cache=result.cache,
        timings=schemas.TimingsOut(
            queue_ms=t.queue_ms,
            generate_ms=t.generate_ms,
            score_ms=t.score_ms,
            total_ms=(time.perf_counter() - query.submitted_at) * 1e3,
        ),
    )
