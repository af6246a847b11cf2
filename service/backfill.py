"""Backfilling users' histories from a file (`r2ec user import`; docs/operations.md, "Backfilling
history").

A warehouse export of interactions (CSV, TSV or RecBole's .inter, parquet) is read whole,
checked against the rules `POST /users/{id}/events` applies (service/schemas.py: ids, ratings,
timestamps, each distinct value validated by the route's own models) and written through the
service's own store code: `RedisStore.append_many`, the events route's Lua append
(service/store.py APPEND_SCRIPT) sent as one pipeline per `batch_events`. So time order, the
history window, the seen set, idempotency, default event ids and retention are the service's,
and an import run again, whole or after an interruption, stores nothing twice within the dedup
window (after it, an event older than the history window counts as new again, and is streamed
again with `stream=True`: docs/operations.md, "Backfilling history"). Each user's
events go in time order (ties in the file's order), at most MAX_EVENTS a call, as the route
takes them; the whole file is checked before anything is written.

What it adds to the route: events of items the catalog lacks are refused one by one (the route
refuses the request), users whose last event is older than `skip_before` are left out (retention
would only keep them R2EC_USER_TTL_S after the import, docs/operations.md "Retention"), and the
stream retraining reads is left out unless asked for (`stream`): a backfill usually holds what
retraining's seed dataset holds already.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import TypeAdapter, ValidationError

from service import schemas
from service.store import Event, RedisStore, stamped

COLUMNS = ("user_id", "item_id", "rating", "timestamp", "event_id")
REQUIRED = ("user_id", "item_id")
# a file's kind by its name's suffix (before a compression suffix pandas reads through)
TEXT_SEPARATORS = {".csv": ",", ".tsv": "\t", ".inter": "\t"}
PARQUET = (".parquet", ".pq")
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")
BATCH_EVENTS = 10_000  # events per pipeline round trip (BENCHMARKS.md §4)
EXAMPLES = 5  # unknown item ids a summary names


class BackfillError(ValueError):
    """A file that cannot be imported: unreadable, a column missing, a value the service would
    refuse (the message names the file, the line and the column)."""


@dataclass(frozen=True)
class Interactions:
    """A file's events, checked: one array per column, in the file's order. `rating` NaN: none;
    `timestamp` None where the file has no timestamp column (each stamped at the import)."""

    origin: str
    user_id: np.ndarray  # str
    item_id: np.ndarray  # str
    rating: np.ndarray  # float64
    timestamp: np.ndarray | None  # int64
    event_id: np.ndarray  # str, or None: `event_key` of the event
    ignored: tuple[str, ...] = ()  # the file's columns not read

    def __len__(self) -> int:
        return len(self.user_id)


@dataclass
class Summary:
    """What an import did (`r2ec user import` prints it)."""

    rows: int = 0
    users: int = 0  # users written to (at least one event sent)
    users_skipped: int = 0  # last event older than `skip_before`
    new: int = 0
    duplicates: int = 0  # an event id the user had: stored already (a rerun), or twice in the file
    refused: int = 0  # items the catalog lacks
    skipped: int = 0  # the events of skipped users
    unknown_items: list[str] = field(default_factory=list)  # the first EXAMPLES refused ids
    stream: bool = False
    seconds: float = 0.0

    @property
    def events_per_s(self) -> float:
        return (self.new + self.duplicates) / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "users": self.users,
            "users_skipped": self.users_skipped,
            "events_new": self.new,
            "events_duplicate": self.duplicates,
            "events_refused": self.refused,
            "events_skipped": self.skipped,
            "unknown_items": self.unknown_items,
            "stream": self.stream,
            "seconds": round(self.seconds, 3),
            "events_per_s": round(self.events_per_s, 1),
        }


# ------------------------------------------------------------------------------- reading
def read_interactions(path: Path | str) -> Interactions:
    """The file's events, checked as the events route checks them (`check`); BackfillError for
    anything it would refuse, naming the line (a text file's, the header being line 1) or the
    row (a parquet file's, from 1)."""
    path = Path(path)
    if not path.is_file():
        raise BackfillError(f"{path}: no such file")
    name = path.name.lower()
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    kind = Path(name).suffix
    try:
        if kind in PARQUET:
            frame, text = pd.read_parquet(path), False
        elif kind in TEXT_SEPARATORS:
            frame = pd.read_csv(
                path, sep=TEXT_SEPARATORS[kind], dtype=str, keep_default_na=False, na_filter=False
            )
            text = True
        else:
            raise BackfillError(
                f"{path}: unknown file kind {kind or '(no suffix)'!r}: give a .csv, .tsv, .inter or "
                ".parquet file (.gz and the like for text)"
            )
    except BackfillError:
        raise
    except (OSError, ValueError, UnicodeError) as exc:  # pandas' and pyarrow's errors are ValueErrors
        raise BackfillError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc
    return check(frame, str(path), text=text)


def _names(frame: pd.DataFrame, origin: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """Column -> the name it stands for, as `r2ec data prepare` reads a header: the name before a
    ':' (RecBole's `user_id:token`), surrounding space trimmed; and the columns left unread."""
    names: dict[str, str] = {}
    ignored = []
    for column in frame.columns:
        name = str(column).strip().partition(":")[0]
        if name in names.values():
            raise BackfillError(f"{origin}: column {name!r} is given twice")
        if name in COLUMNS:
            names[column] = name
        else:
            ignored.append(str(column))
    missing = [c for c in REQUIRED if c not in names.values()]
    if missing:
        found = [str(c) for c in frame.columns]
        raise BackfillError(
            f"{origin}: no {' or '.join(missing)} column; found {found} (columns: user_id, item_id, "
            "and optionally rating, timestamp, event_id; a RecBole header's 'user_id:token' is read "
            "as user_id)"
        )
    return names, tuple(ignored)


def check(frame: pd.DataFrame, origin: str, *, text: bool = True) -> Interactions:
    """`frame`'s events as `Interactions`, every value checked as the events route checks it:
    ids as the route's (surrounding space trimmed first, as `r2ec data prepare` trims ids),
    ratings finite within the scale, timestamps whole Unix seconds in range and not more than
    a day ahead (service/schemas.py). Each distinct value goes through the route's own models
    once; BackfillError names the first bad one, its line or row, and how many rows have it."""
    names, ignored = _names(frame, origin)
    frame = frame.rename(columns=names)[[c for c in COLUMNS if c in names.values()]]
    if frame.empty:
        raise BackfillError(f"{origin}: no events")

    def where(i: int) -> str:
        return f"line {i + 2}" if text else f"row {i + 1}"

    def refuse(column: str, bad: np.ndarray, why: str) -> BackfillError:
        """The error for the rows `bad` of `column`, showing the first one's value as read."""
        i = int(np.flatnonzero(bad)[0])
        value = frame[column].iloc[i]
        value = value.item() if isinstance(value, np.generic) else value
        return BackfillError(
            f"{origin}: {where(i)}: {column} {value!r} {why}; {int(bad.sum())} such row(s): "
            "nothing was written"
        )

    ids = {c: _ids(frame[c], c, origin, refuse) for c in ("user_id", "item_id")}
    event_id = (
        _ids(frame["event_id"], "event_id", origin, refuse, optional=True) if "event_id" in frame else None
    )
    rating = _numbers(frame["rating"], "rating", refuse, text) if "rating" in frame else None
    stamps = _numbers(frame["timestamp"], "timestamp", refuse, text) if "timestamp" in frame else None
    if stamps is not None and np.isnan(stamps).any():
        raise refuse("timestamp", np.isnan(stamps), "is empty")

    user_rule = TypeAdapter(schemas.PathId)  # POST /users/{user_id}/events: a path id
    _valid(ids["user_id"], "user_id", refuse, user_rule.validate_python)
    _valid(ids["item_id"], "item_id", refuse, lambda v: _event({"item_id": v}))
    if event_id is not None:
        given = np.array([v is not None for v in event_id], dtype=bool)
        _valid(event_id, "event_id", refuse, lambda v: _event({"event_id": v}), among=given)
    if rating is not None:
        given = ~np.isnan(rating)
        _valid(rating, "rating", refuse, lambda v: _event({"rating": float(v)}), among=given)
    if stamps is not None:
        _valid(stamps, "timestamp", refuse, lambda v: _event({"timestamp": float(v)}))
    n = len(frame)
    return Interactions(
        origin,
        ids["user_id"],
        ids["item_id"],
        np.full(n, np.nan) if rating is None else rating,
        None if stamps is None else stamps.astype(np.int64),
        np.full(n, None, dtype=object) if event_id is None else event_id,
        ignored,
    )


def _event(fields: dict[str, Any]) -> None:
    """Validate one value as a field of the events route's EventIn (the other fields valid)."""
    schemas.EventIn.model_validate({"item_id": "x", **fields})


def _valid(
    values: np.ndarray,
    column: str,
    refuse: Callable[..., BackfillError],
    validate: Callable[[Any], Any],
    among: np.ndarray | None = None,
) -> None:
    """Each distinct value of `values` (where `among`) through `validate` once; the first it
    refuses, as `refuse` says it."""
    considered = values if among is None else values[among]
    bad: dict[Any, str] = {}
    for value in pd.unique(considered):
        try:
            validate(value)
        except ValidationError as exc:
            bad[value] = exc.errors()[0]["msg"].removeprefix("Value error, ")
    if bad:
        mask = pd.Series(values).isin(list(bad)).to_numpy()
        if among is not None:
            mask = mask & among
        first = values[int(np.flatnonzero(mask)[0])]
        raise refuse(column, mask, bad[first])


def _ids(
    column: pd.Series, name: str, origin: str, refuse: Callable[..., BackfillError], optional: bool = False
) -> np.ndarray:
    """An id column as str (integers as their decimal digits, surrounding space trimmed); where
    `optional`, an empty value is None (no event_id: `event_key` of the event), else an error."""
    if pd.api.types.is_float_dtype(column.dtype):
        raise BackfillError(
            f"{origin}: {name} is a column of floats (an integer column with a missing value?): "
            "ids must be text or integers"
        )
    if pd.api.types.is_integer_dtype(column.dtype) and not column.isna().any():
        return column.astype(np.int64).astype(str).to_numpy(dtype=object)
    values = column.to_numpy(dtype=object)
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            out[i] = None
        elif isinstance(v, str):
            out[i] = v.strip()
        elif isinstance(v, int | np.integer) and not isinstance(v, bool):
            out[i] = str(int(v))
        else:
            raise BackfillError(f"{origin}: {name} {v!r} is no text or integer id")
    empty = np.array([v is None or v == "" for v in out], dtype=bool)
    if optional:
        out[empty] = None
    elif empty.any():
        raise refuse(name, empty, "is empty")
    return out


def _numbers(column: pd.Series, name: str, refuse: Callable[..., BackfillError], text: bool) -> np.ndarray:
    """A rating or timestamp column as float64, NaN where empty (a date-time column of a parquet
    file: its Unix seconds, UTC, the fraction dropped)."""
    if pd.api.types.is_datetime64_any_dtype(column.dtype):
        if getattr(column.dtype, "tz", None) is not None:
            column = column.dt.tz_convert("UTC").dt.tz_localize(None)
        seconds = (column - pd.Timestamp(0)) // pd.Timedelta(seconds=1)
        return seconds.to_numpy(dtype=np.float64, na_value=np.nan)
    if text or column.dtype == object or pd.api.types.is_string_dtype(column.dtype):
        raw = column.to_numpy(dtype=object)
        stripped = pd.Series(raw).map(lambda v: v.strip() if isinstance(v, str) else v)
        parsed = pd.to_numeric(stripped.replace("", np.nan), errors="coerce").to_numpy(dtype=np.float64)
        blank = stripped.map(lambda v: v is None or v == "" or (isinstance(v, str) and v.lower() == "nan"))
        bad = np.isnan(parsed) & ~blank.to_numpy(dtype=bool)
        if bad.any():
            raise refuse(name, bad, "is not a number")
        return parsed
    if not pd.api.types.is_numeric_dtype(column.dtype) or pd.api.types.is_bool_dtype(column.dtype):
        raise BackfillError(f"{name} is a column of {column.dtype}, not numbers")
    return column.to_numpy(dtype=np.float64, na_value=np.nan)


# ------------------------------------------------------------------------------- items
def catalog_items(checkpoint: Path | str) -> frozenset[str]:
    """The item ids the service serves from `checkpoint` (a checkpoint directory, or a versions
    root its CURRENT names): the checkpoint's items with the item edits saved for it (added,
    removed), as the service's catalog opens them (service/catalog.py). CheckpointError where it
    is no readable checkpoint."""
    from model.checkpoint_meta import ITEMS_FILE, reading, resolve_checkpoint, saved_item_edits

    path = resolve_checkpoint(checkpoint)
    with reading(path / ITEMS_FILE, path):
        items = {str(i) for i in pd.read_parquet(path / ITEMS_FILE, columns=["item_id"])["item_id"]}
    for item_id, record in saved_item_edits(path)["catalog_edits"].items():
        if record is None:
            items.discard(item_id)
        else:
            items.add(item_id)
    return frozenset(items)


# ------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class Plan:
    """Which rows an import writes, in the order it writes them (by user, then time, ties in
    the file's order), and what it leaves out."""

    order: np.ndarray  # row indices written
    users: int
    users_skipped: int
    refused: int
    skipped: int
    unknown_items: list[str]


def plan(rows: Interactions, items: Collection[str] | None, now: int, skip_before: int | None = None) -> Plan:
    """Rows of items not in `items` (None: every item) are refused; users whose last event
    (`now` for one without a timestamp) is before `skip_before` are skipped whole."""
    n = len(rows)
    refused = np.zeros(n, dtype=bool)
    unknown: list[str] = []
    if items is not None:
        refused = ~pd.Series(rows.item_id).isin(items).to_numpy()
        unknown = [str(i) for i in pd.unique(rows.item_id[refused])[:EXAMPLES]]
    stamps = np.full(n, now, dtype=np.int64) if rows.timestamp is None else rows.timestamp
    frame = pd.DataFrame({"user": rows.user_id, "t": stamps, "row": np.arange(n)})
    skipped = np.zeros(n, dtype=bool)
    if skip_before is not None:
        last = frame.groupby("user", sort=False)["t"].transform("max").to_numpy()
        skipped = last < skip_before
    kept = frame[~skipped & ~refused].sort_values(["user", "t", "row"], kind="stable")
    users_skipped = len(pd.unique(rows.user_id[skipped])) if skipped.any() else 0
    return Plan(
        kept["row"].to_numpy(),
        kept["user"].nunique(),
        users_skipped,
        int((refused & ~skipped).sum()),
        int(skipped.sum()),
        unknown,
    )


def _calls(rows: Interactions, order: np.ndarray, now: int) -> Iterator[tuple[str, list[Event]]]:
    """(user, events) per store call: a user's events in `order`, at most MAX_EVENTS a call,
    each stamped as the events route stamps it (`stamped`: id, else `event_key` of the event as
    sent; time, else `now`)."""
    users = rows.user_id[order]
    items = rows.item_id[order].tolist()
    ratings = [None if math.isnan(r) else r for r in rows.rating[order].tolist()]
    stamps = [None] * len(order) if rows.timestamp is None else rows.timestamp[order].tolist()
    ids = rows.event_id[order].tolist()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(order) else np.array([], int)
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        user = users[start]
        for a in range(start, end, schemas.MAX_EVENTS):
            b = min(a + schemas.MAX_EVENTS, end)
            yield (
                user,
                [stamped(user, Event(items[i], ratings[i], stamps[i], ids[i]), now) for i in range(a, b)],
            )


async def write(
    store: RedisStore,
    rows: Interactions,
    order: np.ndarray,
    *,
    now: int,
    stream: bool = False,
    batch_events: int = BATCH_EVENTS,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Write `rows[order]` through `store.append_many`, about `batch_events` events a round trip,
    one round trip in flight while the next is made ready; (new, duplicates). A failure
    (StoreUnavailable) leaves what was written: the same call again stores nothing twice."""
    new = duplicates = 0
    pending: asyncio.Task | None = None
    pending_size = 0

    async def settle() -> None:
        nonlocal new, duplicates, pending
        if pending is None:
            return
        for done in await pending:
            new += done.appended
            duplicates += len(done.new) - done.appended
        pending = None
        if progress is not None:
            progress(pending_size)

    batch: list[tuple[str, list[Event]]] = []
    size = 0
    for call in _calls(rows, order, now):
        batch.append(call)
        size += len(call[1])
        if size >= batch_events:
            await settle()
            pending, pending_size = asyncio.create_task(store.append_many(batch, stream=stream)), size
            await asyncio.sleep(0)  # sent: the next batch is made ready while Redis runs this one
            batch, size = [], 0
    await settle()
    if batch:
        pending, pending_size = asyncio.create_task(store.append_many(batch, stream=stream)), size
        await settle()
    return new, duplicates


def run_import(
    rows: Interactions,
    store: RedisStore,
    *,
    items: Collection[str] | None,
    stream: bool = False,
    skip_older_than_s: float | None = None,
    batch_events: int = BATCH_EVENTS,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> Summary:
    """Plan and write `rows` (`plan`, `write`) into `store`, closing it; the summary. `progress`:
    given the events to write, returns what to tell each round trip's count."""
    started = time.perf_counter()
    now = int(time.time())
    skip_before = None if skip_older_than_s is None else int(now - skip_older_than_s)
    p = plan(rows, items, now, skip_before)
    summary = Summary(
        rows=len(rows),
        users=p.users,
        users_skipped=p.users_skipped,
        refused=p.refused,
        skipped=p.skipped,
        unknown_items=p.unknown_items,
        stream=stream,
    )
    tell = progress(len(p.order), p.users) if progress is not None else None

    async def go() -> tuple[int, int]:
        try:
            return await write(
                store, rows, p.order, now=now, stream=stream, batch_events=batch_events, progress=tell
            )
        finally:
            await store.close()

    summary.new, summary.duplicates = asyncio.run(go())
    summary.seconds = time.perf_counter() - started
    return summary
