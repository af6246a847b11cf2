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
    pair = Query(H1, k=20, reasoning=False, candidates=frozenset({"new", "i7"}))
    added = {i.item_id: i for i in engine.recommend_batch([pair])[0].items}
    assert added["new"].title == i7["title"]
    assert added["new"].score == pytest.approx(before["i7"], abs=1e-3)
    # and one of the two, not both, in a whole-catalog list (service/catalog.py Catalog.search)
    assert len({"new", "i7"} & {i.item_id for i in engine.recommend_batch([q])[0].items}) == 1

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

    def killed(self, edits, **kw):
        raise RuntimeError("killed while encoding")

    monkeypatch.setattr(Catalog, "_apply", killed)
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
    assert hnsw.catalog.index.describe() == "hnsw M=32 ef_search=200"  # what /readyz shows
    r = hnsw.recommend_batch([Query(H1, k=3, reasoning=False)])[0]
    exact = first.recommend_batch([Query(H1, k=3, reasoning=False)])[0]
    assert [i.item_id for i in r.items] == [i.item_id for i in exact.items]


def test_encode_item_matches_the_checkpoint_table(engine: Recommender):
    row = engine.checkpoint.items.iloc[0].to_dict()
    v = engine.catalog.encode_item(row)
    np.testing.assert_allclose(v, engine.checkpoint.item_vectors[0], atol=1e-5)


def test_replicas_on_one_volume_keep_each_others_edits_and_the_latest_wins(ckpt, make_engine):
    """Two services on one checkpoint directory (replicas on a shared volume): a save merges
    what the other saved instead of writing over it, and `sync_edits` brings the other's edits
    in; for one item the later edit wins, on both."""
    a, b = make_engine(ckpt), make_engine(ckpt)
    i7 = {k: v for k, v in a.catalog.item("i7").items() if k != "item_id"}
    a.catalog.upsert("from-a", i7)
    b.catalog.upsert("from-b", {"title": "Only On B"})
    b.catalog.remove("i5")
    restarted = make_engine(ckpt)  # today's record holds both replicas' edits
    assert restarted.catalog.item("from-a")["title"] == i7["title"]
    assert restarted.catalog.item("from-b")["title"] == "Only On B" and restarted.catalog.item("i5") is None

    assert a.catalog.sync_edits() == 2  # b's two edits, encoded with a's model
    assert a.catalog.item("from-b")["title"] == "Only On B" and a.catalog.item("i5") is None
    assert "from-b" in a.catalog.index and "i5" not in a.catalog.index
    q = Query(H1, k=20, reasoning=False)
    assert [i.item_id for i in a.recommend_batch([q])[0].items] == [
        i.item_id for i in restarted.recommend_batch([q])[0].items
    ]
    assert a.catalog.sync_edits() == 0  # nothing saved since

    b.catalog.upsert("i7", {"title": "Earlier Edit"})
    a.catalog.upsert("i7", {"title": "Later Edit"})  # a saves after applying b's older edit
    assert b.catalog.item("from-a")["title"] == i7["title"]  # b's save applied a's edit first
    assert b.catalog.sync_edits() == 1  # a's later i7
    assert a.catalog.item("i7")["title"] == b.catalog.item("i7")["title"] == "Later Edit"
    assert make_engine(ckpt).catalog.item("i7")["title"] == "Later Edit"


def test_edits_saved_before_times_were_kept_still_load(ckpt, make_engine):
    import json

    engine = make_engine(ckpt)
    engine.catalog.upsert("i7", {"title": "Edited"})
    assert engine.catalog._save_snapshot()  # the edit in index.json, not (only) in the edit log
    record = ckpt / INDEX_DIR / "index.json"
    doc = json.loads(record.read_text())
    del doc["metadata"]["edit_times"]  # an index.json from before this change
    record.write_text(json.dumps(doc))
    again = make_engine(ckpt)
    assert again.catalog.item("i7")["title"] == "Edited" and again.catalog.edits.times == {"i7": 0}


def test_the_latest_edit_wins_even_where_a_replica_already_serves_its_record(ckpt, make_engine):
    """Three replicas. B takes A's latest edit, equal to what B serves, with its time: B's next
    save must not write the older time back, which would let C's stale edit win."""
    a, b, c = (make_engine(ckpt).catalog for _ in range(3))
    a.upsert("i7", {"title": "R1"})
    b.sync_edits(), c.sync_edits()
    a.upsert("i7", {"title": "R2"})
    c.sync_edits()  # b misses R2
    a.upsert("i7", {"title": "R1"})  # the latest
    b.sync_edits()
    assert b.edits.times["i7"] == a.edits.times["i7"]
    b.upsert("other", {"title": "X"})
    c.upsert("other-2", {"title": "Y"})  # applies the newer R1 first
    a.sync_edits(), b.sync_edits()
    assert {x.item("i7")["title"] for x in (a, b, c)} == {"R1"}
    assert make_engine(ckpt).catalog.item("i7")["title"] == "R1"


def test_a_reload_carries_only_edits_not_older_than_the_new_catalogs(ckpt, make_engine):
    a = make_engine(ckpt)
    c = make_engine(ckpt, index_kind="hnsw")  # another kind: each open rebuilds and re-applies
    a.catalog.upsert("i7", {"title": "Older (A)"})
    c.catalog.upsert("i7", {"title": "Newer (C)"})
    new = make_engine(ckpt)  # a reloads: the record holds C's edit, newer than A's
    new.catalog.carry_from(a.catalog)  # what ServiceState.reload does
    assert new.catalog.item("i7")["title"] == "Newer (C)"
    assert make_engine(ckpt).catalog.item("i7")["title"] == "Newer (C)"


def test_an_edit_after_a_clock_step_back_still_wins(ckpt, make_engine, monkeypatch):
    import time

    a, b = make_engine(ckpt).catalog, make_engine(ckpt).catalog
    a.upsert("i7", {"title": "First"})
    b.sync_edits()
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() - 1_000_000_000)  # NTP steps back 1 s
    a.upsert("i7", {"title": "Second"})
    monkeypatch.undo()
    assert b.sync_edits() == 1 and b.item("i7")["title"] == "Second"


def test_a_replica_that_builds_the_index_keeps_edits_saved_while_it_built(ckpt, make_engine, monkeypatch):
    """Two replicas start on a version without an index (retraining publishes none): A is up
    and takes an edit while B builds; B must not save an empty record over it."""
    import service.catalog

    a = make_engine(ckpt).catalog
    (ckpt / INDEX_DIR / "index.json").unlink()
    build = service.catalog.ItemIndex.build

    def build_while_a_edits(*args, **kw):
        index = build(*args, **kw)
        a.upsert("new", {"title": "Added On A"})
        return index

    monkeypatch.setattr(service.catalog.ItemIndex, "build", build_while_a_edits)
    b = make_engine(ckpt).catalog
    monkeypatch.undo()
    assert b.item("new")["title"] == "Added On A"
    assert make_engine(ckpt).catalog.item("new")["title"] == "Added On A"


def test_edits_survive_versions_published_while_no_replica_reloads(ckpt, make_engine, tmp_path):
    """Publishing (what `r2ec retrain` does) carries the current version's edits into the new
    one, also through a version no service ever started on; a service on the new version takes
    the edits a replica still serving the old one saves later."""
    from model.checkpoint import publish_version
    from tests.service.test_admin import copy_as_new_version

    root = tmp_path / "versions"
    copy_as_new_version(ckpt, root / "v1", "w1")
    (root / "CURRENT").write_text("v1")
    old = make_engine(root).catalog  # a replica serving w1
    old.upsert("new", {"title": "Added On w1"})
    old.remove("i5")
    publish_version(root, copy_as_new_version(ckpt, tmp_path / "c2", "w2"), "v2")
    old.upsert("late", {"title": "Saved On w1 After The Publish"})  # it has not reloaded yet

    new = make_engine(root).catalog  # the first start on w2
    assert new.checkpoint.version == "w2"
    assert new.item("new")["title"] == "Added On w1" and new.item("i5") is None
    assert new.item("late")["title"] == "Saved On w1 After The Publish"
    assert "new" in new.index and "late" in new.index and "i5" not in new.index
    old.upsert("later", {"title": "Later Still"})
    assert new.sync_edits() == 1 and new.item("later")["title"] == "Later Still"
    assert new.sync_edits() == 0
    del old, new  # every service stops

    publish_version(root, copy_as_new_version(ckpt, tmp_path / "c3", "w3"), "v3")
    publish_version(root, copy_as_new_version(ckpt, tmp_path / "c4", "w4"), "v4")  # none ran on w3
    last = make_engine(root).catalog
    assert last.checkpoint.version == "w4"
    assert {i: (r or {}).get("title") for i, r in last.edits.records.items()} == {
        "new": "Added On w1",
        "i5": None,
        "late": "Saved On w1 After The Publish",
        "later": "Later Still",
    }
    assert last.item("i5") is None and "i5" not in last.index and "later" in last.index


def test_a_damaged_carried_edits_file_never_stops_a_version_from_starting(
    ckpt, make_engine, tmp_path, caplog
):
    """item_edits.json is the only copy of the carried edits once the old version is pruned:
    a damaged record is left out and a damaged file is named in the log, but the version
    starts (a start that raised would crash-loop every replica, a reload would never land)."""
    import json
    import logging

    from model.checkpoint import EDITS_FILE
    from tests.service.test_admin import copy_as_new_version

    version = copy_as_new_version(ckpt, tmp_path / "v2", "w2")
    record = {"catalog_edits": {"i5": "deleted", "newx": {"year": "1999"}, "ok": {"title": "Fine"}}}
    (version / EDITS_FILE).write_text(json.dumps({**record, "from": "v1\x00", "version": "w1"}))
    with caplog.at_level(logging.WARNING):
        catalog = make_engine(version).catalog
    assert catalog.item("ok")["title"] == "Fine" and catalog.item("i5") is not None
    assert catalog.item("ok")["year"] == "" == catalog.search_titles("Fine", 5)[0][0]["genres"]  # all fields
    assert "damaged records left out: 'i5', 'newx'" in caplog.text
    (version / EDITS_FILE).write_text('{"catalog_edits": {"i5": nu')  # cut short
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert make_engine(version).catalog.item("i5") is not None
    assert f"{EDITS_FILE} is unreadable" in caplog.text
    # JSON that is no text (a lone surrogate: no path, no tokenizer takes it), and a record
    # with a field an item does not have (it would change the id the item is served under)
    for doc in (
        '{"from": "v1\\ud800", "catalog_edits": {}}',
        '{"catalog_edits": {"n": {"title": "\\ud800"}}}',
    ):
        (version / EDITS_FILE).write_text(doc)
        assert make_engine(version).catalog.item("n") is None
    (version / EDITS_FILE).write_text(json.dumps({"catalog_edits": {"n": {"title": "N", "item_id": "i1"}}}))
    assert make_engine(version).catalog.item("n") is None


def test_an_edit_saved_to_a_version_two_publishes_old_reaches_the_newest(ckpt, make_engine, tmp_path):
    """A replica still serving w1 saves an edit after w2 and w3 were published, and no service
    ever started on w2: w3 follows w1's record through w2's carried edits, at its start and at
    each sync; a replica that reloads from w2 follows w1 too."""
    from model.checkpoint import publish_version
    from tests.service.test_admin import copy_as_new_version

    root = tmp_path / "versions"
    copy_as_new_version(ckpt, root / "v1", "w1")
    (root / "CURRENT").write_text("v1")
    on_w1 = make_engine(root).catalog
    publish_version(root, copy_as_new_version(ckpt, tmp_path / "c2", "w2"), "v2")
    publish_version(root, copy_as_new_version(ckpt, tmp_path / "c3", "w3"), "v3")
    on_w1.upsert("late", {"title": "Saved On w1 After Two Publishes"})

    on_w3 = make_engine(root).catalog
    assert on_w3.checkpoint.version == "w3"
    assert on_w3.item("late")["title"] == "Saved On w1 After Two Publishes" and "late" in on_w3.index
    on_w1.remove("i5")
    assert on_w3.sync_edits() == 1 and on_w3.item("i5") is None

    # a replica that started on w2 reloads to w4, put in place by hand (no carried edits)
    on_w2 = make_engine(root / "v2").catalog
    copy_as_new_version(ckpt, root / "v4", "w4")
    (root / "CURRENT").write_text("v4")
    reloaded = make_engine(root).catalog
    assert reloaded.checkpoint.version == "w4" and reloaded.item("late") is None
    assert reloaded.carry_from(on_w2) == 2 and reloaded.item("late") and reloaded.item("i5") is None
    on_w1.upsert("later", {"title": "Later Still"})
    assert reloaded.sync_edits() == 1 and reloaded.item("later")["title"] == "Later Still"
    assert reloaded.sync_edits() == 0


def test_the_twins_index_follows_every_edit():
    """service/catalog.py `_Twins` kept up to date edit by edit equals one built from scratch."""
    import random

    from service.catalog import _Twins

    rng = random.Random(0)
    texts = [{"title": t, "year": "", "genres": "", "description": ""} for t in ("A", "B", "C")]
    records = {f"i{n}": dict(rng.choice(texts)) for n in range(6)}
    twins = _Twins(records)
    for _ in range(300):
        item_id = f"i{rng.randrange(8)}"
        new = None if rng.random() < 0.3 else dict(rng.choice(texts))
        twins.change(item_id, records.get(item_id), new)
        if new is None:
            records.pop(item_id, None)
        else:
            records[item_id] = new
        groups: dict = {}  # the reference, from scratch and apart from _Twins
        for i, record in records.items():
            groups.setdefault(tuple(record.values()), []).append(i)
        assert twins.ids == {i: text for text, ids in groups.items() if len(ids) > 1 for i in ids}
    a, b = texts[0], texts[1]
    pair = _Twins({"x": a, "y": dict(a), "z": b})
    assert pair.one_per_text(["x", "z", "y"], exclude=()) == [0, 1]  # y: x's twin, listed already
    assert pair.one_per_text(["y", "z"], exclude={"x"}) == [1]  # the user had x


def test_a_row_whose_user_had_an_item_listed_many_times_still_gets_k(ckpt, make_engine):
    """The first fetch (k more than asked) can hold only twins of an excluded item: the search
    looks further until the row has k items, none of them those twins."""
    engine = make_engine(ckpt)
    catalog = engine.catalog
    i3 = {k: v for k, v in catalog.item("i3").items() if k != "item_id"}
    for n in range(8):
        catalog.upsert(f"copy{n}", i3)
    twins = {"i3", *(f"copy{n}" for n in range(8))}
    vector = catalog.encode_item(i3)[None, :]  # i3 itself: its copies rank first
    ids, scores, titles = catalog.search(vector, 2, [{"i3"}])
    assert len(ids[0]) == 2 and not twins & set(ids[0])
    assert titles[0] == [catalog.item(i)["title"] for i in ids[0]] and np.isfinite(scores[0]).all()
    ids, _, _ = catalog.search(vector, 2, [set()])  # not excluded: one of them, then others
    assert ids[0][0] in twins and ids[0][1] not in twins


# ---------------------------------------------------------------- what an edit writes
def _saved_files(ckpt):
    """(the faiss file index.json names, index.json's inode and mtime) beside the checkpoint."""
    import json
    import os

    record = ckpt / INDEX_DIR / "index.json"
    st = os.stat(record)
    return json.loads(record.read_text())["faiss_file"], (st.st_ino, st.st_mtime_ns)


def test_an_edit_appends_one_line_to_the_log_and_leaves_the_saved_index_alone(ckpt, make_engine, monkeypatch):
    """An edit costs the size of the edit: one line in the edit log, not the whole index written
    again; a restart applies the logged edits with their logged vectors (no encoding) and serves
    what was served."""
    from index import journal
    from model.r2ec import R2ec

    engine = make_engine(ckpt)
    before = _saved_files(ckpt)
    i7 = {k: v for k, v in engine.catalog.item("i7").items() if k != "item_id"}
    engine.catalog.upsert("new", i7)
    engine.catalog.upsert("i3", {"title": "Retitled"})
    engine.catalog.remove("i5")
    assert _saved_files(ckpt) == before
    logged = journal.read(ckpt / INDEX_DIR)
    assert [(e["item_id"], (e["record"] or {}).get("title")) for e in logged] == [
        ("new", i7["title"]),
        ("i3", "Retitled"),
        ("i5", None),
    ]
    assert logged[2]["vector"] is None and logged[0]["vector"].shape == (engine.model.hidden_size,)
    q = Query(H1, k=20, reasoning=False)
    served = {i.item_id: i.score for i in engine.recommend_batch([q])[0].items}

    def no_encoding(*args, **kwargs):
        raise AssertionError("a restart encoded items")

    monkeypatch.setattr(R2ec, "item_vectors", no_encoding)
    restarted = make_engine(ckpt)
    monkeypatch.undo()
    assert _saved_files(ckpt) == before  # loaded, not rebuilt nor saved again
    assert restarted.catalog.item("i3")["title"] == "Retitled" and restarted.catalog.item("i5") is None
    assert restarted.catalog.edits.times == engine.catalog.edits.times
    again = {i.item_id: i.score for i in restarted.recommend_batch([q])[0].items}
    assert again == pytest.approx(served, abs=1e-6)


def test_the_whole_index_is_saved_again_once_the_log_is_long(ckpt, make_engine):
    from index import journal

    catalog = make_engine(ckpt).catalog
    catalog.snapshot_every = 3
    before = _saved_files(ckpt)
    catalog.upsert("a", {"title": "A"})
    catalog.upsert("b", {"title": "B"})
    catalog.wait_saved()
    assert _saved_files(ckpt) == before and journal.count(ckpt / INDEX_DIR) == 2
    catalog.remove("i5")  # the third: a full save, on a thread of its own
    catalog.wait_saved()
    assert _saved_files(ckpt)[0] != before[0]
    assert not journal.path_of(ckpt / INDEX_DIR).exists()  # its entries are in index.json now
    assert set(catalog.index.metadata["catalog_edits"]) == {"a", "b", "i5"}
    catalog.upsert("c", {"title": "C"})
    assert journal.count(ckpt / INDEX_DIR) == 1
    restarted = make_engine(ckpt).catalog
    assert {i: (r or {}).get("title") for i, r in restarted.edits.records.items()} == {
        "a": "A",
        "b": "B",
        "i5": None,
        "c": "C",
    }
    assert "c" in restarted.index and "i5" not in restarted.index


def test_a_kill_mid_append_loses_only_the_line_being_written(ckpt, make_engine):
    from index import journal

    catalog = make_engine(ckpt).catalog
    catalog.upsert("a", {"title": "A"})
    log_file = journal.path_of(ckpt / INDEX_DIR)
    with open(log_file, "ab") as f:  # a process killed half way through its line
        f.write(b'{"model_version": "' + catalog.checkpoint.version.encode() + b'", "item_id": "b", "rec')
    restarted = make_engine(ckpt).catalog
    assert restarted.item("a")["title"] == "A" and restarted.item("b") is None
    restarted.upsert("c", {"title": "C"})  # on a line of its own, after the cut one
    again = make_engine(ckpt).catalog
    assert again.item("a")["title"] == "A" and again.item("c")["title"] == "C" and "c" in again.index


def test_a_kill_between_a_full_save_and_the_log_cut_loses_nothing(ckpt, make_engine, monkeypatch):
    """The log is cut back only after the full save holding its entries is on the disk; a kill
    in between leaves entries that are in index.json too, and applying them again changes
    nothing. A kill while the faiss file is written leaves the old index and the whole log."""
    import faiss

    from index import journal

    catalog = make_engine(ckpt).catalog
    catalog.upsert("a", {"title": "A"})
    catalog.remove("i5")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(journal, "drop_through", killed)
    with pytest.raises(KeyboardInterrupt):
        catalog._save_snapshot()
    monkeypatch.undo()
    assert journal.count(ckpt / INDEX_DIR) == 2 and set(catalog.index.metadata["catalog_edits"]) == {
        "a",
        "i5",
    }
    saved = _saved_files(ckpt)
    restarted = make_engine(ckpt).catalog
    assert _saved_files(ckpt) == saved  # loaded, with the log applied to no effect
    assert restarted.item("a")["title"] == "A" and restarted.item("i5") is None
    assert restarted.edits.times == catalog.edits.times

    restarted.upsert("b", {"title": "B"})
    monkeypatch.setattr(faiss, "write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        restarted._save_snapshot()
    monkeypatch.undo()
    assert _saved_files(ckpt) == saved and not list((ckpt / INDEX_DIR).glob("index-*.faiss"))[1:]
    again = make_engine(ckpt).catalog
    assert again.item("b")["title"] == "B" and again.item("a")["title"] == "A" and "b" in again.index


def test_searches_go_on_while_the_whole_index_is_written(ckpt, make_engine, monkeypatch):
    """A full save holds no lock a search takes while it writes the faiss file (it used to hold
    the index's lock through the write and its flush: every recommendation waited)."""
    import threading

    import faiss

    catalog = make_engine(ckpt).catalog
    vector = catalog.encode_item({"title": "Anything"})[None, :]
    real_write, searched, during = faiss.write_index, [], []

    def write_while_searching(index, path):
        search = threading.Thread(target=lambda: searched.append(catalog.search(vector, 3, [set()])))
        search.start()
        search.join(60)  # a search blocked by the save does not return before it: no timing here
        during.append(len(searched))
        real_write(index, path)

    monkeypatch.setattr(faiss, "write_index", write_while_searching)
    catalog.upsert("a", {"title": "A"})
    assert catalog._save_snapshot()
    assert during == [1] and len(searched[0][0][0]) == 3


def test_another_index_kind_asked_for_is_news_not_a_warning(ckpt, make_engine, caplog):
    """R2EC_INDEX_KIND changed: an INFO naming both kinds and the build's time; damage to the
    saved index is still a WARNING."""
    import logging

    make_engine(ckpt).catalog.upsert("a", {"title": "A"})
    with caplog.at_level(logging.INFO, logger="service.catalog"):
        hnsw = make_engine(ckpt, index_kind="hnsw")
    catalog_logs = [r for r in caplog.records if r.name == "service.catalog"]
    assert not [r for r in catalog_logs if r.levelno >= logging.WARNING], caplog.text
    assert any("built a hnsw index in place of the flat one" in r.getMessage() for r in catalog_logs)
    assert hnsw.catalog.item("a")["title"] == "A"
    caplog.clear()
    for damaged in (ckpt / INDEX_DIR).glob("index-*.faiss"):
        damaged.write_bytes(b"not a faiss index")
    with caplog.at_level(logging.INFO, logger="service.catalog"):
        make_engine(ckpt, index_kind="hnsw")
    assert any(
        r.levelno == logging.WARNING and "not using the index" in r.getMessage() for r in caplog.records
    )


def test_the_title_index_is_built_as_the_catalog_opens_and_never_under_its_lock(
    ckpt, make_engine, monkeypatch
):
    """A title index build (~40 s at a million titles) used to run under the lock every
    recommendation's search takes, on the first search after a start or reload and again after
    TITLE_REBUILD_EDITS edits. Now it is built as the catalog opens, rebuilt on a thread of its
    own, searches and edits going on meanwhile, and the edits made during a build are found."""
    import threading

    import service.catalog as catalog_module
    from service.search import TitleIndex

    catalog = make_engine(ckpt).catalog
    assert catalog._titles is not None  # before any search
    vector = catalog.encode_item({"title": "Anything"})[None, :]
    during: list[bool] = []

    class SearchedDuringBuild(TitleIndex):
        def __init__(self, titles, **kw):
            titles = list(titles)
            if len(titles) > 3:  # the catalog's, not the few edited titles searched beside it
                done = []
                search = threading.Thread(target=lambda: done.append(catalog.search(vector, 3, [set()])))
                edit = threading.Thread(target=catalog.upsert, args=("during", {"title": "Toy During"}))
                search.start(), edit.start()
                search.join(60), edit.join(60)  # blocked by the build, they do not end before it: no timing
                during.append(bool(done) and not edit.is_alive())
            super().__init__(titles, **kw)

    monkeypatch.setattr(catalog_module, "TITLE_REBUILD_EDITS", 0)
    monkeypatch.setattr(catalog_module, "TitleIndex", SearchedDuringBuild)
    catalog.upsert("new", {"title": "Toy Soldiers"})
    assert [r["title"] for r, _ in catalog.search_titles("toy", 10)] == ["Toy Soldiers", "Toy Story"]
    catalog.wait_titles()
    assert during == [True]
    assert [r["title"] for r, _ in catalog.search_titles("toy", 10)] == [
        "Toy During",
        "Toy Soldiers",
        "Toy Story",
    ]


def test_the_item_table_is_mapped_from_its_file_not_a_second_copy_beside_the_index(ckpt, make_engine):
    """The index holds the item vectors; the checkpoint's table (read only to build an index
    that is not on disk) is a read-only map of item_vectors.npy, not N x H floats more in memory.
    What reads it still gets the vectors: an index built from it, the retrain gate's table."""
    from model.checkpoint import VECTORS_FILE

    engine = make_engine(ckpt)
    table = engine.checkpoint.item_vectors
    assert isinstance(table, np.memmap) and not table.flags.writeable
    assert str(table.filename) == str((ckpt / VECTORS_FILE).resolve())
    hnsw = make_engine(ckpt, index_kind="hnsw")  # built from the mapped table
    np.testing.assert_allclose(hnsw.catalog.index.vector("i3"), table[2], atol=1e-6)
    assert engine.checkpoint.vectors_for(engine.checkpoint.items) is table


def test_a_sync_applies_this_versions_logged_edits_with_their_vectors(ckpt, make_engine, monkeypatch):
    """Review 40, #1: another replica's edits of this version come with the vectors it logged
    (as a restart applies them): a sync encodes none of them, and serves the same vectors; an
    entry without a usable vector (a log written without one, another dimension) is encoded,
    by the encoder the caller gives."""
    from index import journal
    from service.catalog import Catalog

    a, b = make_engine(ckpt).catalog, make_engine(ckpt).catalog
    encoded: list[tuple[int, int]] = []  # (catalog, items per call)
    real = Catalog.encode_items
    monkeypatch.setattr(
        Catalog,
        "encode_items",
        lambda self, items: encoded.append((id(self), len(items))) or real(self, items),
    )
    a.edit_many({f"sku-{n}": {"title": f"Product {n}"} for n in range(20)}, ["i5"])
    assert encoded == [(id(a), 20)]
    encoded.clear()
    assert b.sync_edits() == 21
    assert encoded == [] and b.item("sku-19")["title"] == "Product 19" and b.item("i5") is None
    for n in range(20):
        np.testing.assert_allclose(b.index.vector(f"sku-{n}"), a.index.vector(f"sku-{n}"), atol=1e-6)

    # entries whose vectors are missing or of another dimension: encoded, through `encode`
    a.edit_many({"x1": {"title": "X One"}, "x2": {"title": "X Two"}, "x3": {"title": "X Three"}})
    directory = ckpt / INDEX_DIR
    entries = journal.read(directory)
    for e in entries:
        if e["item_id"] == "x1":
            e["vector"] = None
        elif e["item_id"] == "x2":
            e["vector"] = e["vector"][:-1]
    journal.remove(directory)
    journal.append(directory, entries)
    calls: list[list[str]] = []

    def encode(items):
        calls.append([i["item_id"] for i in items])
        return b.encode_items(items)

    encoded.clear()
    assert b.sync_edits(encode) == 3
    assert calls == [["x1", "x2"]] and encoded == [(id(b), 2)]  # x3's logged vector went in as it was
    for item_id in ("x1", "x2", "x3"):
        np.testing.assert_allclose(b.index.vector(item_id), a.index.vector(item_id), atol=1e-5)


def test_a_sync_encodes_another_versions_edits_rather_than_take_their_vectors(ckpt, tmp_path, make_engine):
    """A logged vector is taken only by a catalog of the version whose model made it: the edits
    a reload follows on the version it replaced are encoded with the new model."""
    from service.catalog import Edits

    a, b = make_engine(ckpt).catalog, make_engine(ckpt).catalog
    a.upsert("later", {"title": "Later"})
    edits = a.edits
    logged = Edits(edits.records, edits.times, {"later": np.ones(a.index.dim, np.float32)}, "another-version")
    encoded: list[list[str]] = []

    def encode(items):
        encoded.append([i["item_id"] for i in items])
        return b.encode_items(items)

    assert b._apply(logged, ties_win=False, encode=encode) == 1
    assert encoded == [["later"]]
    np.testing.assert_allclose(b.index.vector("later"), a.index.vector("later"), atol=1e-5)


def test_an_edit_with_a_long_cjk_description_encodes_its_token_budget_only(engine: Recommender):
    """A 5,000-character Japanese description is one white-space "word": it used to reach the
    model whole (a 10,000-token prompt holding the model thread for minutes). The edit keeps
    the text and encodes the prompt cut to the budget, as checkpoint init and retraining do."""
    from model.prompts import item_message

    model = engine.catalog.checkpoint.model
    long = "湯屋で働く少女の物語。" * 455
    item = {"title": "千と千尋", "year": "2001", "genres": "Drama", "description": long}
    engine.catalog.upsert("ja", item)
    assert engine.catalog.item("ja")["description"] == long.strip()
    message = item_message({"item_id": "ja", **item}, model.prompts, model.tokenizer)
    cut = message.split("Description: ", 1)[1]
    assert len(cut) < 600 and long.startswith(cut)
    (ids,) = model.item_prompt_ids([{"item_id": "ja", **item}])
    assert len(ids) < model.prompts.item_tokens + 64
    again = model.item_vectors([{"item_id": "x", **item, "description": cut}]).numpy()[0]
    assert np.allclose(engine.catalog.index.vector("ja"), again, atol=1e-5)


# ---------------------------------------------------------------- following a full save
WRITER = """
import sys
from service.recommender import Recommender

catalog = Recommender.load(sys.argv[1], dtype="float32").catalog
catalog.snapshot_every = 6
catalog.edit_many({f"sku-{n}": {"title": f"Product {n}", "year": "2024"} for n in range(5)}, ["i5"])
catalog.wait_saved()
print(len(catalog.index))
"""


def test_a_replica_following_a_full_save_takes_the_saved_vectors_instead_of_encoding(ckpt, make_engine):
    """Review 40 (sync), finding 2: a batch that fills the edit log starts a full save at once,
    which takes its entries (and their vectors) out of the log; another replica then reads
    them from index.json, and encoded every upsert of the batch. The full save keeps the
    entries it cut as the previous log: the replica takes their vectors from there, encodes
    none, and serves what the writer serves. The writer is a process of its own."""
    import subprocess
    import sys

    from index import journal
    from service.catalog import Catalog
    from tests.conftest import child_env

    b = make_engine(ckpt).catalog
    directory = ckpt / INDEX_DIR
    done = subprocess.run(
        [sys.executable, "-c", WRITER, str(ckpt)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not journal.path_of(directory).exists()  # cut: every entry is in index.json now
    assert len(journal.read_previous(directory)) == 6
    encoded: list[int] = []
    real = Catalog.encode_items
    Catalog.encode_items = lambda self, items: encoded.append(len(items)) or real(self, items)
    try:
        assert b.sync_edits() == 6
    finally:
        Catalog.encode_items = real
    assert encoded == [] and b.item("i5") is None and len(b.index) == int(done.stdout.split()[-1])
    for n in range(5):  # the writer's vectors: what this model gives the same text
        text = {"item_id": f"sku-{n}", **{k: v for k, v in b.item(f"sku-{n}").items() if k != "item_id"}}
        np.testing.assert_allclose(b.index.vector(f"sku-{n}"), b.encode_item(text), atol=1e-5)
    assert make_engine(ckpt).catalog.item("sku-4")["title"] == "Product 4"  # a restart: index.json


def test_a_replica_encodes_only_what_the_previous_log_does_not_hold(ckpt, make_engine, tmp_path):
    """What the previous log cannot give is encoded, and only that: an item whose text a
    later edit changed takes the vector of the text it has now; a replica that missed two full
    saves encodes the first one's items (the second replaced the previous log); a vector of
    another dimension is encoded; another version's previous log gives nothing."""
    import json
    import shutil

    from index import journal
    from model.checkpoint import META_FILE
    from service.catalog import saved_edits

    a, b = make_engine(ckpt).catalog, make_engine(ckpt).catalog
    directory = ckpt / INDEX_DIR
    a.snapshot_every = 6
    a.upsert("twice", {"title": "First Text"})
    a.upsert("twice", {"title": "Second Text"})
    a.edit_many({f"p{n}": {"title": f"P {n}"} for n in range(4)})  # the 6th entry: a full save
    a.wait_saved()
    assert not journal.path_of(directory).exists()
    calls: list[list[str]] = []

    def encode(items):
        calls.append(sorted(i["item_id"] for i in items))
        return b.encode_items(items)

    assert b.sync_edits(encode) == 5 and calls == []
    np.testing.assert_allclose(b.index.vector("twice"), a.index.vector("twice"), atol=1e-6)
    assert b.item("twice")["title"] == "Second Text"

    a.edit_many({f"x{n}": {"title": f"X {n}"} for n in range(6)})  # a second full save...
    a.wait_saved()
    a.edit_many({f"y{n}": {"title": f"Y {n}"} for n in range(6)})  # ...and a third
    a.wait_saved()
    assert b.sync_edits(encode) == 12
    assert calls == [[f"x{n}" for n in range(6)]]  # the y's came from the previous log
    for item_id in ("x0", "y5"):
        np.testing.assert_allclose(b.index.vector(item_id), a.index.vector(item_id), atol=1e-5)

    a.edit_many({f"z{n}": {"title": f"Z {n}"} for n in range(6)})
    a.wait_saved()
    entries = journal.read_previous(directory)
    for e in entries:
        if e["item_id"] == "z0":
            e["vector"] = e["vector"][:-1]  # another dimension: encoded
    journal.remove(directory)
    journal.append(directory, entries)
    journal.drop_through(directory, journal.stamp(directory))  # as the previous log again
    calls.clear()
    assert b.sync_edits(encode) == 6 and calls == [["z0"]]

    # a catalog of another version reading this record: the previous log's vectors are not
    # its model's, every upsert is encoded
    other = tmp_path / "other"
    shutil.copytree(ckpt, other, ignore=shutil.ignore_patterns("index"))
    meta = json.loads((other / META_FILE).read_text())
    (other / META_FILE).write_text(json.dumps({**meta, "version": "other"}))
    c = make_engine(other).catalog
    calls.clear()
    upserts = sorted(i for i, r in a.edits.records.items() if r is not None)
    assert (
        c._apply(saved_edits(directory, a.checkpoint.version), ties_win=False, encode=encode)
        == len(upserts)
        == 23
    )
    assert sorted(i for call in calls for i in call) == upserts and "z1" in upserts
