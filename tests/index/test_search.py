"""Search results checked by hand: orthogonal vectors, scaling, exclusion, recall."""

import numpy as np
import pytest

from index import ItemIndex
from tests.index.conftest import clustered

KINDS = ["flat", "ivf", "hnsw"]


def brute_force(x, q, k, exclude=None):
    """Top-k rows of cosine(q, x) by numpy, skipping exclude[i]; (ids, scores) as lists."""
    xu = x / np.linalg.norm(x, axis=1, keepdims=True)
    qu = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = qu.astype(np.float64) @ xu.T.astype(np.float64)  # (B, N)
    ids, scores = [], []
    for i, row in enumerate(sims):
        if exclude is not None:
            row = row.copy()
            row[list(exclude[i])] = -np.inf
        order = np.argsort(-row, kind="stable")[:k]
        ids.append([str(j) for j in order])
        scores.append(row[order])
    return ids, np.array(scores)


def test_flat_search_equals_numpy_brute_force():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((300, 24)).astype(np.float32) * rng.uniform(0.1, 10, (300, 1))
    q = rng.standard_normal((9, 24)).astype(np.float32)
    ix = ItemIndex.build([str(i) for i in range(300)], x)
    got, scores = ix.search(q, 15)
    want, want_scores = brute_force(x, q, 15)
    assert got == want
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # random ids plus each row's own top 5, so the mask hits the head of the ranking
    excluded = [{*rng.choice(300, 40, replace=False).tolist(), *map(int, row[:5])} for row in want]
    got, scores = ix.search(q, 15, exclude=[{str(j) for j in e} for e in excluded])
    want, want_scores = brute_force(x, q, 15, excluded)
    assert got == want
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_orthogonal_vectors_rank_the_equal_item_first_with_score_one():
    ids = [chr(ord("a") + j) for j in range(8)]
    ix = ItemIndex.build(ids, np.eye(8, dtype=np.float32))
    got, scores = ix.search(np.eye(8, dtype=np.float32), k=3)
    assert [row[0] for row in got] == ids
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(scores[:, 1:], 0.0, atol=1e-6)  # cosine of orthogonal vectors
    assert scores.shape == (8, 3) and scores.dtype == np.float32


def test_scaled_vectors_give_the_same_ranking_and_cosine_scores(catalog):
    ids, x = catalog
    scale = np.random.default_rng(1).uniform(0.01, 100.0, (len(x), 1)).astype(np.float32)
    q = x[:4] * 7.0
    a_ids, a_sc = ItemIndex.build(ids, x).search(x[:4], 10)
    b_ids, b_sc = ItemIndex.build(ids, x * scale).search(q, 10)
    assert a_ids == b_ids
    np.testing.assert_allclose(a_sc, b_sc, atol=1e-5)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(a_sc[0, 0], unit[0] @ unit[0], atol=1e-5)


def test_build_does_not_modify_the_callers_array(catalog):
    ids, x = catalog
    before = x.copy()
    ItemIndex.build(ids, x)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("kind", KINDS)
def test_exclusion_keeps_exactly_k_and_never_returns_excluded(kind, catalog):
    ids, x = catalog
    ix = ItemIndex.build(ids, x, kind=kind)
    k = 10
    # exclude each query's own 30 nearest items, so the mask hits the head of the ranking
    near, _ = ItemIndex.build(ids, x).search(x[:6], 30)
    exclude = [set(row) | {"not-in-index"} for row in near]
    got, scores = ix.search(x[:6], k, exclude=exclude)
    for row, excl, sc in zip(got, exclude, scores, strict=True):
        assert len(row) == k and len(set(row)) == k
        assert not set(row) & excl
        assert np.all(np.diff(sc) <= 1e-6) and np.isfinite(sc).all()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_exclusion_larger_than_what_an_approximate_search_reaches(kind, catalog):
    ids, x = catalog  # nprobe=1 reaches ~40 items: the exact retry must fill the row
    ix = ItemIndex.build(ids, x, kind=kind, nprobe=1, ef_search=1, nlist=12)
    exclude = [ids[:300]]
    got, _ = ix.search(x[:1], 150, exclude=exclude)
    assert len(got[0]) == 150 and not set(got[0]) & set(ids[:300])


def test_exclusion_larger_than_the_catalog():
    ids = [str(i) for i in range(10)]
    ix = ItemIndex.build(ids, np.random.default_rng(0).standard_normal((10, 8)))
    q = np.ones((3, 8))
    got, scores = ix.search(q, 5, exclude=[ids[:8], ids, ids + ["x", "y"]])
    assert len(got[0]) == 2 and set(got[0]) == {"8", "9"}
    assert got[1] == [] and got[2] == []
    assert np.isfinite(scores[0, :2]).all() and np.isneginf(scores[0, 2:]).all()
    assert np.isneginf(scores[1:]).all()


def test_k_larger_than_the_catalog_returns_every_item():
    ix = ItemIndex.build(["a", "b", "c"], np.eye(3))
    got, scores = ix.search(np.eye(3)[:1], 10)
    assert sorted(got[0]) == ["a", "b", "c"] and scores.shape == (1, 10)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_at_10_vs_flat(kind):
    x = clustered(2000, 32, clusters=30, seed=3)
    q = clustered(50, 32, clusters=30, seed=3)[:50] + 0.1
    ids = [str(i) for i in range(len(x))]
    truth, _ = ItemIndex.build(ids, x).search(q, 10)
    got, _ = ItemIndex.build(ids, x, kind=kind).search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got, strict=True)])
    assert recall >= 0.9, recall


def test_ivf_falls_back_to_flat_when_too_small_to_train(caplog):
    x = clustered(50, 8)
    ix = ItemIndex.build([str(i) for i in range(50)], x, kind="ivf")
    assert ix.kind == "flat"
    assert "building a flat index" in caplog.text


def test_ivf_reduces_nlist_to_what_the_data_can_train():
    ix = ItemIndex.build([str(i) for i in range(400)], clustered(400, 8), kind="ivf", nlist=100)
    assert ix.kind == "ivf" and ix.config.nlist == 400 // 39


def test_blas_threshold_is_lowered_once_an_index_exists():
    import faiss

    ItemIndex.build(["a"], np.ones((1, 4)))
    assert faiss.cvar.distance_compute_blas_threshold == 20


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_rows_an_approximate_search_leaves_short_are_searched_again_exactly(kind, catalog, monkeypatch):
    ids, x = catalog
    ix = ItemIndex.build(ids, x, kind=kind, nlist=8)
    flat = ItemIndex.build(ids, x)
    for i in ids[:20]:  # hnsw: tombstones, which the exact pass must skip too
        ix.remove(i)
        flat.remove(i)
    real = ItemIndex._faiss_search
    calls = []

    def lossy(self, q, fetch, exact):  # the graph / probed lists found only one item per row
        calls.append(exact)
        d, lab = real(self, q, fetch, exact)
        if not exact:
            lab = lab.copy()
            lab[:, 1:] = -1
        return d, lab

    exclude = [ids[20:40]] * 5
    want, want_scores = flat.search(x[40:45], 10, exclude=exclude)
    monkeypatch.setattr(ItemIndex, "_faiss_search", lossy)
    got, scores = ix.search(x[40:45], 10, exclude=exclude)
    assert calls == [False, True]
    assert got == want
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_set_search_params_changes_nprobe_and_ef_search(catalog, tmp_path):
    ids, x = catalog
    ivf = ItemIndex.build(ids, x, kind="ivf", nlist=8, nprobe=2)
    ivf.set_search_params(nprobe=8)
    assert ivf._index.nprobe == 8 and ivf.config.nprobe == 8
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        ivf.set_search_params(nprobe=0)
    hnsw = ItemIndex.build(ids, x, kind="hnsw")
    hnsw.set_search_params(ef_search=99)
    hnsw.save(tmp_path)
    assert ItemIndex.load(tmp_path).config.ef_search == 99


def test_describe_names_the_kind_and_the_search_parameters_in_force(catalog):
    """What /readyz and r2ec_model_info show: ivf's nprobe as searched (at most nlist)."""
    ids, x = catalog
    assert ItemIndex.build(ids, x).describe() == "flat"
    ivf = ItemIndex.build(ids, x, kind="ivf", nlist=8, nprobe=2)
    assert ivf.describe() == "ivf nlist=8 nprobe=2"
    ivf.set_search_params(nprobe=50)
    assert ivf.describe() == "ivf nlist=8 nprobe=8"
    hnsw = ItemIndex.build(ids, x, kind="hnsw", hnsw_m=16, ef_search=99)
    assert hnsw.describe() == "hnsw M=16 ef_search=99"


@pytest.mark.parametrize("kind", KINDS)
def test_a_candidate_set_is_ranked_exactly_beside_rows_searched_whole(kind):
    """`only` limits a row to its candidates, scored exactly whatever the kind (an approximate
    index may not reach them): brute force over that subset, exclusions and ids the index does
    not hold dropped, removed items never returned; the other rows search the whole catalog."""
    rng = np.random.default_rng(3)
    x = clustered(400, 16, seed=3)
    q = rng.standard_normal((3, 16)).astype(np.float32)
    ix = ItemIndex.build([str(i) for i in range(400)], x, kind=kind)
    ix.remove("5")
    subset = rng.choice(400, 60, replace=False).tolist()
    only = [{*map(str, subset), "5", "not-indexed"}, None, {str(subset[0])}]
    exclude = [{str(subset[1])}, set(), {str(subset[0])}]
    got, scores = ix.search(q, 10, exclude=exclude, only=only)

    keep = [j for j in subset if j not in (5, subset[1])]
    sims = (x[keep] / np.linalg.norm(x[keep], axis=1, keepdims=True)) @ (q[0] / np.linalg.norm(q[0]))
    order = np.argsort(-sims, kind="stable")[:10]
    assert got[0] == [str(keep[j]) for j in order]
    np.testing.assert_allclose(scores[0], sims[order], atol=1e-5)
    whole, _ = ix.search(q[1:2], 10, exclude=[set()])
    assert got[1] == whole[0] and len(got[1]) == 10
    assert got[2] == [] and np.isneginf(scores[2]).all()  # its one candidate is excluded
    few, few_scores = ix.search(q[:1], 10, only=[{"1", "2"}])
    assert sorted(few[0]) == ["1", "2"] and np.isneginf(few_scores[0, 2:]).all()
    with pytest.raises(ValueError, match=r"only\[0\] must be a collection"):
        ix.search(q[:1], 10, only=["12"])
