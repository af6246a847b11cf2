"""Tests over a real TCP socket: uvicorn serving `create_app()` (model loaded by the lifespan,
Redis store), a recommendation, and a client that hangs up while its request waits for the
model, on /recommend and on /recommend/stream: the server notices the disconnect and never runs
that request."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from service.app import create_app
from tests.service.conftest import count_generate, free_port, needs_redis, settings_for
from tests.service.test_app import H1, H2, H3, metric, requests

pytestmark = needs_redis


def wait_for(predicate, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextmanager
def uvicorn_serving(app) -> Iterator[str]:
    """uvicorn serving `app` on a loopback port in a thread; yields the base URL."""
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


def hold_generate(state) -> tuple[list[int], threading.Event, threading.Event, Callable]:
    """Hold the model thread inside the next generate calls until `gate` is set: (the generate
    calls' batch sizes, gate, entered, the counting generate to restore)."""
    calls = count_generate(state.engine)
    counted = state.engine.backend.generate
    gate, entered = threading.Event(), threading.Event()

    def held(*args, **kwargs):
        entered.set()
        gate.wait(60)
        return counted(*args, **kwargs)

    state.engine.backend.generate = held
    return calls, gate, entered, counted


def test_uvicorn_socket_recommend_and_a_client_that_hangs_up(ckpt, redis_url):
    app = create_app(settings_for(ckpt, redis_url=redis_url, max_wait_ms=1))
    with uvicorn_serving(app) as base:
        with httpx.Client(base_url=base, timeout=60) as client:
            assert client.get("/readyz").json()["status"] == "ready"
            r = client.post("/recommend", json={"history": H1, "k": 3})
            assert r.status_code == 200, r.text
            assert len(r.json()["items"]) == 3 and r.json()["history_source"] == "request"

            # hold the model thread inside request A's generate call
            state = app.state.r2ec
            calls, gate, entered, counted = hold_generate(state)
            answers: list[httpx.Response] = []
            a = threading.Thread(
                target=lambda: answers.append(client.post("/recommend", json={"history": H2}))
            )
            a.start()
            assert entered.wait(60)
            # B queues behind A; its client gives up and closes the connection
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{base}/recommend", json={"history": H3}, timeout=2)
            wait_for(
                lambda: requests(client.get("/metrics").text, "/recommend", "499") == 1,
                "the server to see the disconnect",
            )
            gate.set()
            a.join(60)
            assert answers and answers[0].status_code == 200, answers
            state.engine.backend.generate = counted
            assert client.post("/recommend", json={"history": H1 + H3}).status_code == 200
            assert calls == [1, 1]  # A and the last request; B never reached the model
            assert state.batcher.batches == 3  # the first request, A, the last one


def test_uvicorn_socket_a_stream_whose_client_hangs_up_is_cancelled(ckpt):
    """The same over SSE: stream B is accepted (200, text/event-stream) while A holds the model,
    its client closes the connection, sse-starlette notices and B's request is dropped."""
    app = create_app(settings_for(ckpt, max_wait_ms=1))
    with uvicorn_serving(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        state = app.state.r2ec
        calls, gate, entered, _ = hold_generate(state)
        answers: list[httpx.Response] = []
        a = threading.Thread(target=lambda: answers.append(client.post("/recommend", json={"history": H2})))
        a.start()
        assert entered.wait(60)
        with httpx.Client(base_url=base, timeout=60) as other:
            with other.stream("POST", "/recommend/stream", json={"history": H3}) as b:
                assert b.status_code == 200
                assert b.headers["content-type"].startswith("text/event-stream")
                assert state.batcher.queue_depth == 1  # accepted: queued behind A
        # B's connection is closed
        wait_for(
            lambda: (
                metric(client.get("/metrics").text, "r2ec_stream_requests_total", outcome="disconnected") == 1
            ),
            "the server to see the stream's client leave",
        )
        gate.set()
        a.join(60)
        assert answers and answers[0].status_code == 200, answers
        r = client.post("/recommend/stream", json={"history": H1, "max_reasoning_tokens": 2})
        assert r.status_code == 200 and "event: done" in r.text
        assert calls == [1, 1]  # A and the last stream; B never reached the model
