"""DELETE /users/{user_id}: erasing a user (GDPR Art. 17) through the API, with the in-process
store and a real Redis; what the store itself does is in tests/service/test_store.py, what
retraining does with the ledger in tests/model/test_retrain.py and tests/cli/test_retrain.py."""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from service.store import RedisStore, read_erasures
from tests.service.conftest import ADMIN, RedisServer, app_for, serve
from tests.service.test_app import H1, H2, H3, metric

pytestmark = pytest.mark.asyncio


async def test_erasing_a_user_removes_what_the_service_keeps_of_them(app, client):
    state = app.state.r2ec
    assert (await client.post("/users/u1/events", json={"events": H1})).status_code == 200
    assert (await client.post("/users/u2/events", json={"events": H2})).status_code == 200
    mine = await client.post("/recommend", json={"user_id": "u1", "k": 3})
    assert mine.json()["cache"] == "miss" and mine.json()["history_source"] == "store"
    # the same history sent inline: the entry u1's request wrote answers it, by content
    assert (await client.post("/recommend", json={"history": H1, "k": 3})).json()["cache"] == "hit"
    assert (await client.post("/recommend", json={"history": H3, "k": 3})).json()["cache"] == "miss"

    r = await client.delete("/users/u1", headers=ADMIN)
    assert r.status_code == 200, r.text
    receipt = r.json()
    assert {k: v for k, v in receipt.items() if k not in ("erased_at", "remains")} == {
        "user_id": "u1",
        "history_events": 3,
        "seen_items": 3,
        "stream_entries": 3,
        "cached_reasonings": 1,
        "served_entries": 0,  # the exposure log is off (tests/service/test_exposure.py has it on)
    }
    assert abs(datetime.fromisoformat(receipt["erased_at"]).timestamp() - time.time()) < 60
    assert receipt["remains"] == state.erasure_remains()

    assert (await client.get("/users/u1/history")).json()["history"] == []
    r = await client.post("/recommend", json={"user_id": "u1"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "empty_history"
    # u1's cached reasoning is gone: the same window now writes its own again
    assert (await client.post("/recommend", json={"history": H1, "k": 3})).json()["cache"] == "miss"
    # an inline history's entry is keyed by content, not by user: it stays (listed in `remains`)
    assert (await client.post("/recommend", json={"history": H3, "k": 3})).json()["cache"] == "hit"
    assert len((await client.get("/users/u2/history")).json()["history"]) == 2  # others keep theirs

    # a repeat, or a user nobody knows: nothing to remove, not an error
    for user in ("u1", "nobody"):
        r = await client.delete(f"/users/{user}", headers=ADMIN)
        assert r.status_code == 200 and r.json()["user_id"] == user
        assert [r.json()[k] for k in ("history_events", "stream_entries", "cached_reasonings")] == [0, 0, 0]
    # the id may be used again: what it posts now is kept
    r = await client.post("/users/u1/events", json={"events": H3})
    assert r.json()["appended"] == 1 and r.json()["history_length"] == 1
    assert [e.user_id for e in await state.store.read_events()] == ["u2", "u2", "u1"]
    if isinstance(state.store, RedisStore):  # the ledger retraining reads
        assert read_erasures(state.store.url).users == {"u1", "nobody"}


async def test_a_url_of_a_users_history_or_events_is_not_a_user_to_erase(client):
    """DELETE /users/u1/history is a 405 (the history has no DELETE), not the erasure of a user
    named "u1/history" while u1 stays; any other "/" is part of the id, as in every route."""
    await client.post("/users/u1/events", json={"events": H1})
    for tail, allow in (("history", "GET"), ("events", "POST")):
        r = await client.delete(f"/users/u1/{tail}", headers=ADMIN)
        assert r.status_code == 405 and r.headers["allow"] == allow, r.text
        r = await client.options(f"/users/u1/{tail}")
        assert r.status_code == 405 and r.headers["allow"] == allow
    assert len((await client.get("/users/u1/history")).json()["history"]) == 3
    await client.post("/users/a/b/events", json={"events": H1})
    r = await client.delete("/users/a%2Fb", headers=ADMIN)
    assert r.json()["user_id"] == "a/b" and r.json()["history_events"] == 3


async def test_a_refused_erasure_changes_nothing_and_a_bad_id_is_named(client):
    await client.post("/users/u1/events", json={"events": H1})
    assert (await client.delete("/users/u1")).status_code == 401
    assert (await client.delete("/users/u1", headers={"X-API-Key": "wrong"})).status_code == 403
    assert len((await client.get("/users/u1/history")).json()["history"]) == 3
    r = await client.delete("/users/%FF", headers=ADMIN)
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "user_id"
    r = await client.put("/users/u1", headers=ADMIN)
    assert r.status_code == 405 and r.headers["allow"] == "DELETE"


async def test_the_receipt_says_what_remains_as_the_service_is_configured(ckpt):
    async with serve(app_for(ckpt)) as client:  # in-process store, cache on
        remains = (await client.delete("/users/u1", headers=ADMIN)).json()["remains"]
    text = " ".join(remains)
    assert "this call erased this replica's only" in text and "AOF" not in text
    assert "Model versions already published" in text and "Backups" in text and "Log lines" in text
    assert "keyed by the history's content" in text and "in-process cache of 10000 entries" in text
    async with serve(app_for(ckpt, cache_size=0, speculative_tokens=0)) as client:
        text = " ".join((await client.delete("/users/u1", headers=ADMIN)).json()["remains"])
    assert "keyed by the history's content" not in text and "speculative-decoding drafts" not in text


@pytest.mark.redis  # redis_url starts a redis-server, or skips (fails under CI) without one
async def test_the_receipt_with_redis_names_the_aof_the_ttl_retraining_and_the_drafts(ckpt, redis_url):
    app = app_for(ckpt, redis_url=redis_url, cache_ttl_s=3600)
    async with serve(app) as client:
        remains = (await client.delete("/users/u1", headers=ADMIN)).json()["remains"]
        drafter = app.state.r2ec.engine.backend.drafter
    text = " ".join(remains)
    assert "BGREWRITEAOF" in text and "expire 3600 s after they were written" in text
    assert "ROOT/retrain/events.parquet" in text and "replica's only" not in text
    assert drafter is not None and f"the last {drafter.memory} reasoning texts" in text


@pytest.mark.redis
async def test_an_erasure_while_redis_is_down_is_a_503_and_counted(ckpt):
    server = RedisServer()  # its own, to stop
    try:
        async with serve(app_for(ckpt, redis_url=server.url)) as client:
            assert (await client.post("/users/u1/events", json={"events": H1})).status_code == 200
            server.stop()
            r = await client.delete("/users/u1", headers=ADMIN)
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
            assert r.headers["retry-after"] == "2"
            text = (await client.get("/metrics")).text
            assert metric(text, "r2ec_store_errors_total", op="erase_user") == 1
            assert metric(text, "r2ec_store_seconds_count", op="erase_user") == 1
    finally:
        server.stop()
