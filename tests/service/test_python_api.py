"""The model from Python (journey 39): `service.load` as `r2ec serve` loads, Query's checks and
the history forms it takes, `recommend`, `score`, `similar_items`, and a batch whose bad query
fails alone."""

from __future__ import annotations

import math

import numpy as np
import pytest

import service
from service.offline import DETERMINISTIC, serve_load_kwargs
from service.store import Event
from service.types import (
    EmptyHistoryError,
    InvalidQueryError,
    Query,
    QueryError,
    Result,
    UnknownItemsError,
)

H = (Event("i1", 5.0, 100), Event("i2", 4.0, 200), Event("i3", 3.0, 300))


# -- Query: what a history entry may be, and what is refused ---------------------------------------
def test_history_entries_in_every_form_become_the_same_events():
    forms = [
        [("i1", 5, 100), ("i2", 4.0, 200), ("i3", np.float64(3), np.int64(300))],
        [{"item_id": "i1", "rating": 5, "timestamp": 100}, {"item_id": "i2", "rating": 4, "timestamp": 200}]
        + [{"item_id": "i3", "rating": 3.0, "timestamp": 300}],
        list(H),
    ]
    for history in forms:
        assert Query(history).history == H
    assert Query(["i1", 7]).history == (Event("i1"), Event("7"))  # bare ids; an int id made str
    assert Query([(50, 5)]).history == (Event("50", 5.0),)
    assert Query([("i1", float("nan"))]).history == (Event("i1", None),)  # pandas' missing rating
    event = Event("i1", 5.0, 100, "e-1")
    assert Query([event]).history[0] is event  # a valid Event is kept as it is (its event_id too)


def test_ids_of_every_set_become_str():
    q = Query(H, seen_items=[1, "i2"], exclude_items={3}, candidates=("i4", 5))
    assert q.seen_items == {"1", "i2"} and q.exclude_items == {"3"} and q.candidates == {"i4", "5"}
    assert isinstance(q.seen_items, frozenset) and isinstance(q.candidates, frozenset)


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"k": 0}, "k", "must be >= 1, got 0"),
        ({"k": -5}, "k", "got -5"),
        ({"k": "10"}, "k", "must be an int"),
        ({"k": True}, "k", "must be an int"),
        ({"max_reasoning_tokens": -1}, "max_reasoning_tokens", ">= 0"),
        ({"reasoning": "yes"}, "reasoning", "True or False"),
        ({"exclude_history": None}, "exclude_history", "True or False"),
        ({"history": [Event("i1", "5")]}, "history.0.rating", "must be a number"),
        ({"history": [("i1", 4), ("i2", 42)]}, "history.1.rating", "between 0 and 10, got 42"),
        ({"history": [("i1", -1)]}, "history.0.rating", "between 0 and 10"),
        ({"history": [("i1", math.inf)]}, "history.0.rating", "between 0 and 10"),
        ({"history": [("i1", 5, 1.5)]}, "history.0.timestamp", "must be an int"),
        ({"history": [("i1", 5, 1_700_000_000_000)]}, "history.0.timestamp", "between 0 and"),
        ({"history": [3.5]}, "history.0.item_id", "item id"),
        ({"history": [("",)]}, "history.0.item_id", "must not be empty"),
        ({"history": [("i1", 5, 1, 2)]}, "history.0", "(item_id, rating)"),
        ({"history": [{"id": "i1"}]}, "history.0", "unknown keys ['id']"),
        ({"history": [{"rating": 5}]}, "history.0", "has no item_id"),
        ({"history": "i1"}, "history", "must be a list"),
        ({"candidates": set()}, "candidates", "is empty"),
        ({"candidates": "i1"}, "candidates", "set or list of item ids"),
        ({"seen_items": None}, "seen_items", "set or list"),
    ],
)
def test_a_bad_field_is_refused_by_name(fields, field, says):
    with pytest.raises(InvalidQueryError) as caught:
        Query(**{"history": H, **fields})
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ") and says in str(caught.value)
    assert isinstance(caught.value, QueryError) and isinstance(caught.value, ValueError)


# -- recommend_batch: one bad query never fails its batch-mates -------------------------------------
def test_a_query_made_past_the_checks_fails_alone(engine):
    bad = Query(H, reasoning=False)
    object.__setattr__(bad, "history", (Event("i1", "5"),))  # what Query's checks now refuse
    good = Query(H, k=3, reasoning=False)
    out = engine.recommend_batch([good, bad, {"history": H}, good])  # type: ignore[list-item]
    assert isinstance(out[0], Result) and isinstance(out[3], Result)
    assert isinstance(out[1], InvalidQueryError) and "TypeError" in str(out[1])
    assert isinstance(out[2], InvalidQueryError) and "must be a Query, got dict" in str(out[2])
    assert [i.item_id for i in out[0].items] == [i.item_id for i in out[3].items]


# -- recommend, score, similar_items ----------------------------------------------------------------
def test_recommend_is_the_batch_path_for_one_user(engine):
    result = engine.recommend([("i1", 5, 100), ("i2", 4, 200), ("i3", 3, 300)], k=4, max_reasoning_tokens=6)
    (batched,) = engine.recommend_batch([Query(H, k=4, max_reasoning_tokens=6)])
    assert [i.item_id for i in result.items] == [i.item_id for i in batched.items]
    np.testing.assert_allclose([i.score for i in result.items], [i.score for i in batched.items], atol=1e-4)
    assert result.reasoning == batched.reasoning and result.reasoning_tokens > 0
    off = engine.recommend(H, k=4, reasoning=False, seen_items=["i4"], exclude_items={"i5"})
    assert off.reasoning is None and not {"i1", "i2", "i3", "i4", "i5"} & {i.item_id for i in off.items}


def test_recommend_raises_what_the_batch_returns(engine):
    with pytest.raises(UnknownItemsError, match="unknown item ids in history: 'nope'"):
        engine.recommend([("i1", 5), ("nope", 4)])
    with pytest.raises(UnknownItemsError, match="in candidates: 'nope'"):
        engine.recommend(H, candidates=["i4", "nope"])
    with pytest.raises(EmptyHistoryError):
        engine.recommend([])
    with pytest.raises(InvalidQueryError, match="^k: must be >= 1, got 0$"):
        engine.recommend(H, k=0)


def test_score_gives_every_id_asked_its_whole_catalog_score(engine):
    ids = ["i9", "i1", "i4", "i7", "i5", "i6", "i8", "i2"]
    whole = engine.recommend(H, k=len(engine.catalog), exclude_history=False, reasoning=False)
    catalog = {i.item_id: i.score for i in whole.items}
    scores = engine.score(H, ids, reasoning=False)
    assert list(scores) == ids  # the order asked, history items (i1, i2) included
    for item, score in scores.items():
        assert score == pytest.approx(catalog[item], abs=1e-4)
    many = engine.score(H, list(engine.catalog.titles), reasoning=False)  # past k=10
    assert len(many) == len(engine.catalog) > 10
    assert list(engine.score(H, ["i4", "i4", "i5"], reasoning=False)) == ["i4", "i5"]
    with pytest.raises(UnknownItemsError):
        engine.score(H, ["i4", "nope"])
    with pytest.raises(InvalidQueryError, match="^item_ids: is empty"):
        engine.score(H, [])


def test_similar_items_are_the_nearest_item_vectors(engine):
    items = list(engine.catalog.titles)
    vectors = np.stack([engine.catalog.index.vector(i) for i in items])
    cos = vectors @ engine.catalog.index.vector("i2")
    expected = [items[j] for j in np.argsort(-cos, kind="stable") if items[j] != "i2"][:4]
    similar = engine.similar_items("i2", k=4)
    assert [s.item_id for s in similar] == expected
    assert [s.rank for s in similar] == [1, 2, 3, 4]
    assert [s.title for s in similar] == [engine.catalog.titles[i] for i in expected]
    np.testing.assert_allclose(
        [s.score for s in similar], sorted(cos[[items.index(i) for i in expected]])[::-1], atol=1e-5
    )
    assert len(engine.similar_items("i2", k=1000)) == len(items) - 1
    with pytest.raises(UnknownItemsError, match="in item_id: 'nope'"):
        engine.similar_items("nope")
    with pytest.raises(InvalidQueryError, match="^k: "):
        engine.similar_items("i2", k=0)


# -- service.load: r2ec serve's defaults ------------------------------------------------------------
def test_load_uses_serve_defaults_and_deterministic_settings(ckpt, monkeypatch):
    from service.recommender import Recommender

    seen: list[dict] = []
    monkeypatch.setattr(Recommender, "load", classmethod(lambda cls, path, **kw: seen.append(kw) or kw))
    monkeypatch.setenv("R2EC_MAX_BATCH", "3")  # not read unless Settings() is passed
    service.load(ckpt)
    assert seen[-1] == serve_load_kwargs()
    assert seen[-1]["slots"] == 16 and seen[-1]["warmup_requests"] == 2 and seen[-1]["dtype"] == "bfloat16"
    service.load(ckpt, deterministic=True, threads=1)
    assert seen[-1] == serve_load_kwargs() | DETERMINISTIC | {"threads": 1}
    from service.config import Settings

    service.load(ckpt, settings=Settings())
    assert seen[-1]["slots"] == 3
    with pytest.raises(ValueError, match="deterministic=True sets"):
        service.load(ckpt, deterministic=True, dtype="bfloat16")


def test_load_answers_as_served(ckpt):
    rec = service.load(ckpt, dtype="float32", threads=1)
    assert rec.backend.engine.slots == 16  # R2EC_MAX_BATCH's default, where Recommender.load's is 8
    assert rec.backend.drafter is not None and len(rec.backend.drafter) > 0  # the warm-up's texts
    assert rec.generate_calls == 0
    assert [i.item_id for i in rec.recommend(H, k=3).items]
