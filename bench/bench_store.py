"""What keeping histories in event-time order costs an append (service/store.py `_place` and
APPEND_SCRIPT), on a real redis-server and the in-process store.

    python3 bench/bench_store.py [--users 200] [--events 60] [--window 20] [--rounds 3]

For each store, `--users` users each get `--events` events, one event per `append_events` call
(what a one-event POST makes; no HTTP), in three orders:
- `in order`: every event newer than the last (the script pushes it at the end);
- `10% late`: one event in ten arrives 5 places late (it takes its place 5 events back, and
  the list is written back from there);
- `all late by a window`: every event older than the whole window (its walk stops at the
  window's edge and it is left out, the worst walk).
Rounds interleave the orders so drift on a noisy machine hits them alike. Prints µs per append
(median over rounds) and each order's ratio to `in order`. Starts its own redis-server on a free
loopback port (`redis-server` on PATH), and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from redis_server import running_redis  # this script's folder is on sys.path

from service.store import Event, MemoryStore, RedisStore

ORDERS = ("in order", "10% late", "all late by a window")


def timestamps(order: str, n: int, window: int) -> list[int]:
    """The order in which one user's events arrive (their timestamps)."""
    ts = list(range(1_000_000, 1_000_000 + 10 * n, 10))
    if order == "10% late":
        for i in range(9, n, 10):  # the event that should be 5 places back arrives now
            ts[i] = ts[i] - 10 * 5 - 5
    elif order == "all late by a window":
        ts = [ts[-1] + 10 * window] + [ts[0] - 10 * window - i for i in range(n - 1)]
    return ts


async def run(store, order: str, users: int, events: int, window: int, tag: str) -> float:
    """µs per append for `users` users with `events` events each, arriving in `order`."""
    plan = timestamps(order, events, window)
    start = time.perf_counter()
    for u in range(users):
        for j, t in enumerate(plan):
            await store.append_events(f"{tag}-{u}", [Event(f"i{j}", 4.0, t)])
    return (time.perf_counter() - start) / (users * events) * 1e6


async def main_async(args: argparse.Namespace) -> None:
    with running_redis() as url:
        redis_store = RedisStore(url, window=args.window)
        stores = {"redis": redis_store, "memory": MemoryStore(window=args.window)}
        times: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for name, store in stores.items():
                for order in ORDERS:
                    us = await run(store, order, args.users, args.events, args.window, f"{order}-{r}")
                    times.setdefault((name, order), []).append(us)
        print(f"{args.users} users x {args.events} events, window {args.window}, {args.rounds} rounds")
        print(f"{'store':<8} {'order':<22} {'µs/append':>10} {'vs in order':>12}")
        for name in stores:
            base = statistics.median(times[(name, "in order")])
            for order in ORDERS:
                us = statistics.median(times[(name, order)])
                print(f"{name:<8} {order:<22} {us:>10.1f} {us / base:>11.2f}x")
        await redis_store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--events", type=int, default=60)
    parser.add_argument("--window", type=int, default=20, help="R2EC_HISTORY_WINDOW")
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
