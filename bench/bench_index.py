"""Benchmark ItemIndex kinds (flat / ivf / hnsw) on synthetic clustered item vectors.

Data: a gaussian mixture with low intrinsic dimension, like learned item embeddings:
`--clusters` centres in a `--latent`-dim space, samples around them with std `--spread`, a
fixed random projection to `--dim`, plus a little isotropic noise (`--noise`). Queries come
from the same mixture. The index L2-normalises everything, so scores are cosines.

For each catalog size it builds flat, ivf and hnsw (build = `ItemIndex.build` on the first
chunk, then `add_many` for the rest, so a progress bar can follow it; for ivf the k-means
sample comes from the first chunk, which is as random as the rest), times `ItemIndex.search`
(median of `--repeats` runs, a fresh query batch each run) for each batch size, and measures
recall@k against flat over `--recall-queries` queries. It also times flat search of the
largest batch at faiss's default BLAS threshold vs the 20 `index.tune_faiss()` sets.
Progress goes to stderr, the markdown tables to stdout. Compare ratios within one run: on a
shared machine absolute times drift.

Index parameters default to the service's (index/faiss_index.py `IndexConfig`, read from
there: ivf nlist ~4*sqrt(N) capped at MAX_NLIST, nprobe; hnsw M, efConstruction, efSearch),
what `R2EC_INDEX_KIND` builds; each can be set to see what another value does
(`R2EC_INDEX_NPROBE` / `R2EC_INDEX_EF_SEARCH` change the search ones in the service).

`--checkpoint CKPT`: instead of the synthetic mixture, a checkpoint's own item vectors
(item_vectors.npy): `--recall-queries` of its items, drawn at random, are held out of the
index and are the queries (an item's vector is where a user who likes it points), so recall and
latency are those of your catalog at its size.

    python3 bench/bench_index.py                      # 100k and 1M x 576, k=20, 1 and 64 queries
    python3 bench/bench_index.py --sizes 20000 --repeats 3      # a quick look
    python3 bench/bench_index.py --checkpoint checkpoints/shop   # your catalog's vectors
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import statistics
import time

# First: model/__init__ sets OMP_WAIT_POLICY=PASSIVE, which must precede faiss's OpenMP. On a
# shared machine threads that spin while waiting for a descheduled sibling made 2-thread
# searches 4-10x slower and erratic.
import model  # noqa: F401

# isort: split
import faiss
import numpy as np
from tqdm import tqdm

from index import ItemIndex
from index.faiss_index import TRAIN_POINTS_PER_LIST, IndexConfig, default_nlist

SERVICE = IndexConfig()  # what the service builds (R2EC_INDEX_KIND), unless told otherwise

DEFAULT_BLAS_THRESHOLD = faiss.cvar.distance_compute_blas_threshold  # before any tune_faiss()
GEN_CHUNK = 100_000


class Mixture:
    """Samples of one fixed mixture: (n, dim) float32, generated a chunk at a time."""

    def __init__(self, args: argparse.Namespace) -> None:
        rng = np.random.default_rng(args.seed)
        self.centres = rng.standard_normal((args.clusters, args.latent)).astype(np.float32)
        self.proj = (rng.standard_normal((args.latent, args.dim)) / math.sqrt(args.latent)).astype(np.float32)
        self.args = args

    def sample(self, n: int, seed: int, desc: str | None = None) -> np.ndarray:
        a, rng = self.args, np.random.default_rng(seed)
        out = np.empty((n, a.dim), dtype=np.float32)
        for start in tqdm(range(0, n, GEN_CHUNK), desc=desc, disable=desc is None, leave=False):
            m = min(GEN_CHUNK, n - start)
            z = self.centres[rng.integers(0, len(self.centres), m)]  # (m, latent)
            z += a.spread * rng.standard_normal(z.shape, dtype=np.float32)
            out[start : start + m] = z @ self.proj
            out[start : start + m] += a.noise * rng.standard_normal((m, a.dim), dtype=np.float32)
        return out


def build(kind: str, ids: list[str], x: np.ndarray, params: dict, chunk: int) -> tuple[ItemIndex, float]:
    if kind == "ivf":  # its k-means sample comes from the first chunk: as large as the service's
        chunk = max(chunk, min(len(ids), TRAIN_POINTS_PER_LIST * params["nlist"]))
    t0 = time.perf_counter()
    with tqdm(total=len(ids), desc=f"build {kind} {len(ids)}", unit="item", leave=False) as bar:
        ix = ItemIndex.build(ids[:chunk], x[:chunk], kind=kind, **params)
        bar.update(min(chunk, len(ids)))
        for start in range(chunk, len(ids), chunk):
            ix.add_many(ids[start : start + chunk], x[start : start + chunk])
            bar.update(len(ids[start : start + chunk]))
    return ix, time.perf_counter() - t0


def median_ms(fn, repeats: int, desc: str) -> float:
    times = []
    for r in tqdm(range(repeats), desc=desc, leave=False):
        t0 = time.perf_counter()
        fn(r)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def recall(truth: list[list[str]], got: list[list[str]]) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(truth, got, strict=True)]))


def search_ms(ix: ItemIndex, queries: np.ndarray, args: argparse.Namespace) -> dict[int, float]:
    """Median ms of `ItemIndex.search` per batch size, a fresh batch each run."""
    return {
        b: median_ms(lambda r, b=b: ix.search(queries[r * b : (r + 1) * b], args.k), args.repeats, f"{b}q")
        for b in args.queries
    }


def blas_ms(ix: ItemIndex, q: np.ndarray, args: argparse.Namespace) -> dict[int, float]:
    """Median ms of one flat search of `q` at faiss's default BLAS threshold and at 20."""
    out = {}
    for thr in (DEFAULT_BLAS_THRESHOLD, 20):
        faiss.cvar.distance_compute_blas_threshold = thr
        out[thr] = median_ms(lambda r: ix.search(q, args.k), args.blas_repeats, f"blas threshold {thr}")
    faiss.cvar.distance_compute_blas_threshold = 20
    return out


def bench_size(n: int, mix: Mixture, args: argparse.Namespace) -> tuple[list[dict], dict]:
    x = mix.sample(n, args.seed + 1, desc=f"data {n}")  # (N, H)
    queries = mix.sample(max(args.queries) * args.repeats, args.seed + 2)  # a fresh batch per timed run
    rq = mix.sample(args.recall_queries, args.seed + 3)
    return bench_vectors(x, queries, rq, args)


def checkpoint_vectors(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indexed, timed queries, recall queries) from a checkpoint's item vectors: the recall
    queries are held out of the index, the timed batches drawn from them."""
    from model.checkpoint import VECTORS_FILE, resolve_checkpoint

    table = np.load(resolve_checkpoint(args.checkpoint) / VECTORS_FILE, mmap_mode="r")  # (N, H)
    if args.recall_queries >= len(table):
        raise SystemExit(f"--recall-queries {args.recall_queries}: the checkpoint has {len(table)} items")
    held = np.random.default_rng(args.seed).permutation(len(table))
    rq = np.asarray(table[np.sort(held[: args.recall_queries])], dtype=np.float32)
    x = np.asarray(table[np.sort(held[args.recall_queries :])], dtype=np.float32)
    rows = np.random.default_rng(args.seed + 2).integers(0, len(rq), max(args.queries) * args.repeats)
    return x, rq[rows], rq


def bench_vectors(
    x: np.ndarray, queries: np.ndarray, rq: np.ndarray, args: argparse.Namespace
) -> tuple[list[dict], dict]:
    n, bmax = len(x), max(args.queries)
    ids = [f"item{i}" for i in range(n)]
    nlist = default_nlist(n) if args.nlist_scale is None else max(2, round(args.nlist_scale * math.sqrt(n)))
    params = {
        "flat": {},
        "ivf": {"nlist": nlist, "nprobe": args.nprobe},
        "hnsw": {"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction, "ef_search": args.ef_search},
    }
    rows, truth, blas = [], None, {}
    for kind in ("flat", "ivf", "hnsw"):
        ix, build_s = build(kind, ids, x, params[kind], args.chunk)
        cfg = ix.config
        row = {"size": n, "kind": kind, "build_s": build_s, **search_ms(ix, queries, args)}
        row["params"] = {
            "flat": "exact",
            "ivf": f"nlist={cfg.nlist} nprobe={cfg.nprobe}",
            "hnsw": f"M={cfg.hnsw_m} efC={cfg.ef_construction} efS={cfg.ef_search}",
        }[ix.kind]
        got = [r for s in range(0, len(rq), bmax) for r in ix.search(rq[s : s + bmax], args.k)[0]]
        if kind == "flat":
            truth, blas = got, blas_ms(ix, queries[:bmax], args)
        row["recall"] = recall(truth, got)
        rows.append(row)
        tqdm.write(f"done {n} {kind}: build {build_s:.1f}s, recall {row['recall']:.3f}")
        del ix
        gc.collect()
    return rows, blas


def markdown(head: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--queries", type=int, nargs="+", default=[1, 64], help="query batch sizes")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--repeats", type=int, default=7, help="timed runs per cell (median)")
    p.add_argument("--blas-repeats", type=int, default=3, help="timed runs per BLAS threshold")
    p.add_argument("--recall-queries", type=int, default=256)
    p.add_argument("--clusters", type=int, default=1000, help="mixture components")
    p.add_argument("--latent", type=int, default=64, help="intrinsic dimension of the data")
    p.add_argument("--spread", type=float, default=1.0, help="std around a centre (latent space)")
    p.add_argument("--noise", type=float, default=0.05, help="isotropic noise std in the full dim")
    p.add_argument(
        "--checkpoint", help="a checkpoint: its item vectors instead of the mixture (--sizes unused)"
    )
    p.add_argument(
        "--nlist-scale", type=float, default=None, help="ivf nlist = scale * sqrt(N) (default: the service's)"
    )
    p.add_argument("--nprobe", type=int, default=SERVICE.nprobe)
    p.add_argument("--hnsw-m", type=int, default=SERVICE.hnsw_m)
    p.add_argument("--ef-construction", type=int, default=SERVICE.ef_construction)
    p.add_argument("--ef-search", type=int, default=SERVICE.ef_search)
    p.add_argument("--chunk", type=int, default=50_000, help="rows per add_many call while building")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    rows, blas = [], {}
    if args.checkpoint:
        x, queries, rq = checkpoint_vectors(args)
        rows, blas[len(x)] = bench_vectors(x, queries, rq, args)
        print(f"{args.checkpoint}: {len(x):,} of its items indexed, {len(rq)} held out as the queries")
    else:
        mix = Mixture(args)
        for n in args.sizes:
            size_rows, blas[n] = bench_size(n, mix, args)
            rows += size_rows

    qs = args.queries
    flat = {r["size"]: r for r in rows if r["kind"] == "flat"}
    print(
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads "
        f"(OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), dim {args.dim}, "
        f"k {args.k}, median of {args.repeats} runs; load avg {load0:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end; {time.perf_counter() - t0:.0f}s total, "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB\n"
    )
    head = ["items", "kind", "params", "build s", *[f"{b}q ms" for b in qs], f"recall@{args.k}"]
    head += [f"{b}q speed-up vs flat" for b in qs]
    lines = [
        [
            f"{r['size']:,}",
            r["kind"],
            r["params"],
            f"{r['build_s']:.1f}",
            *[f"{r[b]:.2f}" for b in qs],
            f"{r['recall']:.3f}",
            *[f"{flat[r['size']][b] / r[b]:.1f}x" for b in qs],
        ]
        for r in rows
    ]
    print(markdown(head, lines))
    b = max(qs)
    print(f"\nflat search of {b} queries, faiss BLAS threshold {DEFAULT_BLAS_THRESHOLD} (default) vs 20:\n")
    head = ["items", f"threshold {DEFAULT_BLAS_THRESHOLD} ms", "threshold 20 ms", "ratio"]
    d = DEFAULT_BLAS_THRESHOLD
    lines = [[f"{n:,}", f"{t[d]:.1f}", f"{t[20]:.1f}", f"{t[d] / t[20]:.1f}x"] for n, t in blas.items()]
    print(markdown(head, lines))


if __name__ == "__main__":
    main()
