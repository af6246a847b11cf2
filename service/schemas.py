"""Request and response bodies: the HTTP edge only (the engine speaks frozen dataclasses).

Ids (users, items, events) are one type, `Id`, in paths and in bodies alike: 1-256
characters, no control characters, no bidirectional controls (U+061C, U+200E, U+200F,
U+202A-U+202E, U+2066-U+2069: they make an id display as another; other format characters,
such as the zero-width joiner of emoji sequences, are fine), no leading or trailing whitespace,
valid Unicode (and no U+FFFD: a path's bytes that are not UTF-8 arrive as that character, so
"Jos%E9" and "Jos%E8" would otherwise be one user). An id is
refused, never trimmed: an id trimmed in a body but kept in a path would name two users. A JSON
integer is accepted as an id and turned into a string (ml-100k's ids look like numbers). Free
text (titles, descriptions) must be valid Unicode without control characters other than tab
and newline. Bodies are validated strictly against the published schema: "10" is not an
integer, 1 is not a boolean, a number is not a title. Invalid input comes back as 422 naming
the field (service/errors.py).
"""

from __future__ import annotations

import re
import time
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

# 2100-01-01T00:00:00Z: a time in milliseconds is refused, not stored; ratings 0-10. The same
# bounds as the data training reads (model/data/build.py), so retraining's events fit it.
from model.data.build import MAX_TIMESTAMP_S, RATING_RANGE
from model.special_text import BIDI_CONTROLS, BIDI_RE, check_no_bidi, check_shown_text, nfc

ID_MAX = 256
# The id rule as a JSON-schema pattern, for the docs and for clients that generate ids;
# `check_id` applies the same expression (Python's \s is str.isspace, Cc is \x00-\x1f\x7f-\x9f).
# Bidirectional controls (Cf, unlike the other format characters, such as the zero-width joiner
# of emoji sequences, which ids may hold) reorder what is shown: "\u202eadmin" reads "nimda".
_NOT_IN_ID = r"\x00-\x1f\x7f-\x9f\ufffd" + BIDI_CONTROLS
ID_PATTERN = rf"^[^\s{_NOT_IN_ID}](?:[^{_NOT_IN_ID}]*[^\s{_NOT_IN_ID}])?$"
_ID_RE = re.compile(ID_PATTERN)
REPLACEMENT = "\ufffd"  # what a byte that is not UTF-8 decodes to
TEXT_PATTERN = r"^[^\x00-\x08\x0b-\x1f\x7f-\x9f]*$"  # no control character but tab and newline
_TEXT_RE = re.compile(TEXT_PATTERN)

MAX_HISTORY = 1000  # longer inline histories are refused (only the latest window is used)
MAX_EVENTS = 1000
MAX_ITEM_LIST = 1000  # a request's `candidates` or `exclude_items`
MAX_ITEM_BATCH = 1000  # entries (upserts and deletes) of one POST /items:batch
MAX_AHEAD_S = 86_400  # an event may carry a time this far past the server's clock (clock skew)


def _unicode(value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (it holds a lone UTF-16 surrogate)") from None


def check_id(value: str, *, allow_bidi: bool = False) -> str:
    """The id rule (module docstring); the message says which part of it failed. `allow_bidi`:
    for `r2ec user erase/export`, which must reach an id stored before bidi controls were
    refused."""
    if allow_bidi:  # every other part of the rule still holds
        check_id(BIDI_RE.sub("x", value))
        return value
    _unicode(value)
    if _ID_RE.fullmatch(value) is None:
        if any(unicodedata.category(c) == "Cc" for c in value):
            raise ValueError("must not contain control characters")
        check_no_bidi(value, "they make an id display as another")
        if REPLACEMENT in value:
            raise ValueError(
                "must not contain U+FFFD, what bytes that are not UTF-8 decode to (two such ids "
                "would name one user): send ids as UTF-8, percent-encoded in a path"
            )
        raise ValueError("must not start or end with whitespace")
    return value


def check_text(value: str) -> str:
    _unicode(value)
    if _TEXT_RE.fullmatch(value) is None:
        raise ValueError("must not contain control characters other than tab and newline")
    return value


class _Pattern:
    """Adds `pattern` to a field's JSON schema without pydantic enforcing it (a validator does,
    with a message that says which rule failed instead of quoting the expression); with
    `or_integer`, the schema also admits the JSON integers `_integer_id` accepts."""

    def __init__(self, pattern: str, or_integer: bool = False) -> None:
        self.pattern = pattern
        self.or_integer = or_integer

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        schema = {**handler(core_schema), "pattern": self.pattern}
        if not self.or_integer:
            return schema
        return {"anyOf": [schema, {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}]}


def _integer_id(value: Any) -> Any:
    """A JSON integer id (within int64, as the schema says) becomes its decimal string; any other
    number is refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not -(2**63) <= value < 2**63:
            raise ValueError("must be a string or an integer within int64")
        return str(value)
    if isinstance(value, float):
        raise ValueError("must be a string or an integer")
    return value


Id = Annotated[
    str,
    StringConstraints(min_length=1, max_length=ID_MAX),
    BeforeValidator(_integer_id),
    AfterValidator(check_id),
    _Pattern(ID_PATTERN, or_integer=True),
]
ItemId = Id
UserId = Id
# An id in a URL path: the same rules, as text (a path holds no JSON integer). Its schema says
# "string", which tells a schema-driven fuzzer that any value is sent as text: offered the
# body's "string or integer", schemathesis sent a JSON array as "['null']", a valid string id,
# and counted the 201 as a schema-violating request accepted.
PathId = Annotated[
    str, StringConstraints(min_length=1, max_length=ID_MAX), AfterValidator(check_id), _Pattern(ID_PATTERN)
]


def _text(max_length: int, min_length: int = 0) -> Any:
    """Free text: surrounding whitespace trimmed, valid Unicode, no control characters but tab/newline."""
    return Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=min_length, max_length=max_length),
        AfterValidator(check_text),
        _Pattern(TEXT_PATTERN),
    ]


# An item's title, year and genres: one line each. A line break in a title made the user prompt
# read one history entry as two, and the rated list's grammar copied both lines as one title;
# `r2ec data prepare` makes such white space one space (model/special_text.py).
LINE_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"  # no control character, tab or line break


_LINE_RE = re.compile(LINE_PATTERN)


def check_line(value: Any) -> Any:
    """One line of text: refused, not trimmed, where it holds a line break, a tab or any other
    control character anywhere (checked before the surrounding white space is trimmed, as the
    schema's pattern says)."""
    if isinstance(value, str) and _LINE_RE.fullmatch(value) is None:
        raise ValueError("must be one line: no line break, tab or other control characters")
    return value


# An item's title, year and genres, which the page lists and the reasoning copies: one line, and
# no bidirectional control either (`check_shown`).
SHOWN_PATTERN = rf"^[^\x00-\x1f\x7f-\x9f\u2028\u2029{BIDI_CONTROLS}]*$"


def check_shown(value: str) -> str:
    """An item's title, year or genres: no bidirectional control (the id rule's check,
    model/special_text.py `check_shown_text`), then NFC (`nfc`), so "Amélie" typed on macOS
    (e + U+0301) and on Windows are one title."""
    return nfc(check_shown_text(value))


def _line(max_length: int, min_length: int = 0) -> Any:
    """One line of an item's text: `_text` without tabs, line breaks or bidirectional controls,
    in NFC (`check_shown`)."""
    return Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=min_length, max_length=max_length),
        BeforeValidator(check_line),  # before the constraints trim the white space around it
        AfterValidator(check_text),
        AfterValidator(check_shown),
        _Pattern(SHOWN_PATTERN),
    ]


# An item's text as PUT /items (and every route that takes an `ItemUpsert`) stores it, in NFC.
Title = _line(1000, min_length=1)
ShortLine = _line(32)
Line = _line(1000)
LongText = Annotated[_text(100_000), AfterValidator(nfc)]
PathText = _text(4096, min_length=1)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _whole_seconds(value: Any) -> Any:
    """A timestamp sent as a JSON number with no fraction (1700000000.0) is that integer: a
    pandas or parquet export turns an integer column into float64 as soon as one value is
    missing, and `r2ec data prepare` takes such stamps too. One with a fraction is refused,
    not rounded: its default event id would differ from the whole second's."""
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError(f"must be whole Unix seconds, got {value!r}: send an integer (no fraction)")
    return value


class Interaction(_Body):
    item_id: ItemId
    rating: float | None = Field(
        None,
        ge=RATING_RANGE[0],
        le=RATING_RANGE[1],
        allow_inf_nan=False,
        description="Rating, on the scale the model was trained on (1-5 for the shipped ml-100k model).",
    )
    timestamp: Annotated[int | None, BeforeValidator(_whole_seconds)] = Field(
        None,
        ge=0,
        le=MAX_TIMESTAMP_S,
        description="Unix time in seconds, up to 4102444800 (2100-01-01); a number with no fraction "
        "(1700000000.0) is taken as that integer. Default: when the server got it.",
    )


def _reasoning_budget(limit: int | None) -> FieldInfo:
    """The one declaration of a request's `max_reasoning_tokens` bounds (None: no ceiling)."""
    return Field(
        None, ge=0, le=limit, description="Reasoning budget in tokens (default: the server's setting)."
    )


class RecommendRequest(_Body):
    # The app serves `recommend_request(limit)`, this body with the server's ceiling added.
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"history": [{"item_id": "50", "rating": 5}, {"item_id": "172", "rating": 5}], "k": 3},
                {"user_id": "u1", "k": 10, "reasoning": False},
                {"user_id": "u1", "k": 2, "candidates": ["100", "127", "7", "98"], "exclude_items": ["98"]},
            ]
        }
    )
    user_id: UserId | None = Field(
        None, description="Use this user's stored history when `history` is not given."
    )
    history: list[Interaction] | None = Field(
        None,
        max_length=MAX_HISTORY,
        description="Oldest first, or in timestamp order where every entry has one (as a stored "
        "history is kept). Overrides the stored history.",
    )
    k: int = Field(
        10,
        ge=1,
        le=100,
        description="How many items to return, at most: fewer where fewer are left after the exclusions.",
    )
    exclude_history: bool = Field(
        True,
        description="Never recommend an item in the history, nor (with `user_id`) any item the user "
        "has an event for.",
    )
    candidates: list[Id] | None = Field(
        None,
        min_length=1,
        max_length=MAX_ITEM_LIST,
        description="Rank only these items (e.g. another retriever's candidates, to rerank), each "
        "scored exactly; every id must be in the catalog. Default: the whole catalog.",
    )
    exclude_items: list[Id] = Field(
        default_factory=list,
        max_length=MAX_ITEM_LIST,
        description="Never return these items (ids not in the catalog are ignored), whatever "
        "`exclude_history` says.",
    )
    reasoning: bool | None = Field(
        None, description="Reason first (default: the server's setting, on unless R2EC_REASONING=false)."
    )
    max_reasoning_tokens: int | None = _reasoning_budget(None)

    @model_validator(mode="after")
    def _who(self) -> RecommendRequest:
        if self.user_id is None and self.history is None:
            raise ValueError("give `history` or `user_id` (or both)")
        return self


def recommend_request(reasoning_token_limit: int) -> type[RecommendRequest]:
    """RecommendRequest with this server's ceiling (R2EC_REASONING_TOKEN_LIMIT) on
    `max_reasoning_tokens`: a budget over it is a 422 naming the field like any other, and the
    OpenAPI docs show the real bound."""
    return create_model(
        "RecommendRequest",
        __base__=RecommendRequest,
        max_reasoning_tokens=(int | None, _reasoning_budget(reasoning_token_limit)),
    )


class RecommendedItem(BaseModel):
    item_id: str
    title: str
    score: float = Field(description="cos(h_T, h_v) / tau")
    rank: int


class TimingsOut(BaseModel):
    queue_ms: float = Field(
        description="Waiting in the queue for the model (0 for a cache hit answered beside it)."
    )
    generate_ms: float = Field(description="Writing the reasoning (the batch's, or this request's decode).")
    score_ms: float = Field(description="h_T and the index search.")
    total_ms: float = Field(
        description="From the parsed request to the answer: also the history read, the prompt and "
        "the cache lookup."
    )


READ_ITEMS = Field(
    description="The history items the model read, oldest first: the latest ones its prompt shows "
    "(10 for the shipped model); what the reasoning's claims are about."
)
REASONING_CUT = Field(
    description="The reasoning stopped at its token budget (max_reasoning_tokens) before the model "
    "ended it: its last sentence may be unfinished."
)


class ModelOut(BaseModel):
    """Which model answered: what an experiment's exposure record keeps beside the items. The
    same values are the X-Model-Version, X-Model-Fingerprint and X-R2ec-Variant headers."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "version": "20261207-102039-87d819",
                    "checkpoint": "20261207-102039-87d819",
                    "fingerprint": "ed3496b3c78e7360",
                    "variant": "candidate",
                }
            ]
        }
    )

    version: str = Field(description="The checkpoint's version (its r2ec.json), as `model_version`.")
    checkpoint: str = Field(
        description="The served checkpoint as r2ec_model_info's `checkpoint` label names it: its "
        "path under the checkpoint root ('20261207-102039-87d819', 'current')."
    )
    fingerprint: str = Field(
        description="16 hex digits: a hash of the checkpoint's weights, prompt config and tokenizer "
        "and of the serving settings that change answers (dtype, device kind, backend, int8, "
        "exact decode, speculative drafts, the claims' grammar). Equal on every replica serving "
        "the same model; another whenever any of those differs, even under one version."
    )
    variant: str | None = Field(
        description="The replica's R2EC_VARIANT (an experiment's arm); null where it is unset."
    )


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    reasoning: str | None = Field(description="What lm_head wrote before ranking; null without reasoning.")
    model_version: str
    model: ModelOut
    history_source: str = Field(description="'request' or 'store'")
    read_items: list[str] = READ_ITEMS
    cache: str = Field(description="hit, miss or off (no reasoning)")
    reasoning_tokens: int
    reasoning_cut: bool = REASONING_CUT
    timings: TimingsOut


class EventIn(Interaction):
    event_id: Id | None = Field(
        None,
        description="Idempotency key, unique per user: an event whose id the user already has is not "
        "stored again. Default: derived from item_id, rating and timestamp as sent (not request_id).",
    )
    request_id: Id | None = Field(
        None,
        description="The recommendation this event came from: the X-Request-ID its /recommend or "
        "/recommend/stream answered with. Kept with the event in the r2ec:events stream, for "
        "joining with the exposure log r2ec:served (R2EC_EXPOSURE_LOG); retraining ignores it.",
    )

    @field_validator("timestamp")
    @classmethod
    def _not_ahead(cls, timestamp: int | None) -> int | None:
        """A stored history is kept in timestamp order (service/store.py), so an event stamped
        in the future would stay the newest until the clock caught up: refused."""
        now = time.time()
        if timestamp is not None and timestamp > now + MAX_AHEAD_S:
            raise ValueError(
                f"{timestamp} is more than {MAX_AHEAD_S // 3600} h ahead of the server's clock "
                f"({int(now)}); send Unix seconds, or leave it out for now"
            )
        return timestamp


class EventsRequest(_Body):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"events": [{"item_id": "50", "rating": 5, "timestamp": 1700000000, "event_id": "e-1"}]},
                {"events": [{"item_id": "127", "request_id": "3f2c9a1e8b7d4c6f9e0a1b2c3d4e5f60"}]},
            ]
        }
    )

    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS)


class EventOutcome(BaseModel):
    event_id: str
    new: bool = Field(description="False: an event with this id was already stored (a retry).")


class EventsResponse(BaseModel):
    user_id: str
    appended: int = Field(description="Events stored by this request (the new ones).")
    duplicates: int = Field(description="Events already stored under the same event_id.")
    history_length: int
    events: list[EventOutcome] = Field(description="One per event sent, in order.")


class HistoryItemOut(BaseModel):
    item_id: str
    title: str | None
    rating: float | None
    timestamp: int | None
    event_id: str | None = Field(
        description="The event's idempotency key: the client's event_id, else the one the service"
        " derived from the event (as POST /users/{user_id}/events answered); null for events"
        " stored before histories kept it."
    )


class HistoryResponse(BaseModel):
    user_id: str
    history: list[HistoryItemOut]


class UserErasure(BaseModel):
    """The receipt of DELETE /users/{user_id}."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "user_id": "alice@example.com",
                    "erased_at": "2026-12-07T17:20:35.123+00:00",
                    "history_events": 4,
                    "seen_items": 4,
                    "stream_entries": 4,
                    "cached_reasonings": 1,
                    "served_entries": 2,
                    "remains": [
                        "Redis's append-only file and RDB snapshots hold the erased data until they "
                        "are rewritten: BGREWRITEAOF for the AOF, the next BGSAVE for the RDB file.",
                        "Backups of Redis, of the versions root and of the seed dataset, until they expire.",
                    ],
                }
            ]
        }
    )

    user_id: str = Field(
        description="The user erased: the rest of the path, '/' included ('/users/a/b' erases 'a/b')."
    )
    erased_at: str = Field(description="When, ISO 8601 UTC, by the store's clock.")
    history_events: int = Field(description="Events removed from the stored history (its window).")
    seen_items: int = Field(description="Items removed from the user's seen set.")
    stream_entries: int = Field(
        description="The user's entries removed from the event stream retraining reads."
    )
    cached_reasonings: int = Field(
        description="Cached reasonings removed: those written for requests that read this user's "
        "stored history."
    )
    served_entries: int = Field(
        description="The user's entries removed from the exposure log r2ec:served (0 where it is "
        "off or holds none)."
    )
    remains: list[str] = Field(
        description="What this call cannot remove, each in words: where it is and what removes it "
        '(docs/operations.md, "Erasing a user").'
    )


class Item(BaseModel):
    item_id: str
    title: str
    year: str = ""
    genres: str = ""
    description: str = ""


class ItemUpsert(_Body):
    """An item's text. Title, year and genres are one line each without bidirectional controls
    (`check_shown`); none of the four may hold a special token of the served model's tokenizer
    (`<|im_end|>`: a 422 naming the field, service/catalog.py `Catalog.check_text`), which a
    prompt would carry as a control token. All four are stored in Unicode NFC."""

    title: Title
    year: ShortLine | None = None
    genres: Line | None = None
    description: LongText | None = None


class ItemUpsertResponse(BaseModel):
    item: Item
    created: bool
    index_size: int


class ItemBatchUpsert(ItemUpsert):
    """One item of a batch: its id and its text, as PUT /items/{item_id} takes them."""

    item_id: ItemId


class ItemBatch(_Body):
    """POST /items:batch: items to add or replace and ids to remove, at most MAX_ITEM_BATCH in
    all; an id may appear once in a batch (`duplicate_fields`)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "upsert": [
                        {"item_id": "sku-17", "title": "Trail Runner 2", "year": "2023", "genres": "Shoes"},
                        {"item_id": "sku-18", "title": "Trail Runner 3"},
                    ],
                    "delete": ["sku-3"],
                }
            ]
        }
    )

    upsert: list[ItemBatchUpsert] = Field(
        default_factory=list,
        max_length=MAX_ITEM_BATCH,
        description="Items to add or replace, each encoded with the served model as PUT "
        "/items/{item_id} does (a PUT replaces the whole item).",
    )
    delete: list[Id] = Field(
        default_factory=list,
        max_length=MAX_ITEM_BATCH,
        description="Items to remove; an id the catalog does not hold is reported in `not_found`, "
        "not refused.",
    )

    @model_validator(mode="after")
    def _bounded(self) -> ItemBatch:
        if len(self.upsert) + len(self.delete) > MAX_ITEM_BATCH:
            raise ValueError(
                f"at most {MAX_ITEM_BATCH} entries in all (`upsert` and `delete`): send "
                f"{len(self.upsert) + len(self.delete)} as several batches"
            )
        return self

    def duplicate_fields(self) -> list[dict[str, Any]]:
        """A validation error (FastAPI's shape) for each entry whose id an earlier entry of the
        batch has (`upsert.3.item_id`, `delete.0`): one batch edits an item once."""
        first: dict[str, str] = {}
        errors = []
        entries = [(("upsert", n, "item_id"), u.item_id) for n, u in enumerate(self.upsert)]
        entries += [(("delete", n), item_id) for n, item_id in enumerate(self.delete)]
        for loc, item_id in entries:
            if item_id in first:
                errors.append(
                    {
                        "type": "value_error",
                        "loc": ("body", *loc),
                        "msg": f"the same id as {first[item_id]}: a batch edits an item once",
                    }
                )
            else:
                first[item_id] = ".".join(map(str, loc))
        return errors


class ItemBatchOutcome(BaseModel):
    item_id: str
    result: Literal["created", "replaced", "deleted", "not_found"]


class ItemBatchResponse(BaseModel):
    created: int = Field(description="Items of `upsert` the catalog did not hold.")
    replaced: int = Field(description="Items of `upsert` that replaced one.")
    deleted: int = Field(description="Items of `delete` removed.")
    not_found: list[str] = Field(description="Ids of `delete` the catalog did not hold (nothing done).")
    index_size: int = Field(description="Items in the index after the batch.")
    results: list[ItemBatchOutcome] = Field(
        description="One per entry, in order: those of `upsert`, then those of `delete`."
    )


class ItemDeleteResponse(BaseModel):
    deleted: str
    index_size: int


class ReloadRequest(_Body):
    checkpoint: PathText | None = Field(
        None,
        description="A version name ('v2') or a path under the checkpoint root: R2EC_CHECKPOINT "
        "where it holds a CURRENT pointer, else the directory that holds it (a relative path is "
        "taken from the root; one that resolves outside it is a 422). Default: R2EC_CHECKPOINT.",
    )


class ReloadResponse(BaseModel):
    previous_version: str
    model_version: str
    checkpoint: str
    items: int
    seconds: float


class Health(BaseModel):
    status: str


class BackboneOut(BaseModel):
    """The served checkpoint's backbone: what its r2ec.json records and what was loaded."""

    status: str = Field(
        description='"match": the one r2ec.json records; "unrecorded": a checkpoint written '
        'before checkpoints recorded it, not checked; "mismatch_allowed": another one, served '
        'under R2EC_ALLOW_BACKBONE_MISMATCH; "unchecked": it could not be read to hash it; '
        '"none": full fine-tuned weights, no backbone.'
    )
    loaded: str | None = Field(
        description='The backbone loaded: "sha256:" and its digest (for smollm2 and a .gguf, '
        "the GGUF file's, as sha256sum prints it), or a built-in's name."
    )
    recorded: str | None = Field(description="What r2ec.json records, in the same form; null: nothing.")


class Readiness(BaseModel):
    status: str
    model_version: str | None = None
    items: int | None = None
    index: str | None = Field(
        default=None,
        description='The item index searched and its parameters: "flat", "ivf nlist=1024 nprobe=16", '
        '"hnsw M=32 ef_search=64".',
    )
    store: str
    reasons: list[str] = []
    backbone: BackboneOut | None = None


class FieldError(BaseModel):
    field: str = Field(description="Where: 'k', 'history.0.item_id', 'user_id' (a path parameter).")
    message: str


# every `code` an error body may carry (service/errors.py; the README lists the same)
ERROR_CODES = (
    *("invalid_request", "invalid_body", "unknown_items", "empty_history", "not_found"),
    *("method_not_allowed", "unauthorized", "forbidden", "reload_failed", "reload_in_progress"),
    *("body_too_large", "overloaded", "shutting_down", "store_unavailable", "unavailable"),
    *("internal_error", "not_saved", "body_timeout", "invalid_header", "deadline_exceeded"),
    *("rate_limited", "auth_throttled"),
)


class ErrorBody(BaseModel):
    status: int
    code: str = Field(description=", ".join(ERROR_CODES))
    message: str = Field(description="One line for people; names the fields or the ids.")
    fields: list[FieldError] = Field(
        default_factory=list, description="Invalid fields (422), or the bad header (400 invalid_header)."
    )
    unknown_item_ids: list[str] | None = Field(None, description="Ids the catalog does not hold.")


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx body (service/errors.py)."""

    error: ErrorBody


# ---------------------------------------------------------------------- POST /recommend/stream
class StreamReasoning(BaseModel):
    """`event: reasoning`: the next piece of the reasoning; the pieces, in order, concatenate to
    the `reasoning` /recommend would return."""

    text: str


class StreamItems(BaseModel):
    """`event: items`: the ranked items, as /recommend returns them."""

    items: list[RecommendedItem]
    model_version: str
    model: ModelOut
    history_source: str = Field(description="'request' or 'store'")
    read_items: list[str] = READ_ITEMS


class StreamDone(BaseModel):
    """`event: done`, the last event of a stream that succeeded."""

    reasoning_tokens: int
    reasoning_cut: bool = REASONING_CUT
    cache: str = Field(description="hit, miss or off (no reasoning)")
    timings: TimingsOut


STREAM_EVENTS: dict[str, type[BaseModel]] = {
    "reasoning": StreamReasoning,
    "items": StreamItems,
    "done": StreamDone,
    "error": ErrorResponse,
}


def stream_item_schema(ref_prefix: str = "#/components/schemas/") -> dict[str, Any]:
    """The OpenAPI schema of one event of POST /recommend/stream (OpenAPI 3.2's `itemSchema`,
    which FastAPI writes for its own SSE routes too): `event` names it, `data` is JSON of that
    event's model. The models are inlined; what they nest (RecommendedItem, TimingsOut,
    ErrorBody, ...) is referenced from the components /recommend already puts there."""
    variants = []
    for name, model in STREAM_EVENTS.items():
        schema = model.model_json_schema(ref_template=ref_prefix + "{model}")
        schema.pop("$defs", None)
        variants.append(
            {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": {"const": name},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": schema,
                    },
                },
            }
        )
    return {
        "description": "One event: `event: <name>` and `data: <JSON>` lines, then a blank line. In "
        "order: `reasoning` (zero or more, none without reasoning; the pieces concatenate to the "
        "reasoning /recommend returns), then `items` and `done`; or, if the answer fails after the "
        "stream began, one `error` with the error body and the end. Lines starting with `:` are "
        "keep-alive comments.",
        "oneOf": variants,
    }


# ---------------------------------------------------------------------- catalog search (GET /items)
def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


# GET /items's `q`: whitespace only is refused as "" is (it used to answer 200 and no items), and
# control characters as in any text (a NUL was searched for and echoed back)
# its length is a constraint on the string itself: given as `Query(max_length=...)` around these
# validators, pydantic checked it after them as a sequence's, "at most 200 items"
SEARCH_MAX = 200
SearchQuery = Annotated[
    str,
    StringConstraints(min_length=1, max_length=SEARCH_MAX),
    AfterValidator(_not_blank),
    AfterValidator(check_text),
    _Pattern(TEXT_PATTERN),
]


class ItemMatch(BaseModel):
    item_id: str
    title: str
    year: str = ""
    genres: str = ""
    match: Literal["exact", "prefix", "word", "substring"] = Field(
        description="How the query met the title; results are ordered by it, then by title."
    )


class ItemSearchResponse(BaseModel):
    query: str
    items: list[ItemMatch]
