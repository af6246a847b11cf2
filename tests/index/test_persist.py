"""save / load: round trips, expectation checks, crash safety."""

import json
import os
import threading

import faiss
import numpy as np
import pytest

from index import IndexMismatchError, ItemIndex

KINDS = ["flat", "ivf", "hnsw"]


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_gives_identical_results(kind, catalog, tmp_path):
    ids, x = catalog
    ix = ItemIndex.build(ids, x, kind=kind, nprobe=4, ef_search=20)
    ix.remove(ids[3])
    ix.upsert(ids[5], x[6])
    ix.add("extra", x[7] + 0.5)
    ix.save(tmp_path, {"model_version": "v1"})
    back = ItemIndex.load(tmp_path, expect_dim=16, expect_metadata={"model_version": "v1"})
    assert back.kind == kind and back.config == ix.config and back.metadata == {"model_version": "v1"}
    assert back.item_ids() == ix.item_ids() and len(back) == len(ix)
    assert back.num_tombstones == ix.num_tombstones
    exclude = [ids[:5]] * 10
    a_ids, a_sc = ix.search(x[:10], 10, exclude=exclude)
    b_ids, b_sc = back.search(x[:10], 10, exclude=exclude)
    assert a_ids == b_ids
    np.testing.assert_array_equal(a_sc, b_sc)
    back.add("after-load", x[8])  # the id counter continues, no reuse
    assert back._item_to_fid["after-load"] == ix._next_id


def test_load_checks_dim_and_metadata(catalog, tmp_path):
    ids, x = catalog
    ItemIndex.build(ids, x).save(tmp_path, {"model_version": "v1", "tau": 0.1})
    with pytest.raises(IndexMismatchError, match="dim: expected 32, found 16"):
        ItemIndex.load(tmp_path, expect_dim=32)
    with pytest.raises(IndexMismatchError, match="model_version: expected 'v2', found 'v1'"):
        ItemIndex.load(tmp_path, expect_metadata={"model_version": "v2"})
    with pytest.raises(IndexMismatchError, match="checkpoint: expected 'x', found no 'checkpoint'"):
        ItemIndex.load(tmp_path, expect_metadata={"checkpoint": "x"})
    assert isinstance(IndexMismatchError("x"), ValueError)
    ItemIndex.load(tmp_path, expect_dim=16, expect_metadata={"model_version": "v1", "tau": 0.1})


def test_missing_files_name_the_path(catalog, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ItemIndex.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="index.json"):
        ItemIndex.load(tmp_path)
    ids, x = catalog
    ItemIndex.build(ids, x).save(tmp_path)
    faiss_file = json.loads((tmp_path / "index.json").read_text())["faiss_file"]
    (tmp_path / faiss_file).unlink()
    with pytest.raises(FileNotFoundError, match=faiss_file):
        ItemIndex.load(tmp_path)


def test_metadata_must_be_json(catalog, tmp_path):
    ids, x = catalog
    with pytest.raises(ValueError, match="JSON-serialisable"):
        ItemIndex.build(ids, x).save(tmp_path, {"when": object()})


def test_a_new_save_replaces_the_old_pair(catalog, tmp_path):
    ids, x = catalog
    ix = ItemIndex.build(ids, x)
    ix.save(tmp_path, {"model_version": "v1"})
    ix.remove(ids[0])
    ix.save(tmp_path, {"model_version": "v2"})
    assert _suffixes(tmp_path) == [".faiss", ".json"]
    back = ItemIndex.load(tmp_path, expect_metadata={"model_version": "v2"})
    assert len(back) == 499


def _suffixes(directory):
    # .lock, .save.lock: the writers' turns
    return sorted(p.suffix for p in directory.iterdir() if p.name not in (".lock", ".save.lock"))


def test_two_writers_take_turns(catalog, tmp_path, monkeypatch):
    # B saves while A is between its commit and its cleanup (replicas on one volume): without
    # turns, A's cleanup deletes the faiss file B's json names
    import index.persist

    ids, x = catalog
    a, b = ItemIndex.build(ids, x), ItemIndex.build(ids[:10], x[:10])
    real_fsync, other = index.persist._fsync, []

    def fsync(path):
        real_fsync(path)
        if path == tmp_path and not other:  # A's commit is done
            other.append(threading.Thread(target=b.save, args=(tmp_path, {"model_version": "b"})))
            other[0].start()
            other[0].join(0.3)  # B blocks on A's lock, or (without one) commits meanwhile

    monkeypatch.setattr(index.persist, "_fsync", fsync)
    a.save(tmp_path, {"model_version": "a"})
    other[0].join()
    assert len(ItemIndex.load(tmp_path, expect_metadata={"model_version": "b"})) == 10
    assert _suffixes(tmp_path) == [".faiss", ".json"]


def _assert_v1_intact(tmp_path, ids, x, expected):
    back = ItemIndex.load(tmp_path, expect_metadata={"model_version": "v1"})
    assert len(back) == len(ids)
    assert back.search(x[:5], 10)[0] == expected
    assert _suffixes(tmp_path) == [".faiss", ".json"]  # no debris


def test_crash_at_the_commit_keeps_the_previous_index(catalog, tmp_path, monkeypatch):
    ids, x = catalog
    ix = ItemIndex.build(ids, x)
    ix.save(tmp_path, {"model_version": "v1"})
    expected = ix.search(x[:5], 10)[0]
    ix.remove(ids[0])

    def crash(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        ix.save(tmp_path, {"model_version": "v2"})
    monkeypatch.undo()
    _assert_v1_intact(tmp_path, ids, x, expected)


def test_crash_while_writing_faiss_keeps_the_previous_index(catalog, tmp_path, monkeypatch):
    ids, x = catalog
    ix = ItemIndex.build(ids, x, kind="hnsw")
    ix.save(tmp_path, {"model_version": "v1"})
    expected = ix.search(x[:5], 10)[0]
    ix.remove(ids[0])
    real_write = faiss.write_index

    def half_write(index, path):
        real_write(index, path)
        with open(path, "r+b") as f:
            f.truncate(100)  # a torn file, then the process "dies"
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(faiss, "write_index", half_write)
    with pytest.raises(OSError, match="killed mid-write"):  # faiss's RuntimeError, as an OSError
        ix.save(tmp_path, {"model_version": "v2"})
    monkeypatch.undo()
    _assert_v1_intact(tmp_path, ids, x, expected)


def test_truncated_faiss_file_is_detected(catalog, tmp_path):
    ids, x = catalog
    ItemIndex.build(ids, x).save(tmp_path)
    faiss_file = tmp_path / json.loads((tmp_path / "index.json").read_text())["faiss_file"]
    with open(faiss_file, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(IndexMismatchError, match="faiss_bytes"):
        ItemIndex.load(tmp_path)


def test_a_json_without_required_fields_is_a_clear_error(catalog, tmp_path):
    ids, x = catalog
    ItemIndex.build(ids, x).save(tmp_path)
    doc = json.loads((tmp_path / "index.json").read_text())
    del doc["next_id"]
    (tmp_path / "index.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['next_id'\]"):
        ItemIndex.load(tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_searches_go_on_while_the_index_is_saved_and_edits_wait_for_the_write(
    kind, catalog, tmp_path, monkeypatch
):
    """A save holds the search lock only to copy the id map, not while the faiss file is
    written (at a million items, seconds of every search waiting); an edit waits for the write,
    so the file is the state its json describes."""
    ids, x = catalog
    ix = ItemIndex.build(ids, x, kind=kind, nprobe=4)
    expected = ix.search(x[:2], 5)[0]
    real_write, seen, edit = faiss.write_index, {}, threading.Thread(target=ix.remove, args=(ids[0],))

    def write_while_searching(index, path):
        search = threading.Thread(target=lambda: seen.setdefault("ids", ix.search(x[:2], 5)[0]))
        search.start(), edit.start()
        search.join(60)  # a search blocked by the save does not return before it: no timing here
        seen["searched during the write"] = "ids" in seen
        seen["edited during the write"] = ids[0] not in ix
        real_write(index, path)

    monkeypatch.setattr(faiss, "write_index", write_while_searching)
    ix.save(tmp_path, {"model_version": "v1"})
    edit.join()
    assert seen == {"ids": expected, "searched during the write": True, "edited during the write": False}
    assert ids[0] not in ix and ids[0] in ItemIndex.load(tmp_path).item_ids()
