"""What the exposure log adds to a request (R2EC_EXPOSURE_LOG=redis, service/exposure.py).

    PYTHONPATH=. python3 bench/bench_exposure.py --checkpoint checkpoints/current \
        [--rounds 6] [--hits 100] [--plain 10] [--burst 32] [--port 0]

One app in this process (the checkpoint, bf16, continuous batching, the service's defaults) over
a real redis-server this script starts (`--port`, 0: a free loopback port), talked to over ASGI
with httpx, so the event loop that answers is the one the log's writer runs on. The log is
switched on and off between blocks of requests (`ServiceState.exposures` set or None), in
alternating order over `--rounds` rounds, so both see the same machine:

- `hit`: `--hits` sequential requests of one history whose reasoning is cached with its h_T
  (one index search: the fastest answer, where a per-request cost shows most);
- `plain`: `--plain` sequential `"reasoning": false` requests, each a different history (one
  prefill), the same histories for both;
- `burst`: `--burst` concurrent cache hits, the wall time of the whole burst (the writer
  batches what the burst queued).

`paired` is the median over rounds of each round's p50 with the log on minus its p50 off (ms):
the added latency, with the machine's drift between rounds taken out. Then, alone: `record()`'s
own time per call (building the entry, its sha256, the queue put) and what one `add_served`
round trip takes at batches of 1 and WRITE_BATCH (50) entries. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

import httpx
import redis
from redis_server import running_redis  # this script's folder is on sys.path

from service import exposure
from service.app import create_app
from service.config import Settings
from service.store import Event, Served
from service.types import Query


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def timed(client: httpx.AsyncClient, body: dict) -> float:
    t = time.perf_counter()
    r = await client.post("/recommend", json=body)
    elapsed = (time.perf_counter() - t) * 1e3
    assert r.status_code == 200, r.text
    return elapsed


async def run(args: argparse.Namespace, url: str) -> None:
    settings = Settings(checkpoint=args.checkpoint, redis_url=url, exposure_log="redis")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        state = app.state.r2ec
        log = state.exposures
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:
            ids = sorted(state.engine.catalog.titles)[:400]
            rng = random.Random(0)
            hit_body = {"history": [{"item_id": i, "rating": 4} for i in ids[:10]], "k": 10}
            assert (await client.post("/recommend", json=hit_body)).status_code == 200  # fills the cache
            assert (await client.post("/recommend", json=hit_body)).json()["cache"] == "hit"
            results: dict[tuple[str, str], list[float]] = {}
            cpu: dict[tuple[str, str], list[float]] = {}  # process CPU ms per request, per block
            paired: dict[str, list[float]] = {}  # per round: median(on) - median(off)
            for rnd in range(args.rounds):
                block: dict[tuple[str, str], list[float]] = {}
                plain = [
                    {"history": [{"item_id": i} for i in rng.sample(ids, 10)], "k": 10, "reasoning": False}
                    for _ in range(args.plain)
                ]
                modes = ("off", "on") if rnd % 2 == 0 else ("on", "off")
                for mode in modes:
                    state.exposures = log if mode == "on" and not args.aa else None
                    for kind, n in (("hit", args.hits), ("plain", len(plain)), ("burst", args.burst)):
                        c = time.process_time()
                        if kind == "hit":
                            block[kind, mode] = [await timed(client, hit_body) for _ in range(n)]
                        elif kind == "plain":
                            block[kind, mode] = [await timed(client, b) for b in plain]
                        else:
                            t = time.perf_counter()
                            await asyncio.gather(*(timed(client, hit_body) for _ in range(n)))
                            block[kind, mode] = [(time.perf_counter() - t) * 1e3]
                        await log.flush()  # the writer's work counts in this block's CPU
                        cpu.setdefault((kind, mode), []).append((time.process_time() - c) * 1e3 / n)
                for (kind, mode), times in block.items():
                    results.setdefault((kind, mode), []).extend(times)
                    if mode == "on":
                        diff = statistics.median(times) - statistics.median(block[kind, "off"])
                        paired.setdefault(kind, []).append(diff)
                print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
            state.exposures = log
            written = log.metrics.exposures.labels("written")._value.get()

            what = "A/A: the log off in both modes" if args.aa else "log on/off alternating"
            print(f"\n{args.rounds} rounds, {what}; {written:.0f} written; linger {exposure.LINGER_S}s\n")
            print(
                "| requests | n per mode | p50 off / on ms | mean off / on | p95 off / on | paired Δ p50 "
                "| CPU ms a request off / on |"
            )
            print("|---|---|---|---|---|---|---|")
            for kind, label in (("hit", "cache hit, sequential"), ("plain", "no reasoning, sequential"),
                                ("burst", f"{args.burst} concurrent hits (whole burst)")):  # fmt: skip
                off, on = results[(kind, "off")], results[(kind, "on")]
                print(
                    f"| {label} | {len(off)} | {statistics.median(off):.2f} / {statistics.median(on):.2f} | "
                    f"{statistics.mean(off):.2f} / {statistics.mean(on):.2f} | "
                    f"{pct(off, 0.95):.2f} / {pct(on, 0.95):.2f} | {statistics.median(paired[kind]):+.2f} | "
                    f"{statistics.median(cpu[kind, 'off']):.2f} / {statistics.median(cpu[kind, 'on']):.2f} |"
                )

            # record() alone, on a real answer
            query = Query(tuple(Event(i, 4.0) for i in ids[:10]), k=10)
            result = await state.recommend(query)
            n = 5000
            t = time.perf_counter()
            for _ in range(n):
                state.record_served(
                    "0123456789abcdef0123456789abcdef", "u1", "/recommend", query, result, "request"
                )
            per_call = (time.perf_counter() - t) / n * 1e6
            await log.flush()

            entry = Served("r", "u1", int(time.time() * 1000), "v", "/recommend", 10, True, "ab" * 32, "miss",
                           "store", tuple(str(i) for i in range(10)), tuple(30.0 + i for i in range(10)),
                           tuple(range(1, 11)))  # fmt: skip
            admin = redis.Redis.from_url(url)
            admin.config_set("slowlog-log-slower-than", 0)
            print(f"\nrecord(): {per_call:.1f} µs a call (entry, sha256, queue put)")
            for size in (1, exposure.WRITE_BATCH):
                admin.slowlog_reset()
                times = []
                for _ in range(50):
                    t = time.perf_counter()
                    await state.store.add_served([entry] * size, 200_000)
                    times.append(time.perf_counter() - t)
                held = [e["duration"] for e in admin.slowlog_get(1000) if e["command"].startswith(b"EVALSHA")]
                in_redis = statistics.median(held)
                print(
                    f"add_served of {size}: {statistics.median(times) * 1e3:.2f} ms a round trip, "
                    f"Redis held {in_redis:.0f} µs ({in_redis / size:.1f} µs an entry)"
                )
            admin.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/current"))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--hits", type=int, default=100)
    p.add_argument("--plain", type=int, default=10)
    p.add_argument("--burst", type=int, default=32)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--aa", action="store_true", help="leave the log off in both modes: the noise floor")
    p.add_argument("--linger", type=float, default=None, help="the writer's wait for more entries (s)")
    args = p.parse_args()
    if args.linger is not None:
        exposure.LINGER_S = args.linger
    with running_redis(args.port) as url:
        asyncio.run(run(args, url))


if __name__ == "__main__":
    main()
