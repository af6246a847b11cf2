"""What erasing a user costs (service/store.py `RedisStore.erase_user`): its one script, then the
paged scan of the event stream, which has no index by user.

    PYTHONPATH=. python3 bench/bench_erase.py [--entries 1000000] [--user-entries 50]
                                              [--pages 1000,5000] [--port 0]

Fills the stream with `--entries` entries (what R2EC_STREAM_MAXLEN keeps at most), of which
`--user-entries` are one user's, spread evenly, plus that user's history; then, for each page
size, erases the user (the user's entries put back between runs) and reports the erasure's wall
time, its steps, and from Redis's SLOWLOG the longest and the median time one step held Redis
(every other client waits that long at most). Starts its own redis-server on `--port` (0: a free
loopback port) and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import redis
import redis.asyncio
from redis_server import running_redis  # this script's folder is on sys.path

from service.store import EVENTS_STREAM, Event, RedisStore

USER = "erase-me"


def fill(url: str, entries: int, user_entries: int) -> None:
    """`entries` stream entries, every (entries // user_entries)-th one USER's."""
    client = redis.Redis.from_url(url)
    every = max(1, entries // max(1, user_entries))
    pipe = client.pipeline(transaction=False)
    for n in range(entries):
        user = USER if n % every == every // 2 else f"u{n % 5000}"
        fields = {"user_id": user, "item_id": f"i{n % 1682}", "rating": "4.0", "timestamp": ""}
        pipe.xadd(EVENTS_STREAM, {**fields, "event_id": f"e{n}"})
        if len(pipe) >= 10_000:
            pipe.execute()
    pipe.execute()
    client.close()


async def erase_once(url: str, page: int) -> tuple[float, int, list[int]]:
    """(seconds, entries removed, each command's time in Redis, µs)."""
    store = RedisStore(url, timeout_s=30)
    store.erase_page = page
    await store.append_events(USER, [Event(f"h{n}", 4.0, n) for n in range(20)])
    admin = redis.Redis.from_url(url)
    admin.config_set("slowlog-log-slower-than", 0)
    admin.config_set("slowlog-max-len", 100_000)
    admin.slowlog_reset()
    t = time.perf_counter()
    erased = await store.erase_user(USER)
    seconds = time.perf_counter() - t
    held = [e["duration"] for e in admin.slowlog_get(100_000) if e["command"].startswith(b"EVALSHA")]
    admin.close()
    await store.close()
    return seconds, erased.stream_entries, held


async def main_async(args: argparse.Namespace) -> None:
    with running_redis(args.port) as url:
        t = time.perf_counter()
        fill(url, args.entries, args.user_entries)
        print(f"stream of {args.entries} entries filled in {time.perf_counter() - t:.1f} s")
        print(f"{'page':>7} {'erase s':>8} {'removed':>8} {'steps':>6} {'step max ms':>12} {'median ms':>10}")
        for n, page in enumerate(int(p) for p in args.pages.split(",")):
            if n:  # the user's entries back, at the end: the scan reads the whole stream anyway
                fill(url, args.user_entries, args.user_entries)
            seconds, removed, held = await erase_once(url, page)
            steps, worst, median = len(held), max(held) / 1e3, statistics.median(held) / 1e3
            print(f"{page:>7} {seconds:>8.2f} {removed:>8} {steps:>6} {worst:>12.1f} {median:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--user-entries", type=int, default=50)
    parser.add_argument("--pages", default="1000,10000")
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
