"""The same store tests against the in-process store and a real redis-server."""

from __future__ import annotations

import time

import pytest
import pytest_asyncio

from service.store import Event, MemoryStore, RedisStore, StoreUnavailable, read_stream
from tests.service.conftest import RedisServer, free_port, needs_redis

pytestmark = pytest.mark.asyncio
WINDOW = 3


@pytest_asyncio.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
async def store(request):
    if request.param == "memory":
        s = MemoryStore(window=WINDOW, cache_size=2)
    else:
        s = RedisStore(request.getfixturevalue("redis_url"), window=WINDOW, cache_ttl_s=60)
    yield s
    await s.close()


async def test_unknown_user_has_empty_history(store):
    assert await store.get_history("nobody") == []


async def test_history_is_capped_newest_last(store):
    events = [Event(f"i{n}", float(n % 5), 1000 + n) for n in range(5)]
    assert await store.append_events("u1", events[:2]) == 2
    assert await store.append_events("u1", events[2:]) == WINDOW
    assert await store.get_history("u1") == events[-WINDOW:]
    assert await store.get_history("u2") == []


async def test_events_without_rating_or_time_round_trip(store):
    await store.append_events("u1", [Event("i9")])
    assert await store.get_history("u1") == [Event("i9", None, None)]


async def test_every_event_goes_to_the_stream_in_order(store):
    await store.append_events("u1", [Event("a", 5.0, 1), Event("b", None, 2)])
    await store.append_events("u2", [Event("c", 3.5, None)])
    await store.append_events("u1", [Event(f"x{n}") for n in range(4)])  # beyond the window
    entries = await store.read_events()
    assert [(e.user_id, e.event) for e in entries[:3]] == [
        ("u1", Event("a", 5.0, 1)),
        ("u1", Event("b", None, 2)),
        ("u2", Event("c", 3.5, None)),
    ]
    assert len(entries) == 7  # the stream keeps what the capped history dropped
    assert entries[0].timestamp == 1 and (entries[0].item_id, entries[0].rating) == ("a", 5.0)
    assert abs(entries[2].timestamp - time.time()) < 60  # no event time: when the stream took it
    after = await store.read_events(after=entries[2].id)
    assert [e.event.item_id for e in after] == ["x0", "x1", "x2", "x3"]
    assert [e.event.item_id for e in await store.read_events(after=entries[2].id, count=2)] == ["x0", "x1"]


async def test_non_finite_rating_is_refused(store):
    with pytest.raises(ValueError, match="finite"):
        await store.append_events("u1", [Event("a", float("nan"))])
    assert await store.get_history("u1") == []


async def test_cache_round_trip(store):
    assert await store.cache_get("k1") is None
    await store.cache_set("k1", '{"ids": [1], "text": "x"}')
    assert await store.cache_get("k1") == '{"ids": [1], "text": "x"}'


async def test_memory_ping_answers():
    assert await MemoryStore(window=WINDOW).ping() is None


@pytest.mark.redis
async def test_redis_ping_answers_while_the_server_runs_and_fails_once_it_stops():
    server = RedisServer()  # its own server, to stop; skips (fails under CI) without redis-server
    s = RedisStore(server.url, window=WINDOW, timeout_s=0.5)
    try:
        assert await s.ping() is None
        server.stop()
        with pytest.raises(StoreUnavailable, match="^redis ping failed") as info:
            await s.ping()
        assert info.value.op == "ping"
    finally:
        server.stop()
        await s.close()


async def test_memory_cache_is_bounded_lru():
    s = MemoryStore(window=WINDOW, cache_size=2)
    await s.cache_set("a", "1")
    await s.cache_set("b", "2")
    assert await s.cache_get("a") == "1"  # a is now the most recent
    await s.cache_set("c", "3")
    assert await s.cache_get("b") is None
    assert await s.cache_get("a") == "1" and await s.cache_get("c") == "3"


@pytest.mark.redis
async def test_redis_cache_entries_expire(redis_url):
    import redis.asyncio as aioredis

    s = RedisStore(redis_url, window=WINDOW, cache_ttl_s=60)
    await s.cache_set("k", "v")
    await s.append_events("u1", [Event("a")])
    raw = aioredis.from_url(redis_url)
    try:
        assert 0 < await raw.ttl("r2ec:reasoning:k") <= 60
        assert await raw.ttl("r2ec:history:u1") == -1  # histories and the stream do not expire
        assert await raw.type("r2ec:events") == b"stream" and await raw.ttl("r2ec:events") == -1
    finally:
        await raw.aclose()
        await s.close()


async def test_redis_down_raises_store_unavailable_naming_the_operation():
    s = RedisStore(f"redis://user:secret@127.0.0.1:{free_port()}/0", window=WINDOW, timeout_s=0.5)
    calls = {
        "ping": s.ping(),
        "get_history": s.get_history("u"),
        "append_events": s.append_events("u", [Event("a")]),
        "cache_get": s.cache_get("k"),
        "cache_set": s.cache_set("k", "v"),
        "read_events": s.read_events(),
    }
    for op, call in calls.items():
        with pytest.raises(StoreUnavailable, match=f"^redis {op} failed") as info:
            await call
        assert info.value.op == op
        assert "secret" not in str(info.value) and "user:***@" in str(info.value)  # no password in logs
    await s.close()
    with pytest.raises(StoreUnavailable, match="^redis read_events failed") as info:
        read_stream(s.url, None, timeout_s=0.5)
    assert info.value.op == "read_events" and "secret" not in str(info.value)


@pytest.mark.redis
async def test_read_stream_pages_through_everything_after_a_cursor(redis_url):
    s = RedisStore(redis_url, window=WINDOW)
    try:
        await s.append_events("u1", [Event(f"i{n}", 1.0, 100 + n) for n in range(5)])
        await s.append_events("u2", [Event("x")])
        entries, cursor = read_stream(redis_url, None, page_size=2)  # three pages and an empty one
        assert [(e.user_id, e.item_id) for e in entries] == [("u1", f"i{n}") for n in range(5)] + [
            ("u2", "x")
        ]
        assert [e.id for e in entries] == [e.id for e in await s.read_events()]
        assert cursor == entries[-1].id
        assert [e.timestamp for e in entries[:5]] == [100, 101, 102, 103, 104]
        assert entries[-1].event.timestamp is None and abs(entries[-1].timestamp - time.time()) < 60
        assert read_stream(redis_url, cursor) == ([], cursor)  # nothing new: the same cursor back
        later, cursor2 = read_stream(redis_url, entries[2].id, page_size=1)
        assert [e.item_id for e in later] == ["i3", "i4", "x"] and cursor2 == cursor
        await s.append_events("u2", [Event("y", 2.0, 7)])
        (new,), cursor3 = read_stream(redis_url, cursor)
        assert (new.item_id, new.timestamp, cursor3) == ("y", 7, new.id)
    finally:
        await s.close()
