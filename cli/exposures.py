"""`r2ec exposures export`: the exposure log (r2ec:served, R2EC_EXPOSURE_LOG=redis) as a parquet
file to join with outcomes (docs/operations.md, "Attributing outcomes").

One row per served item, not one per request with list columns: a click is one (user, item,
request_id) row, so `clicks.merge(served, on=["user_id", "request_id", "item_id"])` (the user
too: the service does not make client request ids unique) gives each click the
rank, score and model version it was shown with, and a left merge the other way gives the
exposures a click-through rate is counted over (`groupby(["model_version", "rank"])`), with no
`explode` first and no list types for tools that read parquet without them. The request's
fields repeat on each of its rows (parquet's dictionary encoding keeps that small). An answer
with no items (every candidate excluded) is one row with `item_id`, `rank` and `score` null, so
requests still count: `served.request_id.nunique()`.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import fail, os_error

app = typer.Typer(
    help="The exposure log: what the service served (R2EC_EXPOSURE_LOG=redis).", no_args_is_help=True
)

RedisUrl = Annotated[
    str, typer.Option(envvar="R2EC_REDIS_URL", help="The service's Redis (redis://host:port/db)")
]
WHEN_HELP = (
    "an ISO 8601 date or time (UTC where it names no zone: 2026-12-01, 20261201, 2026-12-01T08:00), "
    "Unix seconds (10 digits: 1796000000), Unix milliseconds (13 digits: 1796000000000), or a time "
    "back from now: 30m, 24h, 7d"
)
_AGO = re.compile(r"(\d+)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_when(text: str, now_ms: int | None = None) -> int:
    """Unix ms of `text` (WHEN_HELP); ValueError for anything else.

    A bare number is told by its digits, not guessed: 10 are Unix seconds (2001-09-09 to 2286,
    the unit of every event timestamp in this API), 13 are Unix ms (the same years), 8 an ISO
    basic date (YYYYMMDD, tried as ISO first). Any other count is refused, since it could be
    either (1796000000 read as ms is 1970-01-21, and the whole log would be exported). A time
    before 1970 is refused: the log's entries are stream ids, Unix ms from 0."""
    text = text.strip()
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if m := _AGO.fullmatch(text):
        ms = now_ms - int(m.group(1)) * _UNIT_S[m.group(2)] * 1000
    elif text.isascii() and text.isdigit() and len(text) != 8:
        if len(text) == 10:
            ms = int(text) * 1000
        elif len(text) == 13:
            ms = int(text)
        else:
            raise ValueError(
                f"{text!r} is ambiguous: give Unix seconds as 10 digits, Unix ms as 13, or an ISO "
                "date or time (2026-12-01)"
            )
    else:
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a time: give {WHEN_HELP}") from None
        ms = int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp() * 1000)
    if ms < 0:
        raise ValueError(f"{text!r} is before 1970-01-01, where the exposure log begins")
    return ms


def _schema():  # noqa: ANN202 (pyarrow, imported lazily)
    import pyarrow as pa

    return pa.schema(
        [
            ("request_id", pa.string()),  # the X-Request-ID: what a click's request_id names
            ("item_id", pa.string()),
            ("rank", pa.int32()),
            ("score", pa.float64()),
            ("user_id", pa.string()),  # null for an inline history sent without one
            ("served_at", pa.timestamp("ms", tz="UTC")),
            ("model_version", pa.string()),
            ("fingerprint", pa.string()),  # the model beyond its version (empty: written before it)
            ("variant", pa.string()),  # the replica's R2EC_VARIANT, null for none
            ("route", pa.string()),
            ("k", pa.int32()),
            ("reasoning", pa.bool_()),
            ("reasoning_sha256", pa.string()),  # null without reasoning
            ("cache", pa.string()),
            ("history_source", pa.string()),
            ("entry_id", pa.string()),  # the stream entry's id
        ]
    )


def _columns(page: list[Any]) -> dict[str, list]:
    """One row per served item (module docstring) of a page of `Served` entries."""
    cols: dict[str, list] = {name: [] for name in _schema().names}
    for s in page:
        served = list(zip(s.items, s.ranks, s.scores, strict=False)) or [(None, None, None)]
        for item, rank, score in served:
            cols["request_id"].append(s.request_id)
            cols["item_id"].append(item)
            cols["rank"].append(rank)
            cols["score"].append(score)
            cols["user_id"].append(s.user_id or None)
            cols["served_at"].append(s.at_ms)
            cols["model_version"].append(s.model_version)
            cols["fingerprint"].append(s.fingerprint or None)
            cols["variant"].append(s.variant or None)
            cols["route"].append(s.route)
            cols["k"].append(s.k)
            cols["reasoning"].append(s.reasoning)
            cols["reasoning_sha256"].append(s.reasoning_sha256 or None)
            cols["cache"].append(s.cache)
            cols["history_source"].append(s.history_source)
            cols["entry_id"].append(s.id)
    return cols


@app.command("export")
def export(
    out: Annotated[Path, typer.Option("--out", help="The parquet file to write (replaced whole at the end)")],
    since: Annotated[
        str | None, typer.Option(help=f"Entries written at or after then (inclusive): {WHEN_HELP}")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help=f"Entries written before then (exclusive): {WHEN_HELP}")
    ] = None,
    redis_url: RedisUrl = "",
    page_size: Annotated[int, typer.Option(min=1, max=100_000, help="Entries read a round trip")] = 10_000,
) -> None:
    """Write the exposure log r2ec:served to parquet, one row per served item (request_id,
    item_id, rank, score, user_id, served_at, model_version, ...), to join with clicks posted
    with a `request_id`: docs/operations.md, "Attributing outcomes". The window is half-open,
    [--since, --until), by the entries' stream ids (Redis's ms): exports of adjacent windows
    (--since A --until B, then --since B) hold each entry once. Reads the stream in pages,
    oldest first, saying on stderr how far it got."""
    from model.data.dataset import atomic_write
    from service.store import SERVED_STREAM, StoreUnavailable, read_served

    if not redis_url:
        fail("--redis-url (R2EC_REDIS_URL) is needed: the exposure log is the stream r2ec:served in Redis")
    from service.redis_conn import RedisUrlError, parse

    try:
        parse(redis_url)
    except RedisUrlError as exc:
        fail(str(exc))
    now_ms = int(time.time() * 1000)  # one "now" for both ends
    times: dict[str, int | None] = {}
    for option, text in (("--since", since), ("--until", until)):
        try:
            times[option] = None if text is None else parse_when(text, now_ms)
        except ValueError as exc:
            fail(f"{option}: {exc}")
    since_ms, until_ms = times["--since"], times["--until"]
    if since_ms is not None and until_ms is not None and until_ms < since_ms:
        fail(f"--until ({until}) is before --since ({since})")

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema().with_metadata(
        {
            "r2ec": json.dumps(
                {
                    "stream": SERVED_STREAM,
                    "since_ms": since_ms,
                    "until_ms": until_ms,  # exclusive: [since_ms, until_ms)
                    "exported_at": _iso(None),
                }
            )
        }
    )
    counts = {"entries": 0, "rows": 0}
    requests: set[str] = set()
    users: set[str] = set()
    versions: set[str] = set()

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, schema) as writer:
            for page in read_served(redis_url, since_ms, until_ms, page_size=page_size):
                table = pa.Table.from_pydict(_columns(page), schema=schema)
                writer.write_table(table)
                counts["entries"] += len(page)
                counts["rows"] += table.num_rows
                requests.update(s.request_id for s in page)
                users.update(s.user_id for s in page if s.user_id)
                versions.update(s.model_version for s in page)
                typer.echo(
                    f"read {counts['entries']:,} entries, {counts['rows']:,} rows "
                    f"(through {_iso(page[-1].at_ms)})",
                    err=True,
                )

    try:
        atomic_write(out, write)
    except StoreUnavailable as exc:
        fail(str(exc))
    except OSError as exc:
        fail(os_error(exc, out.parent))
    if not counts["entries"]:
        typer.echo(f"no exposure-log entries in that range; wrote an empty {out}")
        return
    typer.echo(
        f"wrote {counts['rows']:,} rows to {out}: {counts['entries']:,} answers to {len(requests):,} "
        f"request ids, {len(users):,} users, model versions {', '.join(sorted(versions))}"
    )


def _iso(ms: int | None) -> str:
    """Unix ms (None: now) in ISO 8601, UTC, to the second."""
    at = datetime.now(UTC) if ms is None else datetime.fromtimestamp(ms / 1000, UTC)
    return at.isoformat(timespec="seconds")
