"""A FAISS inner-product index over L2-normalised item vectors, keyed by dataset item ids.

The index knows vectors and ids, not models: the caller turns items into (N, H) vectors and
users into (B, H) vectors; here they are normalised on the way in, so a raw score is a cosine
similarity (R²ec divides it by tau, which is the caller's business).

Kinds (`IndexConfig.kind`):
  flat  exact; `IndexIDMap2(IndexFlatIP(H))`. The default.
  ivf   `IndexIVFFlat` (inner product) trained on a sample of the build vectors; `nlist`
        defaults to ~4*sqrt(N) capped at 4096 and is reduced to N // 39 when N is too small to
        train it (faiss k-means wants >= 39 points per list); below 2 lists the build falls
        back to flat with a warning. A hashtable direct map gives O(1) remove and `vector()`.
        Items added later are assigned to the existing centroids (no retraining).
  hnsw  `IndexIDMap2(IndexHNSWFlat(H, M, METRIC_INNER_PRODUCT))`. HNSW cannot delete a node,
        so remove/upsert leave a *tombstone*: the old faiss id stays in the graph (it keeps
        the graph connected) and is skipped at search time through an `IDSelectorNot`
        search parameter. When tombstones exceed `max_tombstone_ratio` of the stored rows the
        graph is rebuilt from the live vectors (same faiss ids), see `compact()`.

Item ids are strings (`str(item_id)` is applied, so 42 and "42" name the same item). Each is
mapped to an int64 faiss id from a monotonic counter; a faiss id is never reused within one
index's life, including across save/load, so a stale id can never alias a new item. A flat
index replaces an item's vector where it is, under the item's own id (a removal moves every
row after it); ivf and hnsw remove (or tombstone) and add it under a new id.

`search` masks per-query exclusions (history) without losing k: one batched faiss call asks
for k + max_i |exclude_i| rows, which is enough for an exact index; rows an approximate index
left short are searched again exactly (ivf with nprobe = nlist, hnsw by brute force over its
storage). Row i holds exactly min(k, len(index) - |exclude_i ∩ index|) items.

Thread safety: every mutation and search holds one `threading.RLock`, so a service can
search from a worker thread while admin routes edit items. A save holds it only to copy the
id map; it writes the faiss file holding a second lock, which mutations take too (first), so
searches go on while a large index is written and flushed (faiss reads an index from several
threads at once), and no edit lands in the middle of the write.

Persistence (`save`/`load`): see `index.persist` (faiss file + `index.json`, committed by an
atomic rename of the json; a crash leaves the previous pair intact).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.persist import (
    FORMAT_VERSION,
    check_metadata,
    commit_index_dir,
    read_index_dir,
    saving,
    write_faiss,
)

logger = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "hnsw")
# Below this many queries faiss scans the items once per query instead of one BLAS matrix
# product. faiss's default (128000 in this build) kept every service batch off BLAS;
# bench/bench_index.py measures the difference.
BLAS_THRESHOLD = 20
MIN_POINTS_PER_LIST = 39  # faiss k-means warns below 39 training points per centroid
MAX_NLIST = 4096
TRAIN_POINTS_PER_LIST = 64  # ivf k-means sample: 64 * nlist vectors (faiss would take up to 256)
CHUNK = 65536  # rows normalised and added per step: bounds the float32 copies of a big build


@dataclasses.dataclass(frozen=True)
class PendingSave:
    """A faiss file `ItemIndex.begin_save` wrote and the description `finish_save` commits."""

    directory: Path
    faiss_path: Path
    doc: dict[str, Any]


class UnknownItemError(KeyError):
    """An item id that is not in the index."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def tune_faiss() -> None:
    """Lower faiss's process-wide BLAS threshold (called by `build` and `load`)."""
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


def search_without_threads() -> None:
    """Make this thread's FAISS calls run on it alone, without an OpenMP team (the setting is
    per thread). For a thread that searches beside the one running the model (the service's
    cache hits). With torch imported first, as in the service, FAISS's OpenMP calls go to
    torch's libgomp, and a team of it living on a second thread made the model thread's later
    prefills 1.39-1.47x slower (bench/bench_threads.py, BENCHMARKS.md §4), while one query over
    a catalog of thousands of items is a fraction of a millisecond on one core."""
    faiss.omp_set_num_threads(1)


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How an `ItemIndex` is built and searched; stored in `index.json`."""

    kind: str = "flat"  # "flat" (exact), "ivf" or "hnsw"
    nlist: int | None = None  # ivf: inverted lists; None -> ~4*sqrt(N), capped at 4096
    nprobe: int = 16  # ivf: lists visited per query
    hnsw_m: int = 32  # hnsw: neighbours per node (faiss's M)
    ef_construction: int = 40  # hnsw: candidate list size while building
    ef_search: int = 64  # hnsw: candidate list size while searching (raised to k if smaller)
    max_tombstone_ratio: float = 0.25  # hnsw: rebuild once tombstones exceed this share
    seed: int = 0  # ivf: k-means seed and training sample

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"nlist must be >= 1 or None (automatic), got {self.nlist}")
        if not 0.0 < self.max_tombstone_ratio <= 1.0:
            raise ValueError(f"max_tombstone_ratio must be in (0, 1], got {self.max_tombstone_ratio}")


def _make_config(kind: str, params: dict[str, Any]) -> IndexConfig:
    names = {f.name for f in dataclasses.fields(IndexConfig)} - {"kind"}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(f"unknown index parameter(s) {unknown}; valid: {sorted(names)}")
    return IndexConfig(kind=kind, **params)


def default_nlist(n: int) -> int:
    """The ivf lists built for N vectors when `IndexConfig.nlist` is None: ~4*sqrt(N), at most
    MAX_NLIST (before `_resolve_ivf` lowers it to what N can train)."""
    return min(MAX_NLIST, max(1, round(4 * math.sqrt(max(n, 1)))))


def _resolve_ivf(config: IndexConfig, n: int) -> IndexConfig:
    """Pick nlist for N vectors; fall back to flat when N cannot train 2 lists."""
    if config.kind != "ivf":
        return config
    wanted = config.nlist or default_nlist(n)
    trainable = n // MIN_POINTS_PER_LIST
    if trainable < 2:
        logger.warning(
            "ivf needs >= %d vectors to train 2 lists, got %d: building a flat index instead",
            2 * MIN_POINTS_PER_LIST,
            n,
        )
        return dataclasses.replace(config, kind="flat", nlist=None)
    if wanted > trainable:
        log = logger.warning if config.nlist else logger.info  # warn only if nlist was asked for
        log(
            "ivf nlist %d needs %d training vectors, got %d: using nlist=%d",
            wanted,
            wanted * MIN_POINTS_PER_LIST,
            n,
            trainable,
        )
        wanted = trainable
    return dataclasses.replace(config, nlist=wanted)


def _row_norms(block: np.ndarray, what: str, offset: int) -> np.ndarray:
    """(n,) float64 L2 norms of float32 rows; ValueError naming rows that are not finite or zero."""
    sq = np.einsum("ij,ij->i", block, block, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(sq))
    if bad.size:
        raise ValueError(f"{what}: NaN or inf in row(s) {(bad[:5] + offset).tolist()}")
    zero = np.flatnonzero(sq == 0.0)
    if zero.size:
        raise ValueError(f"{what}: zero vector in row(s) {(zero[:5] + offset).tolist()}")
    return np.sqrt(sq)


def _checked(x: Any, dim: int | None, what: str) -> np.ndarray:
    """Validate a (N, H) real array without copying it: shape, dim, finite, no zero rows."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{what}: expected a real numeric array, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D (rows, dim) array, got shape {a.shape}")
    if a.shape[1] == 0 or (dim is not None and a.shape[1] != dim):
        raise ValueError(f"{what}: expected dimension {dim}, got {a.shape[1]}")
    for start in range(0, a.shape[0], CHUNK):  # float32 first: an overflow to inf is caught
        _row_norms(a[start : start + CHUNK].astype(np.float32, copy=False), what, start)
    return a


def _unit(rows: np.ndarray) -> np.ndarray:
    """A contiguous float32 copy of (already `_checked`) rows, each divided by its L2 norm."""
    out = np.array(rows, dtype=np.float32, order="C")
    out /= _row_norms(out, "vectors", 0)[:, None].astype(np.float32)  # norms in float64: no overflow
    return out


def _one_row(vector: Any, dim: int) -> np.ndarray:
    a = np.asarray(vector)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[0] != 1:
        raise ValueError(f"vector: expected shape ({dim},) or (1, {dim}), got {a.shape}")
    return _checked(a, dim, "vector")


def _string_ids(item_ids: Sequence[Any], n: int) -> list[str]:
    ids = [str(i) for i in item_ids]
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} item ids for {n} vectors")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"duplicate item id {dup!r} in one batch; each id must appear once")
    return ids


def _new_faiss_index(config: IndexConfig, dim: int) -> faiss.Index:
    match config.kind:
        case "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        case "ivf":
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, config.nlist, faiss.METRIC_INNER_PRODUCT)
            ivf.cp.seed = config.seed
            ivf.nprobe = min(config.nprobe, config.nlist)
            return ivf
        case "hnsw":
            hnsw = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = config.ef_construction
            hnsw.hnsw.efSearch = config.ef_search
            return faiss.IndexIDMap2(hnsw)
    raise AssertionError(config.kind)


class ItemIndex:
    """Item vectors under string ids; build with `ItemIndex.build` or `ItemIndex.load`."""

    def __init__(self, index: faiss.Index, config: IndexConfig, dim: int) -> None:
        self._index = index
        self._config = config
        self._dim = dim
        self._item_to_fid: dict[str, int] = {}
        self._fid_to_item: dict[int, str] = {}
        self._next_id = 0
        self._tombstones: set[int] = set()  # hnsw only: faiss ids still in the graph
        self._tomb_selector: tuple[Any, ...] | None = None  # cached IDSelectorNot(Batch)
        self._metadata: dict[str, Any] = {}
        self._lock = threading.RLock()  # searches, mutations, reads of the maps
        self._mutating = threading.RLock()  # mutations and saves (taken before `_lock`)

    # ----------------------------------------------------------------- construction
    @classmethod
    def build(
        cls, item_ids: Sequence[str], vectors: np.ndarray, kind: str = "flat", **params: Any
    ) -> ItemIndex:
        """Index `vectors` (N, H) under `item_ids` (N); `params` are `IndexConfig` fields."""
        tune_faiss()
        config = _make_config(kind, params)
        a = _checked(vectors, None, "vectors")  # (N, H), not copied
        ids = _string_ids(item_ids, a.shape[0])
        n, dim = a.shape
        config = _resolve_ivf(config, n)
        t0 = time.perf_counter()
        self = cls(_new_faiss_index(config, dim), config, dim)
        if config.kind == "ivf":
            size = min(n, TRAIN_POINTS_PER_LIST * config.nlist)
            rng = np.random.default_rng(config.seed)
            sample = a if size >= n else a[np.sort(rng.choice(n, size, replace=False))]
            self._index.train(_unit(sample))
            self._index.set_direct_map_type(faiss.DirectMap.Hashtable)
        self._add(ids, a)
        logger.info("built %s index: %d items, dim %d, %.2fs", config.kind, n, dim, time.perf_counter() - t0)
        return self

    # ----------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def kind(self) -> str:
        return self._config.kind

    @property
    def config(self) -> IndexConfig:
        return self._config

    def describe(self) -> str:
        """The kind and search parameters in force, as /readyz and r2ec_model_info show them:
        "flat", "ivf nlist=1024 nprobe=16" (nprobe as searched: at most nlist), "hnsw M=32
        ef_search=64"."""
        match self._config.kind:
            case "ivf":
                nlist = self._index.nlist
                return f"ivf nlist={nlist} nprobe={min(self._config.nprobe, nlist)}"
            case "hnsw":
                return f"hnsw M={self._config.hnsw_m} ef_search={self._config.ef_search}"
        return self._config.kind

    @property
    def metadata(self) -> dict[str, Any]:
        """The metadata of the last `save` or `load` (e.g. model_version)."""
        return dict(self._metadata)

    @property
    def num_tombstones(self) -> int:
        return len(self._tombstones)

    def __len__(self) -> int:
        return len(self._item_to_fid)

    def __contains__(self, item_id: object) -> bool:
        return str(item_id) in self._item_to_fid

    def __repr__(self) -> str:
        return f"ItemIndex(kind={self.kind!r}, items={len(self)}, dim={self._dim})"

    def item_ids(self) -> list[str]:
        with self._lock:
            return list(self._item_to_fid)

    def vector(self, item_id: str) -> np.ndarray:
        """The stored (normalised) vector of `item_id`, shape (H,)."""
        with self._lock:
            return np.asarray(self._index.reconstruct(self._fid(item_id)), dtype=np.float32)

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change ivf `nprobe` / hnsw `ef_search` (e.g. from service settings after `load`)."""
        with self._mutating, self._lock:
            changes = {k: v for k, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}
            self._config = dataclasses.replace(self._config, **changes)
            self._apply_search_params()

    def _apply_search_params(self) -> None:
        match self._config.kind:
            case "ivf":
                self._index.nprobe = min(self._config.nprobe, self._index.nlist)
            case "hnsw":
                faiss.downcast_index(self._index.index).hnsw.efSearch = self._config.ef_search

    # ----------------------------------------------------------------- mutation
    def add(self, item_id: str, vector: np.ndarray) -> None:
        """Add one new item; ValueError if it is already indexed (use `upsert`)."""
        self.add_many([item_id], _one_row(vector, self._dim))

    def add_many(self, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add new items (N ids, (N, H) vectors) in one call; nothing is added on a ValueError."""
        a = _checked(vectors, self._dim, "vectors")
        ids = _string_ids(item_ids, a.shape[0])
        with self._mutating, self._lock:
            present = [i for i in ids if i in self._item_to_fid]
            if present:
                raise ValueError(f"item(s) {present[:5]} already in the index; use upsert() to replace")
            self._add(ids, a)

    def upsert(self, item_id: str, vector: np.ndarray) -> bool:
        """Replace the item's vector, or add it; returns True when it replaced one."""
        key, a = str(item_id), _one_row(vector, self._dim)
        with self._mutating, self._lock:
            replaced = key in self._item_to_fid
            if replaced and self._config.kind == "flat":
                self._replace_flat([key], a)
                return True
            if replaced:
                self._delete([key])
            self._add([key], a)
            return replaced

    def upsert_many(self, item_ids: Sequence[str], vectors: np.ndarray) -> int:
        """Replace or add items (N ids, (N, H) vectors) in one call, the replaced ones removed in
        one pass (a flat index's removal moves every row after it: one pass, not N); returns how
        many it replaced. Nothing changes on a ValueError."""
        a = _checked(vectors, self._dim, "vectors")
        ids = _string_ids(item_ids, a.shape[0])
        with self._mutating, self._lock:
            rows = [r for r, i in enumerate(ids) if i in self._item_to_fid]
            if rows and self._config.kind == "flat":
                self._replace_flat([ids[r] for r in rows], a[rows])
                replaced = set(rows)
                new = [r for r in range(len(ids)) if r not in replaced]
                if new:
                    self._add([ids[r] for r in new], a[new])
                return len(rows)
            if rows:
                self._delete([ids[r] for r in rows])
            self._add(ids, a)
            return len(rows)

    def remove(self, item_id: str) -> None:
        """Remove an item; `UnknownItemError` (a KeyError) if it is not indexed."""
        self.remove_many([item_id])

    def remove_many(self, item_ids: Sequence[str]) -> None:
        """Remove items in one pass (`upsert_many`); `UnknownItemError` (a KeyError), and nothing
        removed, if one is not indexed."""
        keys = list(dict.fromkeys(str(i) for i in item_ids))
        with self._mutating, self._lock:
            for key in keys:
                self._fid(key)
            if keys:
                self._delete(keys)

    def compact(self) -> None:
        """hnsw: rebuild the graph without tombstones (same faiss ids); no-op otherwise."""
        with self._mutating, self._lock:
            if not self._tombstones:
                return
            t0 = time.perf_counter()
            labels = faiss.vector_to_array(self._index.id_map)  # (ntotal,) faiss ids
            keep = ~np.isin(labels, np.fromiter(self._tombstones, np.int64))
            vecs = self._index.index.reconstruct_n(0, self._index.ntotal)[keep]
            index = _new_faiss_index(self._config, self._dim)
            if keep.any():
                index.add_with_ids(np.ascontiguousarray(vecs), labels[keep])
            self._index = index
            dropped = len(self._tombstones)
            self._tombstones.clear()
            self._tomb_selector = None
            logger.info(
                "compacted hnsw index: dropped %d tombstones, %d items, %.2fs",
                dropped,
                len(self),
                time.perf_counter() - t0,
            )

    def _fid(self, item_id: str) -> int:
        try:
            return self._item_to_fid[str(item_id)]
        except KeyError:
            raise UnknownItemError(f"item {str(item_id)!r} is not in the index") from None

    def _add(self, ids: list[str], a: np.ndarray) -> None:
        """Add checked rows under new faiss ids, a chunk at a time (maps follow each chunk)."""
        for start in range(0, len(ids), CHUNK):
            keys = ids[start : start + CHUNK]
            fids = np.arange(self._next_id, self._next_id + len(keys), dtype=np.int64)
            self._index.add_with_ids(_unit(a[start : start + CHUNK]), fids)
            self._next_id += len(keys)
            self._item_to_fid.update(zip(keys, fids.tolist(), strict=True))
            self._fid_to_item.update(zip(fids.tolist(), keys, strict=True))

    def _replace_flat(self, keys: Sequence[str], a: np.ndarray) -> None:
        """flat: overwrite the stored vectors of indexed `keys` with (checked) rows `a`, where
        they are, under the same faiss ids: a scan of the id map, where a removal and an add
        moved every row after the removed one (~25 ms per replacement at 200k items, under the
        lock every search takes)."""
        flat = faiss.downcast_index(self._index.index)
        stored = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * self._dim).reshape(flat.ntotal, self._dim)
        labels = faiss.vector_to_array(self._index.id_map)  # storage row -> faiss id
        fids = np.array([self._item_to_fid[key] for key in keys], dtype=np.int64)
        order = np.argsort(fids)
        found = np.flatnonzero(np.isin(labels, fids))  # rows holding them, in storage order
        if len(found) != len(fids):
            raise RuntimeError(f"faiss holds {len(found)} rows for {len(fids)} items {list(keys)[:5]}")
        rows = np.empty(len(fids), dtype=np.int64)
        rows[order] = found[np.argsort(labels[found])]  # the row of each key, in `keys` order
        stored[rows] = _unit(a)

    def _delete(self, keys: Sequence[str]) -> None:
        """Remove indexed, distinct `keys` (one faiss call for all of them)."""
        fids = [self._item_to_fid[key] for key in keys]
        if self._config.kind == "hnsw":
            self._tombstones.update(fids)
            self._tomb_selector = None
        else:
            removed = self._index.remove_ids(np.array(fids, dtype=np.int64))
            if removed != len(fids):
                raise RuntimeError(f"faiss removed {removed} rows for {len(fids)} items {list(keys)[:5]}")
        for key, fid in zip(keys, fids, strict=True):
            del self._item_to_fid[key]
            del self._fid_to_item[fid]
        if len(self._tombstones) > self._config.max_tombstone_ratio * self._index.ntotal:
            self.compact()

    # ----------------------------------------------------------------- search
    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Sequence[Collection[str]] | None = None,
        only: Sequence[Collection[str] | None] | None = None,
    ) -> tuple[list[list[str]], np.ndarray]:
        """Top-k items by cosine similarity for each of B queries (B, H).

        `exclude[i]` holds item ids that row i must not return (e.g. the user's history);
        ids not in the index are ignored. Row i returns exactly
        min(k, len(self) - |exclude[i] ∩ index|) ids, best first; `scores` is (B, k) float32
        with -inf after the last returned item. `only[i]`, where given (not None), limits row i
        to those ids (a candidate set to rerank): scored exactly against their stored vectors,
        whatever the kind, ids not in the index ignored; the row then returns
        min(k, |only[i] ∩ index - exclude[i]|) ids.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        q = _unit(_checked(queries, self._dim, "queries"))  # (B, H)
        b = q.shape[0]
        if exclude is not None and len(exclude) != b:
            raise ValueError(f"exclude has {len(exclude)} entries for {b} queries")
        if only is not None and len(only) != b:
            raise ValueError(f"only has {len(only)} entries for {b} queries")
        with self._lock:
            excl = [set()] * b if exclude is None else [self._indexed(e, i) for i, e in enumerate(exclude)]
            ids: list[list[str]] = [[] for _ in range(b)]
            scores = np.full((b, k), -np.inf, dtype=np.float32)  # (B, K)
            limited = [] if only is None else [i for i in range(b) if only[i] is not None]
            for i in limited:
                allowed = sorted(self._indexed(only[i], i, "only") - excl[i])  # sorted: ties by id
                ids[i], row_scores = self._rank_among(q[i], allowed, k)
                scores[i, : len(ids[i])] = row_scores
            n_live = len(self._item_to_fid)
            want = [min(k, n_live - len(e)) for e in excl]
            fetch = min(n_live, k + max((len(e) for e in excl), default=0))
            rows = [i for i in range(b) if want[i] > 0 and i not in limited]
            for exact in (False, True):  # exact: only the rows an approximate index left short
                if not rows:
                    break
                d, lab = self._faiss_search(q[rows], fetch, exact)  # (R, F) scores, faiss ids
                short = []
                for r, i in enumerate(rows):
                    got, got_scores = self._collect(d[r], lab[r], excl[i], want[i])
                    if len(got) < want[i]:
                        short.append(i)
                        continue
                    ids[i] = got
                    scores[i, : len(got)] = got_scores
                if short and not exact:
                    logger.debug("%s search left %d of %d rows short: exact retry", self.kind, len(short), b)
                rows = short
            if rows:
                raise RuntimeError(f"exact search left {len(rows)} rows short")  # a bug
        return ids, scores

    def _indexed(self, e: Collection[str], i: int, name: str = "exclude") -> set[str]:
        """The ids of `e` that are indexed, as strings (others cannot be returned anyway)."""
        if isinstance(e, str | bytes):
            raise ValueError(f"{name}[{i}] must be a collection of item ids, not a string")
        return {s for s in map(str, e) if s in self._item_to_fid}

    def _rank_among(self, q: np.ndarray, item_ids: list[str], k: int) -> tuple[list[str], np.ndarray]:
        """The top-k of `item_ids` (indexed, live) for one unit query (H,), exactly: their
        stored vectors times q, best first, a tie kept in the order given."""
        if not item_ids:
            return [], np.empty(0, dtype=np.float32)
        fids = np.fromiter((self._item_to_fid[x] for x in item_ids), np.int64, len(item_ids))
        cos = self._index.reconstruct_batch(fids) @ q  # (C,)
        top = np.argsort(-cos, kind="stable")[:k]
        return [item_ids[t] for t in top], cos[top].astype(np.float32)

    def _collect(
        self, d: np.ndarray, lab: np.ndarray, excluded: set[str], want: int
    ) -> tuple[list[str], list[float]]:
        """The first `want` live, non-excluded items of one result row, best first."""
        got, got_scores = [], []
        for score, fid in zip(d.tolist(), lab.tolist(), strict=True):
            item = self._fid_to_item.get(fid)  # None for -1 padding and tombstones
            if item is None or item in excluded:
                continue
            got.append(item)
            got_scores.append(score)
            if len(got) == want:
                break
        return got, got_scores

    def _faiss_search(self, q: np.ndarray, fetch: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
        """faiss search returning (scores, faiss ids), each (R, F); -1 ids pad missing rows."""
        cfg = self._config
        match cfg.kind:
            case "flat":
                return self._index.search(q, fetch)
            case "ivf":
                nprobe = self._index.nlist if exact else self._index.nprobe
                return self._index.search(q, fetch, params=faiss.SearchParametersIVF(nprobe=nprobe))
            case "hnsw" if exact:
                return self._hnsw_exact(q, fetch)
            case "hnsw":
                params = faiss.SearchParametersHNSW(efSearch=max(cfg.ef_search, fetch))
                if self._tombstones:
                    params.sel = self._tombstone_selector()
                return self._index.search(q, fetch, params=params)
        raise AssertionError(cfg.kind)

    def _hnsw_exact(self, q: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over the HNSW's flat storage (tombstones included, skipped by the caller)."""
        storage = faiss.downcast_index(faiss.downcast_index(self._index.index).storage)
        d, pos = storage.search(q, min(self._index.ntotal, fetch + len(self._tombstones)))
        labels = faiss.vector_to_array(self._index.id_map)  # storage row -> faiss id
        return d, np.where(pos >= 0, labels[np.maximum(pos, 0)], -1)

    def _tombstone_selector(self) -> faiss.IDSelector:
        if self._tomb_selector is None:  # keep both objects alive: faiss holds raw pointers
            batch = faiss.IDSelectorBatch(np.fromiter(self._tombstones, np.int64))
            self._tomb_selector = (batch, faiss.IDSelectorNot(batch))
        return self._tomb_selector[1]

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> Path:
        """Write the index into `directory` atomically (see `index.persist`); returns the json path.
        Searches go on meanwhile; mutations wait while the faiss file is written."""
        directory = Path(directory)
        with saving(directory):
            return self.finish_save(self.begin_save(directory, metadata))

    def begin_save(self, directory: Path, metadata: dict[str, Any] | None = None) -> PendingSave:
        """The part of `save` that needs the index as it is: its description, and the faiss file
        written (not flushed yet), under the mutation lock, not the search lock. The caller holds
        `index.persist.saving(directory)` until `finish_save`, which makes it the saved index."""
        directory = Path(directory)
        with self._mutating:
            with self._lock:
                doc = {
                    "format_version": FORMAT_VERSION,
                    "kind": self._config.kind,
                    "config": dataclasses.asdict(self._config),
                    "dim": self._dim,
                    "ntotal": int(self._index.ntotal),
                    "next_id": self._next_id,
                    "item_ids": list(self._item_to_fid),
                    "faiss_ids": list(self._item_to_fid.values()),
                    "tombstones": sorted(self._tombstones),
                    "metadata": dict(metadata or {}),
                }
            check_metadata(doc)
            # no mutation until it is written: the faiss file is the state the doc describes
            return PendingSave(directory, write_faiss(directory, self._index), doc)

    def finish_save(self, pending: PendingSave) -> Path:
        """Flush and commit what `begin_save` wrote (no index lock is held: it reads files)."""
        path = commit_index_dir(pending.directory, pending.faiss_path, pending.doc)
        self._metadata = dict(pending.doc["metadata"])
        return path

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        expect_dim: int | None = None,
        expect_metadata: dict[str, Any] | None = None,
    ) -> ItemIndex:
        """Load a saved index; `IndexMismatchError` names the first field that differs.

        `expect_dim` is the checkpoint's hidden size; `expect_metadata` the values the saved
        metadata must hold (e.g. {"model_version": ckpt.version}).
        """
        tune_faiss()
        doc, index = read_index_dir(Path(directory), expect_dim, expect_metadata)
        config = _make_config(doc["kind"], {k: v for k, v in doc["config"].items() if k != "kind"})
        self = cls(index, config, int(doc["dim"]))
        self._item_to_fid = dict(zip(doc["item_ids"], doc["faiss_ids"], strict=True))
        self._fid_to_item = {f: i for i, f in self._item_to_fid.items()}
        self._next_id = int(doc["next_id"])
        self._tombstones = set(doc["tombstones"])
        self._metadata = dict(doc["metadata"])
        self._apply_search_params()
        logger.info("loaded %s index from %s: %d items", config.kind, directory, len(self))
        return self
