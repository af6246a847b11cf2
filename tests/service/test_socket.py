"""Tests over a real TCP socket: uvicorn serving `create_app()` (model loaded by the lifespan,
Redis store), a recommendation, and a client that hangs up while its request waits for the
model, on /recommend and on /recommend/stream: the server notices the disconnect and never runs
that request."""

from __future__ import annotations

import threading

import httpx
import pytest

from service.app import create_app
from tests.service.conftest import (
    HeldModel,
    count_generate,
    needs_redis,
    settings_for,
    uvicorn_serving,
    wait_for,
)
from tests.service.test_app import H1, H2, H3, metric, requests

pytestmark = needs_redis


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
            calls = count_generate(state.engine)
            held = HeldModel(state)
            answers: list[httpx.Response] = []
            a = threading.Thread(
                target=lambda: answers.append(client.post("/recommend", json={"history": H2}))
            )
            a.start()
            assert held.entered.wait(60)
            # B queues behind A; its client gives up and closes the connection
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{base}/recommend", json={"history": H3}, timeout=2)
            wait_for(
                lambda: requests(client.get("/metrics").text, "/recommend", "499") == 1,
                "the server to see the disconnect",
            )
            held.release()
            a.join(60)
            assert answers and answers[0].status_code == 200, answers
            held.restore()
            assert client.post("/recommend", json={"history": H1 + H3}).status_code == 200
            assert calls == [1, 1]  # A and the last request; B never reached the model
            assert state.batcher.batches == 3  # the first request, A, the last one


def test_uvicorn_socket_a_stream_whose_client_hangs_up_is_cancelled(ckpt):
    """The same over SSE: stream B is accepted (200, text/event-stream) while A holds the model,
    its client closes the connection, sse-starlette notices and B's request is dropped."""
    app = create_app(settings_for(ckpt, max_wait_ms=1))
    with uvicorn_serving(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        state = app.state.r2ec
        calls = count_generate(state.engine)
        held = HeldModel(state)
        answers: list[httpx.Response] = []
        a = threading.Thread(target=lambda: answers.append(client.post("/recommend", json={"history": H2})))
        a.start()
        assert held.entered.wait(60)
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
        held.release()
        a.join(60)
        assert answers and answers[0].status_code == 200, answers
        r = client.post("/recommend/stream", json={"history": H1, "max_reasoning_tokens": 2})
        assert r.status_code == 200 and "event: done" in r.text
        assert calls == [1, 1]  # A and the last stream; B never reached the model
