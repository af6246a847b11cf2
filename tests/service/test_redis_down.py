"""Redis goes away mid-test (its own redis-server, stopped): requests that carry their history
are still answered; those that need the store get a 503 that says so; /readyz reports it and
stays 200 ("degraded"), so a load balancer keeps the replicas that can still answer."""

from __future__ import annotations

import logging
import socket

import pytest

from service.store import StoreConfigError
from tests.service.conftest import ADMIN, RedisServer, app_for, needs_redis, serve
from tests.service.test_app import H1, H2, metric

pytestmark = [pytest.mark.asyncio, *needs_redis]


async def test_a_stopped_redis_degrades_to_inline_histories(ckpt):
    server = RedisServer()
    try:
        app = app_for(ckpt, redis_url=server.url)
        async with serve(app) as client:
            r = await client.post("/users/u1/events", json={"events": H1})
            assert r.status_code == 200, r.text
            assert (await client.post("/recommend", json={"user_id": "u1"})).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
            text = (await client.get("/metrics")).text
            assert metric(text, "r2ec_store_up") == 1
            assert metric(text, "r2ec_store_errors_total", op="get_seen") == 0  # exported from the start
            # each Redis operation's time, by operation: one append so far, no stream read
            assert metric(text, "r2ec_store_seconds_count", op="append_events") == 1
            assert metric(text, "r2ec_store_seconds_count", op="read_events") == 0
            histories = metric(text, "r2ec_store_seconds_count", op="get_history")
            assert histories >= 1

            server.stop()

            r = await client.post("/recommend", json={"history": H1, "k": 3})
            assert r.status_code == 200, r.text
            assert len(r.json()["items"]) == 3 and r.json()["reasoning"] is not None
            # the cache is skipped while Redis is down: a repeat is generated, not a 503
            r = await client.post("/recommend", json={"history": H1, "k": 3})
            assert r.status_code == 200 and r.json()["cache"] == "miss"

            for call in (
                client.post("/recommend", json={"user_id": "u1"}),
                client.get("/users/u1/history"),
                client.post("/users/u1/events", json={"events": H1}),
            ):
                r = await call
                assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
                assert r.json()["error"]["message"] == "history store unavailable"  # no URL in it

            # still ready (a load balancer keeps it: inline histories are answered), degraded
            ready = await client.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["status"] == "degraded" and ready.json()["store"] == "down"
            assert ready.json()["reasons"] == ["store unavailable: ConnectionError"]
            assert (await client.get("/healthz")).status_code == 200
            text = (await client.get("/metrics")).text
            assert metric(text, "r2ec_store_errors_total", op="get_history") == 2
            # failed operations are timed too (a slow Redis shows before its timeouts count)
            assert metric(text, "r2ec_store_seconds_count", op="get_history") == histories + 2
            assert metric(text, "r2ec_store_errors_total", op="append_events") == 1
            assert metric(text, "r2ec_store_errors_total", op="cache_get") == 1  # then skipped a while
            assert metric(text, "r2ec_store_errors_total", op="ping") == 1
            assert metric(text, "r2ec_store_up") == 0
    finally:
        server.stop()


async def test_the_cache_skip_ends_when_the_store_answers_again(ckpt, redis_url, monkeypatch):
    """After a failed cache lookup the cache is skipped (a down Redis is not asked twice per
    request), but only until Redis answers another operation: with a fixed 5 s window, a 5 s
    Redis stall sent 5 s more of cache hits to the model (SRE journey 39, finding 4). The window
    is made an hour here, so nothing below depends on time."""
    import redis

    from service import state as state_module

    monkeypatch.setattr(state_module, "CACHE_BACKOFF_S", 3600.0)
    app = app_for(ckpt, redis_url=redis_url)
    async with serve(app) as client:
        assert (await client.post("/users/u1/events", json={"events": H1})).status_code == 200
        mine, inline = {"user_id": "u1", "k": 3}, {"history": H2, "k": 3}
        assert (await client.post("/recommend", json=mine)).json()["cache"] == "miss"
        assert (await client.post("/recommend", json=inline)).json()["cache"] == "miss"
        store = app.state.r2ec.store
        get = store._redis.get

        async def stalled(*args, **kwargs):
            store._redis.get = get  # this lookup fails, the next ones reach Redis
            raise redis.TimeoutError("Timeout reading from socket")

        store._redis.get = stalled
        assert (await client.post("/recommend", json=inline)).json()["cache"] == "miss"  # failed
        # nothing asked of Redis since: still skipped
        assert (await client.post("/recommend", json=inline)).json()["cache"] == "miss"
        # the user's history is read (Redis answers), then the cache is asked again
        assert (await client.post("/recommend", json=mine)).json()["cache"] == "hit"
        assert (await client.post("/recommend", json=inline)).json()["cache"] == "hit"
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_store_errors_total", op="cache_get") == 1


def _require_password(server: RedisServer, password: str, was: str | None = None) -> None:
    """Set Redis's password; where it had one (`was`), also drop every client connected with it,
    so theirs must log in again."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
        login = b"" if was is None else f"AUTH {was}\r\n".encode()
        s.sendall(login + f"CONFIG SET requirepass {password}\r\nCLIENT KILL TYPE normal\r\n".encode())
        replies = b""
        while replies.count(b"\r\n") < (3 if was else 2):
            replies += s.recv(64)
        assert b"-" not in replies, replies


@pytest.mark.parametrize("then", ["stopped", "password_changed"])
async def test_a_password_in_the_query_reaches_no_client_and_no_log(ckpt, caplog, then):
    """redis-py also takes the password as `?password=`; it used to be copied whole into the
    open /readyz reasons, every 503 body and the WARNING line when Redis went away (or refused
    a wrong one). Clients now see no part of the URL (not its host, port or db either); the log
    has it with the password masked and the other parameters kept."""
    server = RedisServer()
    try:
        _require_password(server, "RIGHTPW")
        url = f"{server.url}?password=RIGHTPW&socket_keepalive=true"
        caplog.set_level(logging.WARNING, logger="service")
        async with serve(app_for(ckpt, redis_url=url)) as client:
            assert (await client.get("/readyz")).json()["store"] == "ok"
            if then == "stopped":
                server.stop()
            else:  # the password changed under the running service: it is refused at reconnecting
                _require_password(server, "NEWPW", was="RIGHTPW")
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["store"] == "down"
            cause = "ConnectionError" if then == "stopped" else "AuthenticationError"
            assert ready.json()["reasons"] == [f"store unavailable: {cause}"]
            r = await client.get("/users/u1/history")
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
            assert r.json()["error"]["message"] == "history store unavailable"
            for text in (ready.text, r.text):
                assert "RIGHTPW" not in text and str(server.port) not in text and "127.0.0.1" not in text
        warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
        logged = f"{server.url}?password=***&socket_keepalive=true"  # which Redis, and why
        assert any(logged in w for w in warnings), warnings
        assert "RIGHTPW" not in caplog.text
    finally:
        server.stop()


async def test_a_password_redis_refuses_stops_the_start_without_showing_it(ckpt, caplog):
    """A wrong password is no outage to wait out: the start stops with one line (what `r2ec
    serve` prints) naming R2EC_REDIS_URL, the password masked, rather than a replica that says
    ready and answers every user's request 503 (journey 41)."""
    server = RedisServer()
    try:
        _require_password(server, "RIGHTPW")
        app = app_for(ckpt, redis_url=f"{server.url}?password=WRONGPW&socket_keepalive=true")
        with pytest.raises(StoreConfigError):
            async with serve(app):
                pass
        assert app.state.startup_error == (
            f"Redis refuses the user or password of R2EC_REDIS_URL ({server.url}?password=***&"
            "socket_keepalive=true): invalid username-password pair or user is disabled."
        )
        assert "WRONGPW" not in caplog.text
    finally:
        server.stop()


async def test_a_full_redis_that_evicts_nothing_refuses_writes_with_a_503_and_keeps_reads(ckpt):
    """docker-compose.yml caps Redis (`--maxmemory`) with `--maxmemory-policy noeviction`: at
    the cap, nothing stored is dropped silently; a write is refused with the clear 503, reads go
    on, and the replica stays ready (Redis answers)."""
    server = RedisServer()
    try:
        async with serve(app_for(ckpt, redis_url=server.url)) as client:
            r = await client.post("/users/u1/events", json={"events": H1})
            assert r.status_code == 200, r.text
            with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
                s.sendall(b"CONFIG SET maxmemory-policy noeviction\r\nCONFIG SET maxmemory 1\r\n")
                assert s.recv(32).startswith(b"+OK")
            r = await client.post("/users/u2/events", json={"events": H1})
            assert r.status_code == 503 and r.json()["error"] == {
                "status": 503,
                "code": "store_unavailable",
                "message": "history store unavailable",
                "fields": [],
            }
            r = await client.get("/users/u2/history")  # refused whole: a retry stores each once
            assert r.status_code == 200 and r.json()["history"] == []
            r = await client.get("/users/u1/history")
            assert r.status_code == 200 and len(r.json()["history"]) == 3  # nothing evicted
            r = await client.post("/recommend", json={"user_id": "u1", "k": 3})
            assert r.status_code == 200, r.text  # its cache write is refused, and skipped
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
            r = await client.delete("/users/u1", headers=ADMIN)  # an erasure frees, and works
            assert r.status_code == 200 and r.json()["history_events"] == 3, r.text
    finally:
        server.stop()


async def test_a_cache_write_a_full_redis_refuses_is_not_retried_by_every_request(ckpt, monkeypatch):
    """A full Redis (noeviction, as docker-compose.yml runs it) answers reads and refuses the
    cache's writes: that is no outage for the next answered read to end, so the cache stays
    skipped for its window (an hour here) instead of every request trying the write again."""
    from service import state as state_module

    monkeypatch.setattr(state_module, "CACHE_BACKOFF_S", 3600.0)
    server = RedisServer()
    try:
        async with serve(app_for(ckpt, redis_url=server.url)) as client:
            assert (await client.post("/users/u1/events", json={"events": H1})).status_code == 200
            with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
                s.sendall(b"CONFIG SET maxmemory-policy noeviction\r\nCONFIG SET maxmemory 1\r\n")
                assert s.recv(32).startswith(b"+OK")
            for body in ({"history": H2, "k": 3}, {"user_id": "u1", "k": 3}, {"user_id": "u1", "k": 3}):
                r = await client.post("/recommend", json=body)
                assert r.status_code == 200 and r.json()["cache"] == "miss", r.text
            text = (await client.get("/metrics")).text
            assert metric(text, "r2ec_store_errors_total", op="cache_set") == 1  # the first only
            assert metric(text, "r2ec_store_up") == 1
    finally:
        server.stop()
