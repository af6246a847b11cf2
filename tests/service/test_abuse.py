"""Misbehaving clients: one user's events posted in a loop (R2EC_EVENT_DEDUP_MAX bounds what a
user's event ids take in Redis; R2EC_USER_EVENTS_PER_S / _BURST bound how fast a user's events
are written, shared by the replicas through Redis), and a client guessing API keys
(R2EC_AUTH_FAILURES per R2EC_AUTH_FAILURE_WINDOW_S per client address). Clocks are the tests'
own: nothing here waits for time to pass."""

from __future__ import annotations

import math

import httpx
import pytest
import pytest_asyncio
import redis

from service.buckets import TokenBuckets
from service.limits import AuthThrottle, client_address
from service.store import (
    EVENT_IDS_KEY,
    EVENT_RATE_KEY,
    EVENTS_STREAM,
    Event,
    EventRate,
    MemoryStore,
    RedisStore,
    UserRateLimited,
)
from tests.service.conftest import ADMIN, API_KEY, app_for, needs_redis, serve, uvicorn_serving
from tests.service.test_app import metric
from tests.service.test_errors import the_error


class Clock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
async def make_store(request):
    """A factory of stores on one backend (two Redis stores share the server: two replicas)."""
    made = []

    def make(**kw):
        if request.param == "memory":
            s = MemoryStore(window=3, **kw)
        else:
            s = RedisStore(request.getfixturevalue("redis_url"), window=3, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close()


def events(n: int, start: int = 0) -> list[Event]:
    return [Event(f"i{1 + k % 9}", 4.0, 1000 + k, f"e{k}") for k in range(start, start + n)]


# ---------------------------------------------------------------- a user's event ids, bounded


@pytest.mark.asyncio
async def test_a_users_event_ids_are_capped_oldest_first(make_store):
    clock = Clock()
    store = make_store(dedup_max=1000, clock=clock)
    for batch in range(3):  # 3000 distinct ids, one request a second
        done = await store.append_events("u1", events(1000, start=batch * 1000))
        assert done.appended == 1000
        clock.now += 1
    if isinstance(store, RedisStore):
        r = redis.Redis.from_url(store.url)
        key = EVENT_IDS_KEY.format(user_id="u1")
        assert r.zcard(key) == 1000
        assert r.zrange(key, 0, 0) == [b"e2000"]  # the oldest request's ids went first
    # the last request retried whole is known whole; an id of the first, gone from both the ids
    # and the 3-event window, counts as new again (the documented price of the cap)
    again = await store.append_events("u1", events(1000, start=2000))
    assert again.appended == 0
    assert (await store.append_events("u1", events(1, start=0))).new == (True,)


@pytest.mark.asyncio
async def test_the_cap_holds_within_one_request_and_its_ids_are_still_checked(make_store):
    store = make_store(dedup_max=1000)
    sent = events(1000) + events(1000, start=1000) + events(5)  # the last 5 repeat the first
    done = await store.append_events("u1", sent)
    assert done.appended == 2000  # the repeats were checked before the trim
    assert done.new[-5:] == (False,) * 5


@pytest.mark.redis
@pytest.mark.asyncio
async def test_redis_memory_of_a_user_flooding_events_stays_bounded(redis_url):
    """What grows for one user posting distinct events: with the cap the id set stops growing;
    the seen set is bounded by the catalog, the history by the window, the stream by its cap."""
    store = RedisStore(redis_url, window=3, stream_maxlen=100_000, dedup_max=1000)
    r = redis.Redis.from_url(redis_url)
    key = EVENT_IDS_KEY.format(user_id="u1")
    sizes = []
    for batch in range(6):
        await store.append_events("u1", events(1000, start=batch * 1000))
        sizes.append(r.memory_usage(key, samples=0))
    await store.close()
    assert r.zcard(key) == 1000 and r.xlen(EVENTS_STREAM) == 6000
    assert max(sizes[1:]) <= sizes[0] * 1.1  # flat after the cap, not 6x


# ---------------------------------------------------------------- a user's event rate


@pytest.mark.asyncio
async def test_a_users_events_past_the_burst_wait_for_the_rate_and_nothing_is_stored(make_store):
    clock = Clock()
    store = make_store(clock=clock)
    rate = EventRate(per_s=2.0, burst=10)
    assert (await store.append_events("u1", events(8), rate=rate)).appended == 8
    with pytest.raises(UserRateLimited) as refused:
        await store.append_events("u1", events(5, start=8), rate=rate)  # 2 left, 5 asked
    assert refused.value.retry_after_s == pytest.approx(1.5)  # 3 missing at 2 a second
    assert "R2EC_USER_EVENTS_PER_S" in str(refused.value)
    history = await store.get_history("u1")
    assert [e.event_id for e in history] == ["e5", "e6", "e7"]  # nothing of the refused request
    assert len(await store.read_events()) == 8
    # another user has a bucket of their own; a backfill (no rate) is not bound
    assert (await store.append_events("u2", events(10), rate=rate)).appended == 10
    assert (await store.append_events("u1", events(100, start=100))).appended == 100
    clock.now += 1.5  # the wait it was told
    assert (await store.append_events("u1", events(5, start=8), rate=rate)).appended == 5
    # duplicates cost too: the bucket is empty now
    with pytest.raises(UserRateLimited):
        await store.append_events("u1", events(1, start=8), rate=rate)
    clock.now += 10 / 2.0  # a full bucket, and never more than full
    assert (await store.append_events("u1", events(10, start=20), rate=rate)).appended == 10
    with pytest.raises(UserRateLimited):
        await store.append_events("u1", events(1, start=30), rate=rate)


@pytest.mark.redis
@pytest.mark.asyncio
async def test_replicas_share_one_users_event_rate_and_an_erasure_removes_it(redis_url):
    clock = Clock()
    a = RedisStore(redis_url, window=3, clock=clock)
    behind = Clock(clock.now - 5)  # a replica whose clock is 5 s behind gains nothing from it
    b = RedisStore(redis_url, window=3, clock=behind)
    rate = EventRate(per_s=1.0, burst=4)
    try:
        await a.append_events("u1", events(3), rate=rate)
        with pytest.raises(UserRateLimited):
            await b.append_events("u1", events(2, start=3), rate=rate)
        await b.append_events("u1", events(1, start=3), rate=rate)
        with pytest.raises(UserRateLimited) as refused:
            await a.append_events("u1", events(1, start=4), rate=rate)
        assert refused.value.retry_after_s == pytest.approx(1.0)
        r = redis.Redis.from_url(redis_url)
        key = EVENT_RATE_KEY.format(user_id="u1")
        assert 0 < r.pttl(key) <= 5000  # gone once it would be full again (4 s, and 1 s spare)
        await a.erase_user("u1")
        assert not r.exists(key)  # its name holds the user id
        await a.append_events("u1", events(4, start=10), rate=rate)  # a fresh, full bucket
    finally:
        await a.close()
        await b.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
def redis_or_not(request) -> str:
    """R2EC_REDIS_URL: a real redis-server's, or empty (the in-process store)."""
    return request.getfixturevalue("redis_url") if request.param == "redis" else ""


@pytest.mark.asyncio
async def test_the_route_answers_429_with_retry_after_naming_the_limit(ckpt, redis_or_not):
    redis_url = redis_or_not
    app = app_for(ckpt, redis_url=redis_url, user_events_per_s=0.5, user_events_burst=5)
    async with serve(app) as client:
        body = {"events": [{"item_id": f"i{k}", "event_id": f"e{k}"} for k in range(1, 5)]}
        assert (await client.post("/users/u1/events", json=body)).status_code == 200
        r = await client.post("/users/u1/events", json=body)
        error = the_error(r, 429)
        assert error["code"] == "rate_limited" and "R2EC_USER_EVENTS_PER_S" in error["message"]
        assert r.headers["Retry-After"] == "6"  # 3 missing at 0.5 a second
        assert (await client.post("/users/u2/events", json=body)).status_code == 200
        too_many = {"events": [{"item_id": "i1", "event_id": f"x{k}"} for k in range(6)]}
        error = the_error(await client.post("/users/u3/events", json=too_many), 422, "events")
        assert "R2EC_USER_EVENTS_BURST" in error["message"]
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_rejected_total", reason="user_event_rate") == 1
        history = (await client.get("/users/u1/history")).json()["history"]
        assert [e["event_id"] for e in history] == ["e1", "e2", "e3", "e4"]
        # the refused repeat was not even checked for duplicates
        assert metric(text, "r2ec_events_total", result="duplicate") == 0


# ---------------------------------------------------------------- wrong API keys


def test_token_buckets_keep_a_bounded_number_of_keys_and_count_by_the_clock():
    clock = Clock()
    buckets = TokenBuckets(per_s=1.0, burst=2, max_keys=3, clock=clock)
    assert buckets.take("a", 2) == 0 and buckets.take("a") == 1.0
    assert buckets.wait("a") == 1.0 and buckets.wait("a", 3) == math.inf
    for key in "bcd":
        buckets.take(key)
    assert len(buckets) == 3  # "a", the least recently charged, was dropped: it starts full
    assert buckets.wait("a", 2) == 0
    clock.now -= 100  # a clock that went back adds nothing, takes nothing
    assert buckets.wait("b") == 0 and buckets.wait("b", 2) == 1.0


def test_a_clients_address_is_its_own_and_ipv6_counts_by_its_64():
    def scope(host):
        return {"client": (host, 5000)}

    assert client_address(scope("203.0.113.7")) == "203.0.113.7"
    assert client_address(scope("::ffff:203.0.113.7")) == "203.0.113.7"
    assert client_address(scope("2001:db8:1:2:aaaa::1")) == client_address(scope("2001:db8:1:2:bbbb::9"))
    assert client_address(scope("2001:db8:1:2::1")) == "2001:db8:1:2::/64"
    assert client_address(scope("2001:db8:1:3::1")) != client_address(scope("2001:db8:1:2::1"))
    assert client_address({"client": None}) == "unknown"


def test_an_address_regains_one_try_every_window_over_failures():
    clock = Clock()
    throttle = AuthThrottle(3, 30.0, clock=clock)
    for _ in range(3):
        assert throttle.blocked("a") == 0
        throttle.failed("a")
    assert throttle.blocked("a") == pytest.approx(10.0) and throttle.blocked("b") == 0
    clock.now += 10
    assert throttle.blocked("a") == 0


async def _wrong_then_right(client: httpx.AsyncClient, path: str, tries: int) -> list[int]:
    statuses = [
        (await client.get(path, headers={"X-API-Key": f"guess-{n}"})).status_code for n in range(tries)
    ]
    return statuses


@pytest.mark.asyncio
async def test_an_address_guessing_keys_gets_429_even_for_the_right_key_others_do_not(ckpt):
    app = app_for(ckpt, client_key="client-key-0123456789", auth_failures=3, auth_failure_window_s=60)
    async with app.router.lifespan_context(app):
        clock = Clock()
        app.state.auth_throttle = AuthThrottle(3, 60.0, clock=clock)

        def client_from(host: str) -> httpx.AsyncClient:
            transport = httpx.ASGITransport(app, client=(host, 4000))
            return httpx.AsyncClient(transport=transport, base_url="http://r2ec.test")

        async with client_from("198.51.100.1") as guesser, client_from("198.51.100.2") as other:
            path = "/users/u1/history"
            assert [(await guesser.get(path)).status_code for _ in range(5)] == [401] * 5  # no key: no guess
            assert await _wrong_then_right(guesser, path, 3) == [403, 403, 403]
            r = await guesser.get(path, headers={"X-API-Key": "client-key-0123456789"})
            error = the_error(r, 429)
            assert error["code"] == "auth_throttled" and "R2EC_AUTH_FAILURES" in error["message"]
            assert r.headers["Retry-After"] == "20"  # one try every 60 / 3 s
            r = await guesser.post("/admin/reload", headers=ADMIN)  # every route that takes a key
            assert r.status_code == 429
            assert (await other.get(path, headers={"X-API-Key": API_KEY})).status_code == 200
            assert await _wrong_then_right(other, path, 1) == [403]
            clock.now += 20
            assert (await guesser.get(path, headers={"X-API-Key": API_KEY})).status_code == 200
            assert await _wrong_then_right(guesser, path, 2) == [403, 429]  # one try regained
            text = (await other.get("/metrics")).text
        assert metric(text, "r2ec_auth_failures_total") == 5  # 403s: 3 + 1 + 1
        assert metric(text, "r2ec_rejected_total", reason="auth_throttled") == 3


@pytest.mark.asyncio
async def test_no_bound_on_failures_with_auth_failures_0(ckpt):
    async with serve(app_for(ckpt, auth_failures=0)) as client:
        statuses = {
            (await client.post("/admin/reload", headers={"X-API-Key": "x"})).status_code for _ in range(20)
        }
    assert statuses == {403}


def test_behind_a_trusted_proxy_the_forwarded_address_is_throttled_not_the_proxy(ckpt):
    """uvicorn takes X-Forwarded-For from a peer it trusts (FORWARDED_ALLOW_IPS, 127.0.0.1 by
    default): a guessing client behind the proxy is refused, the proxy's other clients are not."""
    app = app_for(ckpt, auth_failures=2)
    with uvicorn_serving(app) as url, httpx.Client(base_url=url, timeout=60) as http:

        def reload(key: str, forwarded_for: str) -> int:
            headers = {"X-API-Key": key, "X-Forwarded-For": forwarded_for}
            return http.post("/admin/reload", headers=headers).status_code

        assert [reload("wrong", "203.0.113.9") for _ in range(3)] == [403, 403, 429]
        assert reload("wrong", "203.0.113.10") == 403  # another client of the same proxy
