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

    python3 bench/bench_hardening.py --abuse --checkpoint checkpoints/current --port 8270

3. `--abuse`, misbehaving clients (journey "abuse"), against a redis-server the script starts
   (`--redis-port`; 0: a free one) instead of phases 1-2:
   a. Memory of one user posting distinct events in a loop (`--events`, 100,000, in requests of
      1000 through `RedisStore.append_events`, 32-character ids as `event_key` makes): MEMORY
      USAGE of each of the user's keys and of r2ec:events, and INFO used_memory, without a cap
      on the user's event ids and with R2EC_EVENT_DEDUP_MAX's default.
   b. The cost of the checks per request: a one-event append with and without the user's
      event-rate check in the script (a bucket that never runs dry), interleaved in rounds, a
      refused append, and the in-process wrong-key check (`client_address` + `AuthThrottle`).
   c. Over HTTP (`r2ec serve` on `--port`, R2EC_CLIENT_KEY set), `--seconds` each: clients
      posting one user's events in a loop (`--http-batch` events a request), then a client
      sending wrong keys; with the bounds off (R2EC_USER_EVENTS_PER_S=0, R2EC_AUTH_FAILURES=0,
      no id cap) and at the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import Server, free_port, pct  # noqa: E402 (bench/ is a folder of scripts)


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


class RedisProc:
    """A throwaway redis-server on loopback (no persistence); its URL, stopped on leaving."""

    def __init__(self, port: int) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("--abuse needs redis-server (apt-get install redis-server)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> str:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self.url
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        sys.exit(f"redis-server did not start on port {self.port}")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def catalog_ids(checkpoint: str) -> list[str]:
    import pandas as pd

    from model.checkpoint import resolve_checkpoint

    return list(
        pd.read_parquet(resolve_checkpoint(Path(checkpoint)) / "items.parquet")["item_id"].astype(str)
    )


def user_keys(user: str) -> dict[str, str]:
    from service.store import EVENT_IDS_KEY, EVENTS_STREAM, HISTORY_KEY, SEEN_KEY

    keys = {"history": HISTORY_KEY, "seen": SEEN_KEY, "event ids": EVENT_IDS_KEY}
    return {**{k: v.format(user_id=user) for k, v in keys.items()}, "r2ec:events (all users)": EVENTS_STREAM}


def key_sizes(r, user: str) -> dict[str, dict]:  # noqa: ANN001 (a redis.Redis)
    counts = {"list": r.llen, "set": r.scard, "zset": r.zcard, "stream": r.xlen, "none": lambda k: 0}
    out = {}
    for name, key in user_keys(user).items():
        kind = r.type(key).decode()
        out[name] = {"bytes": r.memory_usage(key, samples=0) or 0, "entries": counts[kind](key)}
    return out


async def flood_memory(url: str, items: list[str], events: int, id_len: int) -> list[dict]:
    """(a): one user, `events` distinct events in requests of 1000, no cap and the default cap."""
    import redis

    from service.store import DEDUP_MAX, Event, RedisStore

    r = redis.Redis.from_url(url)
    rows = []
    for label, cap in (("no cap (before)", 10_000_000), (f"R2EC_EVENT_DEDUP_MAX={DEDUP_MAX}", DEDUP_MAX)):
        r.flushall()
        store = RedisStore(url, window=20, dedup_max=cap, timeout_s=30)
        base = r.info("memory")["used_memory"]
        start, now = time.perf_counter(), int(time.time())
        for b in range(0, events, 1000):
            batch = [
                Event(items[n % len(items)], 4.0, now - events + n, f"{n:0{id_len}d}")
                for n in range(b, min(events, b + 1000))
            ]
            await store.append_events("flood", batch)
        seconds = time.perf_counter() - start
        await store.close()
        used = r.info("memory")["used_memory"] - base
        rows.append({"setting": label, "events": events, "seconds": round(seconds, 1), "used_memory": used,
                     "keys": key_sizes(r, "flood")})  # fmt: skip
    r.flushall()
    return rows


async def check_cost(url: str, rounds: int, per_round: int) -> dict:
    """(b): one-event appends for one user whose id set is at its cap (so each trims), with the
    event-rate check and without it, interleaved; then appends the bucket refuses."""
    import redis

    from service.store import DEDUP_MAX, Event, EventRate, RedisStore, UserRateLimited

    r = redis.Redis.from_url(url)
    r.flushall()
    store = RedisStore(url, window=20, timeout_s=30)
    now = int(time.time())
    for b in range(0, DEDUP_MAX, 1000):  # the id set full: every append below trims one
        await store.append_events("cost", [Event("1", 4.0, now, f"fill-{n}") for n in range(b, b + 1000)])
    never_dry = EventRate(per_s=1e9, burst=1_000_000)
    times: dict[str, list[float]] = {"no rate check": [], "rate check": []}
    n = 0
    for _ in range(rounds):
        for label, rate in (("no rate check", None), ("rate check", never_dry)):
            for _ in range(per_round):
                n += 1
                t = time.perf_counter()
                await store.append_events("cost", [Event("1", 4.0, now, f"c-{n}")], rate=rate)
                times[label].append((time.perf_counter() - t) * 1e6)
    dry = EventRate(per_s=0.001, burst=1)
    await store.append_events("dry", [Event("1", 4.0, now, "d-0")], rate=dry)
    refused = []
    for k in range(rounds * per_round):
        t = time.perf_counter()
        try:
            await store.append_events("dry", [Event("1", 4.0, now, f"d-{k + 1}")], rate=dry)
        except UserRateLimited:
            refused.append((time.perf_counter() - t) * 1e6)
    await store.close()
    ids = r.zcard("r2ec:event-ids:cost")
    r.flushall()
    out = {label: {"p50_us": round(pct(v, 0.5)), "p90_us": round(pct(v, 0.9))} for label, v in times.items()}
    out["refused (bucket dry)"] = {"p50_us": round(pct(refused, 0.5)), "p90_us": round(pct(refused, 0.9))}
    out["id set after"] = ids
    return out


def auth_check_cost(number: int = 100_000) -> dict:
    """(b): the wrong-key check's in-process cost per request that carries a key: the address
    (a client seen before, whose parse is cached; a new one), then its bucket."""
    from service.limits import AuthThrottle, _counted_as, client_address

    throttle = AuthThrottle(10, 60.0)
    out = {}
    for label, host in (("IPv4", "203.0.113.7"), ("IPv6 (/64)", "2001:db8:1:2::7")):
        scope = {"client": (host, 40000)}
        for seen, clear in (("seen before", lambda: None), ("new", _counted_as.cache_clear)):
            check = lambda scope=scope, clear=clear: (clear(), throttle.blocked(client_address(scope)))  # noqa: E731
            seconds = min(timeit.repeat(check, number=number, repeat=3))
            out[f"{label}, {seen}"] = round(seconds / number * 1e9)
    return out


async def flood_http(url: str, items: list[str], seconds: float, batch: int, clients: int, key: str) -> dict:
    """(c): `clients` clients posting one user's distinct events for `seconds`, then one client
    sending wrong keys for `seconds`, then the right key from that client's address."""
    statuses: Counter = Counter()
    stored = 0
    n = 0
    headers = {"X-API-Key": key}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def poster() -> None:
            nonlocal stored, n
            while time.perf_counter() < end:
                events = []
                for _ in range(batch):
                    n += 1
                    events.append({"item_id": items[n % len(items)], "event_id": f"flood-{n}"})
                r = await client.post("/users/flood/events", json={"events": events}, headers=headers)
                statuses[str(r.status_code)] += 1
                if r.status_code == 200:
                    stored += r.json()["appended"]

        start = time.perf_counter()
        end = start + seconds
        await asyncio.gather(*(poster() for _ in range(clients)))
        events_wall = time.perf_counter() - start
        guesses: Counter = Counter()
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            r = await client.get("/users/flood/history", headers={"X-API-Key": f"guess-{guesses.total()}"})
            guesses[str(r.status_code)] += 1
        guess_wall = time.perf_counter() - start
        right = (await client.get("/users/flood/history", headers=headers)).status_code
    return {
        "events": {"requests": sum(statuses.values()), "statuses": dict(statuses), "stored": stored,
                   "stored_per_s": round(stored / events_wall), "seconds": round(events_wall, 1)},
        "guesses": {"requests": guesses.total(), "per_s": round(guesses.total() / guess_wall),
                    "statuses": dict(guesses), "right_key_after": right},
    }  # fmt: skip


def abuse(args: argparse.Namespace) -> dict:
    items = catalog_ids(args.checkpoint)
    record: dict = {}
    with RedisProc(args.redis_port) as redis_url:
        record["memory"] = asyncio.run(flood_memory(redis_url, items, args.events, 32))
        record["check_cost"] = asyncio.run(check_cost(redis_url, args.rounds, args.per_round))
        record["auth_check_ns"] = auth_check_cost()
        if not args.no_http:
            import redis

            r = redis.Redis.from_url(redis_url)
            key = "bench-client-key-0123456789abcdef"
            off = {
                "R2EC_USER_EVENTS_PER_S": "0",
                "R2EC_AUTH_FAILURES": "0",
                "R2EC_EVENT_DEDUP_MAX": "10000000",
            }
            record["http"] = {}
            logs = Path(tempfile.mkdtemp(prefix="bench-abuse-"))
            for label, env in (("bounds off", off), ("defaults", {})):
                r.flushall()
                settings = {"R2EC_REDIS_URL": redis_url, "R2EC_CLIENT_KEY": key, "R2EC_WARMUP_REQUESTS": "0"}
                server = Server(
                    label, args.checkpoint, logs / f"{label.replace(' ', '-')}.log", **settings, **env
                )
                if args.port:
                    server.port, server.url = args.port, f"http://127.0.0.1:{args.port}"
                with server:
                    run = asyncio.run(flood_http(server.url, items, args.seconds, args.http_batch, 4, key))
                run["keys"] = key_sizes(r, "flood")
                record["http"][label] = run
    return record


def print_abuse(record: dict) -> None:
    print("\n(a) one user posting distinct events through RedisStore.append_events, requests of 1000\n")
    print("| setting | events | s | history | seen | event ids | r2ec:events | used_memory |")
    print("|---|---|---|---|---|---|---|---|")
    for row in record["memory"]:
        k = row["keys"]
        cells = [f"{v['bytes'] / 1e3:,.0f} KB ({v['entries']:,})" for v in k.values()]
        print(
            f"| {row['setting']} | {row['events']:,} | {row['seconds']} | {' | '.join(cells)} "
            f"| {row['used_memory'] / 1e6:.1f} MB |"
        )
    c = record["check_cost"]
    print(f"\n(b) one-event append, the user's id set at its cap ({c['id set after']:,} ids after)\n")
    print("| append | p50 us | p90 us |")
    print("|---|---|---|")
    for label in ("no rate check", "rate check", "refused (bucket dry)"):
        print(f"| {label} | {c[label]['p50_us']} | {c[label]['p90_us']} |")
    checks = ", ".join(f"{label} {ns:,} ns" for label, ns in record["auth_check_ns"].items())
    print(f"\nthe wrong-key check in process, a request: {checks}")
    if "http" in record:
        print("\n(c) over HTTP: 4 clients posting one user's events, then one client guessing keys\n")
        print("| server | event requests | statuses | events stored/s | event ids | guesses/s | statuses "
              "| right key after |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for label, run in record["http"].items():
            e, g, ids = run["events"], run["guesses"], run["keys"]["event ids"]
            print(
                f"| {label} | {e['requests']} | {e['statuses']} | {e['stored_per_s']:,} "
                f"| {ids['entries']:,} ({ids['bytes'] / 1e6:.2f} MB) | {g['per_s']} | {g['statuses']} "
                f"| {g['right_key_after']} |"
            )


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
    parser.add_argument("--port", type=int, default=0, help="the server's port (0: a free one)")
    parser.add_argument("--abuse", action="store_true", help="run phase 3 (misbehaving clients) only")
    parser.add_argument("--redis-port", type=int, default=0, help="--abuse: redis-server's port (0: free)")
    parser.add_argument("--events", type=int, default=100_000, help="--abuse (a): one user's events")
    parser.add_argument("--rounds", type=int, default=6, help="--abuse (b): interleaved rounds")
    parser.add_argument("--per-round", type=int, default=500, help="--abuse (b): appends per round")
    parser.add_argument("--seconds", type=float, default=10, help="--abuse (c): each flood's length")
    parser.add_argument("--http-batch", type=int, default=100, help="--abuse (c): events a request")
    parser.add_argument("--no-http", action="store_true", help="--abuse: skip (c), no server")
    args = parser.parse_args()
    if args.abuse:
        record = {"checkpoint": args.checkpoint, "abuse": abuse(args)}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as fh:
            fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}) + "\n")
        print_abuse(record["abuse"])
        return

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
    # bench_service's Server takes a name and a log since this script was written
    server = Server("hardening", args.checkpoint, Path(args.out).with_suffix(".log"), **env)
    if args.port:
        server.port, server.url = args.port, f"http://127.0.0.1:{args.port}"
    with server:
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
