"""What `Catalog.search` (service/catalog.py) adds to the index search it wraps: its titles, and
one item per shared text (items listed twice, `_Twins`), with the user's seen items excluded.

For a checkpoint's catalog (ml-100k: 1,682 films, 18 of them listed twice) it times, per batch
of user vectors (random unit vectors in the model's space, each row excluding `--exclude` random
items, as a heavy user's seen set), the plain `ItemIndex.search` and `Catalog.search` on the
same rows, median of `--repeats` runs each, and prints a markdown table with their ratio.

    python3 bench/bench_catalog.py --checkpoint checkpoints/current
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.recommender import Recommender  # noqa: E402


def median_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/current")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--exclude", default="0,200,2000", help="items excluded per row")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    engine = Recommender.load(args.checkpoint, persist_edits=False)
    catalog = engine.catalog
    ids = list(catalog.titles)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.batch, engine.model.hidden_size)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    twins = getattr(catalog, "_twins", None)  # absent in code before it, to compare against
    shared = "?" if twins is None else len(twins.ids)
    print(f"{len(ids)} items, {shared} of them sharing their text with another")
    print()
    print("| excluded per row | index search ms | Catalog.search ms | ratio |")
    print("|---|---|---|---|")
    for n in (int(x) for x in args.exclude.split(",")):
        pick = random.Random(n)
        exclude = [set(pick.sample(ids, min(n, len(ids) - args.k))) for _ in range(args.batch)]
        plain = median_ms(lambda ex=exclude: catalog.index.search(vectors, args.k, exclude=ex), args.repeats)
        full = median_ms(lambda ex=exclude: catalog.search(vectors, args.k, ex), args.repeats)
        print(f"| {n} | {plain:.2f} | {full:.2f} | {full / plain:.2f}x |")


if __name__ == "__main__":
    main()
