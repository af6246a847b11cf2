"""A backfill two ways, on one machine in one run (BENCHMARKS.md §4): `r2ec user import FILE`
against the loop a data engineer writes without it (journey 40's backfill.py: POST
/users/{id}/events, one user's events a request, at most 1000, `--concurrency` clients).

    PYTHONPATH=. python3 bench/bench_import.py [--rounds 3] [--concurrency 4]
        [--checkpoint checkpoints/current] [--redis-port 0] [--serve-port 0]

Writes ml-100k (data/raw/ml-100k/ml-100k.inter: 100,000 events, 943 users) as a CSV export,
starts its own redis-server and an `r2ec serve` on it, and runs, each round in a rotated order
and each on an emptied Redis: `http` (the loop), `import --stream` (the same writes as the route:
history, seen set, event ids and the stream) and `import` (the default, no stream). For each:
the wall time of the whole thing (the CLI's: a process of its own, its start, the catalog and
the file read and checked included; the loop's: its posts only, the file already in memory, as
backfill.py timed it), the writing phase alone, and the CPU seconds of the client, the api
process and redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd
import redis
from redis_server import free_port, running_redis  # this script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]


def export_csv(out: Path) -> pd.DataFrame:
    d = pd.read_csv(ROOT / "data/raw/ml-100k/ml-100k.inter", sep="\t")
    d.columns = ["user_id", "item_id", "rating", "timestamp"]
    d.to_csv(out, index=False)
    return d


def cpu_of(pid: int) -> float:
    """A process's user + system CPU seconds so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def http_loop(base: str, frame: pd.DataFrame, concurrency: int) -> tuple[float, dict]:
    """The journey's backfill.py: per user in (user, time) order, 1000 events a request."""
    frame = frame.astype({"user_id": str, "item_id": str}).sort_values(
        ["user_id", "timestamp"], kind="stable"
    )
    jobs = []
    for uid, g in frame.groupby("user_id", sort=False):
        rows = [
            {"item_id": i, "rating": float(r), "timestamp": int(t)}
            for i, r, t in zip(g["item_id"], g["rating"], g["timestamp"], strict=True)
        ]
        jobs += [(uid, rows[k : k + 1000]) for k in range(0, len(rows), 1000)]
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    totals = {"appended": 0, "duplicates": 0, "retries": 0}
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:

        async def worker() -> None:
            while not queue.empty():
                uid, rows = queue.get_nowait()
                while True:
                    r = await client.post(f"/users/{uid}/events", json={"events": rows})
                    if r.status_code == 200:
                        totals["appended"] += r.json()["appended"]
                        totals["duplicates"] += r.json()["duplicates"]
                        break
                    totals["retries"] += 1
                    await asyncio.sleep(1)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, totals


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--checkpoint", default="checkpoints/current")
    ap.add_argument("--redis-port", type=int, default=0)
    ap.add_argument("--serve-port", type=int, default=0)
    a = ap.parse_args()
    work = tempfile.TemporaryDirectory(prefix="bench-import-")  # removed on the way out
    csv = Path(work.name) / "ml100k.csv"
    frame = export_csv(csv)
    port = a.serve_port or free_port()
    with running_redis(a.redis_port) as url:
        admin = redis.Redis.from_url(url)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("R2EC_")},
            "PYTHONPATH": str(ROOT),
            "R2EC_REDIS_URL": url,
            "R2EC_CHECKPOINT": a.checkpoint,
            "R2EC_WARMUP_REQUESTS": "0",
            "GOMP_SPINCOUNT": "0",
        }
        cmd = [sys.executable, "-m", "cli", "serve", "--port", str(port)]
        api = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            else:
                raise SystemExit("r2ec serve did not become ready")
            kinds = ["http", "import --stream", "import"]
            results: dict[str, list[dict]] = {k: [] for k in kinds}
            for n in range(a.rounds):
                for kind in kinds[n % 3 :] + kinds[: n % 3]:
                    admin.flushall()
                    r0, api0 = redis_cpu(admin), cpu_of(api.pid)
                    if kind == "http":
                        c0 = resource.getrusage(resource.RUSAGE_SELF)
                        seconds, totals = asyncio.run(http_loop(base, frame, a.concurrency))
                        c1 = resource.getrusage(resource.RUSAGE_SELF)
                        row = {"wall_s": seconds, "write_s": seconds, "new": totals["appended"]}
                        row["client_cpu_s"] = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
                    else:
                        args = [sys.executable, "-m", "cli", "user", "import", str(csv), "--json"]
                        args += ["--stream"] if kind.endswith("--stream") else []
                        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                        started = time.perf_counter()
                        out = subprocess.run(
                            args, cwd=ROOT, env=env, capture_output=True, text=True, check=True
                        )
                        wall = time.perf_counter() - started
                        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                        summary = json.loads(out.stdout.strip().splitlines()[-1])
                        row = {"wall_s": wall, "write_s": summary["seconds"], "new": summary["events_new"]}
                        row["client_cpu_s"] = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
                    row["api_cpu_s"] = cpu_of(api.pid) - api0
                    row["redis_cpu_s"] = redis_cpu(admin) - r0
                    row["stream"] = admin.xlen("r2ec:events")
                    row["load"] = os.getloadavg()[0]
                    results[kind].append(row)
                    print(
                        kind,
                        {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()},
                        flush=True,
                    )
        finally:
            api.terminate()
            api.wait(30)
    events = len(frame)
    print(f"\n{events} events, {frame.user_id.nunique()} users, {a.rounds} rounds; medians:")
    print(
        "| path | events/s, whole run | events/s, writing | wall s | client CPU s | api CPU s | redis CPU s |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind, rows in results.items():
        med = {
            k: statistics.median(r[k] for r in rows)
            for k in ("wall_s", "write_s", "client_cpu_s", "api_cpu_s", "redis_cpu_s")
        }
        rates = f"{events / med['wall_s']:,.0f} | {events / med['write_s']:,.0f}"
        cpu = f"{med['client_cpu_s']:.1f} | {med['api_cpu_s']:.1f} | {med['redis_cpu_s']:.1f}"
        print(f"| {kind} | {rates} | {med['wall_s']:.1f} | {cpu} |")


if __name__ == "__main__":
    main()
