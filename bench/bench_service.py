"""End-to-end service benchmark: `r2ec serve` in a subprocess, load from this process over
loopback. Prints markdown tables.

    python3 bench/bench_service.py --checkpoint checkpoints/current [--data data/ml-100k/loo]

For batching on (the server's R2EC_MAX_BATCH, default 8) and off (R2EC_MAX_BATCH=1), one
server each, and concurrency 1, 8 and 32: throughput and p50/p95 latency of
POST /recommend with reasoning (64 tokens). Every request carries a different ml-100k test
history, so none hits the reasoning cache. Then, on the batching-on server: the cached path
(the same request again) and the no-reasoning path. Last, the bare model in this process
(`R2ec.reason` + `user_vectors` for one history, the server stopped) against the service's
p50 at concurrency 1: the service's overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`r2ec serve` on a free loopback port, in-process store, given env overrides."""

    def __init__(self, checkpoint: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "R2EC_CHECKPOINT": checkpoint, "R2EC_LOG_LEVEL": "WARNING", **env}

    def __enter__(self) -> Server:
        cmd = [sys.executable, "-m", "cli", "serve", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env=self.env)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server not ready after 600 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def load(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Send `bodies` with at most `concurrency` in flight; latency per request in ms."""
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    gen_ms: list[float] = []

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(body: dict) -> None:
            async with sem:
                t = time.perf_counter()
                r = await client.post("/recommend", json=body)
                latencies.append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
                gen_ms.append(r.json()["timings"]["generate_ms"])

        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - start
    return {
        "n": len(bodies),
        "rps": len(bodies) / wall,
        "p50": pct(latencies, 0.5),
        "p95": pct(latencies, 0.95),
        "gen_p50": statistics.median(gen_ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/current")
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--requests", default="6,16,32", help="requests per concurrency level")
    args = parser.parse_args()

    from model.data import load_prepared

    ds = load_prepared(Path(args.data))
    test = ds.split("test")
    histories = [[{"item_id": str(i)} for i in h] for h in test["history_item_ids"]]
    levels = [int(x) for x in args.levels.split(",")]
    counts = [int(x) for x in args.requests.split(",")]
    cursor = 0
    c1_rows = (0, 0)

    def fresh(n: int, **extra: object) -> list[dict]:
        nonlocal cursor
        out = [{"history": histories[(cursor + i) % len(histories)], "k": 10, **extra} for i in range(n)]
        cursor += n
        return out

    body_extra = {"max_reasoning_tokens": args.tokens}
    results: dict[str, dict[int, dict]] = {}
    extra_rows: list[tuple[str, str]] = []
    for label, env in (("batching on", {}), ("batching off", {"R2EC_MAX_BATCH": "1"})):
        with Server(args.checkpoint, **env) as server:
            asyncio.run(load(server.url, fresh(2, **body_extra), 2))  # warm-up
            results[label] = {}
            for conc, n in zip(levels, counts, strict=True):
                if label == "batching on" and conc == levels[0]:
                    c1_rows = (cursor, cursor + n)
                results[label][conc] = asyncio.run(load(server.url, fresh(n, **body_extra), conc))
                print(label, conc, results[label][conc], flush=True)
            if label == "batching on":
                same = fresh(1, **body_extra)[0]
                asyncio.run(load(server.url, [same], 1))  # fills the cache
                cached = asyncio.run(load(server.url, [same] * 10, 1))
                plain = asyncio.run(load(server.url, fresh(10, reasoning=False), 1))
                extra_rows += [
                    ("cached reasoning, p50", f"{cached['p50']:.1f} ms"),
                    ("no reasoning, p50", f"{plain['p50']:.1f} ms"),
                ]

    # The bare model, same process as the load generator, server stopped.
    from model.checkpoint import load_checkpoint, resolve_checkpoint
    from model.r2ec import GenerationSettings
    from model.samples import sample_histories

    ckpt = load_checkpoint(resolve_checkpoint(Path(args.checkpoint)))
    titles = dict(zip(ds.items["item_id"].astype(str), ds.items["title"].astype(str), strict=True))
    # The same histories the service answered at the first concurrency level, plus one warm-up.
    lo, hi = c1_rows
    entries = sample_histories(test.iloc[[hi % len(test), *range(lo, hi)]], titles)
    bare: list[float] = []
    for i, hist in enumerate(entries):
        t = time.perf_counter()
        rollout = ckpt.model.reason([hist], GenerationSettings(max_new_tokens=args.tokens))
        ckpt.model.user_vectors([hist], rollout)
        if i:  # first call warms up
            bare.append((time.perf_counter() - t) * 1000)
    bare_p50 = statistics.median(bare)
    svc_p50 = results["batching on"][levels[0]]["p50"]

    print(f"\ncheckpoint {args.checkpoint}, {args.tokens} reasoning tokens max, ml-100k catalog\n")
    print("| batching | concurrency | requests | throughput (req/s) | p50 ms | p95 ms | generate p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for label, by_level in results.items():
        for conc, r in by_level.items():
            print(
                f"| {label} | {conc} | {r['n']} | {r['rps']:.2f} | {r['p50']:.0f} | {r['p95']:.0f} "
                f"| {r['gen_p50']:.0f} |"
            )
    print("\n| measurement | value |\n|---|---|")
    for conc in levels:
        on, off = results["batching on"][conc]["rps"], results["batching off"][conc]["rps"]
        print(f"| throughput ratio on/off at concurrency {conc} | {on / off:.2f}x |")
    for name, value in extra_rows:
        print(f"| {name} | {value} |")
    print(f"| bare reason + user vector, batch 1, p50 | {bare_p50:.0f} ms |")
    print(
        f"| service p50 at concurrency 1 | {svc_p50:.0f} ms "
        f"(overhead {svc_p50 - bare_p50:+.0f} ms, {svc_p50 / bare_p50:.2f}x) |"
    )


if __name__ == "__main__":
    main()
