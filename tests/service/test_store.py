"""The same store tests against the in-process store and a real redis-server."""

from __future__ import annotations

import pytest
import pytest_asyncio

from service.store import Event, MemoryStore, RedisStore, StoreUnavailable
from tests.service.conftest import free_port, needs_redis

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


async def test_ping(store):
    await store.ping()


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
    raw = aioredis.from_url(redis_url)
    try:
        assert 0 < await raw.ttl("r2ec:reasoning:k") <= 60
        assert await raw.type("r2ec:events") in (b"none", b"stream")
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
