"""User histories, the event stream retraining reads, and the reasoning cache.

One interface, two stores, the same tests for both (tests/service/test_store.py):

- `RedisStore` (production). Key formats, all of them here:
    r2ec:history:{user_id}    a list of JSON events, newest last, trimmed to the window
    r2ec:events               a stream; one entry per event: user_id, item_id, rating, timestamp
    r2ec:reasoning:{key}      a cached reasoning (JSON), expiring after `cache_ttl_s`
- `MemoryStore` (the embedded default when no Redis URL is configured): the same in process;
  the stream is a list and the cache an LRU bounded by `cache_size`.
- `read_stream(url, cursor)`: retraining's synchronous view of the Redis stream, every entry
  after an opaque cursor. Entry ids and the cursor's syntax stay in this module.

Every Redis failure surfaces as `StoreUnavailable`, so callers catch one type.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

import redis
import redis.asyncio

log = logging.getLogger(__name__)

HISTORY_KEY = "r2ec:history:{user_id}"
EVENTS_STREAM = "r2ec:events"
CACHE_KEY = "r2ec:reasoning:{key}"


class StoreUnavailable(RuntimeError):
    """The backing store could not be reached or answered with an error; `op` names the
    operation (get_history, append_events, read_events, cache_get, cache_set, ping)."""

    def __init__(self, message: str, op: str = "store") -> None:
        super().__init__(message)
        self.op = op


@dataclass(frozen=True)
class Event:
    """One interaction: the user consumed/rated `item_id` at `timestamp` (seconds)."""

    item_id: str
    rating: float | None = None
    timestamp: int | None = None

    def to_json(self) -> str:
        return json.dumps({"item_id": self.item_id, "rating": self.rating, "timestamp": self.timestamp})

    @classmethod
    def from_json(cls, raw: str | bytes) -> Event:
        d = json.loads(raw)
        return cls(str(d["item_id"]), d.get("rating"), d.get("timestamp"))

    def stream_fields(self, user_id: str) -> dict[str, str]:
        return {
            "user_id": user_id,
            "item_id": self.item_id,
            "rating": "" if self.rating is None else repr(float(self.rating)),
            "timestamp": "" if self.timestamp is None else str(int(self.timestamp)),
        }

    @classmethod
    def from_stream_fields(cls, fields: dict[str, str]) -> Event:
        rating, ts = fields.get("rating", ""), fields.get("timestamp", "")
        return cls(fields["item_id"], float(rating) if rating else None, int(ts) if ts else None)


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


class HistoryStore(Protocol):
    window: int

    async def get_history(self, user_id: str) -> list[Event]:
        """The user's latest `window` events, oldest first (empty for an unknown user)."""

    async def append_events(self, user_id: str, events: Sequence[Event]) -> int:
        """Append to the history (trimmed to the window) and to the event stream; returns the
        history length after the append."""

    async def read_events(self, after: str = "0-0", count: int | None = None) -> list[StreamEntry]:
        """Stream entries with an id greater than `after`, oldest first."""

    async def cache_get(self, key: str) -> str | None: ...

    async def cache_set(self, key: str, value: str) -> None: ...

    async def ping(self) -> None:
        """Return if the store is reachable; raise StoreUnavailable otherwise."""

    async def close(self) -> None: ...


def _check_events(events: Sequence[Event]) -> None:
    for e in events:
        if e.rating is not None and not math.isfinite(e.rating):
            raise ValueError(f"rating of item {e.item_id!r} must be finite, got {e.rating}")


class MemoryStore:
    """In-process store: nothing survives a restart; one event loop uses it."""

    kind = "memory"

    def __init__(self, window: int = 20, cache_size: int = 10_000) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.cache_size = cache_size
        self._histories: dict[str, deque[Event]] = {}
        self._events: list[StreamEntry] = []
        self._cache: OrderedDict[str, str] = OrderedDict()

    async def get_history(self, user_id: str) -> list[Event]:
        return list(self._histories.get(user_id, ()))

    async def append_events(self, user_id: str, events: Sequence[Event]) -> int:
        _check_events(events)
        history = self._histories.setdefault(user_id, deque(maxlen=self.window))
        for e in events:
            history.append(e)
            self._events.append(StreamEntry(f"{len(self._events) + 1}-0", user_id, e, int(time.time())))
        return len(history)

    async def read_events(self, after: str = "0-0", count: int | None = None) -> list[StreamEntry]:
        start = int(after.split("-")[0])  # ids are "<n>-0" with n = position + 1
        out = self._events[start:]
        return out if count is None else out[:count]

    async def cache_get(self, key: str) -> str | None:
        value = self._cache.get(key)
        if value is not None:
            self._cache.move_to_end(key)
        return value

    async def cache_set(self, key: str, value: str) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = value
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)  # least recently used

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisStore:
    """Redis-backed store (redis.asyncio). Connections are lazy: a down server does not stop
    the app from starting, it makes `ping` (and so /readyz) fail."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        window: int = 20,
        cache_ttl_s: int = 86_400,
        stream_maxlen: int = 1_000_000,
        timeout_s: float = 1.0,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.cache_ttl_s = cache_ttl_s
        self.stream_maxlen = stream_maxlen
        self.url = url
        self._redis = redis.asyncio.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
        )

    def _failures(self, op: str) -> AbstractContextManager[None]:
        return _failures(self.url, op)

    async def get_history(self, user_id: str) -> list[Event]:
        with self._failures("get_history"):
            raw = await self._redis.lrange(HISTORY_KEY.format(user_id=user_id), 0, -1)
        return [Event.from_json(r) for r in raw]

    async def append_events(self, user_id: str, events: Sequence[Event]) -> int:
        _check_events(events)
        if not events:
            return len(await self.get_history(user_id))
        key = HISTORY_KEY.format(user_id=user_id)
        with self._failures("append_events"):
            # MULTI/EXEC: the history and the stream change together or not at all
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(key, *[e.to_json() for e in events])
                pipe.ltrim(key, -self.window, -1)  # newest last: keep the tail
                for e in events:
                    pipe.xadd(
                        EVENTS_STREAM,
                        e.stream_fields(user_id),
                        maxlen=self.stream_maxlen,
                        approximate=True,
                    )
                pipe.llen(key)
                out = await pipe.execute()
        return int(out[-1])

    async def read_events(self, after: str = "0-0", count: int | None = None) -> list[StreamEntry]:
        with self._failures("read_events"):
            rows = await self._redis.xrange(EVENTS_STREAM, min=f"({after}", max="+", count=count)
        return _stream_entries(rows)

    async def cache_get(self, key: str) -> str | None:
        with self._failures("cache_get"):
            return await self._redis.get(CACHE_KEY.format(key=key))

    async def cache_set(self, key: str, value: str) -> None:
        with self._failures("cache_set"):
            await self._redis.set(CACHE_KEY.format(key=key), value, ex=self.cache_ttl_s)

    async def ping(self) -> None:
        with self._failures("ping"):
            await self._redis.ping()

    async def close(self) -> None:
        try:
            await self._redis.aclose()
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
    client = redis.Redis.from_url(
        redis_url, decode_responses=True, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
    )
    entries: list[StreamEntry] = []
    after = cursor or STREAM_START
    try:
        with _failures(redis_url, "read_events"):
            while rows := client.xrange(EVENTS_STREAM, min=f"({after}", max="+", count=page_size):
                entries += _stream_entries(rows)
                after = entries[-1].id
    finally:
        client.close()
    return entries, (entries[-1].id if entries else cursor)


def _stream_entries(rows: list[tuple[str, dict[str, str]]]) -> list[StreamEntry]:
    """XRANGE rows -> StreamEntries; a Redis entry id starts with the time it was added (ms)."""
    out = []
    for entry_id, fields in rows:
        added_s = int(entry_id.split("-")[0]) // 1000
        out.append(StreamEntry(entry_id, fields["user_id"], Event.from_stream_fields(fields), added_s))
    return out


@contextmanager
def _failures(url: str, op: str) -> Iterator[None]:
    """Any Redis or socket error inside becomes StoreUnavailable naming `op` (password redacted)."""
    try:
        yield
    except (redis.RedisError, OSError) as exc:
        raise StoreUnavailable(f"redis {op} failed ({_redact(url)}): {exc}", op) from exc


def _redact(url: str) -> str:
    """redis://user:secret@host -> redis://user:***@host, for error messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0] if ":" in creds else ""
    return f"{scheme}://{user}:***@{host}"


def make_store(
    redis_url: str, window: int, cache_size: int, cache_ttl_s: int, stream_maxlen: int
) -> MemoryStore | RedisStore:
    """Redis when a URL is configured, else the in-process store."""
    if redis_url:
        return RedisStore(redis_url, window, cache_ttl_s=cache_ttl_s, stream_maxlen=stream_maxlen)
    return MemoryStore(window, cache_size=cache_size)
