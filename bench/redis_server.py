"""A throwaway redis-server for the bench scripts that need one (bench_store.py, bench_erase.py):
on a free loopback port unless given one, nothing persisted, stopped on the way out."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_redis(port: int = 0) -> Iterator[str]:
    """A redis-server while the block runs; yields its URL (db 0)."""
    if shutil.which("redis-server") is None:
        raise SystemExit("needs redis-server on PATH (apt-get install -y redis-server)")
    port = port or free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)
