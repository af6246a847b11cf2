"""What one replica serves, and what a burst of arrivals costs the requests already decoding:
`r2ec serve` in a subprocess per configuration, load from this process over loopback (httpx).
Every ratio compares servers of this one run, over the same checkpoint and the same histories.

    # R2EC_MAX_PREFILL_PER_TICK: the stall a burst causes, against admission and throughput
    python3 bench/bench_capacity.py burst --prefill 1,2,4,16 [--rounds 2] [--mixed-s 30]
    # req/s per replica by mode at the default settings, OpenMP spinning on and off
    python3 bench/bench_capacity.py capacity [--configs "GOMP_SPINCOUNT=10000;GOMP_SPINCOUNT=0"] \
        [--seconds 30]
    # R2EC_PREFILL_BATCH_TOKENS: bursts of no-reasoning requests, prefilled alone (0) or together
    python3 bench/bench_capacity.py prefill --budgets 0,512 --sizes 1,8,32 [--rounds 5]

Common: `--checkpoint checkpoints/current --data data/ml-100k/loo --port 19400` (servers take
ports from --port up, one at a time; in-process store; every other setting from the server's
defaults and any R2EC_* variable of this shell). Every request carries a different ml-100k test
history (no cache hits), except the `hit` phase; each server gets the same histories in the
same order.

`burst`, per R2EC_MAX_PREFILL_PER_TICK value:
- `--rounds` times: one POST /recommend/stream (budget `--stream-tokens`, 128) alone; once its
  first reasoning event arrived (and `--delay` seconds later, 0 by default: the shipped model's
  reasoning ends by itself after ~20 events), `--burst` (12) `"reasoning": false`
  requests at once. The stream's largest gap between two reasoning events while the burst is
  being admitted, against its mean gap; the burst's latency (p50, max).
- `--mixed-s` seconds of closed-loop load: `--mixed` clients asking with reasoning (budget
  `--tokens`) beside as many without: req/s of each kind, their p50/p90, and the server's
  queue_ms p50/p90 (the admission wait).

`prefill`, one server per R2EC_PREFILL_BATCH_TOKENS value of `--budgets` (0: each
no-reasoning request prefilled alone, the default and the service before it; the first value is
the baseline of the ratios), all started at once (the ports from --port up) and taking turns, so
a busy host's slow minutes fall on every server alike:
- `--rounds` times, for each burst size of `--sizes`, each server in turn: that many
  `"reasoning": false` requests at once (distinct histories, the same ones for every server),
  over connections opened beforehand: req/s (requests / the burst's wall time, over all
  rounds), p50/p95 latency over every request of that size, and their ratios to the baseline;
- then `--stall-rounds` times per server: one POST /recommend/stream (budget
  `--stream-tokens`) with a burst of `--stall-burst` no-reasoning requests once its first
  reasoning event arrived: the stream's largest gap between two reasoning events while the
  burst is answered (what one batched forward costs the running decodes), the burst's p50.

`capacity`, per configuration of `--configs` (`;` between servers, `,` between a server's
VAR=VALUE settings; `r2ec serve` sets GOMP_SPINCOUNT=10000 where it is not set):
closed-loop phases of `--seconds` each: reasoning at concurrency 1 and 16, no reasoning at 1 and
16, and a repeated history (cache hit with h_T) at 8: req/s, p50/p90/p99 latency, queue_ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from bench_service import Server, pct  # noqa: E402 (bench/ is a folder of scripts)


class PortedServer(Server):
    """bench_service's Server on a given port (this machine's runs keep to a port range)."""

    def __init__(self, name: str, checkpoint: str, log: Path, port: int, **env: str) -> None:
        super().__init__(name, checkpoint, log, **env)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": pct(values, 0.5), "p90": pct(values, 0.9), "p99": pct(values, 0.99)}


async def burst_round(url: str, stream_body: dict, burst_bodies: list[dict], delay: float) -> dict:
    """One stream alone, then a burst of no-reasoning requests beside it (module docstring)."""
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as cl:
        times: list[float] = []
        first = asyncio.Event()
        window: dict[str, float] = {}
        t0 = time.perf_counter()

        async def stream() -> None:
            async with cl.stream("POST", "/recommend/stream", json=stream_body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"stream: {r.status_code} {(await r.aread())[:300]!r}")
                async for line in r.aiter_lines():
                    if line.startswith("event: reasoning"):
                        times.append(time.perf_counter() - t0)
                        first.set()
                    elif line.startswith("event: error"):
                        raise RuntimeError("stream error event")
            window["stream_end"] = time.perf_counter() - t0

        async def one(body: dict) -> float:
            t = time.perf_counter()
            r = await cl.post("/recommend", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"burst request: {r.status_code} {r.text[:300]}")
            return time.perf_counter() - t

        async def burst() -> list[float]:
            await first.wait()
            await asyncio.sleep(delay)
            window["start"] = time.perf_counter() - t0
            out = await asyncio.gather(*(one(b) for b in burst_bodies))
            window["end"] = time.perf_counter() - t0
            return list(out)

        _, latencies = await asyncio.gather(stream(), burst())
    gaps = [(b - a, a) for a, b in itertools.pairwise(times)]
    during = [g for g, at in gaps if at + g > window["start"] and at < window["end"]]
    return {
        "events": len(times),
        # several pieces often arrive together (a speculative step writes several tokens)
        "mean_gap_ms": 1e3 * (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0,
        "max_gap_during_ms": 1e3 * max(during, default=0.0),
        "events_during": sum(window["start"] <= t <= window["end"] for t in times),
        "burst_p50_ms": 1e3 * statistics.median(latencies),
        "burst_max_ms": 1e3 * max(latencies),
        "burst_outlived_stream": window["end"] > window.get("stream_end", float("inf")),
    }


async def closed_loop(url: str, clients: dict[str, tuple[int, object]], seconds: float) -> dict:
    """`clients[kind] = (how many, bodies)`: each client sends the next body of its kind's
    iterator (or the same dict, for a repeated history) until `seconds` have passed; per kind:
    answers, req/s, latency and the server's queue_ms."""
    stop = time.perf_counter() + seconds
    lat: dict[str, list[float]] = {k: [] for k in clients}
    queue: dict[str, list[float]] = {k: [] for k in clients}
    codes: Counter[str] = Counter()
    total = sum(n for n, _ in clients.values())
    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=httpx.Limits(max_connections=total + 8)
    ) as cl:

        async def worker(kind: str, bodies: object) -> None:
            while time.perf_counter() < stop:
                body = bodies if isinstance(bodies, dict) else next(bodies)  # type: ignore[call-overload]
                t = time.perf_counter()
                r = await cl.post("/recommend", json=body)
                codes[f"{kind} {r.status_code}"] += 1
                if r.status_code != 200:
                    await asyncio.sleep(0.2)
                    continue
                lat[kind].append(time.perf_counter() - t)
                queue[kind].append(r.json()["timings"]["queue_ms"] / 1e3)

        start = time.perf_counter()
        await asyncio.gather(
            *(worker(kind, bodies) for kind, (n, bodies) in clients.items() for _ in range(n))
        )
        wall = time.perf_counter() - start
    return {
        kind: {"rps": len(lat[kind]) / wall, "latency_s": summary(lat[kind]), "queue_s": summary(queue[kind])}
        for kind in clients
    } | {"codes": dict(codes), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=["burst", "capacity", "prefill"])
    parser.add_argument("--checkpoint", default="checkpoints/current")
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--port", type=int, default=19400, help="first port; one server at a time")
    parser.add_argument("--tokens", type=int, default=64, help="max_reasoning_tokens of reasoning requests")
    parser.add_argument("--prefill", default="1,2,4,16", help="burst: R2EC_MAX_PREFILL_PER_TICK values")
    parser.add_argument("--rounds", type=int, default=2, help="burst: stream + burst rounds per server")
    parser.add_argument("--burst", type=int, default=12, help="burst: no-reasoning requests at once")
    parser.add_argument("--delay", type=float, default=0.0, help="burst: s after the stream's first event")
    parser.add_argument("--stream-tokens", type=int, default=128, help="burst: the stream's budget")
    parser.add_argument("--mixed", type=int, default=8, help="burst: clients of each kind in the mixed load")
    parser.add_argument("--mixed-s", type=float, default=30, help="burst: seconds of mixed load")
    parser.add_argument(
        "--configs",
        default="GOMP_SPINCOUNT=10000;GOMP_SPINCOUNT=0",
        help="capacity: servers (;) by their VAR=VALUE settings (,)",
    )
    parser.add_argument("--seconds", type=float, default=30, help="capacity: seconds per phase")
    parser.add_argument("--budgets", default="0,512", help="prefill: R2EC_PREFILL_BATCH_TOKENS values")
    parser.add_argument("--sizes", default="1,8,32", help="prefill: burst sizes")
    parser.add_argument("--stall-rounds", type=int, default=2, help="prefill: stream + burst rounds")
    parser.add_argument("--stall-burst", type=int, default=32, help="prefill: the burst beside a stream")
    parser.add_argument("--logs", type=Path, default=None, help="server log folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = parser.parse_args()
    logs = args.logs or Path(tempfile.mkdtemp(prefix="bench_capacity-"))
    logs.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # every `with Server` stops its server

    from model.data import load_prepared

    test = load_prepared(Path(args.data)).split("test")
    histories = [[{"item_id": str(i)} for i in h] for h in test["history_item_ids"]]

    def bodies(**extra: object):
        """Every test history once, in order, as a /recommend body (then an error: too few)."""
        for h in histories:
            yield {"history": h, "k": 10, **extra}
        raise SystemExit(f"the test split's {len(histories)} histories ran out; shorten the run")

    reason = {"max_reasoning_tokens": args.tokens}
    results: dict[str, dict] = {}
    port = itertools.count(args.port)
    if args.suite == "burst":
        for value in [int(v) for v in args.prefill.split(",")]:
            name = f"prefill-{value}"
            env = {"R2EC_MAX_PREFILL_PER_TICK": str(value), "R2EC_MAX_QUEUE": "64"}
            with PortedServer(name, args.checkpoint, logs / f"{name}.log", next(port), **env) as srv:
                fresh = bodies()  # the same histories for every server
                rounds = []
                for _ in range(args.rounds):
                    stream_body = {**next(fresh), "max_reasoning_tokens": args.stream_tokens}
                    burst = [{**next(fresh), "reasoning": False} for _ in range(args.burst)]
                    rounds.append(asyncio.run(burst_round(srv.url, stream_body, burst, args.delay)))
                    print(name, json.dumps(rounds[-1]), file=sys.stderr, flush=True)
                with_reasoning = (b | reason for b in fresh)
                plain = ({**b, "reasoning": False} for b in bodies())
                clients = {"reasoning": (args.mixed, with_reasoning), "no reasoning": (args.mixed, plain)}
                mixed = asyncio.run(closed_loop(srv.url, clients, args.mixed_s))
                print(name, json.dumps(mixed), file=sys.stderr, flush=True)
                results[name] = {"rounds": rounds, "mixed": mixed}
        print_burst(results, args)
    elif args.suite == "prefill":
        results = prefill_suite(args, logs, bodies, port)
        print_prefill(results, args)
    else:
        for n, config in enumerate(args.configs.split(";")):
            name = config.strip()
            env = dict(kv.strip().split("=", 1) for kv in name.split(",") if kv.strip())
            log = logs / f"capacity-{n}.log"
            with PortedServer(name, args.checkpoint, log, next(port), **env) as srv:
                fresh = bodies()
                phases = {}
                for phase, n, kind in [
                    ("reasoning", 1, "reasoning"),
                    ("reasoning", 16, "reasoning"),
                    ("no reasoning", 1, "plain"),
                    ("no reasoning", 16, "plain"),
                    ("cache hit", 8, "hit"),
                ]:
                    if kind == "reasoning":
                        source: object = (b | reason for b in fresh)
                    elif kind == "plain":
                        source = ({**b, "reasoning": False} for b in fresh)
                    else:
                        source = {**next(fresh), **reason}
                        httpx.post(f"{srv.url}/recommend", json=source, timeout=600).raise_for_status()
                    out = asyncio.run(closed_loop(srv.url, {"x": (n, source)}, args.seconds))
                    phases[f"{phase} @{n}"] = out["x"] | {"codes": out["codes"]}
                    print(name, phase, n, json.dumps(phases[f"{phase} @{n}"]), file=sys.stderr, flush=True)
                results[name] = phases
        print_capacity(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


async def plain_burst(client: httpx.AsyncClient, bodies: list[dict]) -> dict:
    """`bodies` posted at once to /recommend: the wall time and each request's latency, s."""

    async def one(body: dict) -> float:
        t = time.perf_counter()
        r = await client.post("/recommend", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"burst request: {r.status_code} {r.text[:300]}")
        return time.perf_counter() - t

    start = time.perf_counter()
    latencies = await asyncio.gather(*(one(b) for b in bodies))
    return {"wall_s": time.perf_counter() - start, "latency_s": list(latencies)}


def prefill_suite(args: argparse.Namespace, logs: Path, bodies, port) -> dict[str, dict]:
    """The `prefill` suite (module docstring): every server of `--budgets` up at once, bursts
    taking turns between them."""
    budgets = [int(v) for v in args.budgets.split(",")]
    sizes = [int(v) for v in args.sizes.split(",")]
    queue = str(max(64, 2 * max(sizes), 2 * args.stall_burst))
    with contextlib.ExitStack() as stack:
        servers = {}
        for budget in budgets:
            name = f"budget-{budget}"
            env = {"R2EC_PREFILL_BATCH_TOKENS": str(budget), "R2EC_MAX_QUEUE": queue}
            servers[name] = stack.enter_context(
                PortedServer(name, args.checkpoint, logs / f"{name}.log", next(port), **env)
            )

        async def bursts() -> dict[str, dict]:
            out = {name: {n: {"walls": [], "latency_s": []} for n in sizes} for name in servers}
            limits = httpx.Limits(max_connections=max(sizes) + 8, max_keepalive_connections=max(sizes) + 8)
            async with contextlib.AsyncExitStack() as clients:
                client = {
                    name: await clients.enter_async_context(
                        httpx.AsyncClient(base_url=srv.url, timeout=600, limits=limits)
                    )
                    for name, srv in servers.items()
                }
                warm = [{**b, "reasoning": False} for b in itertools.islice(bodies(), max(sizes))]
                for name in servers:  # connections open and kernels warm before anything counts
                    await plain_burst(client[name], warm)
                fresh = bodies()
                for r in range(args.rounds):
                    for n in sizes:
                        burst = [{**next(fresh), "reasoning": False} for _ in range(n)]
                        order = list(servers) if r % 2 == 0 else list(reversed(servers))
                        for name in order:
                            got = await plain_burst(client[name], burst)
                            out[name][n]["walls"].append(got["wall_s"])
                            out[name][n]["latency_s"] += got["latency_s"]
                            print(name, n, f"{got['wall_s']:.2f} s", file=sys.stderr, flush=True)
            return out

        results = {name: {"bursts": b} for name, b in asyncio.run(bursts()).items()}
        fresh = bodies()
        for _ in range(args.stall_rounds):
            stream_body = {**next(fresh), "max_reasoning_tokens": args.stream_tokens}
            burst = [{**next(fresh), "reasoning": False} for _ in range(args.stall_burst)]
            for name, srv in servers.items():
                got = asyncio.run(burst_round(srv.url, stream_body, burst, args.delay))
                results[name].setdefault("stall", []).append(got)
                print(name, json.dumps(got), file=sys.stderr, flush=True)
    return results


def print_prefill(results: dict[str, dict], args: argparse.Namespace) -> None:
    base = next(iter(results))
    rows = {}
    print("\n| R2EC_PREFILL_BATCH_TOKENS | burst | requests | req/s | p50 ms | p95 ms |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        for n, b in r["bursts"].items():
            lat = b["latency_s"]
            rows[name, n] = (len(lat) / sum(b["walls"]), 1e3 * pct(lat, 0.5), 1e3 * pct(lat, 0.95))
            rps, p50, p95 = rows[name, n]
            print(
                f"| {name.removeprefix('budget-')} | {n} | {len(lat)} | {rps:.2f} | {p50:.0f} | {p95:.0f} |"
            )
    print(
        f"\n| R2EC_PREFILL_BATCH_TOKENS against {base.removeprefix('budget-')} | burst | req/s ratio | "
        "p50 ratio | p95 ratio (below 1: faster) |"
    )
    print("|---|---|---|---|---|")
    for name, r in results.items():
        if name == base:
            continue
        for n in r["bursts"]:
            (a, b50, b95), (o, o50, o95) = rows[name, n], rows[base, n]
            label = name.removeprefix("budget-")
            print(f"| {label} | {n} | {a / o:.2f}x | {b50 / o50:.2f}x | {b95 / o95:.2f}x |")
    print(
        f"\n| R2EC_PREFILL_BATCH_TOKENS | stream's mean gap, ms | its max gap during a burst of "
        f"{args.stall_burst}, ms (each round) | burst p50 / max ms (each round) |"
    )
    print("|---|---|---|---|")
    for name, r in results.items():
        stall = r.get("stall", [])
        if not stall:
            continue
        gaps = " / ".join(f"{x['max_gap_during_ms']:.0f}" for x in stall)
        burst = "; ".join(f"{x['burst_p50_ms']:.0f} / {x['burst_max_ms']:.0f}" for x in stall)
        mean = statistics.fmean(x["mean_gap_ms"] for x in stall)
        print(f"| {name.removeprefix('budget-')} | {mean:.0f} | {gaps} | {burst} |")


def print_burst(results: dict[str, dict], args: argparse.Namespace) -> None:
    print(
        f"\n| R2EC_MAX_PREFILL_PER_TICK | stream's mean gap, ms | its max gap during the "
        f"burst, ms (each round) | burst of {args.burst}: p50 / max ms (each round) | mixed: req/s "
        f"with / without reasoning | with reasoning p50 / p90 s | without p50 / p90 s | queue p50 / "
        f"p90 s (with; without) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        rounds, m = r["rounds"], r["mixed"]
        a, b = m["reasoning"], m["no reasoning"]
        during = " / ".join(f"{x['max_gap_during_ms']:.0f}" for x in rounds)
        burst = "; ".join(f"{x['burst_p50_ms']:.0f} / {x['burst_max_ms']:.0f}" for x in rounds)
        print(
            f"| {name.removeprefix('prefill-')} "
            f"| {statistics.fmean(x['mean_gap_ms'] for x in rounds):.0f} "
            f"| {during} | {burst} "
            f"| {a['rps']:.2f} / {b['rps']:.2f} "
            f"| {a['latency_s'].get('p50', 0):.2f} / {a['latency_s'].get('p90', 0):.2f} "
            f"| {b['latency_s'].get('p50', 0):.2f} / {b['latency_s'].get('p90', 0):.2f} "
            f"| {a['queue_s'].get('p50', 0):.2f} / {a['queue_s'].get('p90', 0):.2f}; "
            f"{b['queue_s'].get('p50', 0):.2f} / {b['queue_s'].get('p90', 0):.2f} |"
        )


def print_capacity(results: dict[str, dict]) -> None:
    print("\n| server | phase | req/s | p50 s | p90 s | p99 s | queue p50 / p90 s | statuses |")
    print("|---|---|---|---|---|---|---|---|")
    for name, phases in results.items():
        for phase, r in phases.items():
            lat, q = r["latency_s"], r["queue_s"]
            print(
                f"| {name} | {phase} | {r['rps']:.2f} | {lat.get('p50', 0):.2f} "
                f"| {lat.get('p90', 0):.2f} | {lat.get('p99', 0):.2f} | {q.get('p50', 0):.2f} / "
                f"{q.get('p90', 0):.2f} | {r['codes']} |"
            )


if __name__ == "__main__":
    main()
