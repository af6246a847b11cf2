"""`r2ec exposures export` against a real redis-server: the exposure log r2ec:served as parquet,
one row per served item, read in pages."""

from __future__ import annotations

import asyncio
import time

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from cli.exposures import parse_when
from service.store import RedisStore, Served
from tests.service.conftest import RedisServer, free_port


@pytest.fixture
def redis_url():
    server = RedisServer()  # a throwaway redis-server on a free loopback port
    yield server.url
    server.stop()


def _entry(request_id: str, user_id: str, items: tuple[str, ...], version: str = "v1") -> Served:
    n = len(items)
    return Served(
        request_id=request_id,
        user_id=user_id,
        at_ms=int(time.time() * 1000),
        model_version=version,
        route="/recommend",
        k=3,
        reasoning=bool(n),
        reasoning_sha256="ab" * 32 if n else "",
        cache="miss" if n else "off",
        history_source="store" if user_id else "request",
        items=items,
        scores=tuple(10.0 - r for r in range(n)),
        ranks=tuple(range(1, n + 1)),
        fingerprint="0123456789abcdef",
        variant="candidate" if version == "v2" else "",
    )


def _write(url: str, entries: list[Served]) -> None:
    async def run() -> None:
        store = RedisStore(url)
        try:
            await store.add_served(entries, maxlen=1000)
        finally:
            await store.close()

    asyncio.run(run())


def _export(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, ["exposures", "export", *args], env=env)


@pytest.mark.redis
def test_export_writes_one_row_per_served_item_of_what_the_stream_holds(redis_url, tmp_path):
    entries = [
        _entry("r1", "u1", ("10", "20", "30")),
        _entry("r2", "", ("40",), version="v2"),
        _entry("r3", "u2", ()),  # every candidate excluded: no items
        _entry("r4", "u1", ("20", "50")),
        _entry("r5", "u3", ("60",)),
    ]
    _write(redis_url, entries)
    out = tmp_path / "served.parquet"
    result = _export("--redis-url", redis_url, "--out", str(out), "--page-size", "2")
    assert result.exit_code == 0, result.output
    # pages of 2: three progress lines on stderr, then the summary
    assert result.stderr.count("entries,") == 3 and "read 5 entries, 8 rows" in result.stderr
    assert "wrote 8 rows" in result.stdout and "4 users" not in result.stdout and "3 users" in result.stdout

    df = pd.read_parquet(out)
    assert len(df) == 3 + 1 + 1 + 2 + 1
    assert list(df.columns[:5]) == ["request_id", "item_id", "rank", "score", "user_id"]
    r1 = df[df.request_id == "r1"]
    assert list(r1.item_id) == ["10", "20", "30"] and list(r1["rank"]) == [1, 2, 3]
    assert list(r1.score) == [10.0, 9.0, 8.0] and set(r1.user_id) == {"u1"}
    assert set(r1.model_version) == {"v1"} and set(r1.route) == {"/recommend"} and set(r1.k) == {3}
    assert str(df.served_at.dt.tz) == "UTC"
    assert abs(df.served_at.iloc[0].timestamp() - time.time()) < 60
    r2 = df[df.request_id == "r2"].iloc[0]
    assert pd.isna(r2.user_id) and r2.history_source == "request" and r2.model_version == "v2"
    assert (r2.variant, r2.fingerprint) == ("candidate", "0123456789abcdef") and set(r1.variant.isna()) == {
        True
    }
    r3 = df[df.request_id == "r3"].iloc[0]  # kept as one row, so requests count
    assert pd.isna(r3.item_id) and pd.isna(r3["rank"]) and pd.isna(r3.reasoning_sha256)
    assert df.request_id.nunique() == 5

    # the join it is for: clicks that name their recommendation
    clicks = pd.DataFrame({"user_id": ["u1", "u3"], "item_id": ["20", "60"], "request_id": ["r4", "r5"]})
    joined = clicks.merge(df, on=["request_id", "item_id", "user_id"], how="left")
    assert list(joined["rank"]) == [1, 1] and list(joined.model_version) == ["v1", "v1"]


@pytest.mark.redis
def test_export_takes_a_time_range_and_writes_an_empty_file_for_none(redis_url, tmp_path):
    _write(redis_url, [_entry("r1", "u1", ("10",))])
    out = tmp_path / "served.parquet"
    result = _export("--out", str(out), "--since", "1h", env={"R2EC_REDIS_URL": redis_url})
    assert result.exit_code == 0 and list(pd.read_parquet(out).request_id) == ["r1"], result.output
    result = _export("--redis-url", redis_url, "--out", str(out), "--until", "2000-01-01")
    assert result.exit_code == 0 and "no exposure-log entries" in result.output
    assert len(pd.read_parquet(out)) == 0 and "item_id" in pd.read_parquet(out).columns


def test_export_refuses_clearly_without_redis_a_bad_time_or_a_down_redis(tmp_path):
    out = str(tmp_path / "x.parquet")
    result = _export("--out", out, env={"R2EC_REDIS_URL": ""})
    assert result.exit_code == 2 and "--redis-url (R2EC_REDIS_URL) is needed" in result.output
    result = _export("--out", out, "--redis-url", "redis://127.0.0.1:1/0", "--since", "yesterday")
    assert result.exit_code == 2 and "'yesterday' is not a time" in result.output
    result = _export("--out", out, "--redis-url", "redis://x/0", "--since", "1d", "--until", "2d")
    assert result.exit_code == 2 and "is before --since" in result.output
    result = _export("--out", out, "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert result.exit_code == 2 and "redis read_served failed" in result.output
    assert not (tmp_path / "x.parquet").exists()


def test_times_are_iso_unix_ms_or_back_from_now():
    now = 1_800_000_000_000
    assert parse_when("24h", now) == now - 86_400_000 and parse_when("30m", now) == now - 1_800_000
    assert parse_when("1700000000000", now) == 1_700_000_000_000
    assert parse_when("2026-12-01", now) == parse_when("2026-12-01T00:00:00+00:00", now)
    assert parse_when("2026-12-01T01:00+01:00", now) == parse_when("2026-12-01", now)


@pytest.mark.redis
def test_adjacent_windows_share_no_entry(redis_url, tmp_path):
    """[--since, --until): the entries of millisecond T are in the window that begins at T, not in
    the one that ends there, so exports of adjacent windows concatenate without a double."""
    import redis

    t = 1_796_000_000_000
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    for entry_id in (f"{t - 1}-0", f"{t}-0", f"{t}-1", f"{t + 1}-0"):
        fields = _entry(f"req-{entry_id}", "u1", ("i1",)).fields()
        raw.xadd("r2ec:served", fields, id=entry_id)
    a, b, c = (tmp_path / f"{n}.parquet" for n in "abc")
    assert _export("--redis-url", redis_url, "--out", str(a), "--until", str(t)).exit_code == 0
    assert _export("--redis-url", redis_url, "--out", str(b), "--since", str(t)).exit_code == 0
    before, after = set(pd.read_parquet(a).request_id), set(pd.read_parquet(b).request_id)
    assert before == {f"req-{t - 1}-0"} and after == {f"req-{t}-0", f"req-{t}-1", f"req-{t + 1}-0"}
    result = _export("--redis-url", redis_url, "--out", str(c), "--since", str(t), "--until", str(t + 1))
    assert result.exit_code == 0 and set(pd.read_parquet(c).request_id) == {f"req-{t}-0", f"req-{t}-1"}
    result = _export("--redis-url", redis_url, "--out", str(c), "--since", str(t), "--until", str(t))
    assert result.exit_code == 0 and "no exposure-log entries" in result.output


def test_bare_numbers_are_told_by_their_digits_and_a_time_before_1970_is_refused(tmp_path):
    now = 1_800_000_000_000
    assert parse_when("1796000000", now) == 1_796_000_000_000  # Unix seconds, as event timestamps
    assert parse_when("1796000000000", now) == 1_796_000_000_000  # Unix ms
    assert parse_when("20261201", now) == parse_when("2026-12-01", now)  # an ISO basic date
    for ambiguous in ("179600000", "17960000000", "179600000000", "0", "12345678"):
        with pytest.raises(ValueError):
            parse_when(ambiguous, now)
    for before_1970 in ("1969-12-01", "300000d", "19691231"):
        with pytest.raises(ValueError, match="before 1970"):
            parse_when(before_1970, now)
    # the CLI names the option, before it reaches Redis
    out = str(tmp_path / "x.parquet")
    result = _export("--out", out, "--redis-url", "redis://127.0.0.1:1/0", "--since", "1969-12-01")
    assert result.exit_code == 2 and "--since: '1969-12-01' is before 1970" in result.output
    result = _export("--out", out, "--redis-url", "redis://127.0.0.1:1/0", "--until", "17960000000")
    assert result.exit_code == 2 and "--until: '17960000000' is ambiguous" in result.output
