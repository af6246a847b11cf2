"""Request and response bodies: the HTTP edge only (the engine speaks frozen dataclasses).

Item ids are strings; JSON numbers are accepted and turned into strings (ml-100k's ids look
like numbers). Validation errors come back as 422 with the field's location in `loc`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model, model_validator
from pydantic.fields import FieldInfo

ItemId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]
UserId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]

MAX_HISTORY = 1000  # longer inline histories are refused (only the latest window is used)
MAX_EVENTS = 1000


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class Interaction(_Body):
    item_id: ItemId
    rating: float | None = Field(None, ge=0, le=10, allow_inf_nan=False, description="Rating, e.g. out of 5.")
    timestamp: int | None = Field(None, ge=0, description="Unix time in seconds.")


def _reasoning_budget(limit: int | None) -> FieldInfo:
    """The one declaration of a request's `max_reasoning_tokens` bounds (None: no ceiling)."""
    return Field(
        None, ge=0, le=limit, description="Reasoning budget in tokens (default: the server's setting)."
    )


class RecommendRequest(_Body):
    # The app serves `recommend_request(limit)`, this body with the server's ceiling added.
    user_id: UserId | None = Field(
        None, description="Use this user's stored history when `history` is not given."
    )
    history: list[Interaction] | None = Field(
        None, max_length=MAX_HISTORY, description="Oldest first. Overrides the stored history."
    )
    k: int = Field(10, ge=1, le=100, description="How many items to return.")
    exclude_history: bool = Field(True, description="Never recommend an item in the history.")
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
    queue_ms: float
    generate_ms: float
    score_ms: float
    total_ms: float


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    reasoning: str | None
    model_version: str
    history_source: str = Field(description="'request' or 'store'")
    cache: str = Field(description="hit, miss or off (no reasoning)")
    reasoning_tokens: int
    timings: TimingsOut


class EventsRequest(_Body):
    events: list[Interaction] = Field(min_length=1, max_length=MAX_EVENTS)


class EventsResponse(BaseModel):
    user_id: str
    appended: int
    history_length: int


class HistoryItemOut(BaseModel):
    item_id: str
    title: str | None
    rating: float | None
    timestamp: int | None


class HistoryResponse(BaseModel):
    user_id: str
    history: list[HistoryItemOut]


class Item(BaseModel):
    item_id: str
    title: str
    year: str = ""
    genres: str = ""
    description: str = ""


class ItemUpsert(_Body):
    title: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)]
    year: str | None = Field(None, max_length=32)
    genres: str | None = Field(None, max_length=1000)
    description: str | None = Field(None, max_length=100_000)


class ItemUpsertResponse(BaseModel):
    item: Item
    created: bool
    index_size: int


class ReloadRequest(_Body):
    checkpoint: str | None = Field(
        None, description="Checkpoint directory (default: the configured R2EC_CHECKPOINT)."
    )


class ReloadResponse(BaseModel):
    previous_version: str
    model_version: str
    checkpoint: str
    items: int
    seconds: float


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    model_version: str | None = None
    items: int | None = None
    store: str
    reasons: list[str] = []


# ---------------------------------------------------------------------- catalog search (GET /items)
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
