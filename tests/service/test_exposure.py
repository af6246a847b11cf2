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
    Event,
    RedisStore,
    Served,
    read_served,
    read_stream,
    read_stream_checked,
)
from tests.service.conftest import ADMIN, RedisServer, app_for, needs_redis, post_scope, serve
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

        scope = post_scope(STREAM, body)
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


async def test_shutdown_counts_the_batch_in_flight_as_dropped():
    """close() stops a writer that waits on a Redis that never answers: the batch it holds is
    counted (dropped) with what is still queued, so every entry recorded is counted once."""
    import asyncio

    from service.exposure import WRITE_BATCH, ExposureLog
    from service.metrics import Metrics

    class Hung:  # accepts the write, never answers
        async def add_served(self, entries, maxlen=0, max_age_ms=0):
            await asyncio.Event().wait()

    metrics = Metrics()
    log = ExposureLog(Hung(), metrics, maxlen=0, retention_s=0)  # type: ignore[arg-type]
    log.start()
    n = WRITE_BATCH + 20
    for i in range(n):
        log._queue.put_nowait(
            Served(f"r{i}", "u1", 1, "v", "/recommend", 1, False, "", "off", "store", (), (), ())
        )
    await asyncio.sleep(0.2)  # the writer took its batch and waits on Redis
    assert log.pending == n - WRITE_BATCH
    await log.close(timeout_s=0.1)
    counts = {o: metrics.exposures.labels(o)._value.get() for o in ("written", "failed", "dropped", "erased")}
    assert counts == {"written": 0, "failed": 0, "dropped": n, "erased": 0}

    # one taken off the queue while the writer lingers for more (LINGER_S) is counted too
    metrics = Metrics()
    log = ExposureLog(Hung(), metrics, maxlen=0, retention_s=0)  # type: ignore[arg-type]
    log.start()
    log._queue.put_nowait(Served("r", "u1", 1, "v", "/recommend", 1, False, "", "off", "store", (), (), ()))
    await asyncio.sleep(0)  # the writer took it, sleeps in LINGER_S
    await asyncio.sleep(0)
    await log.close(timeout_s=0)
    assert metrics.exposures.labels("dropped")._value.get() == 1


async def test_an_answer_made_from_a_history_erased_while_it_was_answered_is_not_written(ckpt, redis_url):
    """DELETE /users/u1 while the model works on u1's stored history: the answer is given, and
    its entry, made from the erased history, is not written after the erasure (as its reasoning
    is not cached); the user's next answer, from what they post afterwards, is."""
    import asyncio

    from tests.service.conftest import HeldModel

    app = logged_app(ckpt, redis_url)
    async with serve(app) as client:
        state = app.state.r2ec
        assert (await client.post("/users/u1/events", json={"events": H1})).status_code == 200
        held = HeldModel(state)
        try:
            req = asyncio.create_task(
                client.post("/recommend", json={"user_id": "u1", "k": 2}, headers={"X-Request-ID": "during"})
            )
            await held.wait_entered()  # the history was read; the model works
            r = await client.delete("/users/u1", headers=ADMIN)
            assert r.status_code == 200 and r.json()["served_entries"] == 0
            held.release()
            resp = await req
        finally:
            held.release()
            held.restore()
        assert resp.status_code == 200 and resp.json()["history_source"] == "store"
        await state.exposures.flush()
        assert served(redis_url) == [] and (await state.store.export_user("u1")).served == []
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_exposures_total", outcome="erased") == 1

        assert (await client.post("/users/u1/events", json={"events": H2})).status_code == 200
        r = await client.post("/recommend", json={"user_id": "u1", "k": 2}, headers={"X-Request-ID": "after"})
        assert r.status_code == 200
        await state.exposures.flush()
        assert [e.request_id for e in served(redis_url)] == ["after"]


async def test_the_erasure_check_of_a_stored_history_answer_compares_no_clocks(redis_url):
    """An entry made from the stored history is judged by that history, not by `at_ms` against
    the ledger: a replica's clock ahead of Redis's, or behind it, changes nothing."""
    store = RedisStore(redis_url)

    def entry(rid: str, at_ms: int, made_from: tuple[str, ...] | None, user: str = "u1") -> Served:
        return Served(rid, user, at_ms, "v", "/recommend", 1, False, "", "off",
                      "store" if made_from is not None else "request", ("i1",), (1.0,), (1,),
                      made_from=made_from)  # fmt: skip

    try:
        await store.append_events("u1", [Event("i1", event_id="e1"), Event("i2", event_id="e2")])
        erased = await store.erase_user("u1")
        # answered before the erasure from the erased history, stamped 300 ms after it (a
        # replica ahead of Redis): not written
        ahead = entry("ahead", erased.erased_at_ms + 300, ("e1", "e2"))
        assert await store.add_served([ahead]) == 0
        # the user posts again and is answered from the new history, stamped 100 ms before the
        # erasure (a replica behind Redis): written; so is the same id posted again, and an
        # entry's ids read back carry nothing of the check
        await store.append_events("u1", [Event("i3", event_id="e3"), Event("i1", event_id="e1")])
        behind = entry("behind", erased.erased_at_ms - 100, ("e3", "e1"))
        assert await store.add_served([behind]) == 1
        # a history that lost one event read (erased, one posted again) is not the history read
        assert await store.add_served([entry("partial", erased.erased_at_ms + 60_000, ("e1", "e2"))]) == 0
        # an inline history's answer (no stored history read) is still judged by its time
        assert await store.add_served([entry("inline-before", erased.erased_at_ms - 5, None)]) == 0
        assert await store.add_served([entry("inline-after", erased.erased_at_ms + 5, None)]) == 1
        # a user never erased is not checked: an event read and gone since (the window moved on)
        # leaves the entry in
        assert await store.add_served([entry("slid", 1, ("gone",), user="u2")]) == 1
        assert [e.request_id for e in served(redis_url)] == ["behind", "inline-after", "slid"]
        assert all(e.made_from is None for e in served(redis_url))
    finally:
        await store.close()


async def test_a_stream_cut_while_its_items_are_being_sent_has_its_entry(ckpt, redis_url):
    """The server's send of the `items` chunk waits (a slow client's full socket buffer, an ASGI
    middleware that awaits), and the client leaves meanwhile: sse-starlette closes the
    generator at its `yield`, and the entry, recorded as the items were handed over, is there.
    Raw ASGI, as above."""
    import asyncio
    import json

    app = logged_app(ckpt, redis_url)
    async with serve(app):
        state = app.state.r2ec
        leave = asyncio.Event()
        body = json.dumps({"history": H2, "k": 2}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[bytes] = []

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await leave.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                sent.append(message.get("body", b""))
                if b"event: items" in sent[-1]:
                    leave.set()  # the client leaves while this send waits
                    await asyncio.sleep(0)

        scope = post_scope(STREAM, body, (b"x-request-id", b"cut-at-items"))
        await asyncio.wait_for(app(scope, receive, send), 60)
        await state.exposures.flush()
    events = [line for chunk in sent for line in chunk.decode().splitlines() if line.startswith("event:")]
    assert "event: items" in events and "event: done" not in events  # cut after the items
    assert [e.request_id for e in served(redis_url)] == ["cut-at-items"]
