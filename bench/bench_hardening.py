"""Load against the service's limits (issue 13): `r2ec serve` in a subprocess, load from this
process over loopback only. Prints markdown tables and appends one JSON line to
bench/out/hardening.jsonl.

    python3 bench/bench_hardening.py --checkpoint checkpoints/current

1. Steady load: `--requests` (1000) /recommend without reasoning at `--concurrency` (32):
   errors (anything but 200, or no answer), p50 / p99 latency.
2. Overload: 4x the queue bound at once (`--queue`, the server's R2EC_MAX_QUEUE, default 32:
   128 requests in flight), with reasoning so batches are slow and the queue fills. The excess
   must get 503 with Retry-After (never a timeout, never a 500); p50 / p99 of the admitted ones.

Every request carries a different history drawn from the checkpoint's own catalog (seeded), and
the reasoning cache is off, so nothing is answered from it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import Server, pct  # noqa: E402 (bench/ is a folder of scripts)


def histories(checkpoint: str, n: int, seed: int = 0) -> list[list[dict]]:
    """n histories of 5-20 distinct catalog items with ratings (the catalog of `checkpoint`)."""
    import pandas as pd

    from model.checkpoint import resolve_checkpoint

    items = pd.read_parquet(resolve_checkpoint(Path(checkpoint)) / "items.parquet")["item_id"].astype(str)
    pool = list(items)
    rng = random.Random(seed)
    return [
        [
            {"item_id": i, "rating": rng.randint(1, 5)}
            for i in rng.sample(pool, rng.randint(5, min(20, len(pool))))
        ]
        for _ in range(n)
    ]


async def load(url: str, bodies: list[dict], concurrency: int, timeout_s: float) -> dict:
    """Send `bodies` with at most `concurrency` in flight. Per request: status (or the exception's
    name), latency in ms, whether a 503 carried Retry-After."""
    sem = asyncio.Semaphore(concurrency)
    outcomes: list[tuple[str, float, bool]] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def one(body: dict) -> None:
            async with sem:
                t = time.perf_counter()
                try:
                    r = await client.post("/recommend", json=body)
                    status, retry = str(r.status_code), "retry-after" in r.headers
                    if r.status_code != 200:
                        json.loads(r.text)  # every error is the JSON error body
                except json.JSONDecodeError:
                    status, retry = f"{r.status_code} (not JSON)", False
                except httpx.HTTPError as exc:
                    status, retry = type(exc).__name__, False
                outcomes.append((status, (time.perf_counter() - t) * 1000, retry))

        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - start
    ok = [ms for status, ms, _ in outcomes if status == "200"]
    statuses = Counter(status for status, _, _ in outcomes)
    return {
        "requests": len(bodies),
        "concurrency": concurrency,
        "seconds": round(wall, 2),
        "statuses": dict(statuses),
        "errors": len(bodies) - statuses.get("200", 0),
        "refused_503_with_retry_after": sum(1 for s, _, retry in outcomes if s == "503" and retry),
        "p50_ms": round(pct(ok, 0.5), 1) if ok else None,
        "p99_ms": round(pct(ok, 0.99), 1) if ok else None,
        "mean_ms": round(statistics.fmean(ok), 1) if ok else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/current")
    parser.add_argument("--requests", type=int, default=1000, help="steady phase: requests")
    parser.add_argument("--concurrency", type=int, default=32, help="steady phase: in flight")
    parser.add_argument("--queue", type=int, default=32, help="the server's R2EC_MAX_QUEUE")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's R2EC_MAX_BATCH")
    parser.add_argument("--overload", type=int, default=4, help="overload phase: this many x the queue")
    parser.add_argument("--tokens", type=int, default=64, help="overload phase: reasoning budget")
    parser.add_argument("--timeout", type=float, default=600, help="client timeout per request (s)")
    parser.add_argument("--out", default="bench/out/hardening.jsonl")
    args = parser.parse_args()

    n_over = args.overload * args.queue
    bodies = histories(args.checkpoint, args.requests + n_over + 4)
    steady = [{"history": h, "k": 10, "reasoning": False} for h in bodies[: args.requests]]
    over = [
        {"history": h, "k": 10, "reasoning": True, "max_reasoning_tokens": args.tokens}
        for h in bodies[args.requests : args.requests + n_over]
    ]
    env = {
        "R2EC_MAX_QUEUE": str(args.queue),
        "R2EC_MAX_BATCH": str(args.max_batch),
        "R2EC_CACHE_SIZE": "0",
        "R2EC_REASONING_TOKEN_LIMIT": str(max(args.tokens, 64)),
    }
    with Server(args.checkpoint, **env) as server:
        warm = [{"history": h, "k": 10, "reasoning": False} for h in bodies[-4:]]
        asyncio.run(load(server.url, warm, 4, args.timeout))
        results = {
            "steady": asyncio.run(load(server.url, steady, args.concurrency, args.timeout)),
            "overload": asyncio.run(load(server.url, over, n_over, args.timeout)),
        }
    record = {"checkpoint": args.checkpoint, "queue": args.queue, "max_batch": args.max_batch, **results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}) + "\n")

    s, o = results["steady"], results["overload"]
    bad = {k: v for k, v in o["statuses"].items() if k not in ("200", "503")}
    print(f"\ncheckpoint {args.checkpoint}; R2EC_MAX_QUEUE={args.queue}, R2EC_MAX_BATCH={args.max_batch}\n")
    print("| phase | requests | in flight | not 200 | 503 + Retry-After | statuses | p50 ms | p99 ms | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in (("steady, no reasoning", s), (f"{args.overload}x queue, reasoning {args.tokens}", o)):
        refused = r["refused_503_with_retry_after"]
        print(
            f"| {name} | {r['requests']} | {r['concurrency']} | {r['errors']} "
            f"| {refused} ({refused / r['requests']:.0%}) | {r['statuses']} "
            f"| {r['p50_ms']} | {r['p99_ms']} | {r['seconds']} |"
        )
    print(f"\noverload: {o['statuses'].get('200', 0)} admitted; timeouts, 5xx, non-JSON: {bad or 0}")
    if bad or s["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
