"""Service fixtures: a real redis-server on a loopback port, tiny checkpoints, app clients."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from tests.conftest import IN_CI, child_env

REDIS_BIN = shutil.which("redis-server")
# Locally a missing redis-server skips the Redis tests; under CI it fails them, so a broken CI
# image cannot turn the Redis half of the suite into silent skips.
NO_REDIS = "redis-server binary not found (apt-get install redis-server)"
needs_redis = [pytest.mark.redis, pytest.mark.skipif(REDIS_BIN is None and not IN_CI, reason=NO_REDIS)]
API_KEY = "test-key"
ADMIN = {"X-API-Key": API_KEY}


def serve_env(checkpoint, **settings: str) -> dict[str, str]:
    """The environment for an `r2ec serve` subprocess over `checkpoint` (tiny model, fp32, one
    thread), with no R2EC_* variable leaking in from the caller's shell; `settings` are extra
    R2EC_* values by their names without the prefix (max_batch="1" -> R2EC_MAX_BATCH=1)."""
    return child_env(
        {k: v for k, v in os.environ.items() if not k.startswith("R2EC_")},
        R2EC_CHECKPOINT=str(checkpoint),
        R2EC_DTYPE="float32",
        R2EC_THREADS="1",
        **{f"R2EC_{name.upper()}": value for name, value in settings.items()},
    )


# R2EC_TEST_PORTS=LOW-HIGH: take loopback ports from that range only (a machine shared with other
# work that sets a range aside); unset, any port the kernel gives. Read once: the tests' own
# fixture removes R2EC_* variables from the environment.
TEST_PORTS = os.environ.get("R2EC_TEST_PORTS", "")


def port_free(port: int) -> bool:
    """Whether a loopback TCP port can be bound now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    if TEST_PORTS:
        low, _, high = TEST_PORTS.partition("-")
        ports = list(range(int(low), int(high or low) + 1))
        random.shuffle(ports)  # tests run side by side need not race for the range's first port
        for port in ports:
            if port_free(port):
                return port
        raise RuntimeError(f"R2EC_TEST_PORTS={TEST_PORTS}: no free port in the range")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextmanager
def uvicorn_serving(app) -> Iterator[str]:
    """uvicorn serving `app` on a loopback port in a thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), "uvicorn to start")
        assert server.started, "uvicorn failed to start"
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive()


class RedisServer:
    """A throwaway redis-server: no persistence, loopback only; `stop()` kills it."""

    def __init__(self) -> None:
        if REDIS_BIN is None:
            if IN_CI:
                pytest.fail(f"CI=true but {NO_REDIS}")
            pytest.skip(NO_REDIS)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [
                REDIS_BIN,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            s.recv(16)

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate `proc` if it still runs, killing it after 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_dataset, tmp_path_factory) -> Path:
    """An untrained tiny-model checkpoint over the tiny catalog (fp32 so batching is exact)."""
    from model.checkpoint import create_base_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "base"
    create_base_checkpoint(out, "tiny", tiny_dataset.items, dtype="float32", progress=False)
    return out


@pytest.fixture
def ckpt(tiny_ckpt: Path, tmp_path: Path) -> Path:
    """A private copy, for tests that edit items (edits are saved beside the checkpoint)."""
    dest = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dest, ignore=shutil.ignore_patterns("index"))
    return dest


@pytest.fixture
def make_engine() -> Callable:
    from service.recommender import Recommender

    def make(path: Path, **kw):
        return Recommender.load(path, dtype="float32", **kw)

    return make


@pytest.fixture
def engine(ckpt, make_engine):
    return make_engine(ckpt)


def settings_for(ckpt: Path, **kw):
    from service.config import Settings

    base = {
        "checkpoint": ckpt,
        "dtype": "float32",
        "api_key": API_KEY,
        "max_reasoning_tokens": 8,
        "max_wait_ms": 5,
        # the micro-batch contract is what most app tests pin down; continuous batching has its
        # own (tests/service/test_continuous_app.py)
        "batching": "static",
    }
    return Settings(**{**base, **kw})


def app_for(ckpt: Path, **kw):
    from service.app import create_app

    return create_app(settings_for(ckpt, **kw))


def post_scope(path: str, body: bytes, *headers: tuple[bytes, bytes]) -> dict:
    """The ASGI scope of a POST of a JSON `body` to `path`, for tests that drive the app's
    receive/send by hand (a client that leaves mid-stream, a send that blocks)."""
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
        "root_path": "", "query_string": b"", "server": ("r2ec.test", 80), "client": ("127.0.0.1", 1),
        "headers": [(b"host", b"r2ec.test"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), *headers],
    }  # fmt: skip


@asynccontextmanager
async def serve(app) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and talk to it in process over ASGI."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://r2ec.test") as client:
            yield client


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
def app(request, ckpt):
    """The app over a private checkpoint copy, once with the in-process store, once with Redis."""
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    return app_for(ckpt, redis_url=redis_url, history_window=3)


@pytest_asyncio.fixture
async def client(app) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(app) as c:
        yield c


def _count_rows(obj, name: str) -> list[int]:
    """Wrap obj.name(prompt_ids, ...); the list collects each call's row count."""
    calls: list[int] = []
    original = getattr(obj, name)

    def counted(prompt_ids, *args):
        calls.append(len(prompt_ids))
        return original(prompt_ids, *args)

    setattr(obj, name, counted)
    return calls


def count_generate(engine) -> list[int]:
    """The generation backend's generate calls (static batching): each call's batch size."""
    return _count_rows(engine.backend, "generate")


def count_forward(engine) -> list[int]:
    """The backend's h_T passes for reasoning already written: each call's rows."""
    return _count_rows(engine.backend, "vectors")


class HeldModel:
    """Holds the model thread inside the next generate calls until `release()`; `restore()`
    puts back the generate it wrapped (a counting one, if count_generate came first)."""

    def __init__(self, state) -> None:
        self.gate, self.entered = threading.Event(), threading.Event()
        self.backend = state.engine.backend
        self.original = original = self.backend.generate

        def held(*args, **kwargs):
            self.entered.set()
            self.gate.wait(60)
            return original(*args, **kwargs)

        self.backend.generate = held

    def restore(self) -> None:
        self.backend.generate = self.original

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 60)

    def release(self) -> None:
        self.gate.set()


@pytest.fixture(autouse=True)
def _no_r2ec_env(monkeypatch):
    """Settings read R2EC_* variables; the tests must not pick up the machine's."""
    for name in list(os.environ):
        if name.startswith("R2EC_") and name not in ("R2EC_CACHE_DIR", "R2EC_DATA_DIR"):
            monkeypatch.delenv(name)
