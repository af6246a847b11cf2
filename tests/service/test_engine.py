"""Recommender.recommend_batch: one generate call per batch, answers equal to one-by-one (fp32),
cache hits skip generation, per-query errors stay per query, item edits change results."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from service.engine import (
    INDEX_DIR,
    CachedReasoning,
    EmptyHistoryError,
    Query,
    Recommender,
    UnknownItemsError,
)
from service.store import Event
from tests.service.conftest import count_generate

H1 = (Event("i1", 5.0, 100), Event("i2", 4.0, 200), Event("i3", 3.0, 300))
H2 = (Event("i6", 2.0), Event("i7", 5.0))
H3 = (Event("i8"),)
H4 = (Event("i9", 4.0, 700), Event("i5", None, 500))


def queries() -> list[Query]:
    return [
        Query(H1, k=5, max_reasoning_tokens=12),
        Query(H2, k=3, max_reasoning_tokens=4),  # shorter budget: truncated from the batch's 12
        Query(H3, k=8, reasoning=False),
        Query(H4, k=10, exclude_history=False, max_reasoning_tokens=12),
        Query(H1, k=2, max_reasoning_tokens=6),  # same prompt as #0: one generation row
    ]


def assert_same(a, b):
    assert [i.item_id for i in a.items] == [i.item_id for i in b.items]
    assert [i.title for i in a.items] == [i.title for i in b.items]
    np.testing.assert_allclose([i.score for i in a.items], [i.score for i in b.items], atol=1e-3)
    assert a.reasoning == b.reasoning
    assert a.reasoning_tokens == b.reasoning_tokens


def test_one_generate_call_and_answers_equal_one_by_one(engine):
    calls = count_generate(engine)
    batched = engine.recommend_batch(queries())
    assert calls == [3]  # one call; 3 distinct prompts need reasoning (H1, H2, H4)
    assert engine.generate_calls == 1
    singles = [engine.recommend_batch([q])[0] for q in queries()]
    assert calls[1:] == [1, 1, 1, 1]  # the no-reasoning query never generates
    for b, s in zip(batched, singles, strict=True):
        assert_same(b, s)
    r0, r1, r2, r3, r4 = batched
    assert [len(r.items) for r in batched] == [5, 3, 8, 10, 2]
    assert r0.reasoning_tokens <= 12 and r1.reasoning_tokens <= 4 and r4.reasoning_tokens <= 6
    assert r0.reasoning and r0.cache == "miss" and r0.generated is not None
    assert r2.reasoning is None and r2.cache == "off" and r2.reasoning_tokens == 0
    assert r4.reasoning_tokens == min(6, r0.reasoning_tokens)


def test_items_ranked_by_cosine_over_tau_without_history(engine):
    r = engine.recommend_batch([Query(H1, k=20, max_reasoning_tokens=4)])[0]
    ids = [i.item_id for i in r.items]
    assert not set(ids) & {"i1", "i2", "i3"}
    assert len(ids) == len(engine) - 3  # the whole rest of the catalog, exclusion kept k
    scores = [i.score for i in r.items]
    assert scores == sorted(scores, reverse=True)
    assert [i.rank for i in r.items] == list(range(1, len(ids) + 1))
    assert all(abs(s) <= 1 / engine.model.tau + 1e-3 for s in scores)
    assert r.items[0].title == engine.item(ids[0])["title"]
    kept = engine.recommend_batch([Query(H1, k=20, exclude_history=False, reasoning=False)])[0]
    assert {"i1", "i2", "i3"} <= {i.item_id for i in kept.items}


def test_cached_reasoning_skips_generation_and_gives_the_same_answer(engine):
    q = Query(H2, k=4, max_reasoning_tokens=8)
    first = engine.recommend_batch([q])[0]
    calls = count_generate(engine)
    key = engine.cache_key(q)
    assert key == first.cache_key
    hit = engine.recommend_batch(
        [Query(H2, k=4, max_reasoning_tokens=8, cache_key=key, cached=first.generated)]
    )[0]
    assert calls == [] and hit.cache == "hit" and hit.generated is None
    assert_same(hit, first)
    # a cached reasoning under another key (another model version, history or budget) is ignored
    stale = engine.recommend_batch(
        [Query(H2, k=4, max_reasoning_tokens=8, cache_key="old", cached=CachedReasoning((1, 2), "stale"))]
    )[0]
    assert calls == [1] and stale.cache == "miss" and stale.reasoning == first.reasoning


def test_cache_key_depends_on_version_history_and_budget(engine):
    k = engine.cache_key(Query(H1, max_reasoning_tokens=8))
    assert k == engine.cache_key(Query(H1, k=3, max_reasoning_tokens=8))  # k is not reasoning
    assert k != engine.cache_key(Query(H1, max_reasoning_tokens=9))
    assert k != engine.cache_key(Query(H1[:2], max_reasoning_tokens=8))
    assert k != engine.cache_key(Query((Event("i1", 4.0, 100),) + H1[1:], max_reasoning_tokens=8))
    assert engine.cache_key(Query(H1, reasoning=False)) is None
    assert engine.cache_key(Query(H1, max_reasoning_tokens=0)) is None
    engine.version = "another"
    assert k != engine.cache_key(Query(H1, max_reasoning_tokens=8))


def test_a_bad_query_fails_alone(engine):
    out = engine.recommend_batch(
        [
            Query(H1, k=3, max_reasoning_tokens=4),
            Query((Event("nope"), Event("i1"), Event("nada")), k=3),
            Query((), k=3),
        ]
    )
    assert len(out[0].items) == 3
    assert isinstance(out[1], UnknownItemsError) and out[1].item_ids == ["nope", "nada"]
    assert "'nope', 'nada'" in str(out[1])
    assert isinstance(out[2], EmptyHistoryError) and "history is empty" in str(out[2])


def test_item_add_replace_delete_change_results_and_survive_a_restart(ckpt, make_engine):
    engine = make_engine(ckpt)
    q = Query(H1, k=20, reasoning=False)
    before = {i.item_id: i.score for i in engine.recommend_batch([q])[0].items}
    assert "new" not in before

    # an item with i7's exact text gets i7's vector, so i7's score
    i7 = engine.item("i7")
    assert engine.upsert_item("new", {k: v for k, v in i7.items() if k != "item_id"}) is False
    added = {i.item_id: i for i in engine.recommend_batch([q])[0].items}
    assert added["new"].title == i7["title"]
    assert added["new"].score == pytest.approx(before["i7"], abs=1e-3)

    assert engine.upsert_item("i7", {"title": "A Completely Different Film", "year": "2024"})
    replaced = {i.item_id: i for i in engine.recommend_batch([q])[0].items}
    assert replaced["i7"].title == "A Completely Different Film"
    assert replaced["i7"].score != pytest.approx(before["i7"], abs=1e-3)
    assert engine.item("i7")["year"] == "2024"

    engine.remove_item("i5")
    assert "i5" not in {i.item_id for i in engine.recommend_batch([q])[0].items}
    assert engine.item("i5") is None and engine.unknown_items(["i5"]) == ["i5"]
    with pytest.raises(KeyError):
        engine.remove_item("i5")

    restarted = make_engine(ckpt)  # the edits were saved with the index beside the checkpoint
    assert restarted.index.metadata["model_version"] == restarted.version
    assert restarted.item("new")["title"] == i7["title"]
    assert restarted.item("i7")["title"] == "A Completely Different Film"
    assert restarted.item("i5") is None
    again = {i.item_id: i.score for i in restarted.recommend_batch([q])[0].items}
    assert again == pytest.approx({k: v.score for k, v in replaced.items() if k != "i5"}, abs=1e-3)


def test_index_is_saved_beside_the_checkpoint_and_rebuilt_when_it_does_not_match(ckpt, make_engine):
    first = make_engine(ckpt)
    saved = ckpt / INDEX_DIR / "index.json"
    assert saved.is_file()
    assert first.index.metadata["index_kind"] == "flat"
    mtime = saved.stat().st_mtime_ns
    make_engine(ckpt)  # matching: loaded, not rewritten
    assert saved.stat().st_mtime_ns == mtime
    hnsw = make_engine(ckpt, index_kind="hnsw", index_ef_search=200)  # another kind: rebuilt, saved
    assert hnsw.index.kind == "hnsw" and saved.stat().st_mtime_ns != mtime
    assert faiss.downcast_index(hnsw.index._index.index).hnsw.efSearch == 200  # R2EC_INDEX_EF_SEARCH
    r = hnsw.recommend_batch([Query(H1, k=3, reasoning=False)])[0]
    exact = first.recommend_batch([Query(H1, k=3, reasoning=False)])[0]
    assert [i.item_id for i in r.items] == [i.item_id for i in exact.items]


def test_encode_item_matches_the_checkpoint_table(engine: Recommender):
    row = engine.checkpoint.items.iloc[0].to_dict()
    v = engine.encode_item(row)
    np.testing.assert_allclose(v, engine.checkpoint.item_vectors[0], atol=1e-5)
