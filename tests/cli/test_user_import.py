"""`r2ec user import`: a backfill written through the events route's own append, against a real
redis-server (journey 40, #4 and #8)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pandas as pd
import pytest
import redis
from typer.testing import CliRunner

from cli import app
from service.store import Event, RedisStore, event_key, read_stream
from tests.service.conftest import RedisServer

pytestmark = pytest.mark.redis  # RedisServer() skips (or fails under CI) without a redis-server binary
WINDOW = 3


@pytest.fixture(scope="module")
def server():
    s = RedisServer()  # a throwaway redis-server on a free loopback port
    yield s
    s.stop()


@pytest.fixture
def url(server) -> str:
    server.flush()
    return server.url


def _import(url: str, root, *args: str, window: int = WINDOW, **env: str):
    env = {
        "R2EC_HISTORY_WINDOW": str(window),
        "R2EC_USER_TTL_S": "0",
        "R2EC_EVENT_DEDUP_TTL_S": "604800",
        **env,
    }
    return CliRunner().invoke(
        app, ["user", "import", *args, "--redis-url", url, "--checkpoint", str(root), "--json"], env=env
    )


def _summary(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _history(url: str, user_id: str, window: int = WINDOW) -> list[Event]:
    async def read():
        store = RedisStore(url, window=window)
        try:
            return await store.get_history(user_id)
        finally:
            await store.close()

    return asyncio.run(read())


ROWS = [  # user, item, rating, timestamp; u1 out of time order, one exact repeat
    ("u1", "i3", 3.0, 300),
    ("u1", "i1", 5.0, 100),
    ("u2", "i2", 4.0, 150),
    ("u1", "i4", 2.0, 400),
    ("u1", "i2", 1.0, 200),
    ("u2", "i6", 2.0, 250),
    ("u1", "i1", 5.0, 100),
]


def _csv(tmp_path, rows=ROWS, name="events.csv", columns=("user_id", "item_id", "rating", "timestamp")):
    path = tmp_path / name
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


def test_an_import_writes_histories_seen_sets_and_ids_as_the_route_would_and_a_rerun_nothing(
    url, versions_root, tmp_path
):
    path = _csv(tmp_path)
    done = _summary(_import(url, versions_root, str(path)))
    assert (done["users"], done["events_new"], done["events_duplicate"]) == (2, 6, 1)
    assert (done["events_refused"], done["events_skipped"], done["stream"]) == (0, 0, False)
    u1 = _history(url, "u1")
    assert [(e.item_id, e.timestamp) for e in u1] == [("i2", 200), ("i3", 300), ("i4", 400)]  # window 3
    assert u1[0].event_id == event_key("u1", Event("i2", 1.0, 200))  # the route's default id
    raw = redis.Redis.from_url(url, decode_responses=True)
    assert raw.smembers("r2ec:seen:u1") == {"i1", "i2", "i3", "i4"}  # past the window too
    assert raw.zcard("r2ec:event-ids:u1") == 4 and raw.ttl("r2ec:event-ids:u1") > 0
    assert raw.exists("r2ec:events") == 0  # not streamed by default: retraining's seed holds it
    assert raw.ttl("r2ec:history:u1") == -1  # R2EC_USER_TTL_S=0: kept
    # run again: nothing stored twice, also once the dedup window has passed (the ids are gone)
    again = _summary(_import(url, versions_root, str(path)))
    assert (again["events_new"], again["events_duplicate"]) == (0, 7)
    for user in ("u1", "u2"):
        raw.delete(f"r2ec:event-ids:{user}")
    _summary(_import(url, versions_root, str(path)))
    assert [e.item_id for e in _history(url, "u1")] == ["i2", "i3", "i4"]
    assert [e.item_id for e in _history(url, "u2")] == ["i2", "i6"]


def test_an_import_matches_posting_each_event_through_the_store_in_the_files_order(
    url, versions_root, tmp_path
):
    """The same append: time order, ties in arrival order, the window, the stream's entries."""
    rng = random.Random(0)
    items = ["i1", "i2", "i3", "i4", "i5", "i6"]
    rows = [
        (f"u{rng.randrange(4)}", rng.choice(items), float(rng.randint(1, 5)), rng.randrange(5))
        for _ in range(80)
    ]
    _summary(_import(url, versions_root, str(_csv(tmp_path, rows)), "--stream", "--batch-events", "7"))
    imported = {u: _history(url, u) for u in ("u0", "u1", "u2", "u3")}
    stream, _ = read_stream(url)
    redis.Redis.from_url(url).flushall()

    async def post():
        store = RedisStore(url, window=WINDOW)
        try:
            for user, item, rating, ts in rows:
                await store.append_events(user, [Event(item, rating, ts)])
        finally:
            await store.close()

    asyncio.run(post())
    assert imported == {u: _history(url, u) for u in imported}
    posted, _ = read_stream(url)
    by_user = lambda entries: sorted((e.user_id, e.event_id) for e in entries)  # noqa: E731
    assert by_user(stream) == by_user(posted) and len(stream) == len({(r[0], r[1:]) for r in rows})


def test_stream_unknown_items_and_the_summary(url, versions_root, tmp_path):
    """--stream feeds retraining; an item the catalog lacks is refused one event at a time, as
    the service refuses it, and named."""
    rows = [*ROWS, ("u3", "nope", 1.0, 10), ("u3", "i5", None, 20), ("u1", "nope", 2.0, 30)]
    result = CliRunner().invoke(
        app,
        [
            "user",
            "import",
            str(_csv(tmp_path, rows)),
            "--redis-url",
            url,
            "--checkpoint",
            str(versions_root),
            "--stream",
        ],
        env={"R2EC_HISTORY_WINDOW": str(WINDOW)},
    )
    assert result.exit_code == 0, result.output
    assert "users   3 written, 0 skipped" in result.output
    assert "7 new, 1 duplicate (stored already), 2 refused (item not in the catalog)" in result.output
    assert "refused items, e.g. 'nope'" in result.output and "events/s" in result.output
    stream, _ = read_stream(url)
    assert (
        len(stream) == 7
        and {e.item_id for e in stream} >= {"i5"}
        and "nope" not in {e.item_id for e in stream}
    )
    assert [(e.item_id, e.rating) for e in _history(url, "u3")] == [("i5", None)]


def test_users_whose_last_event_is_older_than_the_retention_are_skipped(url, versions_root, tmp_path):
    now = int(time.time())
    rows = [
        ("gone", "i1", 4.0, now - 40 * 86_400),
        ("back", "i1", 4.0, now - 400 * 86_400),  # an old event, and a recent one
        ("back", "i2", 4.0, now - 86_400),
        ("here", "i3", 4.0, now - 3_600),
    ]
    done = _summary(_import(url, versions_root, str(_csv(tmp_path, rows)), "--skip-older-than", "30"))
    assert (done["users"], done["users_skipped"], done["events_new"], done["events_skipped"]) == (2, 1, 3, 1)
    assert _history(url, "gone") == [] and len(_history(url, "back")) == 2


def test_parquet_float_stamps_integer_ids_event_ids_and_a_recbole_header(url, versions_root, tmp_path):
    """A parquet export: integer ids, a float64 timestamp column (an int column with a gap
    elsewhere), given event ids; a RecBole .inter file's `name:type` header (r2ec data prepare's)."""
    frame = pd.DataFrame(
        {
            "user_id": [7, 7, 8],
            "item_id": ["i1", "i2", "i3"],
            "rating": [5.0, None, 3.0],
            "timestamp": [100.0, 200.0, 300.0],
            "event_id": ["wh-1", "wh-2", None],
        }
    )
    frame.to_parquet(tmp_path / "events.parquet")
    done = _summary(_import(url, versions_root, str(tmp_path / "events.parquet")))
    assert done["events_new"] == 3
    assert [(e.item_id, e.rating, e.timestamp, e.event_id) for e in _history(url, "7")] == [
        ("i1", 5.0, 100, "wh-1"),
        ("i2", None, 200, "wh-2"),
    ]
    assert _history(url, "8")[0].event_id == event_key("8", Event("i3", 3.0, 300))
    inter = tmp_path / "shop.inter"
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n8\ti4\t4\t400\n")
    assert _summary(_import(url, versions_root, str(inter)))["events_new"] == 1
    assert [e.item_id for e in _history(url, "8")] == ["i3", "i4"]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (("u1", "i1", 4.0, 100.5), "line 3: timestamp '100.5' must be whole Unix seconds"),
        (("u1", "i1", 11.0, 100), "line 3: rating '11.0' Input should be less than or equal to 10"),
        (("u1", "i1", 4.0, 1_700_000_000_000), "line 3: timestamp '1700000000000' Input should be less"),
        ((" u1\x00", "i1", 4.0, 100), "line 3: user_id ' u1\\x00' must not contain control characters"),
        (("u1", "", 4.0, 100), "line 3: item_id '' is empty"),
        (("u1", "i1", "five", 100), "line 3: rating 'five' is not a number"),
    ],
)
def test_a_value_the_service_would_refuse_stops_the_import_before_any_write(
    url, versions_root, tmp_path, row, expected
):
    result = _import(url, versions_root, str(_csv(tmp_path, [("u0", "i1", 4.0, 50), row])))
    assert result.exit_code == 2 and expected in result.output, result.output
    assert "1 such row(s): nothing was written" in result.output
    assert redis.Redis.from_url(url).dbsize() == 0


def test_refusals_without_redis_a_checkpoint_or_a_readable_file(url, versions_root, tmp_path):
    path = _csv(tmp_path)
    result = CliRunner().invoke(app, ["user", "import", str(path)], env={"R2EC_REDIS_URL": ""})
    assert result.exit_code == 2 and "--redis-url (R2EC_REDIS_URL) is needed" in result.output
    result = _import(url, tmp_path / "nowhere", str(path))
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "x.json").write_text("{}")
    result = _import(url, versions_root, str(tmp_path / "x.json"))
    assert result.exit_code == 2 and "unknown file kind '.json'" in result.output
    result = _import(url, versions_root, str(_csv(tmp_path, [("u", "i1")], columns=("user", "item_id"))))
    assert result.exit_code == 2 and "no user_id column; found ['user', 'item_id']" in result.output
