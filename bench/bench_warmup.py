"""A server's first reasoning requests, with and without the startup warm-up
(R2EC_WARMUP_REQUESTS, service/recommender.py `Recommender.warm_up`).

    python3 bench/bench_warmup.py --checkpoint checkpoints/current [--starts 3] [--first 3]

`r2ec serve` is started `--starts` times per setting, the settings alternating (warm-up 2, the
default, and 0), each with the in-process store. Per start: seconds from launch to a ready
/readyz, then `--first` POST /recommend with reasoning, one at a time, each a different ml-100k
test history (no cache hits; every start gets the same histories). Prints the median over the
starts of the time to ready and of each of the first requests' latencies, and the ratio of the
first request without and with the warm-up. What the warm-up buys: the first request meets
kernels already set up and texts for speculative decoding to draft from (model/speculative.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_service import Server  # this script's folder is on sys.path

SETTINGS = {"warm-up 2 (default)": "2", "warm-up 0": "0"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--starts", type=int, default=3, help="server starts per setting")
    parser.add_argument("--first", type=int, default=3, help="requests timed after each start")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    from model.data import load_prepared

    test = load_prepared(Path(args.data)).split("test")
    bodies = [
        {"history": [{"item_id": str(i)} for i in h], "k": 10, "max_reasoning_tokens": args.tokens}
        for h in test["history_item_ids"][: args.first]
    ]
    logs = Path(tempfile.mkdtemp(prefix="bench_warmup-"))
    ready: dict[str, list[float]] = {name: [] for name in SETTINGS}
    latency: dict[str, list[list[float]]] = {name: [] for name in SETTINGS}
    for start in range(args.starts):
        for name, count in SETTINGS.items():
            t = time.perf_counter()
            log = logs / f"{count}-{start}.log"
            with Server(name, args.checkpoint, log, R2EC_WARMUP_REQUESTS=count) as server:
                ready[name].append(time.perf_counter() - t)
                times = []
                with httpx.Client(base_url=server.url, timeout=600) as client:
                    for body in bodies:
                        t = time.perf_counter()
                        r = client.post("/recommend", json=body)
                        times.append((time.perf_counter() - t) * 1000)
                        if r.status_code != 200 or r.json()["cache"] != "miss":
                            raise RuntimeError(f"POST /recommend: {r.status_code} {r.text[:300]}")
                latency[name].append(times)
            print(
                f"{name}, start {start + 1}: ready {ready[name][-1]:.1f} s, first requests {times}",
                file=sys.stderr,
            )

    heads = " | ".join(f"request {i + 1} ms" for i in range(args.first))
    print(f"\n{args.starts} starts per setting, medians, checkpoint {args.checkpoint}\n")
    print(f"| setting | ready s | {heads} |")
    print("|---|---|" + "---|" * args.first)
    for name in SETTINGS:
        cols = " | ".join(f"{statistics.median(t[i] for t in latency[name]):.0f}" for i in range(args.first))
        print(f"| {name} | {statistics.median(ready[name]):.1f} | {cols} |")
    warm, cold = (statistics.median(t[0] for t in latency[name]) for name in SETTINGS)
    print(f"\nfirst request, without / with the warm-up: {cold / warm:.2f}x")


if __name__ == "__main__":
    main()
