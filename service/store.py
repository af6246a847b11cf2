"""User histories, the event stream retraining reads, and the reasoning cache.

One interface, two stores, the same tests for both (tests/service/test_store.py):

- `RedisStore` (production). Key formats, all of them here:
    r2ec:history:{user_id}    a list of JSON events in event-time order, newest last, trimmed to
                              the window (see "Order" below)
    r2ec:events               a stream; one entry per event: user_id, item_id, rating, timestamp,
                              event_id, and request_id where the client named the recommendation
                              the event came from
    r2ec:served               a stream, the exposure log (R2EC_EXPOSURE_LOG=redis; `Served`): one
                              entry per answered recommendation, capped by R2EC_EXPOSURE_MAXLEN
                              and/or R2EC_EXPOSURE_RETENTION_S (SERVED_SCRIPT)
    r2ec:seen:{user_id}       a set: every item the user has an event for (never trimmed), what
                              /recommend excludes beyond the history window
    r2ec:event-ids:{user_id}  a sorted set: the user's event ids by arrival time (s), kept
                              `dedup_ttl_s`, so a retried event is not stored twice, and at most
                              `dedup_max` of them (the oldest dropped first, in the same script)
    r2ec:event-rate:{user_id} a string, the user's event-rate bucket (`EventRate`, POST
                              /users/{id}/events only): "<tokens> <when they were counted, ms>",
                              expiring once it would be full again
    r2ec:reasoning:{key}      a cached reasoning (JSON), expiring after `cache_ttl_s`
    r2ec:user-cache:{user_id} a sorted set: the cache keys written for requests that read the
                              user's stored history, by write time (s), trimmed to and expiring
                              after `cache_ttl_s`: what an erasure deletes of the cache
    r2ec:erasures             a sorted set, the erasure ledger: user_id -> cutoff of the user's
                              latest erasure, in the stream ids' milliseconds (see "Erasure")
    r2ec:events-erased-ids    a sorted set: the ids of the r2ec:events entries erasures have
                              deleted (XDEL, in the same step), scored by the id's milliseconds,
                              so retraining tells them from entries the stream's cap trimmed
                              before it read them (`read_stream_checked`); no user's data. Kept
                              from retraining's previous read on (each read trims it), or, where
                              no retraining has read for READER_TTL_S, from the stream's first
                              entry on (each erasure step trims it)
    r2ec:events-erased-from   the milliseconds below which r2ec:events-erased-ids was trimmed: a
                              read whose range starts before it cannot count exactly
    r2ec:events-epoch         when the append script created r2ec:events (Redis TIME, µs): a
                              stream lost and begun again (FLUSHALL, a restart without
                              persistence, a deleted key) has another, so retraining does not
                              count on from what it saw of the old one (`read_stream_checked`)
    r2ec:events-read          the milliseconds retraining's saved position starts at, written by
                              each read, expiring after READER_TTL_S: how far an erasure step may
                              trim r2ec:events-erased-ids while a retraining job reads the stream
    r2ec:schema               JSON: the format of these keys (STORE_FORMAT), the r2ec version that
                              wrote the marker and when, and whether the Redis held data then (a
                              release before 0.2.0's, which wrote no marker); written at the
                              service's start where absent, and a format newer than the code's is
                              refused (`check_format`)
    r2ec:probe                never written: the readiness probe deletes it (`RedisStore.ping`), a
                              write that a replica refuses and that changes nothing
- `MemoryStore` (the embedded default when no Redis URL is configured): the same in process;
  the stream is a list, the cache an LRU bounded by `cache_size`, event ids kept until restart.

Events are idempotent: each has an id (the client's `event_id`, else `event_key` of what it
sent), and an append stores only the events whose id the user does not have yet, in one atomic
step with the history, the stream and the seen set. A client that timed out and retries cannot
duplicate an event, even when its first attempt did land. "Has" is either list: the event ids
remembered for `dedup_ttl_s`, or the events of the stored history window, so a replay after the
dedup window (a backfill run again, a queue read again from its start) stores nothing twice in a
history either (an event that has left the window and the dedup window counts as new again).
Order: a history is kept in the order of the events' timestamps, as retraining orders them
(model/retrain.py sorts by user and time), not in the order they arrived. An event that comes
late (a backfill, a mobile client that was offline) takes its place among the older ones, equal
timestamps keep their arrival order, and the trim to the window drops the oldest by time, so a
late event older than a full window is left out of the history (still in the stream and the
seen set). An event without a timestamp (the API stamps each with its arrival time and refuses
one more than a day ahead, service/schemas.py; only a direct caller can leave it out) goes last,
and later events do not move back past it. The stream stays in arrival order: it is a log.
Releases before 0.2.0 kept histories in arrival order. Such a list is put in this order where it
is read (`_time_order`, for the reader only) and stored so at the user's next append (the
append script sorts it once, stably, before placing the new events, and writes it back whole):
no migration step, and a user who posts nothing is still served in time order.
Erasure (`erase_user`, GDPR Art. 17): the user's history, seen set, event ids, and the cached
reasonings written for requests that read their stored history go in one atomic step with the
ledger entry (ERASE_SCRIPT); then their entries in both streams (r2ec:events, r2ec:served) up
to the cutoff, found by a paged scan (the streams have no index by user). The cutoff is when the
erasure happened in the streams' own clock: every entry either stream held then has an id at or
before it, and the script moves each stream's last id to the end of that millisecond, so every
entry added later (the same id used again) is past it and kept. An exposure answered before the
erasure but written after it (a replica's write queue, service/exposure.py) is not written:
SERVED_SCRIPT drops an entry made before its user's erasure: one made from the stored history
where that history no longer holds every event the answer read (the reasoning cache's check,
below; no clock compared), one made from an inline history where the ledger's cutoff is at or
after its `at_ms` (the replica's clock against Redis's: off by their skew).
Retraining reads the ledger (`read_erasures`) to drop what it consumed before the erasure and
the user's share of its seed dataset (model/retrain.py). A cache entry is indexed under the
user whose stored history it was made from, in the same step as it is written, and not written
once that user has no history (erased while the request was answered).
Cached reasonings of requests that sent a history inline are keyed by content, not by user: they
cannot be found, and expire after `cache_ttl_s`. The in-process store has no ledger: no
retraining job reads its stream.
- `read_stream(url, cursor)`: retraining's synchronous view of the Redis stream, every entry
  after an opaque cursor. Entry ids and the cursor's syntax stay in this module.
  `read_stream_checked(url, cursor, mark)` reads the same and counts the entries the stream
  lost after the cursor before they were read (`MAXLEN ~` trims the oldest entries, read or
  not): from XINFO STREAM's `entries-added` (Redis 7), against the count the last read saw
  (its `mark`), less the entries read and those erasures deleted in that range
  (r2ec:events-erased-ids); a stream begun again is told by its epoch (r2ec:events-epoch).
- `read_erasures(url)`: retraining's view of the ledger, an `ErasureLedger`.
- `read_served(url, since, until)`: the exposure log in pages, for `r2ec exposures export`.

Every Redis failure surfaces as `StoreUnavailable`, so callers catch one type. At the service's
start (`RedisStore.check_format`), a Redis that answers but cannot serve as configured (a
password or certificate refused, an ACL, a cluster: docs/operations.md, "Managed Redis") is a
`StoreConfigError` instead, which stops the start. The URL's forms: service/redis_conn.py.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import math
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import redis
import redis.asyncio
from redis.exceptions import (
    AskError,
    ClusterCrossSlotError,
    ClusterDownError,
    MovedError,
    NoPermissionError,
    ReadOnlyError,
)

from service.buckets import TokenBuckets
from service.redis_conn import AsyncRedis, SyncRedis, redact

log = logging.getLogger(__name__)

HISTORY_KEY = "r2ec:history:{user_id}"
EVENTS_STREAM = "r2ec:events"
SERVED_STREAM = "r2ec:served"
STREAM_ERASED_IDS_KEY = "r2ec:events-erased-ids"
STREAM_ERASED_FROM_KEY = "r2ec:events-erased-from"
STREAM_READER_KEY = "r2ec:events-read"
STREAM_EPOCH_KEY = "r2ec:events-epoch"
READER_TTL_S = 30 * 86_400  # a retraining job that has not read for this long is gone
SEEN_KEY = "r2ec:seen:{user_id}"
EVENT_IDS_KEY = "r2ec:event-ids:{user_id}"
CACHE_KEY = "r2ec:reasoning:{key}"
USER_CACHE_KEY = "r2ec:user-cache:{user_id}"
ERASURES_KEY = "r2ec:erasures"
SCHEMA_KEY = "r2ec:schema"
# the format of the keys above, in SCHEMA_KEY: 1 since 0.2.0 (histories in time order, the erasure
# ledger and the per-user cache index). Raised by a change an older release could not read right.
STORE_FORMAT = 1
# never written: `RedisStore.ping` deletes it, a write every node but a read-only replica takes
# (and a full one: DEL frees), so a probe finds a URL that reaches a replica after a failover
PROBE_KEY = "r2ec:probe"
DEDUP_TTL_S = 7 * 86_400
# the most event ids a user's dedup set keeps (R2EC_EVENT_DEDUP_MAX): at least a whole request's
# (service/schemas.py MAX_EVENTS, 1000), so a retried request is always known whole
DEDUP_MAX = 10_000
EVENT_RATE_KEY = "r2ec:event-rate:{user_id}"
MEMORY_RATE_USERS = 100_000  # the in-process store's event-rate buckets kept (service/buckets.py)
ERASE_PAGE = 1_000  # stream entries per step of a scan for one user (USER_PAGE_SCRIPT)


class StoreFormatError(ValueError):
    """The store's data is in a format this code does not know (`RedisStore.check_format`)."""


class StoreConfigError(ValueError):
    """Redis answers, but not as this configuration needs, and waiting will not change that (a
    password or TLS certificate it refuses, a user its ACL does not allow the scripts, a Redis
    Cluster, a Sentinel named as a Redis): `RedisStore.check_format`
    raises it at the service's start, which stops there with its message."""


@dataclass(frozen=True)
class StoreFormat:
    """What SCHEMA_KEY says of a Redis (`RedisStore.check_format`)."""

    format: int
    written_by: str  # the r2ec version that wrote the marker
    since: int  # s: when it did, at the first start of r2ec 0.2.0 or later on this Redis
    # whether the Redis held data then: an older release's, whose cached reasonings are not
    # indexed by user, so an erasure cannot find them (they expire R2EC_CACHE_TTL_S after written)
    held_data: bool


class StoreUnavailable(RuntimeError):
    """The backing store could not be reached or answered with an error; `op` names the
    operation (get_history, append_events, get_seen, read_events, cache_get, cache_set,
    erase_user, export_user, add_served, ping; retraining's read_erasures; `r2ec exposures
    export`'s read_served)."""

    def __init__(self, message: str, op: str = "store") -> None:
        super().__init__(message)
        self.op = op


@dataclass(frozen=True)
class EventRate:
    """A per-user bound on event writes: a token bucket of `burst` events that refills at
    `per_s` events a second (R2EC_USER_EVENTS_BURST, R2EC_USER_EVENTS_PER_S). Every event of a
    request costs one, duplicates included (a duplicate costs the script its checks); a request
    the bucket cannot pay for whole is refused whole (`UserRateLimited`), costing nothing, so a
    client that waits the time it is told gets through and stores each event once."""

    per_s: float
    burst: int


class UserRateLimited(Exception):
    """An append refused by the user's `EventRate`: nothing stored; `retry_after_s` until the
    bucket holds the request's events (the service's 429 and its Retry-After)."""

    def __init__(self, events: int, rate: EventRate, retry_after_s: float) -> None:
        self.events = events
        self.rate = rate
        self.retry_after_s = retry_after_s
        super().__init__(
            f"too many events for this user: at most {rate.burst} at once, then {rate.per_s:g} a "
            f"second (R2EC_USER_EVENTS_BURST, R2EC_USER_EVENTS_PER_S); these {events} fit in "
            f"{math.ceil(retry_after_s)} s"
        )


@dataclass(frozen=True)
class Event:
    """One interaction: the user consumed/rated `item_id` at `timestamp` (seconds). `event_id`
    is its idempotency key when appending (None: `event_key` of the other fields); histories and
    the stream read it back (None only for events stored before histories kept it).
    `request_id`: the X-Request-ID of the recommendation the event came from, where the client
    named one (attribution: joined with the exposure log, r2ec:served). The stream keeps it;
    the history does not (the prompt never reads it), nor does retraining (model/retrain.py
    reads item, rating and time)."""

    item_id: str
    rating: float | None = None
    timestamp: int | None = None
    event_id: str | None = None
    request_id: str | None = None

    def to_json(self) -> str:
        """The history's form: without `request_id`."""
        d = {"item_id": self.item_id, "rating": self.rating, "timestamp": self.timestamp}
        return json.dumps(d if self.event_id is None else {**d, "event_id": self.event_id})

    @classmethod
    def from_json(cls, raw: str | bytes) -> Event:
        d = json.loads(raw)
        return cls(str(d["item_id"]), d.get("rating"), d.get("timestamp"), d.get("event_id"))

    def stream_fields(self, user_id: str, event_id: str) -> dict[str, str]:
        """The stream entry's fields; `request_id` only where the event has one (APPEND_SCRIPT
        writes it likewise), so an entry without it is as before."""
        fields = {
            "user_id": user_id,
            "item_id": self.item_id,
            "rating": "" if self.rating is None else repr(float(self.rating)),
            "timestamp": "" if self.timestamp is None else str(int(self.timestamp)),
            "event_id": event_id,
        }
        return fields if not self.request_id else {**fields, "request_id": self.request_id}

    @classmethod
    def from_stream_fields(cls, fields: dict[str, str]) -> Event:
        rating, ts = fields.get("rating", ""), fields.get("timestamp", "")
        event_id = fields.get("event_id") or None
        return cls(
            fields["item_id"],
            float(rating) if rating else None,
            int(ts) if ts else None,
            event_id,
            fields.get("request_id") or None,
        )


def event_key(user_id: str, event: Event) -> str:
    """The default id of an event: a hash of what the client sent (item, rating, timestamp; the
    user scopes it). A retry of the same event gets the same id, whenever it is sent; the same
    item rated the same way again without a timestamp counts once within the dedup window.

    Not `request_id`: it says where the event came from, not which event it is. A retry that
    names another recommendation, or none (a client that lost the id it attributed the first
    attempt to), is still the same interaction and must not be stored, and trained on, twice;
    the first attempt's attribution stands. Keeping it out also keeps every id derived before
    request_id existed: an event sent before an upgrade and retried after it is still known."""
    material = json.dumps([user_id, event.item_id, event.rating, event.timestamp])
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def stamped(user_id: str, event: Event, now: int) -> Event:
    """The event to store, as a client sent it (`POST /users/{id}/events`, `r2ec user import`):
    its id, the client's else `event_key` of the event as sent (so a retry without a timestamp
    gets the same id), its time, the client's else `now`, and its `request_id` as sent."""
    sent = Event(event.item_id, event.rating, event.timestamp)
    event_id = event.event_id or event_key(user_id, sent)  # without request_id: see `event_key`
    timestamp = now if event.timestamp is None else event.timestamp
    return Event(event.item_id, event.rating, timestamp, event_id, event.request_id)


@dataclass(frozen=True)
class Appended:
    """What one append did: the history's length after it, and per event sent (in order) its
    id and whether it was new (False: a duplicate of an id the user already had, not stored)."""

    history_length: int
    event_ids: tuple[str, ...]
    new: tuple[bool, ...]

    @property
    def appended(self) -> int:
        return sum(self.new)


@dataclass(frozen=True)
class StreamEntry:
    """An event as retraining reads it back from the stream.

    `id` orders entries and is unique; readers compare it, never parse it. The flat
    item_id / rating / timestamp views are what model/retrain.py's `Interaction` asks for.
    """

    id: str
    user_id: str
    event: Event
    added_at: int  # seconds: when the stream took the entry
    event_id: str = ""  # the event's idempotency key (empty for entries older than the key)

    @property
    def item_id(self) -> str:
        return self.event.item_id

    @property
    def rating(self) -> float | None:
        return self.event.rating

    @property
    def timestamp(self) -> int:
        """The event's own time, or when the stream took it if the event carried none."""
        return self.added_at if self.event.timestamp is None else int(self.event.timestamp)


@dataclass(frozen=True)
class Served:
    """One answered recommendation, as the exposure log keeps it (r2ec:served): what a
    click's `request_id` is joined with (docs/operations.md, "Attributing outcomes").

    The reasoning is kept as its sha256, not as text: a text is up to ~1 KB (256 tokens) where
    the hash is 64 characters, and it reads the user's history back (their highest-rated
    titles, the genres they like), a second copy of their profile outside the history's own
    retention. The hash still tells whether two answers reasoned alike, and matches the text a
    client logged. It is no anonymisation: the entry names the user and the items, and goes
    with the user's erasure."""

    request_id: str  # the X-Request-ID the service answered with
    user_id: str  # the request's user_id; "" for an inline history sent without one
    at_ms: int  # when the answer was decided, Unix ms (the replica's clock)
    model_version: str
    route: str  # "/recommend" or "/recommend/stream"
    k: int  # what the request asked for (`items` may be fewer)
    reasoning: bool  # whether the answer reasoned first
    reasoning_sha256: str  # of the reasoning text, UTF-8; "" without reasoning
    cache: str  # hit, miss or off
    history_source: str  # "store" or "request", as the reply says
    items: tuple[str, ...]  # the item ids, best first
    scores: tuple[float, ...]
    ranks: tuple[int, ...]
    # the answering model beyond its version (Recommender.fingerprint: weights, prompt config,
    # serving settings that change answers), and the replica's arm (R2EC_VARIANT; "" for none):
    # two arms under one version string are told apart by these
    fingerprint: str = ""
    variant: str = ""
    id: str = ""  # the stream entry's id, once read back
    # not written, for the erasure check only (SERVED_SCRIPT): the event ids of the stored history
    # the answer was made from (`Query.history` of a `stored_user`); None for an answer that read
    # no stored history (inline), checked by `at_ms`; an entry read back has None
    made_from: tuple[str, ...] | None = None

    def fields(self) -> dict[str, str]:
        """The stream entry's fields, `user_id` first (USER_PAGE_SCRIPT meets it first) and
        `at_ms` second (SERVED_SCRIPT reads both by place); the lists as JSON."""
        return {
            "user_id": self.user_id,
            "at_ms": str(int(self.at_ms)),
            "request_id": self.request_id,
            "model_version": self.model_version,
            "route": self.route,
            "k": str(int(self.k)),
            "reasoning": "1" if self.reasoning else "0",
            "reasoning_sha256": self.reasoning_sha256,
            "cache": self.cache,
            "history_source": self.history_source,
            "items": json.dumps(list(self.items), separators=(",", ":")),
            "scores": json.dumps([float(x) for x in self.scores], separators=(",", ":")),
            "ranks": json.dumps([int(x) for x in self.ranks], separators=(",", ":")),
            "fingerprint": self.fingerprint,
            "variant": self.variant,
        }

    @classmethod
    def from_fields(cls, entry_id: str, fields: Mapping[str, str]) -> Served:
        """An entry read back; a field an older writer left out reads as empty."""
        get = fields.get
        return cls(
            request_id=get("request_id", ""),
            user_id=get("user_id", ""),
            at_ms=int(get("at_ms") or entry_id.split("-")[0]),
            model_version=get("model_version", ""),
            route=get("route", ""),
            k=int(get("k") or 0),
            reasoning=get("reasoning") == "1",
            reasoning_sha256=get("reasoning_sha256", ""),
            cache=get("cache", ""),
            history_source=get("history_source", ""),
            items=tuple(str(i) for i in json.loads(get("items") or "[]")),
            scores=tuple(float(x) for x in json.loads(get("scores") or "[]")),
            ranks=tuple(int(x) for x in json.loads(get("ranks") or "[]")),
            fingerprint=get("fingerprint", ""),
            variant=get("variant", ""),
            id=entry_id,
        )


@dataclass(frozen=True)
class Erased:
    """What one erasure removed (`HistoryStore.erase_user`), and when (ms, the store's clock)."""

    user_id: str
    erased_at_ms: int
    history_events: int  # events of the history window
    seen_items: int  # items of the seen set
    stream_entries: int  # the user's entries in the event stream
    cached_reasonings: int  # cache entries written for requests that read the stored history
    served_entries: int = 0  # the user's entries in the exposure log (r2ec:served)

    @property
    def erased_at(self) -> str:
        """`erased_at_ms` in ISO 8601, UTC, to the millisecond."""
        return datetime.fromtimestamp(self.erased_at_ms / 1000, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class UserData:
    """What the store holds of one user (`export_user`: a data subject's access request)."""

    user_id: str
    history: list[Event]  # the history window, oldest first
    seen: list[str]  # every item the user had an event for, sorted
    stream: list[StreamEntry]  # the user's entries in the event stream, oldest first
    erased_at_ms: int | None  # the ledger's latest erasure of this id (Redis), else None
    served: list[Served] = field(default_factory=list)  # their exposure-log entries, oldest first


@dataclass(frozen=True)
class ErasureLedger:
    """The erasure ledger as retraining reads it (`read_erasures`; model/retrain.py's
    `Erasures`): each erased user and the cutoff of their latest erasure, in the milliseconds of
    the stream's ids. An entry the stream held when the user was erased has an id at or before
    the cutoff; one added after it (the user id used again), an id past it (module docstring,
    "Erasure")."""

    cutoffs: Mapping[str, int]

    @property
    def users(self) -> frozenset[str]:
        return frozenset(self.cutoffs)

    def covers(self, user_id: str, entry_id: str) -> bool:
        """Whether the user's erasure came after the stream entry `entry_id` of theirs."""
        cutoff = self.cutoffs.get(user_id)
        return cutoff is not None and int(entry_id.split("-")[0]) <= cutoff


class HistoryStore(Protocol):
    window: int
    up: bool  # how its latest operation went (r2ec_store_up): False from a failure to a success

    async def get_history(self, user_id: str) -> list[Event]:
        """The user's latest `window` events, oldest first (empty for an unknown user)."""

    async def append_events(
        self, user_id: str, events: Sequence[Event], *, stream: bool = True, rate: EventRate | None = None
    ) -> Appended:
        """Add the events whose id is new for the user to the history (placed by timestamp,
        trimmed to the window; module docstring, "Order"), the event stream and the seen set,
        atomically. `stream=False`: not to the stream (`r2ec user import --no-stream`, a
        backfill of history that retraining's seed dataset holds already); the route always
        streams. `rate`: the user's bound on event writes (the route's; a backfill has none):
        UserRateLimited, nothing stored, where the user's bucket cannot pay for `events`."""

    async def get_seen(self, user_id: str) -> frozenset[str]:
        """Every item the user has an event for (not only the history window)."""

    async def read_events(self, after: str = "0-0", count: int | None = None) -> list[StreamEntry]:
        """Stream entries with an id greater than `after`, oldest first."""

    async def cache_get(self, key: str) -> str | None: ...

    async def cache_set(
        self, key: str, value: str, user_id: str | None = None, made_from: Sequence[str] = ()
    ) -> None:
        """Cache a reasoning under `key`. `user_id`: the user whose stored history it was made
        from; the entry is indexed under them for `erase_user`, in the same step, and not
        written at all when they have no history any more (erased while it was made), or when
        one of `made_from`, the event ids of that history, is no longer in theirs (erased, and
        the id posted again meanwhile)."""

    async def export_user(self, user_id: str) -> UserData:
        """Everything the store holds of the user (`r2ec user export`)."""

    async def erase_user(self, user_id: str) -> Erased:
        """Remove the user's history, seen set, event ids, stream entries (and exposure-log
        entries, Redis) and the cache entries indexed under them, and record the erasure
        (module docstring, "Erasure"). An unknown user is no error: nothing is removed. Events
        the user posts afterwards are kept."""

    async def ping(self) -> None:
        """Return if the store is reachable; raise StoreUnavailable otherwise."""

    async def close(self) -> None: ...


def _appended(out: Sequence[int | str], ids: Sequence[str], rate: EventRate | None = None) -> Appended:
    """APPEND_SCRIPT's reply (1/0 per event, then the history's length) as an Appended; its
    refusal by the user's event rate ({-1, ms to wait}) as UserRateLimited."""
    if rate is not None and int(out[0]) == -1:
        raise UserRateLimited(len(ids), rate, int(out[1]) / 1000)
    return Appended(int(out[-1]), tuple(ids), tuple(bool(x) for x in out[:-1]))


def _check_events(user_id: str, events: Sequence[Event], rate: EventRate | None = None) -> list[str]:
    """The events' ids (their own, else `event_key`); ValueError for a non-finite rating, or for
    more events than `rate`'s bucket ever holds (the route refuses those with a 422 first)."""
    if rate is not None and len(events) > rate.burst:
        raise ValueError(f"{len(events)} events are more than the event rate's burst of {rate.burst}")
    for e in events:
        if e.rating is not None and not math.isfinite(e.rating):
            raise ValueError(f"rating of item {e.item_id!r} must be finite, got {e.rating}")
    return [e.event_id or event_key(user_id, e) for e in events]


def _place(history: Sequence[Event], timestamp: int | None) -> int:
    """Where an event at `timestamp` goes in a history kept in time order (module docstring,
    "Order"): after every event not later than it, found from the newest end, so an event in
    order costs one comparison. No timestamp: last. APPEND_SCRIPT does the same in Lua."""
    at = len(history)
    if timestamp is None:
        return at
    while at > 0 and history[at - 1].timestamp is not None and history[at - 1].timestamp > timestamp:
        at -= 1
    return at


def _in_order(history: Sequence[Event]) -> bool:
    """Whether a history is in the order `_place` keeps: each event no earlier than the one
    before it where both have a timestamp (one without may sit before earlier ones: later events
    do not move back past it)."""
    return all(
        a.timestamp is None or b.timestamp is None or a.timestamp <= b.timestamp
        for a, b in itertools.pairwise(history)
    )


def _time_order(history: list[Event]) -> list[Event]:
    """`history` in the order `_place` keeps (`history` itself where it is so already): a list a
    release before 0.2.0 stored in arrival order (module docstring, "Order"), sorted by timestamp,
    stably, as `_place` would have placed its events one by one: an event without a timestamp
    stays behind the events stored before it and ahead of those stored after it. APPEND_SCRIPT
    does the same in Lua."""
    if _in_order(history):
        return history
    keyed, run = [], 0
    for i, e in enumerate(history):
        keyed.append((run, math.inf if e.timestamp is None else e.timestamp, i))
        if e.timestamp is None:
            run += 1
    return [history[k[2]] for k in sorted(keyed)]


class MemoryStore:
    """In-process store: nothing survives a restart; one event loop uses it."""

    kind = "memory"
    up = True

    def __init__(
        self,
        window: int = 20,
        cache_size: int = 10_000,
        user_ttl_s: int = 0,
        clock: Callable[[], float] = time.monotonic,
        dedup_max: int = DEDUP_MAX,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.cache_size = cache_size
        self.user_ttl_s = user_ttl_s
        self.dedup_max = dedup_max
        self._clock = clock
        self._rates: dict[EventRate, TokenBuckets] = {}  # per rate, by user (`append_events`)
        self._last_append: dict[str, float] = {}  # for `user_ttl_s`
        self._histories: dict[str, list[Event]] = {}
        self._events: list[StreamEntry] = []  # ids "<n>-0", n counting every entry ever added
        self._added = 0
        self._seen: dict[str, set[str]] = {}
        # each user's event ids in arrival order (a dict: ordered), at most `dedup_max`
        self._event_ids: dict[str, dict[str, None]] = {}
        self._cache: OrderedDict[str, str] = OrderedDict()
        # the cache keys written for each user's stored-history requests, and the reverse
        self._user_cache: dict[str, set[str]] = {}
        self._cache_users: dict[str, set[str]] = {}

    def _forget_if_expired(self, user_id: str) -> None:
        """Redis's EXPIRE of a user's history and seen set (`user_ttl_s`), done where read."""
        last = self._last_append.get(user_id)
        if self.user_ttl_s > 0 and last is not None and self._clock() - last >= self.user_ttl_s:
            self._histories.pop(user_id, None)
            self._seen.pop(user_id, None)
            del self._last_append[user_id]

    async def get_history(self, user_id: str) -> list[Event]:
        self._forget_if_expired(user_id)
        return _time_order(list(self._histories.get(user_id, ())))

    async def append_events(
        self, user_id: str, events: Sequence[Event], *, stream: bool = True, rate: EventRate | None = None
    ) -> Appended:
        ids = _check_events(user_id, events, rate)
        if rate is not None:
            buckets = self._rates.get(rate)
            if buckets is None:
                buckets = self._rates[rate] = TokenBuckets(
                    rate.per_s, rate.burst, max_keys=MEMORY_RATE_USERS, clock=self._clock
                )
            wait = buckets.take(user_id, len(events))
            if wait:
                raise UserRateLimited(len(events), rate, wait)
        self._forget_if_expired(user_id)
        self._last_append[user_id] = self._clock()
        history = self._histories.setdefault(user_id, [])
        history[:] = _time_order(history)  # as APPEND_SCRIPT repairs a list of an older release
        known = self._event_ids.setdefault(user_id, {})
        held = {e.event_id for e in history}  # a duplicate whatever the ids remembered (APPEND_SCRIPT)
        seen = self._seen.setdefault(user_id, set())
        new = []
        for e, event_id in zip(events, ids, strict=True):
            new.append(event_id not in known and event_id not in held)
            if not new[-1]:
                continue
            known[event_id] = None
            stored = Event(e.item_id, e.rating, e.timestamp, event_id)
            history.insert(_place(history, e.timestamp), stored)
            seen.add(e.item_id)
            if stream:
                self._added += 1
                logged = Event(e.item_id, e.rating, e.timestamp, event_id, e.request_id or None)
                self._events.append(
                    StreamEntry(f"{self._added}-0", user_id, logged, int(time.time()), event_id)
                )
        del history[: -self.window]
        for oldest in list(itertools.islice(known, max(0, len(known) - self.dedup_max))):
            del known[oldest]  # the oldest first, as APPEND_SCRIPT trims r2ec:event-ids
        return Appended(len(history), tuple(ids), tuple(new))

    async def get_seen(self, user_id: str) -> frozenset[str]:
        self._forget_if_expired(user_id)
        return frozenset(self._seen.get(user_id, ()))

    async def read_events(self, after: str = "0-0", count: int | None = None) -> list[StreamEntry]:
        start = bisect.bisect_right(self._events, int(after.split("-")[0]), key=_entry_n)
        out = self._events[start:]
        return out if count is None else out[:count]

    async def cache_get(self, key: str) -> str | None:
        value = self._cache.get(key)
        if value is not None:
            self._cache.move_to_end(key)
        return value

    async def cache_set(
        self, key: str, value: str, user_id: str | None = None, made_from: Sequence[str] = ()
    ) -> None:
        if self.cache_size <= 0 or (user_id is not None and user_id not in self._histories):
            return
        if user_id is not None and not set(made_from) <= {e.event_id for e in self._histories[user_id]}:
            return  # the history it was made from is gone (`HistoryStore.cache_set`)
        self._cache[key] = value
        self._cache.move_to_end(key)
        if user_id is not None:
            self._user_cache.setdefault(user_id, set()).add(key)
            self._cache_users.setdefault(key, set()).add(user_id)
        while len(self._cache) > self.cache_size:
            evicted, _ = self._cache.popitem(last=False)  # least recently used
            self._unindex(evicted)

    def _unindex(self, key: str) -> None:
        for user in self._cache_users.pop(key, ()):
            keys = self._user_cache[user]
            keys.discard(key)
            if not keys:
                del self._user_cache[user]

    async def export_user(self, user_id: str) -> UserData:
        self._forget_if_expired(user_id)
        stream = [e for e in self._events if e.user_id == user_id]
        history = _time_order(list(self._histories.get(user_id, ())))
        return UserData(user_id, history, sorted(self._seen.get(user_id, ())), stream, None)

    async def erase_user(self, user_id: str) -> Erased:
        self._last_append.pop(user_id, None)
        history = self._histories.pop(user_id, [])
        seen = self._seen.pop(user_id, set())
        self._event_ids.pop(user_id, None)
        for buckets in self._rates.values():
            buckets.forget(user_id)
        kept = [e for e in self._events if e.user_id != user_id]
        removed, self._events = len(self._events) - len(kept), kept
        keys = list(self._user_cache.get(user_id, ()))
        for key in keys:
            self._cache.pop(key, None)
            self._unindex(key)
        return Erased(user_id, int(time.time() * 1000), len(history), len(seen), removed, len(keys))

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisStore:
    """Redis-backed store (redis.asyncio). Connections are lazy: a down server does not stop
    the app from starting, it makes `ping` (and so /readyz) fail. `url`: R2EC_REDIS_URL, any form
    service/redis_conn.py reads (TLS, Sentinel); a URL it refuses is a RedisUrlError (ValueError)."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        window: int = 20,
        cache_ttl_s: int = 86_400,
        stream_maxlen: int = 1_000_000,
        timeout_s: float = 1.0,
        dedup_ttl_s: int = DEDUP_TTL_S,
        user_ttl_s: int = 0,
        dedup_max: int = DEDUP_MAX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.user_ttl_s = user_ttl_s
        self.dedup_max = dedup_max
        # the time an append stamps its event ids with and counts a user's event rate by: this
        # replica's, in seconds (a parameter for tests)
        self._clock = clock
        self.up = True
        self.cache_ttl_s = cache_ttl_s
        self.stream_maxlen = stream_maxlen
        self.dedup_ttl_s = dedup_ttl_s
        self.url = url
        self._conn = AsyncRedis(url, timeout_s)
        self._redis = self._conn.client
        # a write was refused as by a replica (READONLY) and none has gone through since: `up`
        # stays False while reads still answer, until a write goes through (`ping` writes)
        self.read_only = False
        self._append = self._redis.register_script(APPEND_SCRIPT)
        self._cache_for_user = self._redis.register_script(CACHE_SET_SCRIPT)
        self._erase = self._redis.register_script(ERASE_SCRIPT)
        self._user_page = self._redis.register_script(USER_PAGE_SCRIPT)
        self._add_served = self._redis.register_script(SERVED_SCRIPT)
        self._stream_info = self._redis.register_script(STREAM_INFO_SCRIPT)
        self.erase_page = ERASE_PAGE
        self.format: StoreFormat | None = None  # SCHEMA_KEY, once `check_format` read it
        # told each operation's name and duration in seconds, failed ones too (the service's
        # r2ec_store_seconds histogram)
        self.on_op: Callable[[str, float], None] | None = None
        self.answered = 0  # operations Redis answered (the service's cache skip ends at the next)

    @contextmanager
    def _failures(self, op: str) -> Iterator[None]:
        """`_failures`, `up` set by how the operation went, and its time told to `on_op`."""
        start = time.perf_counter()
        try:
            with _failures(self.url, op):
                yield
        except StoreUnavailable as exc:
            cause = exc.__cause__
            self.read_only = _refuses_writes(cause) or (self.read_only and op not in _WRITES)
            # up where a command failed on its own (an error reply: a key of another type, a
            # full Redis refusing a write); down where Redis did not answer, something else did,
            # or it refused every command (loading, max clients, a wrong password), or every
            # write (a replica: READONLY), or did not let this user or this deployment run them
            # (an ACL, a cluster)
            self.up = isinstance(cause, redis.ResponseError) and not isinstance(cause, _DOWN_REPLIES)
            if self.read_only:
                self.up = False
            raise
        else:
            if op in _WRITES:
                self.read_only = False
            self.up = not self.read_only
            self.answered += 1
        finally:
            if self.on_op is not None:
                self.on_op(op, time.perf_counter() - start)

    async def get_history(self, user_id: str) -> list[Event]:
        with self._failures("get_history"):
            raw = await self._redis.lrange(HISTORY_KEY.format(user_id=user_id), 0, -1)
        return _time_order([Event.from_json(r) for r in raw])

    async def append_events(
        self, user_id: str, events: Sequence[Event], *, stream: bool = True, rate: EventRate | None = None
    ) -> Appended:
        keys, args, ids = self._append_call(user_id, events, stream, rate)
        with self._failures("append_events"):
            # one Lua script: the rate and dedup checks and every write happen atomically, or not at all
            out = await self._append(keys=keys, args=args)
        return _appended(out, ids, rate)

    async def append_many(
        self, batches: Sequence[tuple[str, Sequence[Event]]], *, stream: bool = True
    ) -> list[Appended]:
        """`append_events` for each (user_id, events) in order, in one round trip: the same
        script, each call atomic on its own, sent as one pipeline (not a transaction: a failure
        part way leaves the calls before it done, and the same batches again store nothing
        twice). For `r2ec user import`, a backfill, where one call per round trip leaves Redis
        idle while the client waits."""
        calls = [self._append_call(user_id, events, stream, None) for user_id, events in batches]
        with self._failures("append_events"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for keys, args, _ in calls:
                    await self._append(keys=keys, args=args, client=pipe)
                replies = await pipe.execute()
        return [_appended(out, ids) for out, (_, _, ids) in zip(replies, calls, strict=True)]

    def _append_call(
        self, user_id: str, events: Sequence[Event], stream: bool, rate: EventRate | None
    ) -> tuple[list[str], list[str | int | float], list[str]]:
        """APPEND_SCRIPT's keys and arguments for an append, and the events' ids."""
        ids = _check_events(user_id, events, rate)
        keys = [k.format(user_id=user_id) for k in (HISTORY_KEY, EVENTS_STREAM, SEEN_KEY, EVENT_IDS_KEY)]
        keys += [STREAM_EPOCH_KEY, EVENT_RATE_KEY.format(user_id=user_id)]
        clock = self._clock()
        now = int(clock)
        maxlen = self.stream_maxlen if stream else 0  # 0: no stream entry (the script's ARGV[3])
        args: list[str | int | float] = [
            *(user_id, self.window, maxlen, self.dedup_ttl_s, now, len(events), self.user_ttl_s)
        ]
        per_s, burst = (rate.per_s, rate.burst) if rate is not None else (0, 0)  # 0: no bound
        args += [self.dedup_max, repr(float(per_s)), burst, int(clock * 1000)]
        for e, event_id in zip(events, ids, strict=True):
            f = e.stream_fields(user_id, event_id)
            stored = Event(e.item_id, e.rating, e.timestamp, event_id)
            args += [event_id, e.item_id, f["rating"], f["timestamp"], stored.to_json(), e.request_id or ""]
        return keys, args, ids

    async def get_seen(self, user_id: str) -> frozenset[str]:
        with self._failures("get_seen"):
            return frozenset(await self._redis.smembers(SEEN_KEY.format(user_id=user_id)))

    async def read_events(self, after: str = "0-0", count: int | None = None) -> list[StreamEntry]:
        with self._failures("read_events"):
            rows = await self._redis.xrange(EVENTS_STREAM, min=f"({after}", max="+", count=count)
        return _stream_entries(rows)

    async def cache_get(self, key: str) -> str | None:
        with self._failures("cache_get"):
            return await self._redis.get(CACHE_KEY.format(key=key))

    async def cache_set(
        self, key: str, value: str, user_id: str | None = None, made_from: Sequence[str] = ()
    ) -> None:
        with self._failures("cache_set"):
            if user_id is None:  # an inline history's: found by its content only
                await self._redis.set(CACHE_KEY.format(key=key), value, ex=self.cache_ttl_s)
                return
            keys = [CACHE_KEY.format(key=key), USER_CACHE_KEY.format(user_id=user_id)]
            keys.append(HISTORY_KEY.format(user_id=user_id))
            await self._cache_for_user(keys=keys, args=[value, self.cache_ttl_s, key, *made_from])

    async def erase_user(self, user_id: str) -> Erased:
        """One script removes the keys and the indexed cache entries and writes the ledger
        (ERASE_SCRIPT); then the stream is scanned up to the erasure's cutoff, `erase_page`
        entries per step, each step one short script (USER_PAGE_SCRIPT: XRANGE COUNT, XDEL of
        the user's ids), so the entries never cross the network and no step holds Redis long.

        Cost: the stream has no index by user, so every entry older than the erasure is read.
        At R2EC_STREAM_MAXLEN's 1,000,000 entries: 1,000 steps, each holding Redis ~2 ms (5 ms
        at most on a quiet machine), ~2.3 s in all, other clients served between them; the page
        of 10,000 entries a plain XRANGE would bring back instead takes the service ~0.7 s of
        Python to parse, on its event loop (bench/bench_erase.py, BENCHMARKS.md). A failure
        during the scan leaves the ledger written (retraining ignores the rest already) and
        some entries in place: the same call again removes them."""
        keys = [HISTORY_KEY, SEEN_KEY, EVENT_IDS_KEY, USER_CACHE_KEY]
        keys = [k.format(user_id=user_id) for k in keys] + [ERASURES_KEY, EVENTS_STREAM, SERVED_STREAM]
        keys.append(EVENT_RATE_KEY.format(user_id=user_id))  # a key that names the user
        with self._failures("erase_user"):
            history, seen, cached, now_ms, cutoff = await self._erase(
                keys=keys, args=[user_id, CACHE_KEY.format(key="")]
            )
            _, removed = await self._scan_user(user_id, until=str(cutoff), delete=True)
            # the exposure log likewise (an empty scan where it was never written)
            _, served = await self._scan_user(user_id, until=str(cutoff), delete=True, stream=SERVED_STREAM)
        return Erased(user_id, int(now_ms), int(history), int(seen), removed, int(cached), served)

    async def export_user(self, user_id: str) -> UserData:
        """The user's history, seen set, ledger entry, stream entries and exposure-log entries:
        the streams are read as `erase_user` scans them, `erase_page` entries a step
        (`_scan_user`), only the user's entries crossing the network (~2 s per million
        entries)."""
        with self._failures("export_user"):
            raw = await self._redis.lrange(HISTORY_KEY.format(user_id=user_id), 0, -1)
            seen = await self._redis.smembers(SEEN_KEY.format(user_id=user_id))
            erased = await self._redis.zscore(ERASURES_KEY, user_id)
            rows, _ = await self._scan_user(user_id, until="+", delete=False)
            served, _ = await self._scan_user(user_id, until="+", delete=False, stream=SERVED_STREAM)
        history = _time_order([Event.from_json(r) for r in raw])
        erased_ms = None if erased is None else int(erased)
        exposures = [Served.from_fields(entry_id, fields) for entry_id, fields in served]
        return UserData(user_id, history, sorted(seen), _stream_entries(rows), erased_ms, exposures)

    async def add_served(self, entries: Sequence[Served], maxlen: int = 0, max_age_ms: int = 0) -> int:
        """Append answered recommendations to the exposure log in one script (SERVED_SCRIPT),
        capped near `maxlen` entries and/or `max_age_ms` by Redis's clock (0: no such cap);
        an entry of an erased user made before the erasure is left out (SERVED_SCRIPT: one made
        from the stored history whose events are no longer all stored, one that read none with
        its `at_ms` at or before the ledger's cutoff). Returns how many were written.
        StoreUnavailable (op add_served) where Redis fails."""
        if not entries:
            return 0
        names = list(entries[0].fields())
        prefix = HISTORY_KEY.format(user_id="")
        args: list[str | int] = [maxlen, max_age_ms, prefix, len(names), *names]
        for entry in entries:
            args += entry.fields().values()
            made = entry.made_from
            args.append("" if made is None else json.dumps(list(made), separators=(",", ":")))
        with self._failures("add_served"):
            return int(await self._add_served(keys=[SERVED_STREAM, ERASURES_KEY], args=args))

    async def _scan_user(
        self, user_id: str, until: str, delete: bool, stream: str = EVENTS_STREAM
    ) -> tuple[list[tuple[str, dict[str, str]]], int]:
        """The user's entries in `stream` up to `until` ('+': all), `erase_page` entries a step,
        each step one short script (USER_PAGE_SCRIPT), so only the user's entries cross the
        network and no step holds Redis long; where `delete`, each is XDELed as it is found.
        Returns their rows ([] where deleted) and how many were deleted. The caller's
        `_failures` counts a Redis failure."""
        rows: list[tuple[str, dict[str, str]]] = []
        removed, after = 0, STREAM_START
        while True:
            last, read, n, mine = await self._user_page(
                # the event stream's deletions are counted (retraining tells them from losses)
                keys=[stream, *_ERASED_KEYS] if stream == EVENTS_STREAM else [stream],
                args=[user_id, after, until, self.erase_page, int(delete)],
            )
            removed += int(n)
            rows += [(entry, dict(zip(fields[::2], fields[1::2], strict=True))) for entry, fields in mine]
            if int(read) < self.erase_page:
                return rows, removed
            after = last

    async def stream_info(self) -> StreamInfo:
        """The event stream's length and counts (STREAM_INFO_SCRIPT): /metrics' r2ec_stream_entries
        and retraining's lag, read at each scrape."""
        with self._failures("stream_info"):
            reply = await self._stream_info(keys=list(_INFO_KEYS))
        return StreamInfo.from_reply(reply)

    async def check_format(self, version: str) -> StoreFormat:
        """Write SCHEMA_KEY where absent (a new Redis, or one a release before 0.2.0 used), and
        read it: StoreFormatError where it names a format newer than STORE_FORMAT (a newer r2ec
        wrote it: this code would misread its keys) or is no marker. The result is kept as
        `format`. StoreUnavailable where Redis does not answer.

        First the server itself (`_check_server`, a read-only script): StoreConfigError where it
        answers but cannot serve r2ec as configured (a refused password or certificate, an ACL, a
        cluster, a Sentinel named as a Redis), which no wait would change; and a WARNING where it
        is a read-only replica (`_check_writable`)."""
        try:
            with _failures(self.url, "check_format"):
                await self._check_server()
                raw = await self._redis.get(SCHEMA_KEY)
                if raw is None:
                    held = await self._redis.dbsize() > 0
                    mark = {"format": STORE_FORMAT, "written_by": version, "since": int(time.time())}
                    await self._redis.set(SCHEMA_KEY, json.dumps({**mark, "held_data": held}), nx=True)
                    raw = await self._redis.get(SCHEMA_KEY)  # another replica's, where it came first
                await self._check_writable()
        except StoreUnavailable as exc:
            refused = _config_error(exc.__cause__, self.url)
            if refused is not None:
                raise refused from exc.__cause__
            raise
        try:
            mark = json.loads(raw)
            found = StoreFormat(
                int(mark["format"]), str(mark["written_by"]), int(mark["since"]), bool(mark["held_data"])
            )
        except (TypeError, ValueError, KeyError) as exc:
            raise StoreFormatError(
                f"{SCHEMA_KEY} in {redact(self.url)} is no format marker r2ec wrote ({raw!r:.200}): "
                "restore it, or delete it and the next start writes it again"
            ) from exc
        if found.format > STORE_FORMAT:
            raise StoreFormatError(
                f"the Redis at {redact(self.url)} holds r2ec data in format {found.format} "
                f"({SCHEMA_KEY}, written by r2ec {found.written_by}); this r2ec {version} knows format "
                f"{STORE_FORMAT} at most and would misread it: run r2ec {found.written_by} or newer "
                "(docs/operations.md, 'Upgrading')"
            )
        self.format = found
        return found

    async def _check_server(self) -> None:
        """The event stream's counts (STREAM_INFO_SCRIPT), read only, as a probe: a script over
        keys of three hash slots (tests/service/test_redis_managed.py checks they are), which a
        cluster refuses (CROSSSLOT, MOVED), as a user whose ACL allows no scripts or no XINFO is,
        and a Sentinel named as a Redis does not know. For a Sentinel URL, the sentinels are asked
        first whether they monitor the service it names. (Not HELLO, which would tell the mode,
        role and version at once: redis-py does not support it on its connections, and a reply
        to it left the next command of a Sentinel-managed connection waiting.)"""
        if self._conn.sentinel is not None:
            await self._check_sentinels()
        await self._stream_info(keys=list(_INFO_KEYS))

    async def _check_writable(self) -> None:
        """A WARNING where the URL reaches a read-only replica at the start (every write fails
        until it reaches the primary: a failover under way, or a URL that names a replica)."""
        try:
            await self._redis.delete(PROBE_KEY)
        except ReadOnlyError:
            self.read_only, self.up = True, False
            log.warning(
                "R2EC_REDIS_URL (%s) reaches a read-only replica: every write fails until it reaches "
                "the primary (a failover under way? name the primary's endpoint, or the sentinels: "
                "docs/operations.md, 'Managed Redis')",
                redact(self.url),
            )

    async def _check_sentinels(self) -> None:
        """StoreConfigError where a sentinel answers and none of those that do monitors the
        service the URL names (a misspelt name: redis-py would only say no primary was found),
        or where none answers and one refused the URL's sentinel credentials."""
        target = self._conn.target
        known: set[str] = set()
        answered, refused = False, None
        for node in self._conn.sentinel.sentinels:
            try:
                known |= set(await node.sentinel_masters())
                answered = True
            except redis.AuthenticationError as exc:
                refused = exc
            except (redis.RedisError, OSError):
                continue
        if not answered and refused is not None:
            raise StoreConfigError(
                f"the sentinels of R2EC_REDIS_URL ({redact(self.url)}) refuse its sentinel_username / "
                f"sentinel_password, their own, not the data nodes' ({refused}): docs/operations.md, "
                "'Managed Redis'"
            )
        if answered and target.service not in known:
            raise StoreConfigError(
                f"R2EC_REDIS_URL ({redact(self.url)}) names the service {target.service!r}, which the "
                f"sentinels that answered do not monitor (they monitor: {', '.join(sorted(known)) or 'none'})"
            )

    async def ping(self) -> None:
        """A write that changes nothing (DEL of PROBE_KEY, never written): it fails where Redis is
        down and where the URL reaches a read-only replica (after a failover), which a PING would
        not tell; it goes through on a Redis at its maxmemory (DEL frees)."""
        with self._failures("ping"):
            await self._redis.delete(PROBE_KEY)

    async def close(self) -> None:
        try:
            await self._conn.aclose()
        except Exception as exc:  # closing a broken connection must not stop shutdown
            log.warning("closing redis: %s", exc)


STREAM_START = "0-0"  # the cursor before the first entry (Redis ids are "<ms>-<seq>", all > 0-0)


def read_stream(
    redis_url: str, cursor: str | None = None, *, page_size: int = 10_000, timeout_s: float = 10.0
) -> tuple[list[StreamEntry], str | None]:
    """Every event-stream entry after `cursor` (None: from the start), oldest first, and the
    cursor to pass next time (the last entry's id; `cursor` itself when nothing is new).

    For retraining, a batch job outside the service's event loop: synchronous, one connection,
    `page_size` entries per round trip. A down Redis raises StoreUnavailable (op read_events).
    """
    connection = SyncRedis(redis_url, timeout_s)
    client = connection.client
    entries: list[StreamEntry] = []
    after = cursor or STREAM_START
    try:
        with _failures(redis_url, "read_events"):
            while rows := client.xrange(EVENTS_STREAM, min=f"({after}", max="+", count=page_size):
                entries += _stream_entries(rows)
                after = entries[-1].id
    finally:
        connection.close()
    return entries, (entries[-1].id if entries else cursor)


@dataclass(frozen=True)
class StreamInfo:
    """The event stream as XINFO STREAM tells it, at one moment (STREAM_INFO_SCRIPT)."""

    length: int  # entries it holds
    entries_added: int | None  # entries ever added (Redis 7's count; None before 7.0)
    last_id: str  # the last id it generated ("0-0": none yet)
    first_id: str | None  # its oldest entry's id (None: empty)
    erased_from: int = 0  # STREAM_ERASED_FROM_KEY: the deleted ids below it are no longer kept (ms)
    epoch: str | None = None  # STREAM_EPOCH_KEY: when it was created (None: before epochs)

    @classmethod
    def from_reply(cls, reply: Sequence) -> StreamInfo:
        length, added, last, first, erased_from, epoch = reply
        return cls(
            int(length),
            None if int(added) < 0 else int(added),
            _str(last),
            _str(first) or None,
            int(erased_from),
            _str(epoch) or None,
        )


_INFO_KEYS = (EVENTS_STREAM, STREAM_ERASED_FROM_KEY, STREAM_EPOCH_KEY)  # STREAM_INFO_SCRIPT's
# USER_PAGE_SCRIPT's for the event stream: where its deletions are recorded
_ERASED_KEYS = (STREAM_ERASED_IDS_KEY, STREAM_ERASED_FROM_KEY, STREAM_READER_KEY)


def _str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class StreamRead:
    """What `read_stream_checked` read: model/retrain.py's `StreamRead`.

    `lost`: entries added after the cursor that the stream no longer held when read, less those
    erasures deleted: what its cap (`MAXLEN ~`, or an operator's XTRIM) dropped unread. Exact
    where `lost_exact`, else a lower bound (no count to start from: the first read with an older
    state, a Redis before 7.0, a stream that was lost and begun again; or the erasures' record
    of a range no retraining had read for READER_TTL_S was trimmed). `mark`: where this read
    stopped and the counts it saw, for the next read to start from (stored by the caller,
    handed back)."""

    events: list[StreamEntry]
    cursor: str | None
    lost: int = 0
    lost_exact: bool = True
    mark: dict[str, int | str | None] | None = None
    length: int = 0  # entries the stream held when read


def _id_key(entry_id: str) -> tuple[int, int]:
    """A stream id "<ms>-<seq>" as a tuple that orders as Redis orders ids."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def read_stream_checked(
    redis_url: str,
    cursor: str | None = None,
    mark: Mapping[str, int | str | None] | None = None,
    *,
    page_size: int = 10_000,
    timeout_s: float = 10.0,
) -> StreamRead:
    """`read_stream`, and how many entries after `cursor` were lost unread (`StreamRead`).

    The stream's counts are read first, in one script (STREAM_INFO_SCRIPT), and the entries
    after the cursor up to the last id they saw, so what is added meanwhile waits for the next
    read. The entries added since the last read (`mark`: its `entries_added`; from the stream's
    start where nothing was read yet) have ids after the last id that read saw (the mark's
    `last_id`) and up to this read's. Each of them was read now, or deleted since: by an
    erasure, whose step records the ids it deleted (STREAM_ERASED_IDS_KEY; those of the range
    not read now are counted, so an erasure before the read, during it or of entries read by an
    earlier run is counted once or not at all, as it should), or by the cap: the rest, exact.

    The record of deletions is then trimmed below the range the mark passed in starts at (the
    next read starts there or later, even where this one's mark is never saved), and that
    position is written (STREAM_READER_KEY) for the erasure steps: while it is there they trim
    no further; without it (no retraining read for READER_TTL_S) they trim to the stream's first
    entry, and a read whose range starts below what was trimmed cannot count exactly."""
    connection = SyncRedis(redis_url, timeout_s)
    client = connection.client
    entries: list[StreamEntry] = []
    after = cursor or STREAM_START
    if mark is not None and (mark.get("cursor", cursor) != cursor or "last_id" not in mark):
        # saved with another cursor: a run of an older release (a code rollback) moved the
        # cursor on and kept this mark; counting from it would call what that run read lost.
        # Or saved by an earlier build, which recorded no position: nothing to count from.
        mark = None
    try:
        with _failures(redis_url, "read_events"):
            info = StreamInfo.from_reply(client.eval(STREAM_INFO_SCRIPT, len(_INFO_KEYS), *_INFO_KEYS))
            while rows := client.xrange(EVENTS_STREAM, min=f"({after}", max=info.last_id, count=page_size):
                entries += _stream_entries(rows)
                after = entries[-1].id
            # the range the entries added since the mark lie in; a stream begun again: all of it
            begun_again = stream_begun_again(info, mark)
            start = str(mark["last_id"]) if mark is not None and not begun_again else STREAM_START
            deleted = _erased_between(client, start, info.last_id) - {e.id for e in entries}
            floor = _id_key(start)[0]
            client.eval(READ_TRIM_SCRIPT, len(_ERASED_KEYS), *_ERASED_KEYS, floor, READER_TTL_S)
    finally:
        connection.close()
    lost, exact = _lost_unread(info, cursor, mark, len(entries), len(deleted), start)
    cursor = entries[-1].id if entries else cursor
    new_mark = None
    if info.entries_added is not None:
        new_mark = {
            "entries_added": info.entries_added,
            "last_id": info.last_id,
            "epoch": info.epoch,
            "cursor": cursor,
        }
    return StreamRead(entries, cursor, lost, exact, new_mark, info.length)


def stream_begun_again(info: StreamInfo, mark: Mapping[str, object] | None) -> bool:
    """Whether the stream is not the one a read's `mark` saw: it was lost and begun again
    (FLUSHALL, a Redis restarted without persistence, a deleted key), whatever it has taken
    since. Told by its epoch (STREAM_EPOCH_KEY, set when the append script creates it), and
    where the stream has none (created before epochs) by a count or an id that went back."""
    if mark is None or info.entries_added is None:
        return False
    if "epoch" in mark and mark["epoch"] != info.epoch:
        return True
    last = mark.get("last_id")
    went_back = isinstance(last, str) and _id_key(info.last_id) < _id_key(last)
    return info.entries_added < float(str(mark["entries_added"])) or went_back


def _erased_between(client: redis.Redis, low: str, high: str) -> set[str]:
    """The ids in STREAM_ERASED_IDS_KEY after `low` and up to `high` (stream ids)."""
    lo, hi = _id_key(low), _id_key(high)
    if hi <= lo:
        return set()
    ids = client.zrangebyscore(STREAM_ERASED_IDS_KEY, lo[0], hi[0])
    return {i for i in ids if lo < _id_key(i) <= hi}


def _lost_unread(
    info: StreamInfo,
    cursor: str | None,
    mark: Mapping[str, int | str | None] | None,
    read: int,
    deleted: int,
    start: str,
) -> tuple[int, bool]:
    """(entries lost after `cursor` before they were read, whether that is exact):
    `read_stream_checked`. `deleted`: entries erasures deleted after `start` (the range's
    start: the mark's `last_id`), not read now."""
    at = _id_key(cursor or STREAM_START)
    # the cap trims the oldest entries: while one at or before the cursor is left, it has taken
    # nothing after it
    untrimmed = info.first_id is not None and _id_key(info.first_id) <= at
    if info.entries_added is None:  # a Redis before 7.0 counts nothing
        return 0, untrimmed
    if mark is None and cursor is not None:  # a cursor an older release saved: nothing to count from
        return 0, untrimmed
    begun_again = stream_begun_again(info, mark)
    # begun again: what it held after the cursor then is unknown, only what came since is counted
    added0 = 0 if mark is None or begun_again else int(mark["entries_added"])
    lost = max(0, info.entries_added - added0 - read - deleted)
    # deleted ids below erased_from are no longer recorded: a range that starts below it may
    # count some of them as lost
    recorded = info.erased_from <= _id_key(start)[0]
    return lost, not begun_again and recorded


# KEYS: the stream, STREAM_ERASED_FROM_KEY, STREAM_EPOCH_KEY. Returns the stream's length,
# entries added (-1: a Redis before 7.0, which does not count them), the last generated id, the
# first entry's id ('' where empty), erased-from (0: none), the epoch ('': none). (max-deleted-
# entry-id is no help: trims leave it.)
STREAM_INFO_SCRIPT = """
local from = tonumber(redis.call('GET', KEYS[2]) or '0')
local epoch = redis.call('GET', KEYS[3]) or ''
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0, '0-0', '', from, ''} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local f = {}
for i = 1, #info, 2 do f[info[i]] = info[i + 1] end
local first = ''
if f['first-entry'] then first = f['first-entry'][1] end
return {f['length'], f['entries-added'] or -1, f['last-generated-id'], first, from, epoch}
"""

# A checked read's trim of the record of deletions. KEYS: _ERASED_KEYS. ARGV: the ms the range of
# the mark it was passed starts in (no later read starts before it), READER_TTL_S.
READ_TRIM_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[2]) or '0') then
  redis.call('SET', KEYS[2], ARGV[1])
end
redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[2])
"""


def read_erasures(redis_url: str, *, timeout_s: float = 10.0) -> ErasureLedger:
    """The erasure ledger (module docstring, "Erasure"), for retraining: synchronous, one
    connection, ZSCAN in pages (an entry updated meanwhile is still read). A down Redis raises
    StoreUnavailable (op read_erasures)."""
    connection = SyncRedis(redis_url, timeout_s)
    client = connection.client
    try:
        with _failures(redis_url, "read_erasures"):
            cutoffs = {user: int(ms) for user, ms in client.zscan_iter(ERASURES_KEY, count=10_000)}
    finally:
        connection.close()
    return ErasureLedger(cutoffs)


def read_served(
    redis_url: str,
    since_ms: int | None = None,
    until_ms: int | None = None,
    *,
    page_size: int = 10_000,
    timeout_s: float = 10.0,
) -> Iterator[list[Served]]:
    """The exposure log's entries added at or after `since_ms` and before `until_ms` (Unix ms, by
    the stream ids; half-open, so adjacent windows share no entry; None: from the start, to the
    end), oldest first, a page of up to `page_size` entries at a time, for `r2ec exposures
    export`: synchronous, one connection. A negative time is a ValueError; a down Redis raises
    StoreUnavailable (op read_served)."""
    for name, ms in (("since_ms", since_ms), ("until_ms", until_ms)):
        if ms is not None and ms < 0:
            raise ValueError(f"{name} {ms} is before 1970: stream ids start at 0")
    if until_ms is not None and (until_ms == 0 or (since_ms is not None and until_ms <= since_ms)):
        return  # an empty window
    low = "-" if since_ms is None else str(int(since_ms))  # "<ms>": from <ms>-0
    # "<ms - 1>": to <ms - 1>-<the last sequence>, the last id before <ms>-0
    high = "+" if until_ms is None else str(int(until_ms) - 1)
    connection = SyncRedis(redis_url, timeout_s)
    client = connection.client
    try:
        while True:
            with _failures(redis_url, "read_served"):
                rows = client.xrange(SERVED_STREAM, min=low, max=high, count=page_size)
            if not rows:
                return
            yield [Served.from_fields(entry_id, fields) for entry_id, fields in rows]
            if len(rows) < page_size:
                return
            low = f"({rows[-1][0]}"
    finally:
        connection.close()


def _entry_n(entry: StreamEntry) -> int:
    """The in-process stream's entry "<n>-0" -> n."""
    return int(entry.id.split("-")[0])


def _stream_entries(rows: list[tuple[str, dict[str, str]]]) -> list[StreamEntry]:
    """XRANGE rows -> StreamEntries; a Redis entry id starts with the time it was added (ms)."""
    out = []
    for entry_id, fields in rows:
        added_s = int(entry_id.split("-")[0]) // 1000
        event = Event.from_stream_fields(fields)
        out.append(StreamEntry(entry_id, fields["user_id"], event, added_s, fields.get("event_id", "")))
    return out


# KEYS: history, stream, seen set, event-id zset, the stream's epoch (set where this call creates
# the stream), the user's event-rate bucket. ARGV: user_id, window, stream maxlen (0: no
# stream entry, `stream=False`), dedup ttl (s), now (s), n, user ttl (s, 0: none), the most event
# ids kept (`dedup_max`), the event rate's refill per second (0: no bound) and burst, now (ms),
# then per event: event_id, item_id, rating, timestamp, history JSON, request_id ('' for none:
# the entry has no such field).
# Returns one 1 (stored) or 0 (duplicate) per event, then the history's length; or, where the
# user's event rate cannot pay for the n events, {-1, ms until it can} and writes nothing.
APPEND_SCRIPT = """
-- the history in time order (`_place`): read once; each new event goes into that table after
-- every event not later than it, walking back from the newest at most a window's length (one
-- that would land further back is older than the whole window and would be trimmed at once);
-- the list is written back from the first place that changed, the oldest past the window dropped
local function stamp(json)
  local t = cjson.decode(json)['timestamp']
  if type(t) == 'number' then return t end
  return false
end
local function push(key, list, from, to)
  for i = from, to, 1000 do redis.call('RPUSH', key, unpack(list, i, math.min(i + 999, to))) end
end
local user, window, maxlen = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local ttl, now, n = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local user_ttl = tonumber(ARGV[7])  -- seconds the history and seen set outlive this append; 0: for good
local ids_max = tonumber(ARGV[8])
-- the user's event rate (`EventRate`, service/buckets.py `refill`): a bucket of `burst` events
-- that refills at `per_s` a second, by the replica's clock in ms (one behind the last writer's
-- counts no time); a request it cannot pay for whole is refused before anything is written
local per_s, burst, now_ms = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local tokens, counted_at = burst, now_ms
if per_s > 0 then
  local bucket = redis.call('GET', KEYS[6])  -- a string, so the documented ACL needs no hash commands
  if bucket then
    local held, at = string.match(bucket, '^(%S+) (%S+)$')
    counted_at = math.max(now_ms, tonumber(at))
    tokens = math.min(burst, tonumber(held) + (counted_at - tonumber(at)) * per_s / 1000)
  end
  if tokens < n then return {-1, math.ceil((n - tokens) * 1000 / per_s)} end
end
-- A Redis at its maxmemory with noeviction refuses a script's write that may grow it only while
-- the script has written nothing yet: after the prune below (a write that only frees), every
-- ZADD, XADD and RPUSH would go through past the cap. So a growing write comes first: a no-op
-- (XX updates only an existing member, and no event id is empty), refused whole when full.
redis.call('ZADD', KEYS[4], 'XX', now, '')
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - ttl)
local fresh = maxlen ~= '0' and redis.call('EXISTS', KEYS[2]) == 0  -- the stream begins here
local hist = redis.call('LRANGE', KEYS[1], 0, -1)
-- held: the ids of the events in the history, each a duplicate whatever the dedup window (a
-- replay after it, a backfill run again, must not show an event twice)
local times, held = {}, {}
for i, json in ipairs(hist) do
  local e = cjson.decode(json)
  times[i] = type(e['timestamp']) == 'number' and e['timestamp']
  if type(e['event_id']) == 'string' then held[e['event_id']] = true end
end
local stored = #hist
local untouched = stored  -- hist[1..untouched] is still the stored list's start
-- a list a release before 0.2.0 stored in arrival order: sorted once, stably, as `_time_order`
-- does (an event without a timestamp ends a run: the events stored after it stay after it),
-- and written back whole below
local in_order = true
for i = 2, stored do
  if times[i - 1] and times[i] and times[i - 1] > times[i] then in_order = false break end
end
if not in_order then
  local keyed, run = {}, 0
  for i = 1, stored do
    keyed[i] = {run, times[i] or math.huge, i, hist[i], times[i]}
    if not times[i] then run = run + 1 end
  end
  table.sort(keyed, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    if a[2] ~= b[2] then return a[2] < b[2] end
    return a[3] < b[3]
  end)
  for i = 1, stored do hist[i], times[i] = keyed[i][4], keyed[i][5] end
  untouched = 0
end
local out = {}
for i = 0, n - 1 do
  local b = 12 + i * 6
  local id, item, json = ARGV[b], ARGV[b + 1], ARGV[b + 4]
  if not held[id] and redis.call('ZADD', KEYS[4], 'NX', now, id) == 1 then
    local ts, at, dropped = stamp(json), #hist, false
    if ts then
      while at > 0 and times[at] and times[at] > ts do
        at = at - 1
        if at <= #hist - window then dropped = true break end  -- before the window: trimmed
      end
    end
    if not dropped then
      table.insert(hist, at + 1, json)
      table.insert(times, at + 1, ts)
      if at < untouched then untouched = at end
    end
    if maxlen ~= '0' and ARGV[b + 5] == '' then  -- '0': a backfill the seed dataset holds already
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'user_id', user, 'item_id', item,
                 'rating', ARGV[b + 2], 'timestamp', ARGV[b + 3], 'event_id', id)
    elseif maxlen ~= '0' then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'user_id', user, 'item_id', item,
                 'rating', ARGV[b + 2], 'timestamp', ARGV[b + 3], 'event_id', id,
                 'request_id', ARGV[b + 5])
    end
    redis.call('SADD', KEYS[3], item)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
-- at most ids_max ids, the oldest by arrival (second; within one, by id) dropped first
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -ids_max - 1)
redis.call('EXPIRE', KEYS[4], ttl)
if per_s > 0 then  -- the bucket, less this request's events; gone once it would be full again
  tokens = tokens - n
  local full_in_ms = math.ceil((burst - tokens) * 1000 / per_s) + 1000
  redis.call('SET', KEYS[6], string.format('%.17g %.17g', tokens, counted_at), 'PX', full_in_ms)
end
if fresh and redis.call('EXISTS', KEYS[2]) == 1 then  -- a new stream, a new epoch (TIME, µs)
  local t = redis.call('TIME')
  redis.call('SET', KEYS[5], t[1] .. string.format('%06d', tonumber(t[2])))
end
local first = math.max(1, #hist - window + 1)
if untouched >= first then  -- keep the stored start, write what follows it
  if untouched < stored then redis.call('LTRIM', KEYS[1], 0, untouched - 1) end
  push(KEYS[1], hist, untouched + 1, #hist)
  redis.call('LTRIM', KEYS[1], -window, -1)
else
  redis.call('DEL', KEYS[1])
  push(KEYS[1], hist, first, #hist)
end
if user_ttl > 0 then  -- retention: a user who posts nothing for user_ttl seconds is forgotten
  redis.call('EXPIRE', KEYS[1], user_ttl)
  redis.call('EXPIRE', KEYS[3], user_ttl)
else  -- kept until erased, also where a retention set before has been turned off
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[3])
end
out[#out + 1] = math.min(#hist, window)
return out
"""


# A Lua function for the scripts below that write what was made from a user's stored history
# (CACHE_SET_SCRIPT, SERVED_SCRIPT): whether that history is still stored, so an erasure while
# it was made stops the write. `history_holds(key, ids)`: the history list `key` exists and holds
# every event id in `ids` (a table; none: only that it exists). An erasure deletes the list; an
# id posted again after it is in a new list, so every id of the history read must be there.
HISTORY_HOLDS_LUA = """
local function history_holds(key, ids)
  if redis.call('EXISTS', key) == 0 then return false end
  if #ids == 0 then return true end
  local stored = {}
  for _, json in ipairs(redis.call('LRANGE', key, 0, -1)) do
    local id = cjson.decode(json)['event_id']
    if id then stored[id] = true end
  end
  for _, id in ipairs(ids) do
    if not stored[id] then return false end
  end
  return true
end
"""


# KEYS: cache entry, the user's cache-key index, the user's history. ARGV: the entry, ttl (s), the
# bare cache key, then the event ids of the history it was made from. Returns 1 if written, 0 if
# the user has no history or one of those events is not in it (erased meanwhile, maybe posted
# to again).
CACHE_SET_SCRIPT = (
    HISTORY_HOLDS_LUA
    + """
local made_from = {}  -- the event ids of the history it was made from
for i = 4, #ARGV do made_from[#made_from + 1] = ARGV[i] end
if not history_holds(KEYS[3], made_from) then return 0 end
local ttl = tonumber(ARGV[2])
local now = tonumber(redis.call('TIME')[1])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)  -- entries expired by now
redis.call('EXPIRE', KEYS[2], ttl)
return 1
"""
)

# KEYS: history, seen set, event-id zset, cache-key index, the ledger, the event stream, the
# exposure log, the event-rate bucket. ARGV: user_id, the cache keys' prefix. Returns the
# history's length, the seen set's size, the cache entries deleted, now (ms) and the cutoff (ms)
# the ledger got. The cache entries' names come from the index, so they are not in KEYS: a
# standalone Redis, as everywhere in this module.
ERASE_SCRIPT = """
local history = redis.call('LLEN', KEYS[1])
local seen = redis.call('SCARD', KEYS[2])
local names = redis.call('ZRANGE', KEYS[4], 0, -1)
for i = 1, #names do names[i] = ARGV[2] .. names[i] end
local cached = 0
for i = 1, #names, 1000 do
  cached = cached + redis.call('DEL', unpack(names, i, math.min(i + 999, #names)))
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[8])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- without a stream nothing of the user's is in it, and an entry added later gets >= now
local cutoff = now - 1
local streams = {}
for k = 6, 7 do
  if redis.call('EXISTS', KEYS[k]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[k])
    local last = '0-0'
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then last = info[i + 1] end
    end
    cutoff = math.max(cutoff, now, tonumber(string.match(last, '^(%d+)-')))
    streams[#streams + 1] = KEYS[k]
  end
end
-- every entry so far is at or before the cutoff, in both streams; the next XADD * is past it,
-- even within this millisecond (its sequence is full) or a clock that went back
for _, key in ipairs(streams) do
  redis.call('XSETID', key, string.format('%.0f', cutoff) .. '-18446744073709551615')
end
redis.call('ZADD', KEYS[5], cutoff, ARGV[1])
return {history, seen, cached, now, cutoff}
"""


# One step of a scan of the stream for one user's entries (an erasure's, an export's). KEYS: the
# stream, and for the event stream the record of its deletions (STREAM_ERASED_IDS_KEY, _FROM_KEY,
# STREAM_READER_KEY): each deleted id is added to it, in the step that deletes it, and it is
# trimmed below the stream's first entry where no retraining reads the stream. ARGV:
# user_id, the last id scanned (exclusive), the last id to scan ('+': the end; an erasure's
# cutoff in ms, inclusive), the page size, 1 to XDEL the user's entries found. Returns
# the last id read (the cursor again where none was), how many were read (fewer than a page: the
# scan is over), how many were deleted, and the user's entries ({id, fields}; none where they
# were deleted). `user_id` is each entry's first field (APPEND_SCRIPT writes it first).
USER_PAGE_SCRIPT = """
local rows = redis.call('XRANGE', KEYS[1], '(' .. ARGV[2], ARGV[3], 'COUNT', ARGV[4])
local mine, ids = {}, {}
for _, row in ipairs(rows) do
  local fields = row[2]
  for j = 1, #fields, 2 do
    if fields[j] == 'user_id' then
      if fields[j + 1] == ARGV[1] then
        mine[#mine + 1] = row
        ids[#ids + 1] = row[1]
      end
      break
    end
  end
end
local removed = 0
if ARGV[5] == '1' then
  for i = 1, #ids, 1000 do
    removed = removed + redis.call('XDEL', KEYS[1], unpack(ids, i, math.min(i + 999, #ids)))
  end
  if removed > 0 and KEYS[2] then
    for i = 1, #ids, 500 do
      local scored = {}
      for j = i, math.min(i + 499, #ids) do
        scored[#scored + 1] = string.match(ids[j], '^(%d+)-')
        scored[#scored + 1] = ids[j]
      end
      redis.call('ZADD', KEYS[2], unpack(scored))
    end
    if redis.call('EXISTS', KEYS[4]) == 0 then  -- no retraining reads it: kept from the first entry
      local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
      if #first > 0 then
        local ms = string.match(first[1][1], '^(%d+)-')
        redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ms)
        if tonumber(ms) > tonumber(redis.call('GET', KEYS[3]) or '0') then redis.call('SET', KEYS[3], ms) end
      end
    end
  end
  mine = {}
end
if #rows == 0 then return {ARGV[2], 0, removed, mine} end
return {rows[#rows][1], #rows, removed, mine}
"""


# The exposure log's write (`RedisStore.add_served`). KEYS: the served stream, the erasure ledger.
# ARGV: the cap in entries (0: none), the age cap in ms (0: none), the history keys' prefix, the
# number of fields, their names, then for each entry its values in that order (user_id first,
# at_ms second: `Served.fields`) and one more, its `made_from` (not written): "" for an answer
# that read no stored history, else the JSON list of the event ids of the stored history it was
# made from. An entry of a user the ledger holds (erased at some time) is written only if it
# was not made before that erasure: one made from the stored history only while that history
# still holds every event it was made from (`history_holds`, as CACHE_SET_SCRIPT: no clock is
# compared), one that read none only if its time is after the ledger's cutoff (the replica's
# clock against Redis's). A user the ledger never erased is not checked. Returns how many were
# written.
SERVED_SCRIPT = (
    HISTORY_HOLDS_LUA
    + """
local maxlen, max_age, nf = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
local head = {KEYS[1]}
if maxlen > 0 then head = {KEYS[1], 'MAXLEN', '~', ARGV[1]} end
head[#head + 1] = '*'
local base = 4 + nf
local written = 0
for at = base, #ARGV - nf - 1, nf + 1 do
  local user, ms, made = ARGV[at + 1], tonumber(ARGV[at + 2]), ARGV[at + nf + 1]
  local keep = true
  local erased = false
  if user ~= '' then erased = redis.call('ZSCORE', KEYS[2], user) end
  if erased then
    if made ~= '' then
      keep = history_holds(ARGV[3] .. user, cjson.decode(made))
    else
      keep = tonumber(erased) < ms
    end
  end
  if keep then
    local args = {unpack(head)}
    for j = 1, nf do
      args[#args + 1] = ARGV[4 + j]
      args[#args + 1] = ARGV[at + j]
    end
    redis.call('XADD', unpack(args))
    written = written + 1
  end
end
if max_age > 0 and written > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%.0f', now - max_age))
end
return written
"""
)


@contextmanager
def _failures(url: str, op: str) -> Iterator[None]:
    """Any Redis or socket error inside becomes StoreUnavailable naming `op` (password redacted),
    with what Redis's words mean where they alone would not say (`_explain`)."""
    try:
        yield
    except (redis.RedisError, OSError) as exc:
        raise StoreUnavailable(f"redis {op} failed ({redact(url)}): {_explain(exc)}", op) from exc


# The errors that leave the store down though Redis answered them (RedisStore._failures): not one
# command's own failure but every write's (a replica), or every command's of this user or
# deployment (an ACL, a cluster).
_CLUSTER_REPLIES = (MovedError, AskError, ClusterCrossSlotError, ClusterDownError)
_DOWN_REPLIES = (ReadOnlyError, NoPermissionError, *_CLUSTER_REPLIES)
# a Redis that takes no write at all for now, though it answers: too few replicas in sync under
# its min-replicas-to-write (NOREPLICAS), or an RDB save failing under stop-writes-on-bgsave-
# error (MISCONF). Like a replica's READONLY, every event would fail until it changes, so the
# store reads as down (`r2ec_store_up` 0, R2ecStoreDown) until a write goes through; inside a
# script the reply may come wrapped ("ERR Error running script ... NOREPLICAS ...")
_NO_WRITES = ("NOREPLICAS", "MISCONF")


def _refuses_writes(cause: BaseException | None) -> bool:
    """Whether `cause` says the server takes no write at all for now (`_failures`)."""
    if isinstance(cause, ReadOnlyError):
        return True
    return isinstance(cause, redis.ResponseError) and any(code in str(cause) for code in _NO_WRITES)


# the operations that write (RedisStore._failures: one that goes through ends `read_only`)
_WRITES = frozenset({"append_events", "cache_set", "erase_user", "add_served", "ping", "check_format"})
CLUSTER_REFUSAL = (
    "r2ec does not run on Redis Cluster. Each event is written in one script together with the "
    "user's keys and the stream r2ec:events that retraining reads, and a cluster runs a script "
    "only over keys of one hash slot, so every key would have to share one slot, on one shard: "
    "the cluster would add no capacity. Use a Redis with cluster mode off (docs/operations.md, "
    "'Managed Redis')"
)


def _acl_refused(exc: BaseException | None) -> bool:
    """A command a script ran that the user's ACL does not allow (Redis 7.0 says so in an ERR,
    later ones in a NOPERM)."""
    return isinstance(exc, NoPermissionError) or (
        isinstance(exc, redis.ResponseError) and "can't run this command" in str(exc)
    )


def _explain(exc: BaseException) -> str:
    """Redis's or the driver's words, and what they mean where they would leave an operator
    guessing (docs/operations.md, "Managed Redis")."""
    if isinstance(exc, ReadOnlyError):
        return (
            f"{exc} (READONLY: this node is a replica, after a failover; the next operation "
            "reconnects, which reaches the new primary through a primary endpoint or Sentinel, "
            "not through a URL that names this node)"
        )
    if isinstance(exc, _CLUSTER_REPLIES):
        return f"{type(exc).__name__} {exc}: {CLUSTER_REFUSAL}"
    if _acl_refused(exc):
        return f"{exc} (the user's ACL: docs/operations.md, 'Managed Redis', lists what r2ec runs)"
    return str(exc)


def _config_error(exc: BaseException | None, url: str) -> StoreConfigError | None:
    """The start's refusal (`RedisStore.check_format`) for a failure no wait would mend: a
    password or user Redis refuses, a TLS certificate not trusted, an ACL, a cluster. None for
    the rest (Redis down, loading, a timeout: the service starts and says degraded)."""
    shown = redact(url)
    seen, chain = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in chain:
        if isinstance(e, redis.AuthenticationError):
            return StoreConfigError(f"Redis refuses the user or password of R2EC_REDIS_URL ({shown}): {e}")
        if isinstance(e, ssl.SSLCertVerificationError):
            return StoreConfigError(
                f"R2EC_REDIS_URL ({shown}): the Redis's TLS certificate is not trusted ({e.verify_message}): "
                "name the CA that signed it, rediss://...?ssl_ca_certs=/path/ca.pem, or the host name the "
                "certificate is for (docs/operations.md, 'Managed Redis')"
            )
        if _acl_refused(e):
            return StoreConfigError(
                f"the Redis user of R2EC_REDIS_URL ({shown}) may not run r2ec's commands: {_explain(e)}"
            )
        if isinstance(e, redis.ResponseError) and str(e).lower().startswith("unknown command"):
            return StoreConfigError(
                f"R2EC_REDIS_URL ({shown}) reaches a server that does not know r2ec's commands ({e}): a "
                "Redis Sentinel? Name the sentinels and the service they monitor, "
                "redis+sentinel://HOST:PORT[,HOST:PORT]/SERVICE[/DB] (docs/operations.md, 'Managed Redis')"
            )
        if isinstance(e, _CLUSTER_REPLIES):
            return StoreConfigError(
                f"R2EC_REDIS_URL ({shown}) reaches a Redis Cluster ({type(e).__name__} {e}): "
                + CLUSTER_REFUSAL
            )
    return None


def make_store(
    redis_url: str,
    window: int,
    cache_size: int,
    cache_ttl_s: int,
    stream_maxlen: int,
    dedup_ttl_s: int = DEDUP_TTL_S,
    user_ttl_s: int = 0,
    dedup_max: int = DEDUP_MAX,
) -> MemoryStore | RedisStore:
    """Redis when a URL is configured, else the in-process store."""
    if redis_url:
        return RedisStore(
            redis_url,
            window,
            cache_ttl_s=cache_ttl_s,
            stream_maxlen=stream_maxlen,
            dedup_ttl_s=dedup_ttl_s,
            user_ttl_s=user_ttl_s,
            dedup_max=dedup_max,
        )
    return MemoryStore(window, cache_size=cache_size, user_ttl_s=user_ttl_s, dedup_max=dedup_max)
