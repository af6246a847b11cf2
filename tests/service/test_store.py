"""The same store tests against the in-process store and a real redis-server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from dataclasses import replace

import pytest
import pytest_asyncio
import redis

from service.redis_conn import redact as _redact
from service.store import (
    EVENTS_STREAM,
    STREAM_EPOCH_KEY,
    STREAM_ERASED_IDS_KEY,
    STREAM_READER_KEY,
    Erased,
    Event,
    MemoryStore,
    RedisStore,
    Served,
    StoreUnavailable,
    _id_key,
    event_key,
    read_erasures,
    read_served,
    read_stream,
    read_stream_checked,
)
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
    assert (await store.append_events("u1", events[:2])).history_length == 2
    assert (await store.append_events("u1", events[2:])).history_length == WINDOW
    assert _without_ids(await store.get_history("u1")) == events[-WINDOW:]
    assert await store.get_history("u2") == []


async def test_history_is_kept_in_event_time_order(store):
    """A late event (a backfill, an offline client) takes its place by its timestamp, not by
    when it arrived; equal times keep arrival order; one older than a full window is left out of
    the history but not out of the stream or the seen set; no timestamp goes last."""
    await store.append_events("u1", [Event("a", 5.0, 100), Event("c", 4.0, 300)])
    await store.append_events("u1", [Event("b", 3.0, 200)])
    history = _without_ids(await store.get_history("u1"))
    assert history == [Event("a", 5.0, 100), Event("b", 3.0, 200), Event("c", 4.0, 300)]
    done = await store.append_events("u1", [Event("old", 1.0, 50), Event("d", 2.0, 250)])
    assert done.history_length == WINDOW and done.new == (True, True)
    assert [e.item_id for e in await store.get_history("u1")] == ["b", "d", "c"]  # oldest by time dropped
    assert {"old", "a"} <= await store.get_seen("u1")
    assert [e.item_id for e in await store.read_events()] == ["a", "c", "b", "old", "d"]  # arrival order
    await store.append_events("u1", [Event("e", None, 300), Event("f", None, None), Event("g", None, 10**9)])
    assert [e.item_id for e in await store.get_history("u1")] == ["e", "f", "g"]
    await store.append_events("u2", [Event("x", None, 5), Event("y", None, 5), Event("z", None, 1)])
    assert [e.item_id for e in await store.get_history("u2")] == ["z", "x", "y"]


async def test_a_backfill_sent_newest_first_keeps_the_newest_window(store):
    """Each event older than the whole window is left out of the history as it comes (the Redis
    script stops its walk there instead of shifting the list), but not out of stream or seen."""
    await store.append_events("u1", [Event("live", None, 5000)])
    events = [Event(f"i{n}", None, 1000 - n) for n in range(200)]  # newest first
    done = await store.append_events("u1", events)
    assert done.appended == 200 and done.history_length == WINDOW
    assert [e.item_id for e in await store.get_history("u1")] == ["i1", "i0", "live"]
    assert len(await store.read_events()) == 201 and len(await store.get_seen("u1")) == 201
    await store.append_events("u1", [Event("between", None, 999)])  # between i1 and i0
    assert [e.item_id for e in await store.get_history("u1")] == ["between", "i0", "live"]


async def _store_as_before_0_2_0(store, user_id, events):
    """A history as releases before 0.2.0 stored it: in arrival order, entries without event_id
    (journey 39, F1; what /work/notes' unsorted_history.sh writes with redis-cli RPUSH)."""
    if isinstance(store, MemoryStore):
        store._histories[user_id] = list(events)
        return
    import redis.asyncio

    client = redis.asyncio.from_url(store.url, decode_responses=True)
    await client.rpush(f"r2ec:history:{user_id}", *(e.to_json() for e in events))
    await client.aclose()


async def _stored_order(store, user_id):
    """The item ids of the history as stored, not as read."""
    if isinstance(store, MemoryStore):
        return [e.item_id for e in store._histories[user_id]]
    import redis.asyncio

    client = redis.asyncio.from_url(store.url, decode_responses=True)
    raw = await client.lrange(f"r2ec:history:{user_id}", 0, -1)
    await client.aclose()
    return [Event.from_json(r).item_id for r in raw]


async def test_a_history_an_older_release_stored_in_arrival_order_is_read_in_time_order(store):
    """A user with a late event from before 0.2.0 who posts nothing since is served in time order."""
    await _store_as_before_0_2_0(store, "bob", [Event("100", 4.0, 99_400), Event("7", 2.0, 14_000)])
    assert [e.item_id for e in await store.get_history("bob")] == ["7", "100"]
    assert [e.item_id for e in (await store.export_user("bob")).history] == ["7", "100"]
    assert await _stored_order(store, "bob") == ["100", "7"]  # a read writes nothing


async def test_a_history_an_older_release_stored_is_sorted_once_at_the_next_append(store):
    """The append sorts the stored list (stably) before it places the new event, and writes it
    back whole, so the new event lands by time and the trim drops the oldest by time."""
    old = [Event("100", 4.0, 99_400), Event("7", 2.0, 14_000), Event("50", 3.0, 99_500)]
    await _store_as_before_0_2_0(store, "bob", old)
    done = await store.append_events("bob", [Event("174", 5.0, 57_000)])
    assert done.new == (True,) and done.history_length == WINDOW
    assert await _stored_order(store, "bob") == ["174", "100", "50"]  # "7", the oldest, trimmed
    assert [e.item_id for e in await store.get_history("bob")] == ["174", "100", "50"]
    # equal times keep their arrival order; an event without a time ends a run, as `_place`
    # leaves one: the events stored after it stay after it
    old = [Event("a", None, 500), Event("b", None, 100), Event("c"), Event("d", None, 50)]
    await _store_as_before_0_2_0(store, "carol", old[:2] + [Event("b2", None, 100)])
    assert [e.item_id for e in await store.get_history("carol")] == ["b", "b2", "a"]
    await _store_as_before_0_2_0(store, "dave", old[:WINDOW])
    await store.append_events("dave", [old[3]])
    assert await _stored_order(store, "dave") == ["a", "c", "d"]  # b, a, c sorted; d after c; b trimmed
    await _store_as_before_0_2_0(store, "erin", [Event("x", None, 9), Event("y"), Event("z", None, 1)])
    assert [e.item_id for e in await store.get_history("erin")] == ["x", "y", "z"]  # in order already


async def test_events_without_rating_or_time_round_trip(store):
    await store.append_events("u1", [Event("i9")])
    assert await store.get_history("u1") == [Event("i9", None, None, event_key("u1", Event("i9")))]


async def test_every_event_goes_to_the_stream_in_order(store):
    await store.append_events("u1", [Event("a", 5.0, 1), Event("b", None, 2)])
    await store.append_events("u2", [Event("c", 3.5, None)])
    await store.append_events("u1", [Event(f"x{n}") for n in range(4)])  # beyond the window
    entries = await store.read_events()
    assert [(e.user_id, replace(e.event, event_id=None)) for e in entries[:3]] == [
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


def _without_ids(events):
    return [replace(e, event_id=None) for e in events]


async def test_histories_and_the_stream_read_each_event_id_back(store):
    """The id a client sent, or the one derived from what it sent (as the append reported it),
    comes back with the event, so a client can match what it reads to what it wrote."""
    done = await store.append_events("u1", [Event("a", 5.0, 1, "client-1"), Event("b", None, 2)])
    assert [e.event_id for e in await store.get_history("u1")] == list(done.event_ids)
    assert done.event_ids[1] == event_key("u1", Event("b", None, 2))
    assert [(e.event_id, e.event.event_id) for e in await store.read_events()] == [
        (i, i) for i in done.event_ids
    ]


async def test_a_retried_event_is_stored_once_and_reported_as_a_duplicate(store):
    first = await store.append_events("u1", [Event("a", 5.0, 1, "e1"), Event("b", None, None)])
    assert first.new == (True, True) and first.appended == 2 and first.history_length == 2
    assert first.event_ids == ("e1", event_key("u1", Event("b")))  # no id given: a hash of the event
    # the same events again (a client retrying after a timeout), plus one new one
    again = await store.append_events("u1", [Event("a", 5.0, 1, "e1"), Event("b"), Event("c", 1.0, 3)])
    assert again.new == (False, False, True) and again.appended == 1 and again.history_length == 3
    # twice in one request: the second is the duplicate
    twice = await store.append_events("u1", [Event("d", event_id="e2"), Event("d", event_id="e2")])
    assert twice.new == (True, False)
    # ids are per user: another user's e1 is new
    assert (await store.append_events("u2", [Event("a", 5.0, 1, "e1")])).new == (True,)
    entries = await store.read_events()
    assert [(e.user_id, e.item_id, e.event_id) for e in entries] == [
        ("u1", "a", "e1"),
        ("u1", "b", event_key("u1", Event("b"))),
        ("u1", "c", event_key("u1", Event("c", 1.0, 3))),
        ("u1", "d", "e2"),
        ("u2", "a", "e1"),
    ]
    assert [e.item_id for e in await store.get_history("u1")] == ["b", "c", "d"]  # window 3
    assert event_key("u1", Event("b")) != event_key("u2", Event("b")) != event_key("u1", Event("b", 1.0))


async def _forget_event_ids(store, user_id: str) -> None:
    """What the dedup window's end does to a user's remembered event ids (R2EC_EVENT_DEDUP_TTL_S)."""
    if isinstance(store, MemoryStore):
        store._event_ids.pop(user_id, None)
        return
    import redis.asyncio as aioredis

    raw = aioredis.from_url(store.url)
    try:
        await raw.delete(f"r2ec:event-ids:{user_id}")
    finally:
        await raw.aclose()


async def test_a_replay_after_the_dedup_window_stores_nothing_twice(store):
    """An event whose id is in the stored history is a duplicate whatever the dedup window: a
    backfill run again, or a queue read again from its start, a week later (journey 40, #3)."""
    events = [Event("50", 5.0, 1_700_000_000, "wh-1"), Event("172", 4.0, 1_700_000_100)]
    first = await store.append_events("d1", events)
    assert first.new == (True, True)
    await _forget_event_ids(store, "d1")
    again = await store.append_events("d1", [*events, Event("7", 3.0, 1_700_000_200)])
    assert again.new == (False, False, True) and again.appended == 1 and again.history_length == 3
    assert [(e.item_id, e.event_id) for e in await store.get_history("d1")] == [
        ("50", "wh-1"),
        ("172", event_key("d1", events[1])),
        ("7", event_key("d1", Event("7", 3.0, 1_700_000_200))),
    ]
    assert [e.item_id for e in await store.read_events()] == ["50", "172", "7"]  # no second entry


async def test_an_append_without_the_stream_writes_the_history_seen_set_and_ids_only(store):
    """`stream=False` (`r2ec user import --no-stream`): a backfill of what retraining's seed
    dataset holds already is not streamed; still idempotent, still in time order."""
    done = await store.append_events(
        "u1", [Event("b", 4.0, 200, "e2"), Event("a", 5.0, 100, "e1")], stream=False
    )
    assert done.new == (True, True) and done.history_length == 2
    assert [e.item_id for e in await store.get_history("u1")] == ["a", "b"]
    assert await store.get_seen("u1") == {"a", "b"}
    assert await store.read_events() == []
    again = await store.append_events("u1", [Event("a", 5.0, 100, "e1"), Event("c", None, 300)])
    assert again.new == (False, True)  # the ids were kept; the route's append streams as before
    assert [(e.user_id, e.item_id) for e in await store.read_events()] == [("u1", "c")]


@pytest.mark.redis
async def test_redis_append_many_is_each_append_in_one_round_trip(redis_url):
    """`append_many`: the same script per user, pipelined; replies in order, idempotent."""
    s = RedisStore(redis_url, window=WINDOW)
    try:
        batches = [
            ("u1", [Event(f"i{n}", 4.0, 100 + n) for n in range(5)]),
            ("u2", [Event("a", None, 7, "x"), Event("a", None, 7, "x")]),
            ("u1", [Event("late", 1.0, 50), Event("i4", 4.0, 104)]),
        ]
        done = await s.append_many(batches, stream=False)
        assert [d.new for d in done] == [(True,) * 5, (True, False), (True, False)]
        assert [d.history_length for d in done] == [WINDOW, 1, WINDOW]
        assert [e.item_id for e in await s.get_history("u1")] == ["i2", "i3", "i4"]
        assert len(await s.get_seen("u1")) == 6 and await s.read_events() == []
        assert [d.appended for d in await s.append_many(batches)] == [0, 0, 0]  # a rerun stores nothing
        assert await s.read_events() == []
        assert (await s.append_many([("u3", [Event("z", None, 1)])]))[0].new == (True,)
        assert [e.user_id for e in await s.read_events()] == ["u3"]
    finally:
        await s.close()


async def test_the_seen_set_keeps_every_item_past_the_history_window(store):
    await store.append_events("u1", [Event(f"i{n}") for n in range(WINDOW + 4)])
    await store.append_events("u1", [Event("i0", 5.0, 9)])  # again: a new event, the same item
    assert len(await store.get_history("u1")) == WINDOW
    assert await store.get_seen("u1") == {f"i{n}" for n in range(WINDOW + 4)}
    assert await store.get_seen("nobody") == frozenset()


async def test_non_finite_rating_is_refused(store):
    with pytest.raises(ValueError, match="finite"):
        await store.append_events("u1", [Event("a", float("nan"))])
    assert await store.get_history("u1") == []


async def test_cache_round_trip(store):
    assert await store.cache_get("k1") is None
    await store.cache_set("k1", '{"ids": [1], "text": "x"}')
    assert await store.cache_get("k1") == '{"ids": [1], "text": "x"}'


async def test_erasing_a_user_removes_their_history_seen_items_event_ids_and_stream_entries(store):
    await store.append_events("u1", [Event(f"i{n}", 4.0, 100 + n, f"e{n}") for n in range(5)])
    await store.append_events("u2", [Event("x", 3.0, 50, "e0")])
    await store.append_events("u1", [Event("i0", 5.0, 200)])  # an item again: 6 events, 5 items
    erased = await store.erase_user("u1")
    assert isinstance(erased, Erased) and abs(erased.erased_at_ms / 1000 - time.time()) < 60
    assert (erased.user_id, erased.history_events, erased.seen_items, erased.stream_entries) == (
        "u1",
        WINDOW,
        5,
        6,
    )
    assert await store.get_history("u1") == [] and await store.get_seen("u1") == frozenset()
    assert [(e.user_id, e.item_id) for e in await store.read_events()] == [("u2", "x")]
    assert [e.item_id for e in await store.get_history("u2")] == ["x"]  # others keep theirs
    # its event ids went too: the same id is a new event now, kept, as every later event is
    again = await store.append_events("u1", [Event("i9", 2.0, 300, "e1")])
    assert again.new == (True,) and again.history_length == 1
    assert [(e.user_id, e.item_id) for e in await store.read_events()] == [("u2", "x"), ("u1", "i9")]
    assert await store.get_seen("u1") == {"i9"}


async def test_exporting_a_user_gives_their_window_seen_items_and_stream_entries_only(store):
    events = [Event(f"i{n}", 4.0, 100 + n) for n in range(WINDOW + 1)]
    await store.append_events("u1", events)
    await store.append_events("u2", [Event("x", 1.0, 5)])
    data = await store.export_user("u1")
    assert [e.item_id for e in data.history] == [e.item_id for e in events[-WINDOW:]]
    assert data.seen == sorted(e.item_id for e in events)  # past the window too
    assert [s.item_id for s in data.stream] == [e.item_id for e in events]
    assert {s.user_id for s in data.stream} == {"u1"} and data.erased_at_ms is None
    assert (await store.export_user("nobody")).stream == []


async def test_erasing_a_user_nobody_knows_removes_nothing(store):
    await store.append_events("u1", [Event("a")])
    erased = await store.erase_user("nobody")
    assert (erased.history_events, erased.seen_items, erased.stream_entries, erased.cached_reasonings) == (
        0,
        0,
        0,
        0,
    )
    assert len(await store.read_events()) == 1 and len(await store.get_history("u1")) == 1


async def test_erasing_a_user_deletes_the_reasonings_cached_for_their_stored_history(store):
    await store.append_events("u1", [Event("a")])
    await store.append_events("u2", [Event("a")])
    if isinstance(store, MemoryStore):
        store.cache_size = 10  # the fixture's LRU holds 2
    await store.cache_set("k1", "u1's", user_id="u1")
    await store.cache_set("shared", "u1's and u2's", user_id="u1")
    await store.cache_set("shared", "u1's and u2's", user_id="u2")  # the same window: one key
    await store.cache_set("inline", "someone's")  # a history sent inline: found by content only
    erased = await store.erase_user("u1")
    assert erased.cached_reasonings == 2
    assert await store.cache_get("k1") is None and await store.cache_get("shared") is None
    assert await store.cache_get("inline") is not None
    assert (await store.erase_user("u2")).cached_reasonings == 0  # "shared" is gone already


async def test_a_reasoning_made_from_a_history_erased_meanwhile_is_not_cached(store):
    """A request read u1's history, the user was erased while it wrote the reasoning: the
    reasoning is not cached after the erasure (nor for a user who never had a history)."""
    await store.cache_set("k1", "v", user_id="u1")
    await store.append_events("u2", [Event("a")])
    await store.erase_user("u2")
    await store.cache_set("k2", "v", user_id="u2")
    assert await store.cache_get("k1") is None and await store.cache_get("k2") is None
    # erased while it was made, then the id posted again: the history it was made from is gone
    await store.append_events("u3", [Event("a", event_id="e1"), Event("b", event_id="e2")])
    await store.erase_user("u3")
    await store.append_events("u3", [Event("c", event_id="e3")])
    await store.cache_set("k3", "v", user_id="u3", made_from=["e1", "e2"])
    assert await store.cache_get("k3") is None
    await store.cache_set("k4", "v", user_id="u3", made_from=["e3"])  # its history now: cached
    assert await store.cache_get("k4") == "v"


async def test_memory_erasure_keeps_reading_the_stream_after_a_cursor():
    """The in-process stream's ids count every entry ever added, so a cursor taken before an
    erasure still points where it did."""
    s = MemoryStore(window=WINDOW)
    await s.append_events("u1", [Event("a"), Event("b")])
    await s.append_events("u2", [Event("c"), Event("d")])
    cursor = (await s.read_events())[2].id
    await s.erase_user("u1")
    await s.append_events("u2", [Event("e")])
    assert [e.item_id for e in await s.read_events(after=cursor)] == ["d", "e"]


async def test_memory_cache_index_forgets_evicted_entries():
    s = MemoryStore(window=WINDOW, cache_size=1)
    await s.append_events("u1", [Event("a")])
    await s.cache_set("k1", "v", user_id="u1")
    await s.cache_set("k2", "v", user_id="u1")  # evicts k1
    assert s._user_cache == {"u1": {"k2"}} and set(s._cache_users) == {"k2"}
    assert (await s.erase_user("u1")).cached_reasonings == 1
    assert s._user_cache == {} and s._cache_users == {}


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


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://user:secret@h:6379/0", "redis://user:***@h:6379/0"),
        ("redis://:secret@h/0", "redis://:***@h/0"),
        ("redis://secret@h/0", "redis://***@h/0"),  # a lone userinfo may be the password
        ("redis://h:6379/0?password=secret&db=2", "redis://h:6379/0?password=***&db=2"),
        ("rediss://h/0?username=secret&password=secret&ssl_cert_reqs=none",
         "rediss://h/0?username=***&password=***&ssl_cert_reqs=none"),
        ("redis://u:secret@h/0?PASSWORD=secret", "redis://u:***@h/0?PASSWORD=***"),
        ("unix:///run/redis.sock?db=0&password=secret", "unix:///run/redis.sock?db=0&password=***"),
        ("redis://:se[cret@h/0", "redis://:***@h/0"),  # no URL parser reads it; masked all the same
        # unencoded "/", "?", "#" in a password (base64 ones hold "/") end a URL parser's host
        # part early: the userinfo is what comes before the last "@"
        ("redis://:12/Sx9+k2Q@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://default:pa?ss@redis:6379/0", "redis://default:***@redis:6379/0"),
        ("redis://default:pa#ss@redis:6379/0?db=1", "redis://default:***@redis:6379/0?db=1"),
        ("rediss://h/0?ssl_password=secret", "rediss://h/0?ssl_password=***"),
    ],
)  # fmt: skip
async def test_redact_masks_the_password_in_userinfo_and_query(url, logged):
    """redis-py reads a password from the userinfo and from `?password=`; both are masked."""
    assert _redact(url) == logged


async def test_redis_down_raises_store_unavailable_naming_the_operation():
    s = RedisStore(f"redis://user:secret@127.0.0.1:{free_port()}/0", window=WINDOW, timeout_s=0.5)
    calls = {
        "ping": s.ping(),
        "get_history": s.get_history("u"),
        "append_events": s.append_events("u", [Event("a")]),
        "get_seen": s.get_seen("u"),
        "cache_get": s.cache_get("k"),
        "cache_set": s.cache_set("k", "v"),
        "read_events": s.read_events(),
        "erase_user": s.erase_user("u"),
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
    with pytest.raises(StoreUnavailable, match="^redis read_erasures failed") as info:
        read_erasures(s.url, timeout_s=0.5)
    assert info.value.op == "read_erasures" and "secret" not in str(info.value)
    s = RedisStore(f"redis://127.0.0.1:{free_port()}/0", window=WINDOW, timeout_s=0.5)
    with pytest.raises(StoreUnavailable, match="^redis cache_set failed"):
        await s.cache_set("k", "v", user_id="u")  # a stored history's entry, by its script
    await s.close()


async def test_a_store_is_up_again_after_its_next_operation_that_succeeds():
    """`up` (r2ec_store_up) follows the operations themselves, so a blip does not leave it down
    where nothing pings the store (no /readyz probes)."""
    server = RedisServer()
    s = RedisStore(server.url, window=WINDOW, timeout_s=0.3)
    try:
        await s.get_history("u")
        assert s.up
        os.kill(server.proc.pid, signal.SIGSTOP)  # a stalled Redis: the operation times out
        try:
            with pytest.raises(StoreUnavailable):
                await s.get_history("u")
            assert not s.up
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        await s.get_seen("u")
        assert s.up
        # an error Redis answers with (a key of another type) fails the call, not the store
        await s._redis.set("r2ec:history:odd", "a string")
        with pytest.raises(StoreUnavailable):
            await s.get_history("odd")
        assert s.up
        assert MemoryStore().up
    finally:
        await s.close()
        server.stop()


async def test_a_store_that_answers_as_something_else_is_down():
    """A URL that reaches another server (an HTTP port) gets answers, but not Redis's: down."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    s = RedisStore(f"redis://127.0.0.1:{port}/0", window=WINDOW, timeout_s=1)
    try:
        with pytest.raises(StoreUnavailable):
            await s.get_history("u")
        assert not s.up
    finally:
        await s.close()
        listener.close()


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


async def _post(s: RedisStore, users: int, each: int, start: int = 0) -> None:
    """`each` events for each of `users` users, one user after the other (as a backfill posts)."""
    for u in range(start, start + users):
        await s.append_events(f"u{u}", [Event(f"i{n}", 4.0, 1000 + n) for n in range(each)])


@pytest.mark.redis
async def test_read_stream_checked_counts_what_the_cap_trimmed_before_it_was_read(redis_url):
    """Journey 40, finding 2: a backfill of 5000 events into a stream capped at 1000 left 1041;
    retraining read those and said nothing of the 3959 others (79 of 100 users gone)."""
    s = RedisStore(redis_url, window=WINDOW, stream_maxlen=100)
    try:
        await _post(s, users=20, each=50)  # 1000 events: `MAXLEN ~ 100` keeps the newest ~100-200
        first = read_stream_checked(redis_url, None)
        assert 100 <= len(first.events) < 1000 and first.length == len(first.events)
        assert (first.lost, first.lost_exact) == (1000 - len(first.events), True)
        assert first.events[-1].user_id == "u19" and first.events[0].user_id != "u0"  # the first users went
        assert first.cursor == first.events[-1].id and first.mark["entries_added"] == 1000
        # read in time: nothing lost, from the mark on
        await _post(s, users=1, each=30, start=20)
        second = read_stream_checked(redis_url, first.cursor, first.mark)
        assert (len(second.events), second.lost, second.lost_exact) == (30, 0, True)
        # too late again: 500 posted, the newest few hundred left
        await _post(s, users=10, each=50, start=21)
        third = read_stream_checked(redis_url, second.cursor, second.mark)
        assert third.lost == 500 - len(third.events) > 0 and third.lost_exact
        # the same entries as the plain reader's
        assert [e.id for e in third.events] == [e.id for e in read_stream(redis_url, second.cursor)[0]]
        nothing = read_stream_checked(redis_url, third.cursor, third.mark)
        assert (nothing.events, nothing.cursor, nothing.lost, nothing.lost_exact) == (
            [],
            third.cursor,
            0,
            True,
        )
    finally:
        await s.close()


@pytest.mark.redis
async def test_entries_an_erasure_deleted_are_not_counted_as_lost(redis_url):
    s = RedisStore(redis_url, window=WINDOW)
    try:
        await _post(s, users=2, each=5)
        first = read_stream_checked(redis_url, None)
        await _post(s, users=2, each=5, start=2)  # u2, u3
        await s.append_events("u0", [Event("late", 3.0, 5000)])
        assert (await s.erase_user("u2")).stream_entries == 5  # after the cursor, unread
        assert (await s.erase_user("u0")).stream_entries == 6  # 5 read before, 1 not
        second = read_stream_checked(redis_url, first.cursor, first.mark)
        assert sorted({e.user_id for e in second.events}) == ["u3"]
        # 11 added since, 5 read, 6 of them deleted by the erasures (and 5 read before, not
        # counted): none lost, exact
        assert (second.lost, second.lost_exact) == (0, True)
        # as Redis orders ids (a string comparison misorders "…822-18446744073709551615" and "…822-3")
        assert _id_key(second.mark["last_id"]) >= _id_key(second.cursor)
    finally:
        await s.close()


@pytest.mark.redis
async def test_with_an_erasure_and_a_trim_the_count_is_exact(redis_url):
    s = RedisStore(redis_url, window=WINDOW, stream_maxlen=100)
    try:
        await s.append_events("u0", [Event("a", 1.0, 1)])
        first = read_stream_checked(redis_url, None)
        await _post(s, users=10, each=50, start=1)  # 500: the first ~300 trimmed
        erased = await s.erase_user("u10")  # the newest user's 50, unread, deleted
        assert erased.stream_entries == 50
        second = read_stream_checked(redis_url, first.cursor, first.mark)
        # 500 added, 50 erased, the rest read or trimmed: exact (the erasure's ids are recorded)
        assert second.lost == 500 - 50 - len(second.events) > 0 and second.lost_exact
    finally:
        await s.close()


@pytest.mark.redis
async def test_an_erasure_of_entries_read_before_hides_no_trimmed_ones(redis_url):
    """Review 40, finding 1: erasing a user whose entries an earlier run read subtracted them
    from the entries trimmed unread (0 lost, "an unknown number", no alert)."""
    s = RedisStore(redis_url, window=WINDOW, stream_maxlen=100)
    try:
        await s.append_events("old", [Event(f"i{n}", 4.0, 1000 + n) for n in range(60)])
        first = read_stream_checked(redis_url, None)
        assert len(first.events) == 60
        assert (await s.erase_user("old")).stream_entries == 60  # all read before
        await _post(s, users=10, each=50)  # 500 at cap 100: most trimmed unread
        second = read_stream_checked(redis_url, first.cursor, first.mark)
        assert second.lost == 500 - len(second.events) > 0 and second.lost_exact
    finally:
        await s.close()


@pytest.mark.redis
async def test_an_erasure_of_read_entries_without_a_trim_is_no_unknown_loss(redis_url):
    """Review 40, finding 1 (part C): nothing trimmed, the read entries erased: nothing lost,
    exact (it was "an unknown number")."""
    s = RedisStore(redis_url, window=WINDOW)
    try:
        await _post(s, users=1, each=50)
        first = read_stream_checked(redis_url, None)
        await s.erase_user("u0")
        await _post(s, users=5, each=10, start=1)
        second = read_stream_checked(redis_url, first.cursor, first.mark)
        assert (len(second.events), second.lost, second.lost_exact) == (50, 0, True)
    finally:
        await s.close()


@pytest.mark.redis
async def test_an_erasure_during_a_read_is_counted_once(redis_url, monkeypatch):
    """Review 40, finding 1: an erasure between the stream's counts and the pages was subtracted
    in that read and again in the next, hiding as many trimmed entries."""
    s = RedisStore(redis_url, window=WINDOW, stream_maxlen=200)
    try:
        await _post(s, users=1, each=100)
        first = read_stream_checked(redis_url, None)
        await _post(s, users=1, each=100, start=1)  # u1's 100, unread
        real, done = redis.Redis.xrange, []

        def erasing(self, *args, **kwargs):
            if not done:
                done.append(1)
                _erase_now(redis_url, "u1")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(redis.Redis, "xrange", erasing)
        second = read_stream_checked(redis_url, first.cursor, first.mark)
        monkeypatch.setattr(redis.Redis, "xrange", real)
        assert (len(second.events), second.lost, second.lost_exact) == (0, 0, True)
        await _post(s, users=15, each=100, start=2)  # 1500 at cap 200: most trimmed unread
        third = read_stream_checked(redis_url, second.cursor, second.mark)
        assert third.lost == 1500 - len(third.events) > 0 and third.lost_exact
    finally:
        await s.close()


def _erase_now(redis_url: str, user: str) -> None:
    """`erase_user` from synchronous code (inside a monkeypatched read), in its own thread."""

    def run() -> None:
        async def go() -> None:
            store = RedisStore(redis_url, window=WINDOW)
            try:
                await store.erase_user(user)
            finally:
                await store.close()

        asyncio.run(go())

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()


@pytest.mark.redis
async def test_the_record_of_erased_ids_is_trimmed_by_reads_and_erasures(redis_url):
    """The erased ids are kept from the position retraining's read starts at (each read trims
    them), or, where no retraining reads the stream, from its first entry (each erasure)."""
    s = RedisStore(redis_url, window=WINDOW, stream_maxlen=100)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await _post(s, users=3, each=10)
        await s.erase_user("u2")
        assert raw.zcard(STREAM_ERASED_IDS_KEY) == 10  # past the stream's first entry: kept
        await _post(s, users=10, each=50, start=3)  # u0, u1 and u2's place trimmed
        time.sleep(0.005)  # the erasures' cutoffs (ms) past their entries'
        assert (await s.erase_user("u12")).stream_entries == 50  # no reader: trimmed to the first entry
        first_ms = int(raw.xrange(EVENTS_STREAM, count=1)[0][0].split("-")[0])
        kept = raw.zrange(STREAM_ERASED_IDS_KEY, 0, -1, withscores=True)
        assert len(kept) == 50 and all(score >= first_ms for _, score in kept)
        first = read_stream_checked(redis_url, None)  # a reader from now on
        assert not first.lost_exact  # erased ids of the range it reads were trimmed
        await _post(s, users=1, each=10, start=20)
        time.sleep(0.005)
        await s.erase_user("u20")
        second = read_stream_checked(redis_url, first.cursor, first.mark)
        assert (second.lost, second.lost_exact) == (0, True)
        assert raw.zcard(STREAM_ERASED_IDS_KEY) == 10  # u20's: past the first read's position
        third = read_stream_checked(redis_url, second.cursor, second.mark)
        assert raw.zcard(STREAM_ERASED_IDS_KEY) == 0 and third.lost_exact  # below the second's
        assert raw.ttl(STREAM_READER_KEY) > 0
    finally:
        raw.close()
        await s.close()


@pytest.mark.redis
async def test_a_stream_lost_and_begun_again_is_noticed_whatever_it_took_since(redis_url):
    """Review 40, finding 2: a stream flushed and begun again that grew past the count the last
    read saw was counted on from that count, short by it, and called exact."""
    s = RedisStore(redis_url, window=WINDOW, stream_maxlen=100)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await _post(s, users=2, each=50)
        first = read_stream_checked(redis_url, None)
        assert (len(first.events), first.lost_exact) == (100, True)
        assert first.mark["epoch"] == raw.get(STREAM_EPOCH_KEY) is not None  # set where XADD created it
        await _post(s, users=1, each=50, start=2)  # never read: lost with the stream
        raw.flushall()  # or a restart without persistence
        await _post(s, users=10, each=50, start=3)  # 500 (more than the 100 the mark saw), cap 100
        second = read_stream_checked(redis_url, first.cursor, first.mark)
        # at least the new stream's trimmed entries; the old one's 50 are unknown
        assert second.lost == 500 - len(second.events) > 0 and not second.lost_exact
        assert second.mark["epoch"] not in (None, first.mark["epoch"])
        # trims and deletions leave the stream (and its epoch) in place
        raw.xtrim(EVENTS_STREAM, maxlen=0)
        await _post(s, users=1, each=5, start=20)
        third = read_stream_checked(redis_url, second.cursor, second.mark)
        assert (len(third.events), third.lost, third.lost_exact) == (5, 0, True)
        assert third.mark["epoch"] == second.mark["epoch"]
    finally:
        raw.close()
        await s.close()


@pytest.mark.redis
async def test_a_cursor_saved_without_a_mark_counts_from_this_read_on(redis_url):
    """A state an older release wrote has a cursor and no counts: whether the cap trimmed past
    the cursor is still told (the stream's first entry is past it), not how much."""
    s = RedisStore(redis_url, window=WINDOW, stream_maxlen=100)
    try:
        await _post(s, users=1, each=10)
        old, _ = read_stream(redis_url, None)
        await _post(s, users=1, each=10, start=1)
        kept = read_stream_checked(redis_url, old[-1].id, None)
        assert (len(kept.events), kept.lost, kept.lost_exact, kept.mark["entries_added"]) == (10, 0, True, 20)
        await _post(s, users=10, each=50, start=2)  # past the cursor: trimmed
        cut = read_stream_checked(redis_url, kept.cursor, None)
        assert (cut.lost, cut.lost_exact) == (0, False)
        # the same with the mark: counted
        again = read_stream_checked(redis_url, kept.cursor, kept.mark)
        assert again.lost == 500 - len(again.events) and again.lost_exact
        # a mark saved with another cursor (an older release's run moved the cursor on and
        # left the mark): not counted from
        await _post(s, users=1, each=10, start=12)
        moved = read_stream_checked(redis_url, again.cursor, kept.mark)
        assert (len(moved.events), moved.lost, moved.lost_exact) == (10, 0, True)
        epoch = redis.Redis.from_url(redis_url, decode_responses=True).get(STREAM_EPOCH_KEY)
        assert moved.mark == {
            "entries_added": 530,
            "last_id": moved.cursor,
            "epoch": epoch,
            "cursor": moved.cursor,
        }
        # a mark an earlier build saved (counts, no position): not counted from either
        await _post(s, users=1, each=10, start=13)
        early = read_stream_checked(
            redis_url, moved.cursor, {"entries_added": 530, "erased": 0, "cursor": moved.cursor}
        )
        assert (len(early.events), early.lost, early.lost_exact) == (10, 0, True)
    finally:
        await s.close()


@pytest.mark.redis
async def test_a_stream_lost_and_begun_again_counts_what_it_can(redis_url):
    import redis as redis_sync

    s = RedisStore(redis_url, window=WINDOW)
    try:
        await _post(s, users=1, each=10)
        first = read_stream_checked(redis_url, None)
        client = redis_sync.Redis.from_url(redis_url)
        client.flushall()  # a Redis that lost its data (no persistence, a failover)
        client.close()
        await _post(s, users=1, each=4, start=1)
        second = read_stream_checked(redis_url, first.cursor, first.mark)
        assert (len(second.events), second.lost, second.lost_exact) == (4, 0, False)
    finally:
        await s.close()


@pytest.mark.redis
async def test_a_write_that_timed_out_but_landed_is_not_duplicated_by_the_retry():
    """Row H of issue 13: Redis stalls (SIGSTOP, as `docker pause` does) longer than the client's
    socket timeout, so the append fails with StoreUnavailable; yet the command sits in the
    socket and Redis runs it when it resumes. The client retries the same events: they are
    reported as duplicates and the stream holds one copy of each."""
    import redis.asyncio as aioredis

    server = RedisServer()  # its own server, to stop and resume
    s = RedisStore(server.url, window=WINDOW, timeout_s=0.2)
    admin = aioredis.from_url(server.url)
    events = [Event("a", 5.0, 100, "evt-1"), Event("b", 4.0, 101)]
    try:
        await s.append_events("warm-up", [Event("x")])  # the script is loaded before the stall
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable, match="append_events"):
                await s.append_events("u1", events)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        landed = [e for e in await admin.xrange("r2ec:events") if e[1][b"user_id"] == b"u1"]
        assert len(landed) == 2, "the timed-out write should have landed when Redis resumed"
        retry = await s.append_events("u1", events)
        assert retry.new == (False, False) and retry.history_length == 2
        assert [(e.item_id, e.event_id) for e in await s.read_events() if e.user_id == "u1"] == [
            ("a", "evt-1"),
            ("b", event_key("u1", Event("b", 4.0, 101))),
        ]
    finally:
        await admin.aclose()
        await s.close()
        server.stop()


@pytest.mark.redis
async def test_redis_forgets_a_user_who_posts_nothing_for_the_retention_time(redis_url):
    """R2EC_USER_TTL_S: the history and the seen set expire that long after the user's last
    event (renewed by each append); turned off again, the next append keeps them for good."""
    import redis.asyncio as aioredis

    raw = aioredis.from_url(redis_url)
    kept, forgetting = (
        RedisStore(redis_url, window=WINDOW),
        RedisStore(redis_url, window=WINDOW, user_ttl_s=60),
    )
    try:
        await forgetting.append_events("u1", [Event("a", 4.0, 100)])
        for key in ("r2ec:history:u1", "r2ec:seen:u1"):
            assert 0 < await raw.ttl(key) <= 60, key
        await kept.append_events("u1", [Event("b", 4.0, 200)])
        assert await raw.ttl("r2ec:history:u1") == -1 and await raw.ttl("r2ec:seen:u1") == -1
        assert [e.item_id for e in await kept.get_history("u1")] == ["a", "b"]
    finally:
        await raw.aclose()
        await kept.close()
        await forgetting.close()


async def test_memory_forgets_a_user_who_posts_nothing_for_the_retention_time():
    now = [0.0]
    s = MemoryStore(window=WINDOW, user_ttl_s=60, clock=lambda: now[0])
    await s.append_events("u1", [Event("a", 4.0, 100)])
    now[0] = 50.0
    await s.append_events("u1", [Event("b", 4.0, 200)])  # renews it
    now[0] = 109.0
    assert [e.item_id for e in await s.get_history("u1")] == ["a", "b"]
    now[0] = 110.0
    assert await s.get_history("u1") == [] and await s.get_seen("u1") == frozenset()
    assert [e.user_id for e in await s.read_events()] == ["u1", "u1"]  # the stream is not a history


async def test_redis_forgets_event_ids_after_the_dedup_window(redis_url):
    import redis.asyncio as aioredis

    s = RedisStore(redis_url, window=WINDOW, dedup_ttl_s=60)
    raw = aioredis.from_url(redis_url)
    try:
        await s.append_events("u1", [Event("a", event_id="e1")])
        assert 0 < await raw.ttl("r2ec:event-ids:u1") <= 60
        assert await raw.ttl("r2ec:seen:u1") == -1  # the seen set does not expire
        # an id older than the window is dropped at the next append: while the event is in the
        # history it is still a duplicate (test_a_replay_after_the_dedup_window_stores_nothing_twice),
        # once it has left the history too it counts as new again
        await s.append_events("u1", [Event(f"b{n}", None, 10 + n, f"e{n}") for n in range(2, 2 + WINDOW)])
        await raw.zadd("r2ec:event-ids:u1", {"e1": 0})
        assert (await s.append_events("u1", [Event("a", None, 1, "e1")])).new == (True,)
    finally:
        await raw.aclose()
        await s.close()


@pytest.mark.redis
async def test_the_erasure_ledger_covers_what_came_before_and_not_the_same_id_used_again(redis_url):
    """Retraining reads the ledger: an entry of the user's at or before the erasure is covered,
    one added after it is not, even within the erasure's millisecond (the script moves the
    stream's last id past it)."""
    import redis.asyncio as aioredis

    s = RedisStore(redis_url, window=WINDOW)
    raw = aioredis.from_url(redis_url, decode_responses=True)
    try:
        assert read_erasures(redis_url).cutoffs == {}
        await s.append_events("u1", [Event("a"), Event("b")])
        await s.append_events("u2", [Event("c")])
        # an entry 10 s ahead of Redis's clock (one written before the clock stepped back):
        # Redis numbers the next entries within that millisecond, as it does for those added in
        # the erasure's own millisecond
        ahead = int(time.time() * 1000) + 10_000
        await raw.xadd("r2ec:events", {"user_id": "u1", "item_id": "z", "event_id": "z"}, id=f"{ahead}-0")
        before = [(e.user_id, e.id) for e in await s.read_events()]
        erased = await s.erase_user("u1")
        await s.append_events("u1", [Event("d")])
        ledger = read_erasures(redis_url)
        cutoff = ledger.cutoffs["u1"]
        assert ledger.users == {"u1"} and cutoff == ahead and erased.erased_at_ms < ahead
        assert erased.stream_entries == 3 and await raw.zscore("r2ec:erasures", "u1") == cutoff
        assert all(ledger.covers("u1", i) for u, i in before if u == "u1")
        assert not any(ledger.covers("u2", i) for _, i in before)  # u2 was never erased
        (after,) = [e for e in await s.read_events() if e.user_id == "u1"]
        assert after.id == f"{ahead + 1}-0" and not ledger.covers("u1", after.id)  # not f"{ahead}-1"
        # erased again: the ledger moves to the new cutoff and covers the later entry too
        await s.erase_user("u1")
        assert read_erasures(redis_url).covers("u1", after.id)
        # a user erased before the stream exists: an entry added later is not covered
        await raw.delete("r2ec:events")
        await s.erase_user("u3")
        await s.append_events("u3", [Event("e")])
        (entry,) = await s.read_events()
        assert not read_erasures(redis_url).covers("u3", entry.id)
    finally:
        await raw.aclose()
        await s.close()


@pytest.mark.redis
async def test_an_erasure_scans_the_stream_in_pages_and_removes_only_the_user(redis_url):
    s = RedisStore(redis_url, window=WINDOW)
    s.erase_page = 4  # 37 entries: ten pages, the user's entries on every page and across edges
    try:
        for n in range(37):
            await s.append_events("u1" if n % 3 else "u2", [Event(f"i{n}", None, n)])
        erased = await s.erase_user("u1")
        assert erased.stream_entries == 24
        assert [e.item_id for e in await s.read_events()] == [f"i{n}" for n in range(0, 37, 3)]
        s.erase_page = 13  # exactly the 13 entries left: a full page, then an empty one
        assert (await s.erase_user("u2")).stream_entries == 13 and await s.read_events() == []
    finally:
        await s.close()


@pytest.mark.redis
async def test_the_user_cache_index_lives_as_long_as_the_entries_it_names(redis_url):
    import redis.asyncio as aioredis

    s = RedisStore(redis_url, window=WINDOW, cache_ttl_s=60)
    raw = aioredis.from_url(redis_url, decode_responses=True)
    try:
        await s.append_events("u1", [Event("a")])
        await s.cache_set("k1", "v", user_id="u1")
        assert 0 < await raw.ttl("r2ec:user-cache:u1") <= 60
        assert await raw.zrange("r2ec:user-cache:u1", 0, -1) == ["k1"]
        await s.cache_set("k0", "v")  # an inline history's entry: no index
        assert await raw.exists("r2ec:user-cache:u1") == 1 and await raw.zcard("r2ec:user-cache:u1") == 1
        # a key written longer than the TTL ago (its entry expired) leaves at the next write
        await raw.zadd("r2ec:user-cache:u1", {"old": 0})
        await s.cache_set("k2", "v", user_id="u1")
        assert await raw.zrange("r2ec:user-cache:u1", 0, -1) == ["k1", "k2"]
        await s.erase_user("u1")
        assert await raw.exists("r2ec:user-cache:u1", "r2ec:reasoning:k1", "r2ec:reasoning:k2") == 0
        assert await raw.exists("r2ec:reasoning:k0") == 1
    finally:
        await raw.aclose()
        await s.close()


async def test_redis_is_marked_with_its_format_once_and_whether_it_held_data(redis_url):
    """r2ec:schema: written at the first start of 0.2.0 or later, kept after; `held_data` says
    whether an older release may have used the Redis (journey 39, F6)."""
    from service.store import STORE_FORMAT, StoreFormatError

    store = RedisStore(redis_url)
    try:
        first = await store.check_format("0.2.0")
        assert (first.format, first.written_by, first.held_data) == (STORE_FORMAT, "0.2.0", False)
        assert abs(first.since - time.time()) < 600 and store.format == first
        assert await store.check_format("0.3.0") == first  # kept: the first start's
        await store._redis.delete("r2ec:schema")
        await store.append_events("u1", [Event("a", None, 1)])
        assert (await store.check_format("0.2.0")).held_data  # data, no marker: an older release's
        for marker in ("not json", '{"format": 1}', "[]"):
            await store._redis.set("r2ec:schema", marker)
            with pytest.raises(StoreFormatError, match="r2ec:schema in redis://.* is no format marker"):
                await store.check_format("0.2.0")
        newer = {"format": STORE_FORMAT + 1, "written_by": "0.9.0", "since": 1, "held_data": True}
        await store._redis.set("r2ec:schema", json.dumps(newer))
        said = r"format 2 \(r2ec:schema, written by r2ec 0\.9\.0\); this r2ec 0\.2\.0 knows format 1 at most"
        with pytest.raises(StoreFormatError, match=said):
            await store.check_format("0.2.0")
    finally:
        await store.close()


async def test_an_events_request_id_is_kept_in_the_stream_not_in_the_history_nor_its_id(store):
    """Attribution: a click names the recommendation it came from (its X-Request-ID). The stream
    keeps it; the history, which the prompt reads, does not; the default event id (the
    idempotency key) does not hash it, so a retry naming another recommendation is a duplicate."""
    done = await store.append_events("u1", [Event("a", 5.0, 100, request_id="rec-1"), Event("b", 4.0, 200)])
    assert done.new == (True, True)
    assert [(e.item_id, e.event.request_id) for e in await store.read_events()] == [
        ("a", "rec-1"),
        ("b", None),
    ]
    assert all(e.request_id is None for e in await store.get_history("u1"))
    assert event_key("u1", Event("a", 5.0, 100, request_id="x")) == event_key("u1", Event("a", 5.0, 100))
    again = await store.append_events("u1", [Event("a", 5.0, 100, request_id="rec-2")])
    assert again.new == (False,)
    assert [e.event.request_id for e in await store.read_events()] == ["rec-1", None]
    assert [s.event.request_id for s in (await store.export_user("u1")).stream] == ["rec-1", None]


def _served(request_id: str, user_id: str, at_ms: int | None = None) -> Served:
    at = int(time.time() * 1000) if at_ms is None else at_ms
    return Served(request_id, user_id, at, "v1", "/recommend", 2, True, "ab" * 32, "miss", "store",
                  ("i1", "i2"), (3.5, 2.25), (1, 2))  # fmt: skip


@pytest.mark.redis
async def test_redis_exposure_log_round_trips_and_is_erased_and_exported_per_user(redis_url):
    s = RedisStore(redis_url, window=WINDOW)
    try:
        first = replace(_served("r1", "u1"), fingerprint="0123456789abcdef", variant="candidate")
        written = await s.add_served([first, _served("r2", ""), _served("r3", "u2")], maxlen=100)
        assert written == 3
        pages = list(read_served(redis_url, page_size=2))
        assert [len(p) for p in pages] == [2, 1]
        back = pages[0][0]
        assert replace(back, id="") == first and back.id and pages[0][1].variant == ""
        assert [e.request_id for e in (await s.export_user("u1")).served] == ["r1"]

        erased = await s.erase_user("u1")
        assert erased.served_entries == 1 and erased.stream_entries == 0
        assert [e.request_id for p in read_served(redis_url) for e in p] == ["r2", "r3"]
        # answered before the erasure, reaching Redis after it: not written; the id used again later is
        late, later = (
            _served("r4", "u1", erased.erased_at_ms - 1),
            _served("r5", "u1", erased.erased_at_ms + 1000),
        )
        assert await s.add_served([late, later]) == 1
        assert [e.request_id for e in (await s.export_user("u1")).served] == ["r5"]
        # a time range, by the entries' stream ids (when Redis took them)
        assert list(read_served(redis_url, since_ms=int(time.time() * 1000) + 60_000)) == []
        assert list(read_served(redis_url, until_ms=1)) == []
    finally:
        await s.close()


async def test_memory_erasure_counts_no_exposure_log(store):
    """The in-process store has no exposure log (R2EC_EXPOSURE_LOG needs Redis): nothing to count
    where none was written."""
    await store.append_events("u1", [Event("a")])
    erased = await store.erase_user("u1")
    assert erased.served_entries == 0 and (await store.export_user("u1")).served == []
