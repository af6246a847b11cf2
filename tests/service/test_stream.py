"""POST /recommend/stream end to end, in process over ASGI with the app's own lifespan: the event
order, the same answer as /recommend, JSON refusals before a stream, an error event after, and a
client that leaves cancelling its request. Nothing here is timed."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from service.store import Event
from service.types import Query
from tests.service.conftest import HeldModel, app_for, count_generate, post_scope, serve
from tests.service.test_app import H1, H2, H3, metric, requests

pytestmark = pytest.mark.asyncio

STREAM = "/recommend/stream"


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """(event, JSON data) per event; comments (keep-alive pings) skipped."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events


async def stream(client, body) -> list[tuple[str, dict]]:
    r = await client.post(STREAM, json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return parse_sse(r.text)


def assert_order(events: list[tuple[str, dict]]) -> None:
    """reasoning* -> items -> done, nothing else."""
    names = [n for n, _ in events]
    n = names.count("reasoning")
    assert names == ["reasoning"] * n + ["items", "done"], names


async def test_a_stream_is_reasoning_then_items_then_done_and_matches_recommend(app, client):
    body = {"history": H1, "k": 5}
    events = await stream(client, body)  # a cache miss: generated
    assert_order(events)
    text = "".join(d["text"] for n, d in events if n == "reasoning")
    items, done = events[-2][1], events[-1][1]
    assert done["cache"] == "miss"
    assert set(done["timings"]) == {"queue_ms", "generate_ms", "score_ms", "total_ms"}

    reply = (await client.post("/recommend", json=body)).json()  # the same reasoning, from the cache
    assert text == reply["reasoning"] and text
    assert items["items"] == reply["items"]
    assert items["model_version"] == reply["model_version"] == app.state.r2ec.engine.version
    assert items["history_source"] == "request"
    assert done["reasoning_tokens"] == reply["reasoning_tokens"]

    again = await stream(client, body)  # a cache hit streams its reasoning too
    assert_order(again)
    assert "".join(d["text"] for n, d in again if n == "reasoning") == text
    assert again[-2][1]["items"] == reply["items"] and again[-1][1]["cache"] == "hit"

    metrics = (await client.get("/metrics")).text
    assert metric(metrics, "r2ec_stream_requests_total", outcome="ok") == 2
    assert requests(metrics, STREAM, "200", method="POST") == 2
    assert metric(metrics, "r2ec_reasoning_cache_total", result="miss") == 1
    assert metric(metrics, "r2ec_reasoning_cache_total", result="hit") == 2


async def test_a_stream_of_a_stored_history(client):
    assert (await client.post("/users/u1/events", json={"events": H2})).status_code == 200
    body = {"user_id": "u1", "k": 3, "max_reasoning_tokens": 4}
    events = await stream(client, body)
    assert_order(events)
    reply = (await client.post("/recommend", json=body)).json()
    assert events[-2][1]["history_source"] == "store" and events[-2][1]["items"] == reply["items"]


async def test_without_reasoning_a_stream_is_items_and_done(client):
    events = await stream(client, {"history": H3, "k": 4, "reasoning": False})
    assert [n for n, _ in events] == ["items", "done"]
    assert len(events[0][1]["items"]) == 4
    assert events[1][1]["cache"] == "off" and events[1][1]["reasoning_tokens"] == 0


BAD = [
    ({"history": H1, "k": 0}, "invalid_request", "k: Input should be greater than or equal to 1"),
    ({"history": H1, "colour": "red"}, "invalid_request", "colour: Extra inputs are not permitted"),
    ({"history": [{"item_id": "nope"}]}, "unknown_items", "unknown item ids in history: 'nope'"),
    ({"history": []}, "empty_history", "history is empty"),
]


@pytest.mark.parametrize(("body", "code", "message"), BAD, ids=[c for _, c, _ in BAD])
async def test_a_bad_body_is_a_json_422_before_any_stream(client, body, code, message):
    r = await client.post(STREAM, json=body)
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == code and message in error["message"]
    if code == "invalid_request":
        assert error["fields"][0]["field"] == message.split(":")[0]
    metrics = (await client.get("/metrics")).text
    assert requests(metrics, STREAM, "422", method="POST") == 1
    assert metric(metrics, "r2ec_stream_requests_total", outcome="ok") == 0  # no stream began


async def test_a_draining_server_refuses_a_stream_with_a_json_503(ckpt):
    app = app_for(ckpt)
    async with serve(app) as client:
        app.state.r2ec.begin_drain()
        r = await client.post(STREAM, json={"history": H1})
        assert r.status_code == 503 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "shutting_down" and "Retry-After" in r.headers


async def test_a_batch_that_fails_after_the_stream_began_is_an_error_event(app, client):
    engine = app.state.r2ec.engine
    original = engine.recommend_batch

    def explode(queries):
        raise RuntimeError("CUDA out of memory (simulated)")

    engine.recommend_batch = explode
    events = await stream(client, {"history": H1})
    assert [n for n, _ in events] == ["error"]
    error = events[0][1]["error"]  # the body a JSON 500 would have had
    assert error["status"] == 500 and error["code"] == "internal_error"
    assert re.fullmatch(r"internal error \(request [0-9a-f]{32}\)", error["message"])  # not the exception
    metrics = (await client.get("/metrics")).text
    assert metric(metrics, "r2ec_stream_requests_total", outcome="error") == 1

    engine.recommend_batch = original
    assert_order(await stream(client, {"history": H1}))


async def test_a_client_that_leaves_mid_stream_cancels_its_request(ckpt):
    """Deterministic: the model thread is busy with request A, stream B is accepted (its headers
    sent) and queued behind it; B's client disconnects; B's request is cancelled and never
    reaches the model. Driven as raw ASGI: httpx's in-process transport cannot disconnect."""
    app = app_for(ckpt)
    async with serve(app) as client:
        state = app.state.r2ec
        calls = count_generate(state.engine)
        held = HeldModel(state)
        a = asyncio.create_task(state.recommend(Query(tuple(Event(h["item_id"]) for h in H1))))
        await held.wait_entered()  # A's batch is in generate

        leave, started = asyncio.Event(), asyncio.Event()
        sent: list[dict] = []
        body = json.dumps({"history": H2}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await leave.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)
            if message["type"] == "http.response.start":
                started.set()

        scope = post_scope(STREAM, body)
        b = asyncio.create_task(app(scope, receive, send))
        await asyncio.wait_for(started.wait(), 30)  # accepted: B is queued behind A
        assert sent[0]["status"] == 200 and state.batcher.queue_depth == 1
        leave.set()
        await asyncio.wait_for(b, 30)  # the response ends without a batch having run for B
        assert not any(m.get("body", b"").startswith(b"event:") for m in sent[1:])

        held.release()
        assert len((await a).items) == 8
        assert calls == [1] and state.batcher.batches == 1 and state.batcher.queue_depth == 0
        assert_order(await stream(client, {"history": H3, "max_reasoning_tokens": 2}))
        assert calls == [1, 1]  # A, then the next stream: B was dropped, never generated
        metrics = (await client.get("/metrics")).text
        assert metric(metrics, "r2ec_stream_requests_total", outcome="disconnected") == 1
        assert metric(metrics, "r2ec_queue_depth") == 0


async def test_openapi_documents_the_stream_and_its_events(client):
    spec = (await client.get("/openapi.json")).json()
    op = spec["paths"][STREAM]["post"]
    assert op["requestBody"] == spec["paths"]["/recommend"]["post"]["requestBody"]
    sse = op["responses"]["200"]["content"]["text/event-stream"]
    events = {v["properties"]["event"]["const"] for v in sse["itemSchema"]["oneOf"]}
    assert events == {"reasoning", "items", "done", "error"}
    assert_order(parse_sse(sse["example"]))
    for status in ("422", "503"):
        body = op["responses"][status]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/ErrorResponse"}
