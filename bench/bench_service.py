"""End-to-end service benchmark for issue 12's targets: `r2ec serve` in a subprocess per
configuration, load from this process over loopback with httpx. Prints markdown tables; every
ratio compares servers of this one run, over the same checkpoint and the same histories.

    python3 bench/bench_service.py --checkpoint checkpoints/current --data data/ml-100k/loo \
        [--servers continuous,static,static-hf] [--quantize none|int8] [--tokens 64] \
        [--levels 1,32] [--requests 8,64] [--json bench_service.json]

Servers (in-process store, everything else from the server's defaults and any R2EC_* variable
in this shell, e.g. R2EC_THREADS or R2EC_MAX_BATCH):
- `continuous`: R2EC_BATCHING=continuous, R2EC_BACKEND=engine (the default service);
- `static`: R2EC_BATCHING=static, R2EC_BACKEND=engine;
- `static-hf`: R2EC_BATCHING=static, R2EC_BACKEND=hf, the path before issue 12 (the baseline),
  with GOMP_SPINCOUNT=0 as it ran then (OpenMP threads sleep between kernels);
- `continuous-nospin`: `continuous` with GOMP_SPINCOUNT=0 (`r2ec serve` lets OpenMP threads
  spin briefly between kernels, model.spin_between_kernels);
- `continuous-nospec`: `continuous` without speculative decoding (R2EC_SPECULATIVE_TOKENS=0;
  by default up to 5 decoding requests check n-gram drafts, model/speculative.py);
- `continuous-16`: `continuous` with 16 decode slots (R2EC_MAX_BATCH=16) instead of 8;
- `continuous-int8`: `continuous` with int8 decode weights (R2EC_QUANTIZE=int8);
- `continuous-8`, `continuous-16-int8`, `continuous-exact`: `continuous` pinned to 8 slots,
  or to 16 slots with int8 weights for a lone sequence, or with R2EC_EXACT_DECODE=true (no
  prefix cache, attention per query head: the reference's greedy tokens);
- `continuous-onednn`: `continuous` with every matmul on oneDNN (R2EC_BF16_KERNEL=off), as
  before model/bf16_gemm.py's kernel for decode steps.
`--quantize` sets R2EC_QUANTIZE on the other engine servers (static-hf always runs `none`).

Per server, at each concurrency level: POST /recommend with reasoning (up to `--tokens`),
every request a different ml-100k test history, so none hits the reasoning cache (each server
gets the same histories in the same order): throughput, p50/p95 latency, mean
reasoning_tokens; then throughput and p95 ratios between the servers at each level. On the
continuous server: the same body sent again (every reply must say `cache: "hit"`, one FAISS
search), `"reasoning": false` with distinct histories, and POST /recommend/stream at
concurrency 1 (time from sending to the first `event: reasoning` line, the whole stream, and
reasoning events per stream); with `--reload`, then POST /admin/reload of the same checkpoint
and `--plain` no-reasoning requests again (a reload must leave the model thread as fast as it
was: bench/bench_threads.py). Last, a table of issue 12's targets with pass/fail. Each
server's output goes to a log file in `--logs` (a new temporary folder by default), named
when a server fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

CONTINUOUS = {"R2EC_BATCHING": "continuous", "R2EC_BACKEND": "engine"}  # the default service
SERVERS: dict[str, dict[str, str]] = {
    "continuous": CONTINUOUS,
    "static": {"R2EC_BATCHING": "static", "R2EC_BACKEND": "engine"},
    # the service before issue 12, as it ran then: OpenMP threads slept between kernels
    "static-hf": {"R2EC_BATCHING": "static", "R2EC_BACKEND": "hf", "GOMP_SPINCOUNT": "0"},
    # the default service with OpenMP threads that sleep at once (`r2ec serve` lets them spin)
    "continuous-nospin": {**CONTINUOUS, "GOMP_SPINCOUNT": "0"},
    # the default service, one token per forward (no speculative decoding)
    "continuous-nospec": {**CONTINUOUS, "R2EC_SPECULATIVE_TOKENS": "0"},
    # continuous with twice the default decode slots (R2EC_MAX_BATCH, 8 by default)
    "continuous-16": {**CONTINUOUS, "R2EC_MAX_BATCH": "16"},
    # continuous with int8 decode weights whatever --quantize says (R2EC_QUANTIZE=int8)
    "continuous-int8": {**CONTINUOUS, "R2EC_QUANTIZE": "int8"},
    # pinned, whatever the defaults are: 8 or 16 slots, bf16 or int8 for a lone sequence
    "continuous-8": {**CONTINUOUS, "R2EC_MAX_BATCH": "8"},
    "continuous-exact": {**CONTINUOUS, "R2EC_EXACT_DECODE": "1"},
    "continuous-16-int8": {**CONTINUOUS, "R2EC_MAX_BATCH": "16", "R2EC_QUANTIZE": "int8"},
    # every matmul on oneDNN, as before model/bf16_gemm.py's decode-step kernel (stop 25)
    "continuous-onednn": {**CONTINUOUS, "R2EC_BF16_KERNEL": "off"},
}
BASELINE = "static-hf"
READY_TIMEOUT_S = 600
RELOAD_KEY = "bench-service"  # the admin key of a server that `--reload` reloads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Server:
    """`r2ec serve` on a free loopback port, in-process store, given env overrides; its stdout
    and stderr go to `log`. Stopped on leaving the `with` block, however it is left."""

    def __init__(self, name: str, checkpoint: str, log: Path, **env: str) -> None:
        self.name = name
        self.log = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "R2EC_CHECKPOINT": checkpoint,
            "R2EC_LOG_LEVEL": "WARNING",
            "R2EC_REDIS_URL": "",
            **env,
        }
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        cmd = [sys.executable, "-m", "cli", "serve", "--port", str(self.port)]
        print(f"starting {self.name} on {self.url} (log {self.log})", file=sys.stderr, flush=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException as exc:
            self.__exit__(type(exc), exc, None)
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.proc.returncode}; log {self.log}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server {self.name} not ready after {READY_TIMEOUT_S} s; log {self.log}")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is not None:
            print(
                f"\n{self.name} failed: {exc!r}; server log {self.log}, its end:\n{tail(self.log)}\n",
                file=sys.stderr,
                flush=True,
            )
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def load(url: str, bodies: list[dict], concurrency: int, expect_cache: str | None = None) -> dict:
    """POST /recommend each of `bodies` with at most `concurrency` in flight; latency per request
    in ms. `expect_cache`: every reply's `cache` must be this ("miss": no history repeated)."""
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    gen_ms: list[float] = []
    tokens: list[int] = []
    caches: Counter[str] = Counter()

    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:

        async def one(body: dict) -> None:
            async with sem:
                t = time.perf_counter()
                r = await client.post("/recommend", json=body)
                latencies.append((time.perf_counter() - t) * 1000)
                if r.status_code != 200:
                    raise RuntimeError(f"POST /recommend: {r.status_code} {r.text[:500]}")
                reply = r.json()
                gen_ms.append(reply["timings"]["generate_ms"])
                tokens.append(reply["reasoning_tokens"])
                caches[reply["cache"]] += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - start
    if expect_cache is not None and set(caches) != {expect_cache}:
        raise RuntimeError(f"expected every reply to say cache {expect_cache!r}, got {dict(caches)}")
    return {
        "concurrency": concurrency,
        "n": len(bodies),
        "wall_s": wall,
        "rps": len(bodies) / wall,
        "p50": pct(latencies, 0.5),
        "p95": pct(latencies, 0.95),
        "mean": statistics.fmean(latencies),
        "gen_p50": statistics.median(gen_ms),
        "tokens_mean": statistics.fmean(tokens),
        "cache": dict(caches),
    }


async def stream_one(client: httpx.AsyncClient, body: dict) -> dict:
    """One POST /recommend/stream, read line by line: ms from sending to the first
    `event: reasoning` line and to the stream's end, reasoning events, and the `done` data."""
    t = time.perf_counter()
    first: float | None = None
    events: Counter[str] = Counter()
    done: dict | None = None
    event = None
    async with client.stream("POST", "/recommend/stream", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"POST /recommend/stream: {r.status_code} {r.text[:500]}")
        async for line in r.aiter_lines():
            if line.startswith("event:"):
                event = line[len("event:") :].strip()
                events[event] += 1
                if event == "reasoning" and first is None:
                    first = (time.perf_counter() - t) * 1000
            elif line.startswith("data:") and event in ("done", "error"):
                data = json.loads(line[len("data:") :])
                if event == "error":
                    raise RuntimeError(f"stream error event: {data}")
                done = data
    total = (time.perf_counter() - t) * 1000
    if done is None or events["items"] != 1:
        raise RuntimeError(f"stream ended without items and done: events {dict(events)}")
    return {
        "ttft": first,
        "total": total,
        "reasoning_events": events["reasoning"],
        "reasoning_tokens": done["reasoning_tokens"],
        "cache": done["cache"],
    }


async def streams(url: str, bodies: list[dict]) -> dict:
    """POST /recommend/stream each of `bodies`, one at a time."""
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        runs = [await stream_one(client, b) for b in bodies]
    missing = sum(r["ttft"] is None for r in runs)
    if missing:
        raise RuntimeError(f"{missing} of {len(runs)} streams sent no reasoning event")
    return {
        "n": len(runs),
        "ttft_p50": statistics.median(r["ttft"] for r in runs),
        "ttft_p95": pct([r["ttft"] for r in runs], 0.95),
        "total_p50": statistics.median(r["total"] for r in runs),
        "events_mean": statistics.fmean(r["reasoning_events"] for r in runs),
        "tokens_mean": statistics.fmean(r["reasoning_tokens"] for r in runs),
        "cache": dict(Counter(r["cache"] for r in runs)),
    }


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def fmt(value: float | None, unit: str = "", digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/current")
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"subset of {','.join(SERVERS)}")
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "auto"], help="engine servers")
    parser.add_argument("--tokens", type=int, default=64, help="max_reasoning_tokens per request")
    parser.add_argument("--levels", default="1,32", help="concurrency levels")
    parser.add_argument("--requests", default="8,64", help="requests per concurrency level")
    parser.add_argument("--warmup", type=int, default=2, help="requests per server before measuring")
    parser.add_argument("--repeats", type=int, default=20, help="repeated-history requests")
    parser.add_argument("--plain", type=int, default=20, help="no-reasoning requests")
    parser.add_argument(
        "--reload",
        action="store_true",
        help="then POST /admin/reload (the same checkpoint) and send --plain no-reasoning requests again",
    )
    parser.add_argument("--streams", type=int, default=10, help="SSE streams")
    parser.add_argument("--logs", type=Path, default=None, help="server log folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = parser.parse_args()

    names = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in names if s not in SERVERS]
    if unknown or not names:
        parser.error(f"--servers: unknown {unknown}; choose from {','.join(SERVERS)}")
    levels = [int(x) for x in args.levels.split(",")]
    counts = [int(x) for x in args.requests.split(",")]
    if len(levels) != len(counts):
        parser.error("--levels and --requests need as many values")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="bench_service-"))
    logs.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so every `with Server` stops its server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from model.data import load_prepared

    test = load_prepared(Path(args.data)).split("test")
    histories = [[{"item_id": str(i)} for i in h] for h in test["history_item_ids"]]

    def fresh(start: int, n: int, **extra: object) -> list[dict]:
        """Bodies for histories start..start+n-1: distinct, so none is a cache hit."""
        if start + n > len(histories):
            raise SystemExit(f"needs {start + n} distinct histories, the test split has {len(histories)}")
        return [{"history": histories[i], "k": 10, **extra} for i in range(start, start + n)]

    reason = {"max_reasoning_tokens": args.tokens}
    extras_on = "continuous" if "continuous" in names else names[0]
    results: dict[str, dict[int, dict]] = {}
    extras: dict[str, dict] = {}
    started = time.perf_counter()
    for name in names:
        env = dict(SERVERS[name])
        env.setdefault("R2EC_QUANTIZE", args.quantize if env["R2EC_BACKEND"] == "engine" else "none")
        # room for every concurrent request (the queue bound answers 503 past it)
        env["R2EC_MAX_QUEUE"] = str(max(32, *levels))
        if args.reload:
            env["R2EC_API_KEY"] = RELOAD_KEY
        with Server(name, args.checkpoint, logs / f"{name}.log", **env) as server:
            cursor = 0  # every server answers the same histories
            if args.warmup:
                asyncio.run(load(server.url, fresh(cursor, args.warmup, **reason), args.warmup))
                cursor += args.warmup
            results[name] = {}
            for conc, n in zip(levels, counts, strict=True):
                r = asyncio.run(load(server.url, fresh(cursor, n, **reason), conc, expect_cache="miss"))
                cursor += n
                results[name][conc] = r
                print(f"{name} concurrency {conc}: {r}", file=sys.stderr, flush=True)
            if name != extras_on:
                continue
            same = fresh(cursor, 1, **reason)[0]
            cursor += 1
            asyncio.run(load(server.url, [same], 1, expect_cache="miss"))  # fills the cache
            extras["repeated"] = asyncio.run(load(server.url, [same] * args.repeats, 1, expect_cache="hit"))
            extras["no_reasoning"] = asyncio.run(
                load(server.url, fresh(cursor, args.plain, reasoning=False), 1)
            )
            cursor += args.plain
            extras["stream"] = asyncio.run(streams(server.url, fresh(cursor, args.streams, **reason)))
            cursor += args.streams
            if args.reload:  # a hot reload of the same checkpoint, then no reasoning again
                r = httpx.post(f"{server.url}/admin/reload", headers={"X-API-Key": RELOAD_KEY}, timeout=600)
                if r.status_code != 200:
                    raise RuntimeError(f"POST /admin/reload: {r.status_code} {r.text[:500]}")
                extras["after_reload"] = asyncio.run(
                    load(server.url, fresh(cursor, args.plain, reasoning=False), 1)
                )
                cursor += args.plain
            for key in ("repeated", "no_reasoning", "stream", "after_reload"):
                if key in extras:
                    print(f"{name} {key}: {extras[key]}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started

    quant = f", R2EC_QUANTIZE={args.quantize} on engine servers" if args.quantize != "none" else ""
    print(
        f"\ncheckpoint {args.checkpoint}, up to {args.tokens} reasoning tokens, ml-100k test histories"
        f"{quant}; {elapsed:.0f} s in all\n"
    )
    print(
        "| server | concurrency | requests | throughput (req/s) | p50 ms | p95 ms "
        "| generate p50 ms | mean reasoning tokens |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, by_level in results.items():
        for conc, r in by_level.items():
            print(
                f"| {name} | {conc} | {r['n']} | {r['rps']:.2f} | {r['p50']:.0f} | {r['p95']:.0f} "
                f"| {r['gen_p50']:.0f} | {r['tokens_mean']:.1f} |"
            )

    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    ratios: list[dict] = []
    if pairs:
        print("\n| concurrency | servers | throughput ratio | p95 ratio (lower: first is faster) |")
        print("|---|---|---|---|")
        for conc in levels:
            for a, b in pairs:
                ra, rb = results[a][conc], results[b][conc]
                row = {
                    "concurrency": conc,
                    "a": a,
                    "b": b,
                    "throughput": ratio(ra["rps"], rb["rps"]),
                    "p95": ratio(ra["p95"], rb["p95"]),
                }
                ratios.append(row)
                print(f"| {conc} | {a} / {b} | {row['throughput']:.2f}x | {row['p95']:.2f}x |")

    if extras:
        rep, plain, st = extras["repeated"], extras["no_reasoning"], extras["stream"]
        print(f"\n| on {extras_on} | requests | p50 ms | p95 ms | notes |")
        print("|---|---|---|---|---|")
        print(
            f"| repeated history (cache hit) | {rep['n']} | {rep['p50']:.1f} | {rep['p95']:.1f} "
            f"| every reply `cache: hit` |"
        )
        print(
            f"| no reasoning | {plain['n']} | {plain['p50']:.1f} | {plain['p95']:.1f} "
            f"| cache {plain['cache']} |"
        )
        print(
            f"| SSE first `reasoning` event | {st['n']} | {st['ttft_p50']:.0f} | {st['ttft_p95']:.0f} "
            f"| from sending, concurrency 1 |"
        )
        print(
            f"| SSE whole stream | {st['n']} | {st['total_p50']:.0f} | | {st['events_mean']:.1f} "
            f"reasoning events per stream, {st['tokens_mean']:.1f} reasoning tokens |"
        )
        if "after_reload" in extras:
            again = extras["after_reload"]
            print(
                f"| no reasoning after a hot reload | {again['n']} | {again['p50']:.1f} | {again['p95']:.1f} "
                f"| {again['p50'] / plain['p50']:.2f}x the p50 before it |"
            )

    # Issue 12's targets, measured on the default server (continuous) unless it was left out.
    top = max(levels)
    c1 = results.get("continuous", {}).get(1, {})
    hi = results.get("continuous", {}).get(top, {})
    hi_base = results.get(BASELINE, {}).get(top, {})
    at = "" if args.tokens == 64 else f" (ran {args.tokens} tokens)"
    at_top = "" if top == 32 else f" (ran concurrency {top})"
    on_extras = "" if extras_on == "continuous" else f" (on {extras_on})"
    both = bool(hi and hi_base)
    tp = ratio(hi["rps"], hi_base["rps"]) if both else None
    p95r = ratio(hi["p95"], hi_base["p95"]) if both else None
    rep_p50 = extras["repeated"]["p50"] if extras else None
    plain_p50 = extras["no_reasoning"]["p50"] if extras else None
    ttft = extras["stream"]["ttft_p50"] if extras else None
    rows = [  # (target, value, as printed, passes: value -> bool)
        (
            f"/recommend 64 tokens, concurrency 1, p50 <= 2000 ms{at}",
            c1.get("p50"),
            fmt(c1.get("p50"), " ms"),
            lambda v: v <= 2000,
        ),
        (
            f"concurrency 32 throughput >= 2x {BASELINE}{at_top}",
            tp,
            f"{fmt(tp, 'x', 2)} ({fmt(hi.get('rps'), '', 2)} vs {fmt(hi_base.get('rps'), '', 2)} req/s)",
            lambda v: v >= 2,
        ),
        (
            f"concurrency 32 p95 lower than {BASELINE}{at_top}",
            p95r,
            f"{fmt(hi.get('p95'), ' ms')} vs {fmt(hi_base.get('p95'), ' ms')} ({fmt(p95r, 'x', 2)})",
            lambda v: v < 1,
        ),
        (f"repeated history p50 <= 20 ms{on_extras}", rep_p50, fmt(rep_p50, " ms", 1), lambda v: v <= 20),
        (f"no reasoning p50 <= 150 ms{on_extras}", plain_p50, fmt(plain_p50, " ms", 1), lambda v: v <= 150),
        (f"SSE first reasoning event p50 <= 600 ms{on_extras}", ttft, fmt(ttft, " ms"), lambda v: v <= 600),
    ]
    print("\n| target (issue 12) | measured | result |\n|---|---|---|")
    print("| decode tok/s | measured by bench/bench_decode.py, not here | n/a |")
    targets = []
    for target, value, text, passes in rows:
        ok = None if value is None else bool(passes(value))
        verdict = "n/a" if ok is None else ("pass" if ok else "FAIL")
        print(f"| {target} | {text if value is not None else 'n/a'} | {verdict} |")
        targets.append({"target": target, "value": value, "pass": ok})

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "checkpoint": args.checkpoint,
                    "tokens": args.tokens,
                    "quantize": args.quantize,
                    "servers": names,
                    "elapsed_s": elapsed,
                    "load": {name: list(by.values()) for name, by in results.items()},
                    "ratios": ratios,
                    "extras_on": extras_on if extras else None,
                    "extras": extras,
                    "targets": targets,
                },
                indent=2,
            )
        )
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
