"""Catalog: item edits re-encode, change results and survive a restart; the index beside the
checkpoint is reused when it matches and rebuilt when not."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from service.catalog import INDEX_DIR
from service.recommender import Recommender
from service.types import Query
from tests.service.test_recommender import H1


def test_item_add_replace_delete_change_results_and_survive_a_restart(ckpt, make_engine):
    engine = make_engine(ckpt)
    q = Query(H1, k=20, reasoning=False)
    before = {i.item_id: i.score for i in engine.recommend_batch([q])[0].items}
    assert "new" not in before

    # an item with i7's exact text gets i7's vector, so i7's score
    i7 = engine.catalog.item("i7")
    assert engine.catalog.upsert("new", {k: v for k, v in i7.items() if k != "item_id"}) is False
    added = {i.item_id: i for i in engine.recommend_batch([q])[0].items}
    assert added["new"].title == i7["title"]
    assert added["new"].score == pytest.approx(before["i7"], abs=1e-3)

    assert engine.catalog.upsert("i7", {"title": "A Completely Different Film", "year": "2024"})
    replaced = {i.item_id: i for i in engine.recommend_batch([q])[0].items}
    assert replaced["i7"].title == "A Completely Different Film"
    assert replaced["i7"].score != pytest.approx(before["i7"], abs=1e-3)
    assert engine.catalog.item("i7")["year"] == "2024"

    engine.catalog.remove("i5")
    assert "i5" not in {i.item_id for i in engine.recommend_batch([q])[0].items}
    assert engine.catalog.item("i5") is None and engine.catalog.unknown(["i5"]) == ["i5"]
    with pytest.raises(KeyError):
        engine.catalog.remove("i5")

    restarted = make_engine(ckpt)  # the edits were saved with the index beside the checkpoint
    assert restarted.catalog.index.metadata["model_version"] == restarted.version
    assert restarted.catalog.item("new")["title"] == i7["title"]
    assert restarted.catalog.item("i7")["title"] == "A Completely Different Film"
    assert restarted.catalog.item("i5") is None
    again = {i.item_id: i.score for i in restarted.recommend_batch([q])[0].items}
    assert again == pytest.approx({k: v.score for k, v in replaced.items() if k != "i5"}, abs=1e-3)


def test_saved_edits_survive_an_index_that_has_to_be_rebuilt(ckpt, make_engine):
    engine = make_engine(ckpt)
    i7 = {k: v for k, v in engine.catalog.item("i7").items() if k != "item_id"}
    engine.catalog.upsert("new", i7)
    engine.catalog.remove("i5")
    # another kind asked for: the index is built again from the checkpoint, the edits re-applied
    hnsw = make_engine(ckpt, index_kind="hnsw")
    assert hnsw.catalog.index.kind == "hnsw"
    assert hnsw.catalog.item("new")["title"] == i7["title"] and hnsw.catalog.item("i5") is None
    assert "new" in hnsw.catalog.index and "i5" not in hnsw.catalog.index
    # a damaged faiss file: the same
    for damaged in (ckpt / INDEX_DIR).glob("index-*.faiss"):
        damaged.write_bytes(b"not a faiss index")
    flat = make_engine(ckpt)
    assert flat.catalog.item("new")["title"] == i7["title"] and flat.catalog.item("i5") is None
    assert set(flat.catalog.index.metadata["catalog_edits"]) == {"new", "i5"}


def test_a_rebuild_that_dies_before_its_edits_are_applied_keeps_them_on_record(
    ckpt, make_engine, monkeypatch
):
    from service.catalog import Catalog

    engine = make_engine(ckpt)
    engine.catalog.upsert("i7", {"title": "A Completely Different Film"})
    q = Query(H1, k=20, reasoning=False)
    edited = {i.item_id: i.score for i in engine.recommend_batch([q])[0].items}

    def killed(self, edits):
        raise RuntimeError("killed while encoding")

    monkeypatch.setattr(Catalog, "carry_edits", killed)
    with pytest.raises(RuntimeError, match="killed"):
        make_engine(ckpt, index_kind="hnsw")
    monkeypatch.undo()
    again = make_engine(ckpt, index_kind="hnsw")  # the record was not overwritten: applied now
    assert again.catalog.item("i7")["title"] == "A Completely Different Film"
    scores = {i.item_id: i.score for i in again.recommend_batch([q])[0].items}
    assert scores["i7"] == pytest.approx(edited["i7"], abs=1e-3)  # the new text's vector, not the old


def test_index_is_saved_beside_the_checkpoint_and_rebuilt_when_it_does_not_match(ckpt, make_engine):
    first = make_engine(ckpt)
    saved = ckpt / INDEX_DIR / "index.json"
    assert saved.is_file()
    assert first.catalog.index.metadata["index_kind"] == "flat"
    mtime = saved.stat().st_mtime_ns
    make_engine(ckpt)  # matching: loaded, not rewritten
    assert saved.stat().st_mtime_ns == mtime
    hnsw = make_engine(ckpt, index_kind="hnsw", index_ef_search=200)  # another kind: rebuilt, saved
    assert hnsw.catalog.index.kind == "hnsw" and saved.stat().st_mtime_ns != mtime
    assert faiss.downcast_index(hnsw.catalog.index._index.index).hnsw.efSearch == 200  # R2EC_INDEX_EF_SEARCH
    r = hnsw.recommend_batch([Query(H1, k=3, reasoning=False)])[0]
    exact = first.recommend_batch([Query(H1, k=3, reasoning=False)])[0]
    assert [i.item_id for i in r.items] == [i.item_id for i in exact.items]


def test_encode_item_matches_the_checkpoint_table(engine: Recommender):
    row = engine.checkpoint.items.iloc[0].to_dict()
    v = engine.catalog.encode_item(row)
    np.testing.assert_allclose(v, engine.checkpoint.item_vectors[0], atol=1e-5)
