"""`r2ec user erase`: erase a user from the service's Redis (service/store.py `erase_user`), what
DELETE /users/{id} does, from a shell: for any id, one ending in /events or /history too (the
route's path cannot name those: it is that user's events or history), and without a running
service or its admin key. `r2ec user export`: everything kept of one user, as JSON (a data
subject's access request, GDPR Art. 15). `r2ec user import`: backfill users' histories from a
file through the events route's own append (service/backfill.py)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import fail, warn

app = typer.Typer(help="Users' data in the service's Redis.", no_args_is_help=True)

UserId = Annotated[str, typer.Argument(help="The user id, as the service stores it")]
RedisUrl = Annotated[
    str, typer.Option(envvar="R2EC_REDIS_URL", help="The service's Redis (redis://host:port/db)")
]


@app.command("erase")
def erase(
    user_id: UserId,
    redis_url: RedisUrl = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the receipt as one JSON object")] = False,
) -> None:
    """Erase a user: history, seen items, event ids, stream entries, exposure-log entries, the
    reasonings cached for their stored history; recorded in the ledger the next `r2ec retrain`
    honours. What this cannot remove: docs/operations.md, "Erasing a user"."""
    without = "store, erased by DELETE /users/{id} on each"
    erased = _on_redis(redis_url, user_id, without, lambda store: store.erase_user(user_id))
    receipt = {
        "user_id": erased.user_id,
        "erased_at": erased.erased_at,
        "history_events": erased.history_events,
        "seen_items": erased.seen_items,
        "stream_entries": erased.stream_entries,
        "cached_reasonings": erased.cached_reasonings,
        "served_entries": erased.served_entries,
    }
    if as_json:
        typer.echo(json.dumps(receipt))
        return
    typer.echo(f"erased {user_id!r} at {receipt['erased_at']}")
    typer.echo(
        f"  removed  {erased.history_events} history events, {erased.seen_items} seen items, "
        f"{erased.stream_entries} stream entries, {erased.cached_reasonings} cached reasonings, "
        f"{erased.served_entries} exposure-log entries"
    )
    typer.echo('  remains  see docs/operations.md, "Erasing a user" (model weights, AOF/RDB, backups, logs)')


@app.command("export")
def export(
    user_id: UserId,
    redis_url: RedisUrl = "",
    root: Annotated[
        Path | None,
        typer.Option(help="The versions root `r2ec retrain` publishes into: its events log's rows too"),
    ] = None,
) -> None:
    """Everything kept of one user, as one JSON object on stdout: the history window, every
    item they had an event for, their entries in the event stream and in the exposure log
    (what was recommended to them), the ledger's erasure of the id if any, and (--root) the
    events retraining consumed. Model weights hold no per-user record: docs/operations.md,
    "Where a user's data lives"."""
    data = _on_redis(redis_url, user_id, "store", lambda store: store.export_user(user_id))
    doc = {
        "user_id": user_id,
        "history": [_event(e) for e in data.history],
        "seen_items": data.seen,
        "stream_events": [
            {**_event(s.event), "request_id": s.event.request_id, "entry_id": s.id, "added_at": s.added_at}
            for s in data.stream
        ],
        "served": [_served(s) for s in data.served],
        "erased_at_ms": data.erased_at_ms,
    }
    if root is not None:
        doc["retrain_events"] = _retrain_events(root, user_id)
    typer.echo(json.dumps(doc, indent=2))


@app.command("import")
def import_cmd(
    file: Annotated[
        Path,
        typer.Argument(
            help="Interactions: .csv, .tsv or RecBole .inter (.gz too), or .parquet; columns user_id, "
            "item_id and optionally rating, timestamp (Unix seconds), event_id"
        ),
    ],
    redis_url: RedisUrl = "",
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="The checkpoint the service serves (default $R2EC_CHECKPOINT or checkpoints/current): "
            "events of items its catalog lacks are refused, as the service refuses them"
        ),
    ] = None,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream/--no-stream",
            help="Also add the events to the stream `r2ec retrain` reads. Off by default: a backfill "
            "usually holds what retraining's seed dataset holds already (docs/operations.md, "
            '"Backfilling history")',
        ),
    ] = False,
    skip_older_than: Annotated[
        float | None,
        typer.Option(
            "--skip-older-than",
            min=0,
            metavar="DAYS",
            help="Leave out users whose last event is older than this many days (R2EC_USER_TTL_S in "
            "days: retention would keep them that long after the import, not after their last event)",
        ),
    ] = None,
    batch_events: Annotated[
        int, typer.Option(min=1, help="Events per round trip to Redis (one pipeline of appends)")
    ] = 10_000,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object")] = False,
) -> None:
    """Backfill users' histories, seen items and event ids into the service's Redis from a file,
    through the service's own append: the same time order, history window, retention and event
    ids as POST /users/{id}/events, so a rerun (after an interruption, or whole) within
    R2EC_EVENT_DEDUP_TTL_S stores nothing twice (after it, events older than the history window
    count as new again: rerun without --stream). The file is held in memory (~650 bytes a row:
    split a large export by user). The history window, retention and dedup settings are the
    service's R2EC_* variables."""
    import time

    from pydantic import ValidationError
    from tqdm.auto import tqdm

    from model.checkpoint_meta import CheckpointError
    from service.backfill import BackfillError, catalog_items, read_interactions, run_import
    from service.config import Settings
    from service.redis_conn import redact
    from service.store import RedisStore, StoreUnavailable

    overrides = {"redis_url": redis_url or None, "checkpoint": checkpoint}
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        fail(f"bad setting: {exc}")
    if not settings.redis_url:
        fail("--redis-url (R2EC_REDIS_URL) is needed: the service's Redis, which the import writes to")
    started = time.perf_counter()
    try:
        items = catalog_items(settings.checkpoint)
    except CheckpointError as exc:
        fail(f"{exc} (--checkpoint: the one the service serves; its catalog says which items exist)")
    try:
        rows = read_interactions(file)
    except BackfillError as exc:
        fail(str(exc))
    if rows.ignored:
        warn(f"{file}: columns not read: {', '.join(rows.ignored)}")
    if rows.timestamp is None:
        warn(
            f"{file} has no timestamp column: each event is stamped with the import's time, as the "
            "service stamps an event sent without one, and a user's events keep the file's order"
        )
    read_s = time.perf_counter() - started
    store = RedisStore(
        settings.redis_url,
        window=settings.history_window,
        stream_maxlen=settings.stream_maxlen,
        timeout_s=30.0,  # a shell's patience: a pipeline of appends is many scripts
        dedup_ttl_s=settings.event_dedup_ttl_s,
        user_ttl_s=settings.user_ttl_s,
        dedup_max=settings.event_dedup_max,
    )
    bar = None

    def progress(events: int, users: int):
        nonlocal bar
        bar = tqdm(total=events, unit="event", desc=f"import {users} users", disable=None, file=sys.stderr)
        return bar.update

    skip_s = None if skip_older_than is None else skip_older_than * 86_400
    try:
        summary = run_import(
            rows,
            store,
            items=items,
            stream=stream,
            skip_older_than_s=skip_s,
            batch_events=batch_events,
            progress=progress,
        )
    except StoreUnavailable as exc:
        fail(f"{exc}; what was written stays, and the same command again writes the rest (nothing twice)")
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        typer.echo(json.dumps({**summary.as_dict(), "read_seconds": round(read_s, 3)}))
        return
    where = "the history, seen set and event ids" + (" and the stream r2ec:events" if stream else "")
    typer.echo(f"imported {file} into {redact(settings.redis_url)}: {where}")
    typer.echo(
        f"  users   {summary.users} written, {summary.users_skipped} skipped"
        + (f" (last event older than {skip_older_than:g} days)" if skip_older_than is not None else "")
    )
    typer.echo(
        f"  events  {summary.new} new, {summary.duplicates} duplicate (stored already), "
        f"{summary.refused} refused (item not in the catalog), {summary.skipped} skipped"
    )
    if summary.unknown_items:
        typer.echo(f"  refused items, e.g. {', '.join(map(repr, summary.unknown_items))}")
    typer.echo(
        f"  time    {read_s:.1f} s reading and checking {summary.rows} rows, {summary.seconds:.1f} s "
        f"writing: {summary.events_per_s:,.0f} events/s"
    )


def _event(e) -> dict:  # noqa: ANN001 (service.store.Event, imported lazily)
    rating = None if e.rating is None or e.rating != e.rating else e.rating  # NaN: none given
    return {"item_id": e.item_id, "rating": rating, "timestamp": e.timestamp, "event_id": e.event_id}


def _served(s) -> dict:  # noqa: ANN001 (service.store.Served, imported lazily)
    """An exposure-log entry: one recommendation the user was served."""
    return {
        "entry_id": s.id,
        "request_id": s.request_id,
        "at_ms": s.at_ms,
        "model_version": s.model_version,
        "fingerprint": s.fingerprint or None,
        "variant": s.variant or None,
        "route": s.route,
        "k": s.k,
        "reasoning": s.reasoning,
        "reasoning_sha256": s.reasoning_sha256 or None,
        "cache": s.cache,
        "history_source": s.history_source,
        "items": [
            {"item_id": i, "rank": r, "score": x} for i, r, x in zip(s.items, s.ranks, s.scores, strict=False)
        ],
    }


def _retrain_events(root: Path, user_id: str) -> list[dict]:
    """The user's rows of ROOT/retrain/events.parquet (model/retrain.py), [] without one."""
    from model.retrain import EVENTS_FILE, WORK_DIR

    path = root / WORK_DIR / EVENTS_FILE
    if not path.is_file():
        return []
    import pandas as pd

    try:
        rows = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        fail(f"{path}: unreadable ({exc})")
    mine = rows[rows["user_id"] == user_id]
    return [
        {
            "entry_id": r.event_id,
            "item_id": r.item_id,
            "rating": None if r.rating != r.rating else float(r.rating),
            "timestamp": int(r.timestamp),
        }
        for r in mine.itertuples()
    ]


def _on_redis(redis_url: str, user_id: str, without: str, op: Callable[[Any], Awaitable[Any]]) -> Any:
    """`op(store)` on the service's Redis (service/store.py RedisStore), with a shell's
    patience, for `user_id`: one error line for no URL, a bad id, a Redis that does not answer."""
    from service.schemas import check_id
    from service.store import RedisStore, StoreUnavailable

    if not redis_url:
        fail(f"--redis-url (R2EC_REDIS_URL) is needed: without Redis each replica keeps its own {without}")
    from service.redis_conn import RedisUrlError, parse

    try:
        parse(redis_url)
    except RedisUrlError as exc:
        fail(str(exc))
    try:
        check_id(user_id, allow_bidi=True)  # an id stored before bidi controls were refused
    except ValueError as exc:
        fail(f"user id {user_id!r} {exc}")

    async def run() -> Any:
        store = RedisStore(redis_url, timeout_s=10.0)  # a shell's patience, not a request's
        try:
            return await op(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except StoreUnavailable as exc:
        fail(str(exc))
