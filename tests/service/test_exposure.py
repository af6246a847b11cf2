"""The exposure log (R2EC_EXPOSURE_LOG=redis, service/exposure.py) and attribution: what was
served goes to the Redis stream r2ec:served, a click names its recommendation by `request_id`
in r2ec:events, an erasure removes and counts the user's entries; a real redis-server, the tiny
model."""

from __future__ import annotations

import hashlib
import time

import pytest
import redis

from service.store import (
    EVENTS_STREAM,
    SERVED_STREAM,
    RedisStore,
    Served,
    read_served,
    read_stream,
    read_stream_checked,
)
from tests.service.conftest import ADMIN, RedisServer, app_for, needs_redis, serve
from tests.service.test_app import H1, H2, H3, metric
from tests.service.test_stream import STREAM, parse_sse

pytestmark = [pytest.mark.asyncio, *needs_redis]


def served(url: str) -> list[Served]:
    return [entry for page in read_served(url) for entry in page]


def logged_app(ckpt, redis_url: str, **settings):
    return app_for(ckpt, redis_url=redis_url, exposure_log="redis", **settings)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def test_an_answered_recommend_writes_one_entry_with_what_was_served(ckpt, redis_url):
    app = logged_app(ckpt, redis_url)
    async with serve(app) as client:
        state = app.state.r2ec
        assert (await client.post("/users/u1/events", json={"events": H1})).status_code == 200
        before = int(time.time() * 1000)
        r = await client.post(
            "/recommend", json={"user_id": "u1", "k": 3}, headers={"X-Request-ID": "ab-test-1"}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        await state.exposures.flush()
        (entry,) = served(redis_url)
        assert entry.request_id == "ab-test-1" and entry.user_id == "u1"
        assert before <= entry.at_ms <= int(time.time() * 1000)
        assert entry.model_version == body["model_version"] == state.engine.version
        assert entry.fingerprint == body["model"]["fingerprint"] == state.engine.fingerprint
        assert entry.variant == ""  # R2EC_VARIANT unset
        assert entry.route == "/recommend" and entry.k == 3
        assert list(entry.items) == [i["item_id"] for i in body["items"]]
        assert list(entry.scores) == pytest.approx([i["score"] for i in body["items"]])
        assert list(entry.ranks) == [1, 2, 3]
        assert entry.reasoning and entry.reasoning_sha256 == sha256(body["reasoning"])
        assert (entry.cache, entry.history_source) == ("miss", "store")

        # an inline history without a user, no reasoning: the id the service made, no user, no hash
        r = await client.post("/recommend", json={"history": H2, "k": 2, "reasoning": False})
        assert r.status_code == 200
        await state.exposures.flush()
        entry = served(redis_url)[-1]
        assert entry.request_id == r.headers["x-request-id"] and entry.user_id == ""
        assert (entry.reasoning, entry.reasoning_sha256, entry.cache) == (False, "", "off")
        assert entry.history_source == "request" and len(entry.items) == 2
        # a user's id sent beside an inline history is still the user's entry
        await client.post("/recommend", json={"user_id": "u9", "history": H3, "k": 1})
        await state.exposures.flush()
        assert (served(redis_url)[-1].user_id, served(redis_url)[-1].history_source) == ("u9", "request")

        # refusals are no exposure: a 422, an empty stored history
        assert (await client.post("/recommend", json={"user_id": "nobody"})).status_code == 422
        assert (await client.post("/recommend", json={"history": [{"item_id": "nope"}]})).status_code == 422
        await state.exposures.flush()
        assert len(served(redis_url)) == 3
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_exposures_total", outcome="written") == 3
        assert metric(text, "r2ec_exposures_total", outcome="failed") == 0


async def test_a_stream_writes_one_entry_once_its_items_are_sent(ckpt, redis_url):
    app = logged_app(ckpt, redis_url, variant="candidate")  # an experiment's arm
    async with serve(app) as client:
        r = await client.post(STREAM, json={"history": H1, "k": 4}, headers={"X-Request-ID": "s-1"})
        assert r.status_code == 200
        events = parse_sse(r.text)
        await app.state.r2ec.exposures.flush()
        (entry,) = served(redis_url)
        items = next(d for n, d in events if n == "items")
        done = next(d for n, d in events if n == "done")
        text = "".join(d["text"] for n, d in events if n == "reasoning")
        assert (entry.request_id, entry.route, entry.user_id, entry.k) == ("s-1", "/recommend/stream", "", 4)
        assert list(entry.items) == [i["item_id"] for i in items["items"]]
        assert entry.model_version == items["model_version"] and entry.cache == done["cache"]
        assert entry.reasoning_sha256 == sha256(text)
        assert (entry.variant, entry.fingerprint) == ("candidate", items["model"]["fingerprint"])

        # a stream that fails after it began (an `error` event) served nothing
        engine = app.state.r2ec.engine
        original = engine.recommend_batch

        def explode(queries):
            raise RuntimeError("simulated")

        engine.recommend_batch = explode
        try:
            r = await client.post(STREAM, json={"history": H2})
            assert [n for n, _ in parse_sse(r.text)] == ["error"]
        finally:
            engine.recommend_batch = original
        await app.state.r2ec.exposures.flush()
        assert len(served(redis_url)) == 1


async def test_a_stream_its_client_cut_before_the_items_records_nothing(ckpt, redis_url):
    """The model is busy with request A; stream B is accepted and queued behind it, then its
    client leaves: B's request is dropped, no items were shown, no entry is written (A, answered
    through the Python API, is no HTTP answer either). Raw ASGI: httpx's in-process transport
    cannot disconnect (as tests/service/test_stream.py)."""
    import asyncio
    import json

    from service.store import Event
    from service.types import Query
    from tests.service.conftest import HeldModel

    app = logged_app(ckpt, redis_url)
    async with serve(app) as client:
        state = app.state.r2ec
        held = HeldModel(state)
        a = asyncio.create_task(state.recommend(Query(tuple(Event(h["item_id"]) for h in H1))))
        await held.wait_entered()
        leave, started = asyncio.Event(), asyncio.Event()
        body = json.dumps({"user_id": "u1", "history": H2}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await leave.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                started.set()

        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": STREAM, "raw_path": STREAM.encode(),
            "root_path": "", "query_string": b"", "server": ("r2ec.test", 80), "client": ("127.0.0.1", 1),
            "headers": [(b"host", b"r2ec.test"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
        }  # fmt: skip
        b = asyncio.create_task(app(scope, receive, send))
        await asyncio.wait_for(started.wait(), 30)  # accepted, queued behind A
        leave.set()
        await asyncio.wait_for(b, 30)
        held.release()
        await a
        # a whole stream after it is recorded, as ever
        r = await client.post(STREAM, json={"history": H3, "reasoning": False})
        assert [n for n, _ in parse_sse(r.text)] == ["items", "done"]
        await state.exposures.flush()
    assert [(e.user_id, e.route) for e in served(redis_url)] == [("", "/recommend/stream")]


async def test_off_by_default_nothing_is_written(ckpt, redis_url):
    app = app_for(ckpt, redis_url=redis_url)
    async with serve(app) as client:
        assert app.state.r2ec.exposures is None
        assert (await client.post("/recommend", json={"history": H1, "k": 2})).status_code == 200
        assert (await client.post(STREAM, json={"history": H2, "k": 2})).status_code == 200
        text = (await client.get("/metrics")).text
    assert not redis.Redis.from_url(redis_url).exists(SERVED_STREAM)
    assert metric(text, "r2ec_exposures_total", outcome="written") is None


async def test_a_redis_down_during_the_write_still_answers_200_and_counts_the_failure(ckpt):
    server = RedisServer()  # its own, to stop
    try:
        app = logged_app(ckpt, server.url)
        async with serve(app) as client:
            state = app.state.r2ec
            assert (await client.post("/recommend", json={"history": H1, "k": 2})).status_code == 200
            await state.exposures.flush()
            server.stop()
            started = time.perf_counter()
            r = await client.post("/recommend", json={"history": H2, "k": 2, "reasoning": False})
            assert r.status_code == 200, r.text
            assert time.perf_counter() - started < 5  # not held by the write (or its timeout)
            await state.exposures.flush()
            text = (await client.get("/metrics")).text
            assert metric(text, "r2ec_exposures_total", outcome="written") == 1
            assert metric(text, "r2ec_exposures_total", outcome="failed") == 1
            assert metric(text, "r2ec_store_errors_total", op="add_served") == 1
            # and a stream too
            r = await client.post(STREAM, json={"history": H3, "reasoning": False})
            assert r.status_code == 200 and [n for n, _ in parse_sse(r.text)] == ["items", "done"]
            await state.exposures.flush()
            text = (await client.get("/metrics")).text
            assert metric(text, "r2ec_exposures_total", outcome="failed") == 2
    finally:
        server.stop()


async def test_the_log_is_trimmed_by_its_cap_and_by_age(ckpt, redis_url):
    """XADD MAXLEN ~ / XTRIM MINID ~, as r2ec:events is capped: whole stream nodes (100 entries
    by default) go, so a length is approximate, never below the cap."""
    filler = {"user_id": "old", "at_ms": "1", "items": "[]", "scores": "[]", "ranks": "[]"}
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    for _ in range(500):
        raw.xadd(SERVED_STREAM, filler)
    app = logged_app(ckpt, redis_url, exposure_maxlen=100)
    async with serve(app) as client:
        await client.post("/recommend", json={"history": H1, "k": 2, "reasoning": False})
        await app.state.r2ec.exposures.flush()
    assert 100 <= raw.xlen(SERVED_STREAM) < 200
    assert served(redis_url)[-1].user_id == ""  # the new entry, kept

    # by age: entries older than R2EC_EXPOSURE_RETENTION_S go (stream ids are Redis's time)
    raw.delete(SERVED_STREAM)
    for n in range(1, 501):
        raw.xadd(SERVED_STREAM, filler, id=f"{n}-0")  # in 1970
    app = logged_app(ckpt, redis_url, exposure_maxlen=0, exposure_retention_s=3600)
    async with serve(app) as client:
        await client.post("/recommend", json={"history": H1, "k": 2, "reasoning": False})
        await app.state.r2ec.exposures.flush()
    assert raw.xlen(SERVED_STREAM) < 101
    assert served(redis_url)[-1].user_id == ""


async def test_an_erasure_removes_the_users_entries_and_counts_them(ckpt, redis_url):
    app = logged_app(ckpt, redis_url)
    async with serve(app) as client:
        state = app.state.r2ec
        await client.post("/users/u1/events", json={"events": H1})
        await client.post("/users/u2/events", json={"events": H2})
        await client.post("/recommend", json={"user_id": "u1", "k": 2})
        await client.post(STREAM, json={"user_id": "u1", "k": 2})
        await client.post("/recommend", json={"user_id": "u1", "history": H3, "k": 2})
        await client.post("/recommend", json={"user_id": "u2", "k": 2})
        await state.exposures.flush()
        assert [e.user_id for e in served(redis_url)] == ["u1", "u1", "u1", "u2"]

        r = await client.delete("/users/u1", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["served_entries"] == 3 and r.json()["stream_entries"] == 3
        assert any("r2ec exposures export" in line for line in r.json()["remains"])
        assert [e.user_id for e in served(redis_url)] == ["u2"]
        assert (await client.delete("/users/u1", headers=ADMIN)).json()["served_entries"] == 0

    # an answer given before the erasure that reaches Redis after it is not written; one of the
    # id used again after the erasure is
    store = RedisStore(redis_url)
    try:
        erased = await store.erase_user("u2")
        assert erased.served_entries == 1
        late = Served("r-late", "u2", erased.erased_at_ms - 5, "v", "/recommend", 1, False, "", "off",
                      "store", ("i1",), (1.0,), (1,))  # fmt: skip
        again = Served("r-again", "u2", erased.erased_at_ms + 60_000, "v", "/recommend", 1, False, "",
                       "off", "store", ("i1",), (1.0,), (1,))  # fmt: skip
        assert await store.add_served([late, again]) == 1
        assert [e.request_id for e in served(redis_url)] == ["r-again"]
        assert [e.request_id for e in (await store.export_user("u2")).served] == ["r-again"]
    finally:
        await store.close()


async def test_events_carry_a_request_id_into_the_stream_and_retraining_ignores_it(ckpt, redis_url, tmp_path):
    from model.retrain import EVENT_SCHEMA, consume_events

    app = logged_app(ckpt, redis_url)
    async with serve(app) as client:
        r = await client.post("/recommend", json={"history": H1, "k": 3}, headers={"X-Request-ID": "rec-7"})
        clicked = r.json()["items"][0]["item_id"]
        events = [
            {"item_id": clicked, "rating": 5, "timestamp": 500, "request_id": "rec-7"},
            {"item_id": "i2"},
        ]
        r = await client.post("/users/u1/events", json={"events": events})
        assert r.status_code == 200 and r.json()["appended"] == 2
        # validated like every id
        bad = await client.post(
            "/users/u1/events", json={"events": [{"item_id": "i1", "request_id": "a\x00"}]}
        )
        assert bad.status_code == 422
        assert bad.json()["error"]["fields"][0]["field"] == "events.0.request_id"
        # the same click again naming another recommendation is the same event: not stored twice
        again = [{"item_id": clicked, "rating": 5, "timestamp": 500, "request_id": "rec-8"}]
        assert (await client.post("/users/u1/events", json={"events": again})).json()["duplicates"] == 1
        # the history does not carry it
        assert "request_id" not in (await client.get("/users/u1/history")).json()["history"][0]
        await app.state.r2ec.exposures.flush()

    rows = redis.Redis.from_url(redis_url, decode_responses=True).xrange(EVENTS_STREAM)
    assert [f.get("request_id") for _, f in rows] == ["rec-7", None]
    # the join a click's request_id is for
    (exposure,) = served(redis_url)
    assert exposure.request_id == rows[0][1]["request_id"] and clicked in exposure.items

    entries, cursor = read_stream(redis_url)
    assert [e.event.request_id for e in entries] == ["rec-7", None]
    done = consume_events(tmp_path, lambda after: read_stream(redis_url, after))
    assert done.new == 2 and list(done.events.columns) == list(EVENT_SCHEMA.names)
    assert list(done.events["item_id"]) == [clicked, "i2"] and list(done.events["user_id"]) == ["u1", "u1"]
    # and through the reader `r2ec retrain` uses now, which also checks the stream for losses
    done = consume_events(
        tmp_path / "checked", lambda after, mark=None: read_stream_checked(redis_url, after, mark)
    )
    assert done.new == 2 and list(done.events["item_id"]) == [clicked, "i2"]
