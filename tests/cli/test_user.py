"""`r2ec user erase` against a real redis-server: what DELETE /users/{id} does, for any id."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from typer.testing import CliRunner

from cli import app
from service.store import Event, RedisStore, read_erasures
from tests.service.conftest import RedisServer, free_port


def _cli(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, ["user", "erase", *args], env=env)


@pytest.fixture
def redis_url():
    server = RedisServer()  # a throwaway redis-server on a free loopback port
    yield server.url
    server.stop()


@pytest.mark.redis
def test_erase_removes_a_user_the_route_cannot_name(redis_url):
    """The user "a/history": in a path, the history of "a"; the command erases that user."""

    async def store_events(user_id: str):
        store = RedisStore(redis_url)
        try:
            await store.append_events(user_id, [Event("i1", 5.0, 100), Event("i2", 4.0, 200)])
        finally:
            await store.close()

    async def history(user_id: str):
        store = RedisStore(redis_url)
        try:
            return await store.get_history(user_id)
        finally:
            await store.close()

    asyncio.run(store_events("a/history"))
    asyncio.run(store_events("a"))
    result = _cli("a/history", "--redis-url", redis_url, "--json")
    assert result.exit_code == 0, result.output
    receipt = json.loads(result.stdout)
    assert receipt["user_id"] == "a/history" and receipt["erased_at"].endswith("+00:00")
    assert [receipt[k] for k in ("history_events", "seen_items", "stream_entries", "cached_reasonings")] == [
        2,
        2,
        2,
        0,
    ]
    assert asyncio.run(history("a/history")) == [] and len(asyncio.run(history("a"))) == 2
    assert read_erasures(redis_url).users == {"a/history"}
    # R2EC_REDIS_URL as the service reads it; a repeat removes nothing and says so
    result = _cli("a/history", env={"R2EC_REDIS_URL": redis_url})
    assert result.exit_code == 0 and "0 history events, 0 seen items, 0 stream entries" in result.output
    assert 'docs/operations.md, "Erasing a user"' in result.output


@pytest.mark.redis
def test_erase_reaches_an_id_stored_before_bidi_controls_were_refused(redis_url):
    """The API now refuses ids with bidirectional controls; a user stored with one before must
    still be erasable (and exportable) from a shell."""
    from service.schemas import check_id

    user = "u\u202eadmin"
    with pytest.raises(ValueError, match="bidirectional control"):
        check_id(user)

    async def store_events():
        store = RedisStore(redis_url)
        try:
            await store.append_events(user, [Event("i1", 5.0, 100)])
        finally:
            await store.close()

    asyncio.run(store_events())
    result = CliRunner().invoke(app, ["user", "export", user, "--redis-url", redis_url])
    assert result.exit_code == 0 and json.loads(result.stdout)["user_id"] == user, result.output
    result = _cli(user, "--redis-url", redis_url, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["history_events"] == 1, result.output
    result = _cli("u\u202e\x00", "--redis-url", redis_url)  # the rest of the rule still holds
    assert result.exit_code == 2 and "must not contain control characters" in result.output


def test_erase_refuses_clearly_without_redis_a_bad_id_or_a_down_redis():
    result = _cli("u1", env={"R2EC_REDIS_URL": ""})
    assert result.exit_code == 2 and "--redis-url (R2EC_REDIS_URL) is needed" in result.output
    result = _cli("u1\x00", "--redis-url", "redis://127.0.0.1:1/0")
    assert result.exit_code == 2 and "must not contain control characters" in result.output
    result = _cli("u1", "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert result.exit_code == 2 and "redis erase_user failed" in result.output


@pytest.mark.redis
def test_export_gives_everything_kept_of_one_user(redis_url, tmp_path):
    """A data subject's access request: the history window, every item (past the window too),
    every stream entry, the events log retraining consumed; nothing of another user."""
    import pandas as pd

    from model.retrain import EVENTS_FILE, WORK_DIR

    async def store_events():
        store = RedisStore(redis_url, window=2)
        try:
            events = [Event(f"i{n}", 4.0, 100 + n, event_id=f"e{n}") for n in range(3)]
            await store.append_events("alice@example.com", events)
            await store.append_events("bob", [Event("i9", None, 50)])
        finally:
            await store.close()

    asyncio.run(store_events())
    work = tmp_path / WORK_DIR
    work.mkdir()
    log = pd.DataFrame(
        {
            "event_id": ["1-0", "1-1"],
            "user_id": ["alice@example.com", "bob"],
            "item_id": ["i0", "i9"],
            "rating": [4.0, float("nan")],
            "timestamp": [100, 50],
            "key": ["e0", ""],
        }
    )
    log.to_parquet(work / EVENTS_FILE)
    args = ["user", "export", "alice@example.com", "--redis-url", redis_url, "--root", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["user_id"] == "alice@example.com" and doc["erased_at_ms"] is None
    assert [e["item_id"] for e in doc["history"]] == ["i1", "i2"]  # the window of 2
    assert doc["seen_items"] == ["i0", "i1", "i2"]  # past the window too
    assert [(e["item_id"], e["event_id"]) for e in doc["stream_events"]] == [
        ("i0", "e0"),
        ("i1", "e1"),
        ("i2", "e2"),
    ]
    assert all(e["entry_id"] and e["added_at"] > 0 for e in doc["stream_events"])
    assert doc["retrain_events"] == [{"entry_id": "1-0", "item_id": "i0", "rating": 4.0, "timestamp": 100}]
    # after an erasure: nothing but the ledger's record of it
    assert (
        CliRunner().invoke(app, ["user", "erase", "alice@example.com", "--redis-url", redis_url]).exit_code
        == 0
    )
    doc = json.loads(CliRunner().invoke(app, args[:5]).stdout)
    assert (doc["history"], doc["seen_items"], doc["stream_events"]) == ([], [], [])
    assert doc["erased_at_ms"] > 0


@pytest.mark.redis
def test_erase_and_export_cover_the_exposure_log(redis_url):
    """What the service served a user (r2ec:served, R2EC_EXPOSURE_LOG=redis) is theirs: exported
    with the rest, erased and counted with the rest; another user's entries stay."""
    from service.store import Served

    def entry(request_id: str, user_id: str) -> Served:
        at = int(time.time() * 1000)
        return Served(request_id, user_id, at, "v1", "/recommend", 2, True, "ab" * 32, "miss", "store",
                      ("i1", "i2"), (3.5, 2.5), (1, 2))  # fmt: skip

    async def fill():
        store = RedisStore(redis_url)
        try:
            await store.append_events("alice", [Event("i9", 5.0, 100, request_id="r1")])
            await store.add_served(
                [entry("r1", "alice"), entry("r2", "bob"), entry("r3", "alice")], maxlen=100
            )
        finally:
            await store.close()

    asyncio.run(fill())
    result = CliRunner().invoke(app, ["user", "export", "alice", "--redis-url", redis_url])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [s["request_id"] for s in doc["served"]] == ["r1", "r3"]
    first = doc["served"][0]
    assert first["items"] == [
        {"item_id": "i1", "rank": 1, "score": 3.5},
        {"item_id": "i2", "rank": 2, "score": 2.5},
    ]
    assert (first["model_version"], first["route"], first["cache"], first["k"]) == (
        "v1",
        "/recommend",
        "miss",
        2,
    )
    assert (first["fingerprint"], first["variant"]) == (None, None)  # written without them
    assert first["at_ms"] > 0 and first["entry_id"] and first["reasoning_sha256"] == "ab" * 32
    assert doc["stream_events"][0]["request_id"] == "r1"  # the click's attribution

    result = _cli("alice", "--redis-url", redis_url, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["served_entries"] == 2, result.output
    result = _cli("alice", "--redis-url", redis_url)
    assert "0 stream entries, 0 cached reasonings, 0 exposure-log entries" in result.output
    doc = json.loads(CliRunner().invoke(app, ["user", "export", "alice", "--redis-url", redis_url]).stdout)
    assert doc["served"] == [] and doc["stream_events"] == []
    bob = json.loads(CliRunner().invoke(app, ["user", "export", "bob", "--redis-url", redis_url]).stdout)
    assert [s["request_id"] for s in bob["served"]] == ["r2"]
