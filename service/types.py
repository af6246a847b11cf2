"""What the service's layers hand each other: frozen dataclasses and the errors a query can raise.

A request travels as: `Query` (what the client asked, with its history resolved) ->
`PreparedQuery` (made ready once for one model version: ids checked, prompt rendered, cache key
hashed) -> the micro-batch -> `Result`. The route layer turns these into pydantic replies; nothing
here knows HTTP, so the messages name fields and ids, never routes.
"""

from __future__ import annotations

import base64
import json
import math
import numbers
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from service.store import Event

if TYPE_CHECKING:
    from model.constrained import Grammar


class QueryError(ValueError):
    """A query that cannot be answered as asked (the client's mistake: HTTP 422)."""


class UnknownItemsError(QueryError):
    """Item ids the catalog does not hold; `where` says which part of the input named them."""

    def __init__(self, item_ids: Sequence[str], where: str = "history") -> None:
        self.item_ids = list(item_ids)
        shown = ", ".join(repr(i) for i in self.item_ids[:20])
        more = f" and {len(self.item_ids) - 20} more" if len(self.item_ids) > 20 else ""
        super().__init__(f"unknown item ids in {where}: {shown}{more}")


class InvalidQueryError(QueryError):
    """A query field of the wrong type or out of range, for a caller of the Python API (the HTTP
    layer's pydantic models refuse the same before a Query is made). `field` names it as the
    HTTP error bodies do: "k", "history.2.rating", "candidates"."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}")


class EmptyHistoryError(QueryError):
    """No history to reason over. `user_id` is set when it was that user's stored history that
    turned out empty, so the HTTP layer can say how to fill it."""

    def __init__(self, user_id: str | None = None, all_deleted: bool = False) -> None:
        self.user_id = user_id
        if user_id is None:
            message = "history is empty: give at least one item or a user_id with stored events"
        elif all_deleted:
            message = f"history is empty: every item stored for user {user_id!r} left the catalog"
        else:
            message = f"history is empty: user {user_id!r} has no stored events"
        super().__init__(message)


VECTOR_DTYPE = "<f4"  # how a cached h_T is stored: little-endian float32, whatever the host
NORM_TOLERANCE = 1e-3  # a cached h_T is normalised; one further from unit length is corrupt


@dataclass(frozen=True)
class CachedReasoning:
    """A reasoning as the cache holds it: token ids (so h_T can be rebuilt exactly), text and,
    since issue 12, the normalised h_T itself, so a repeated history costs one index search
    instead of a forward pass. `vector` is None in entries written before it was cached; those
    still load and go through the batch, which rebuilds h_T from the ids."""

    completion_ids: tuple[int, ...]
    text: str
    vector: np.ndarray | None = field(default=None, compare=False, repr=False)  # (H,) float32

    def to_json(self) -> str:
        """JSON with the vector as base64 of its float32 bytes: 4 bytes a dimension before
        base64 (~3 KB for H = 576), where a list of decimal floats would take ~11 KB."""
        d: dict[str, Any] = {"ids": list(self.completion_ids), "text": self.text}
        if self.vector is not None:
            v = np.ascontiguousarray(self.vector, dtype=VECTOR_DTYPE)
            d["vector"] = {
                "dtype": "float32",
                "dim": int(v.shape[0]),
                "b64": base64.b64encode(v.tobytes()).decode("ascii"),
            }
        return json.dumps(d)

    @classmethod
    def from_json(cls, raw: str | bytes, dim: int | None = None) -> CachedReasoning:
        """Parse an entry; ValueError (or KeyError/TypeError) for anything unreadable, which the
        caller treats as a miss. A vector must be float32, `dim` long (the served model's hidden
        size, when given), finite and of unit length: a vector that fails any of these would
        rank the catalog wrongly without any error, so the entry is refused as a whole."""
        d = json.loads(raw)
        ids = tuple(int(i) for i in d["ids"])
        text = str(d["text"])
        found = d.get("vector")
        return cls(ids, text, None if found is None else _read_vector(found, dim))


def _read_vector(found: Any, dim: int | None) -> np.ndarray:
    """The (H,) float32 array of a cached entry's "vector" field (CachedReasoning.from_json)."""
    if not isinstance(found, dict) or found.get("dtype") != "float32":
        raise ValueError("cached vector is not a float32 vector")
    size = int(found["dim"])
    data = base64.b64decode(str(found["b64"]), validate=True)
    if len(data) != 4 * size:
        raise ValueError(f"cached vector holds {len(data)} bytes for dim {size}")
    if dim is not None and size != dim:
        raise ValueError(f"cached vector has dim {size}, the model's hidden size is {dim}")
    v = np.frombuffer(data, dtype=VECTOR_DTYPE).astype(np.float32)
    if not np.isfinite(v).all():
        raise ValueError("cached vector is not finite")
    if abs(float(np.linalg.norm(v)) - 1.0) > NORM_TOLERANCE:
        raise ValueError("cached vector is not normalised")
    v.setflags(write=False)  # shared by every hit on this entry
    return v


# What a history entry may be in the Python API (`Query.history`, `Recommender.recommend`): an
# Event, an (item_id, rating) or (item_id, rating, timestamp) tuple, a dict with those keys, or
# a bare item id.
HistoryEntry = Event | tuple | Mapping[str, Any] | str | int
_ENTRY_KEYS = frozenset({"item_id", "rating", "timestamp", "event_id"})


@dataclass(frozen=True)
class Query:
    """One recommendation request after the HTTP edge: the history is final (inline or stored)
    and the server's defaults are filled in.

    Made from Python, it is checked and normalised when made (InvalidQueryError naming the
    field): history entries become Events (tuples, dicts and bare ids accepted, item ids
    made str, a NaN rating read as none), ratings must lie in 0-10 and timestamps be whole
    seconds before 2100, as HTTP requires; `k` >= 1 and `max_reasoning_tokens` >= 0 must be
    ints, `reasoning` and `exclude_history` bools; `seen_items`, `exclude_items` and
    `candidates` become frozensets of str ids (`candidates` not empty). A history of ids the
    catalog does not hold is refused later, by `Recommender.prepare` (UnknownItemsError)."""

    history: tuple[Event, ...]
    k: int = 10
    exclude_history: bool = True
    reasoning: bool = True
    max_reasoning_tokens: int = 64
    # The user whose stored history this is (None: the client sent it). A stored history may name
    # items deleted from the catalog since they were recorded: those are dropped, not refused.
    stored_user: str | None = None
    # With exclude_history, items excluded beyond the history: every item the user has an event
    # for (the store's seen set), so a 20-item prompt window does not let older ones back in.
    seen_items: frozenset[str] = frozenset()
    # The request's own limits on the ranking: items never returned, and (None: the whole
    # catalog) the only items ranked, e.g. another retriever's candidates to rerank.
    exclude_items: frozenset[str] = frozenset()
    candidates: frozenset[str] | None = None
    submitted_at: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        fix = object.__setattr__  # frozen: normalised values are set once, here
        fix(self, "history", history_events(self.history))
        fix(self, "k", whole(self.k, "k", least=1))
        fix(self, "max_reasoning_tokens", whole(self.max_reasoning_tokens, "max_reasoning_tokens", least=0))
        for name in ("reasoning", "exclude_history"):
            value = getattr(self, name)
            if not isinstance(value, bool | np.bool_):
                raise InvalidQueryError(name, f"must be True or False, got {value!r}")
            fix(self, name, bool(value))
        if self.stored_user is not None and not isinstance(self.stored_user, str):
            raise InvalidQueryError("stored_user", f"must be a str or None, got {self.stored_user!r}")
        fix(self, "seen_items", _ids(self.seen_items, "seen_items"))
        fix(self, "exclude_items", _ids(self.exclude_items, "exclude_items"))
        if self.candidates is not None:
            candidates = _ids(self.candidates, "candidates")
            if not candidates:
                raise InvalidQueryError(
                    "candidates", "is empty: give at least one id, or None for the whole catalog"
                )
            fix(self, "candidates", candidates)

    @property
    def wants_reasoning(self) -> bool:
        return self.reasoning and self.max_reasoning_tokens > 0


def history_events(history: Iterable[HistoryEntry]) -> tuple[Event, ...]:
    """A history as Events, oldest first: each entry an Event, an (item_id, rating) or (item_id,
    rating, timestamp) tuple, a dict of those keys (and `event_id`), or a bare item id. Item ids
    become str (HTTP coerces them too), a NaN rating (pandas' missing value) becomes None; an
    entry of the wrong type or out of range raises InvalidQueryError naming it
    ("history.3.rating"). Events already valid are kept as they are (the same objects)."""
    if isinstance(history, str | bytes | Mapping) or not isinstance(history, Iterable):
        raise InvalidQueryError(
            "history", f"must be a list of entries (Event, (item_id, rating), dict or id), got {history!r}"
        )
    (low, high), latest = _bounds()
    out = []
    for j, entry in enumerate(history):
        if type(entry) is Event and _valid(entry, low, high, latest):  # the service's own: as it is
            out.append(entry)
            continue
        where = f"history.{j}"
        if isinstance(entry, Event):
            item_id, rating, timestamp, event_id = (
                entry.item_id,
                entry.rating,
                entry.timestamp,
                entry.event_id,
            )
        elif isinstance(entry, Mapping):
            unknown = set(entry) - _ENTRY_KEYS
            if unknown or "item_id" not in entry:
                problem = f"unknown keys {sorted(map(str, unknown))}" if unknown else "has no item_id"
                raise InvalidQueryError(where, f"{problem} (keys: item_id, rating, timestamp, event_id)")
            item_id, rating = entry["item_id"], entry.get("rating")
            timestamp, event_id = entry.get("timestamp"), entry.get("event_id")
        elif isinstance(entry, tuple | list):
            if not 1 <= len(entry) <= 3:
                raise InvalidQueryError(
                    where, f"must be (item_id, rating) or (item_id, rating, timestamp), got {entry!r}"
                )
            item_id, rating, timestamp = (*entry, None, None)[:3]
            event_id = None
        else:
            item_id, rating, timestamp, event_id = entry, None, None, None
        out.append(
            Event(
                _id(item_id, f"{where}.item_id"),
                _rating(rating, f"{where}.rating"),
                None if timestamp is None else whole(timestamp, f"{where}.timestamp", least=0, most=latest),
                None if event_id is None else str(event_id),
            )
        )
    return tuple(out)


def _valid(e: Event, low: float, high: float, latest: int) -> bool:
    """Whether an Event needs nothing changed: a non-empty str id, a float rating in range (not
    NaN) or None, an int timestamp in range or None, a str event id or None. The fast path for
    the service's own histories (up to 1000 events a request)."""
    r, t = e.rating, e.timestamp
    return (
        type(e.item_id) is str
        and e.item_id != ""
        and (r is None or (type(r) is float and low <= r <= high))
        and (t is None or (type(t) is int and 0 <= t <= latest))
        and (e.event_id is None or type(e.event_id) is str)
    )


def _bounds() -> tuple[tuple[float, float], int]:
    """The rating range and the latest timestamp HTTP and training accept (model/data/build.py,
    imported here, not at the top: it loads pandas)."""
    from model.data.build import MAX_TIMESTAMP_S, RATING_RANGE

    return RATING_RANGE, MAX_TIMESTAMP_S


def _id(value: Any, where: str) -> str:
    """An item id as str: a str, or an int (ml-100k's ids read as numbers)."""
    if isinstance(value, bool) or not isinstance(value, str | numbers.Integral):
        raise InvalidQueryError(where, f"must be a str (or int) item id, got {value!r}")
    text = str(value)
    if not text:
        raise InvalidQueryError(where, "must not be empty")
    return text


def as_item_ids(values: Any, where: str) -> list[str]:
    """A set or list of item ids as str ids, in their order, each once; InvalidQueryError naming
    `where` for a lone str (a set of its characters is never what was meant) or a wrong type."""
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise InvalidQueryError(where, f"must be a set or list of item ids, got {values!r}")
    return list(dict.fromkeys(_id(v, where) for v in values))


def as_item_id(value: Any, where: str = "item_id") -> str:
    """One item id as str (an int is accepted); InvalidQueryError naming `where` otherwise."""
    return _id(value, where)


def _ids(values: Any, where: str) -> frozenset[str]:
    return frozenset(as_item_ids(values, where))


def _rating(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidQueryError(where, f"must be a number or None, got {value!r}")
    rating = float(value)
    if math.isnan(rating):  # pandas' missing value: no rating, as the prepared data reads it
        return None
    (low, high), _ = _bounds()
    if not low <= rating <= high:
        raise InvalidQueryError(where, f"must be between {low:g} and {high:g}, got {value!r}")
    return rating


def whole(value: Any, where: str, least: int, most: int | None = None) -> int:
    """An int (numpy's too, not a bool) in [least, most]; InvalidQueryError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidQueryError(where, f"must be an int, got {value!r}")
    if value < least or (most is not None and value > most):
        bound = f">= {least}" if most is None else f"between {least} and {most}"
        raise InvalidQueryError(where, f"must be {bound}, got {value}")
    return int(value)


@dataclass(frozen=True)
class PreparedQuery:
    """A Query made ready for one model version, once per request: the cache lookup and the batch
    both read it. A batch run by another version (a reload came in between) prepares it again."""

    query: Query  # its history holds only items the catalog knew
    model_version: str
    prompt: str  # the rendered user prompt (chat template applied)
    cache_key: str | None  # None when the query does not reason
    fingerprint: str = ""  # the preparing model's (Recommender.fingerprint)
    cached: CachedReasoning | None = None  # the reasoning found under cache_key, if any
    # the grammar the reasoning's claims are decoded under (model/constrained.py), or None, and
    # what it was built from beyond the prompt (the window's genres and decades), which the cache
    # key names
    constraint: Grammar | None = field(default=None, compare=False, hash=False, repr=False)
    grammar: str = "free"
    # Streaming (POST /recommend/stream): called ON THE MODEL THREAD with each new piece of the
    # reasoning text as it becomes known; the pieces concatenate to Result.reasoning. The batch
    # path calls it once with the whole text (generated or cached) before scoring; a token-level
    # decoder calls it per token. It must not block; what it raises is logged, never fails the
    # batch. Not part of the query's identity.
    on_text: Callable[[str], None] | None = field(default=None, compare=False, hash=False, repr=False)
    # when it entered the batcher's queue (perf_counter; None: not through the queue): the
    # reply's queue_ms and r2ec_queue_wait_seconds count from here, not from the request's
    # arrival, which the history read, the prompt and the cache lookup come after
    queued_at: float | None = field(default=None, compare=False, hash=False, repr=False)
    # the prompt's token ids, where `prepare` tokenized it already (a query without reasoning:
    # the batcher counts its prefill's tokens before it reaches the model thread); () where not,
    # and the model thread tokenizes `prompt` itself
    prompt_ids: tuple[int, ...] = field(default=(), compare=False, hash=False, repr=False)


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    title: str
    score: float  # cos(h_T, h_v) / tau; from `Recommender.similar_items`, cos(h_v, h_w)
    rank: int  # 1-based


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    generate_ms: float  # the batch's generate call (0 when nothing was generated)
    score_ms: float  # the batch's h_T forward pass + index search (a cached h_T: the search)
    total_ms: float


@dataclass(frozen=True)
class Result:
    items: tuple[ScoredItem, ...]
    reasoning: str | None  # None when reasoning was off
    model_version: str
    timings: Timings
    reasoning_tokens: int
    cache: str  # "hit", "miss" (generated here) or "off" (no reasoning)
    # the history items the model read (the prompt's window, the latest `max_history`), oldest
    # first, and whether the reasoning stopped at its token budget before the model ended it
    read_items: tuple[str, ...] = ()
    reasoning_cut: bool = False
    cache_key: str | None = None
    # what the caller may cache under cache_key: a new reasoning with its h_T, or a hit read from
    # an entry without h_T (written before vectors were cached), now with it
    generated: CachedReasoning | None = None
    # the answering model's identity beyond its version (Recommender.fingerprint): its files
    # and the serving settings that change its answers; and its checkpoint's name
    # (Recommender.label: as r2ec_model_info's `checkpoint` in the service)
    fingerprint: str = ""
    checkpoint: str = ""
