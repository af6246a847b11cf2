"""add / upsert / remove without a rebuild, ids, bad input, concurrent use."""

import threading

import numpy as np
import pytest

from index import ItemIndex, UnknownItemError

KINDS = ["flat", "ivf", "hnsw"]


def test_string_ids_round_trip(tmp_path):
    ids = ["B00X123", "42", "ünïcode", "with space"]
    ix = ItemIndex.build(ids, np.eye(4))
    assert ix.item_ids() == ids and len(ix) == 4
    assert "B00X123" in ix and 42 in ix and "43" not in ix  # ids are compared as str
    got, _ = ix.search(np.eye(4), 1)
    assert [r[0] for r in got] == ids
    ix.save(tmp_path)
    back = ItemIndex.load(tmp_path)
    assert back.item_ids() == ids
    assert [r[0] for r in back.search(np.eye(4), 1)[0]] == ids


@pytest.mark.parametrize("kind", KINDS)
def test_add_many_adds_a_batch_and_rejects_bad_batches_whole(kind, catalog):
    ids, x = catalog
    ix = ItemIndex.build(ids[:400], x[:400], kind=kind)
    ix.add_many(ids[400:], x[400:])
    assert len(ix) == 500
    got, _ = ix.search(x[450:455], 1)
    assert [r[0] for r in got] == ids[450:455]
    with pytest.raises(ValueError, match="duplicate item id 'n1' in one batch"):
        ix.add_many(["n0", "n1", "n1"], x[:3])
    with pytest.raises(ValueError, match=r"\['B00007'\] already in the index; use upsert"):
        ix.add_many(["n0", "B00007"], x[:2])
    with pytest.raises(ValueError, match="got 3 item ids for 2 vectors"):
        ix.add_many(["n0", "n1", "n2"], x[:2])
    bad = x[:3].copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in row\(s\) \[2\]"):
        ix.add_many(["n0", "n1", "n2"], bad)
    with pytest.raises(ValueError, match="expected dimension 16, got 8"):
        ix.add_many(["n0"], x[:1, :8])
    assert len(ix) == 500 and "n0" not in ix  # nothing from the rejected batches went in


@pytest.mark.parametrize("kind", KINDS)
def test_add_upsert_remove_change_results_without_rebuild(kind, catalog):
    ids, x = catalog
    ix = ItemIndex.build(ids, x, kind=kind)
    probe = np.zeros((1, 16), np.float32)
    probe[0, 0] = 1.0
    before = ix._index

    ix.add("new", probe[0] * 3)
    assert len(ix) == 501 and "new" in ix
    got, sc = ix.search(probe, 3)
    assert got[0][0] == "new" and sc[0, 0] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(ix.vector("new"), probe[0], atol=1e-6)

    assert ix.upsert("new", -probe[0]) is True  # now the least similar item
    assert len(ix) == 501
    got, _ = ix.search(probe, 3)
    assert "new" not in got[0]
    got, sc = ix.search(-probe, 1)
    assert got[0] == ["new"] and sc[0, 0] == pytest.approx(1.0, abs=1e-5)

    assert ix.upsert(ids[0], probe[0]) is True
    assert ix.search(probe, 1)[0][0] == [ids[0]]
    assert ix.upsert("fresh", probe[0] + 0.01) is False and len(ix) == 502

    ix.remove(ids[0])
    assert len(ix) == 501 and ids[0] not in ix
    assert ids[0] not in ix.search(probe, 50)[0][0]
    assert ix._index is before or kind == "hnsw"  # same faiss object: edited in place


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_faiss_ids_are_never_reused(kind):
    ix = ItemIndex.build(["a", "b"], np.eye(2), kind=kind)
    ix.remove("b")
    ix.add("b", np.array([0.0, 1.0]))
    ix.upsert("a", np.array([1.0, 1.0]))
    # flat replaces a vector where it is, under its item's id; hnsw adds it anew
    assert ix._item_to_fid == ({"b": 2, "a": 0} if kind == "flat" else {"b": 2, "a": 3})


def test_a_flat_replacement_overwrites_the_row_and_ranks_as_a_fresh_build(catalog):
    """A flat index replaces a vector in place (a removal moved every row after it: a pass
    over the whole index, under the lock every search takes, per replacement); what it finds
    is what an index built from the final vectors finds."""
    ids, x = catalog
    ix = ItemIndex.build(ids, x)
    fids, rows = dict(ix._item_to_fid), ix._index.ntotal
    x2 = x.copy()
    x2[[3, 250, 499]] = x[[10, 20, 30]] + 0.5
    assert ix.upsert(ids[3], x2[3])
    assert ix.upsert_many([ids[499], "new", ids[250]], x2[[499, 0, 250]]) == 2
    assert ix._index.ntotal == rows + 1 and {i: ix._item_to_fid[i] for i in ids} == fids
    fresh = ItemIndex.build([*ids, "new"], np.vstack([x2, x2[:1]]))
    got, scores = ix.search(x2[[3, 10, 250, 0]], 20)
    want, want_scores = fresh.search(x2[[3, 10, 250, 0]], 20)
    assert got == want
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)
    np.testing.assert_allclose(ix.vector(ids[250]), fresh.vector(ids[250]), atol=1e-6)


def test_unknown_and_duplicate_items_are_errors():
    ix = ItemIndex.build(["a", "b"], np.eye(2))
    with pytest.raises(KeyError, match="'zzz' is not in the index"):
        ix.remove("zzz")
    with pytest.raises(UnknownItemError):
        ix.vector("zzz")
    with pytest.raises(ValueError, match="already in the index"):
        ix.add("a", np.ones(2))
    with pytest.raises(ValueError, match="duplicate item id 'a'"):
        ItemIndex.build(["a", "a"], np.eye(2))


def test_hnsw_remove_uses_tombstones_then_compacts(catalog):
    ids, x = catalog
    ix = ItemIndex.build(ids, x, kind="hnsw", max_tombstone_ratio=0.2)
    flat = ItemIndex.build(ids, x)
    gone = ids[:100]
    for i in gone:
        ix.remove(i)
        flat.remove(i)
    assert ix.num_tombstones == 100 and len(ix) == 400  # 100 is not > 0.2 * 500 stored rows
    got, _ = ix.search(x[:20], 10)  # queries equal to removed items
    assert all(len(r) == 10 and not set(r) & set(gone) for r in got)
    truth, _ = flat.search(x[:20], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got, strict=True)])
    assert recall >= 0.9
    ix.remove(ids[100])  # 101 > 0.2 * 500: rebuilt without tombstones
    flat.remove(ids[100])
    assert ix.num_tombstones == 0 and ix._index.ntotal == 399 == len(ix)
    got, _ = ix.search(x[:20], 10)
    assert all(len(r) == 10 and not set(r) & set(ids[:101]) for r in got)
    np.testing.assert_allclose(ix.vector(ids[200]), flat.vector(ids[200]), atol=1e-6)


def nan_row():
    x = np.ones((3, 4))
    x[1, 2] = np.nan
    return x


@pytest.mark.parametrize(
    ("vectors", "match"),
    [
        (nan_row(), r"NaN or inf in row\(s\) \[1\]"),
        (np.full((3, 4), np.inf), "NaN or inf"),
        (np.zeros((3, 4)), "zero vector"),
        (np.ones(4), "2-D"),
        (np.array([["a"] * 4] * 3), "real numeric"),
    ],
)
def test_bad_build_vectors(vectors, match):
    with pytest.raises(ValueError, match=match):
        ItemIndex.build(["a", "b", "c"], vectors)


def test_bad_search_and_edit_input():
    ix = ItemIndex.build(["a", "b"], np.eye(4)[:2])
    with pytest.raises(ValueError, match="expected dimension 4, got 3"):
        ix.search(np.ones((1, 3)), 1)
    with pytest.raises(ValueError, match="NaN"):
        ix.search(np.array([[1.0, np.nan, 0, 0]]), 1)
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            ix.search(np.ones((1, 4)), k)
    with pytest.raises(ValueError, match="not a string"):
        ix.search(np.ones((1, 4)), 1, exclude=["a"])
    with pytest.raises(ValueError, match="2 entries for 1 queries"):
        ix.search(np.ones((1, 4)), 1, exclude=[[], []])
    with pytest.raises(ValueError, match="expected dimension 4, got 5"):
        ix.add("c", np.ones(5))
    with pytest.raises(ValueError, match="NaN or inf"):
        ix.upsert("a", np.array([np.inf, 0, 0, 0]))
    assert len(ix) == 2 and ix.vector("a")[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown index parameter"):
        ItemIndex.build(["a"], np.ones((1, 4)), nprobes=3)
    with pytest.raises(ValueError, match="kind must be one of"):
        ItemIndex.build(["a"], np.ones((1, 4)), kind="lsh")
    with pytest.raises(ValueError, match="2 item ids for 1 vectors"):
        ItemIndex.build(["a", "b"], np.ones((1, 4)))


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_searches_and_edits_from_several_threads(kind, catalog):
    ids, x = catalog
    ix = ItemIndex.build(ids, x, kind=kind)
    errors: list[BaseException] = []

    def searcher():
        try:
            for _ in range(30):
                got, _ = ix.search(x[:8], 5, exclude=[ids[:3]] * 8)
                assert all(len(r) == 5 for r in got)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def editor():
        try:
            for i in range(60):
                ix.upsert(f"n{i % 7}", x[i])
                if i % 3 == 0:
                    ix.remove(f"n{i % 7}")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=f) for f in (searcher, searcher, editor)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
