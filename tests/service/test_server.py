"""SIGTERM under load against a real `r2ec serve` process (uvicorn, the tiny model), issue 13
row C: with 16 reasoning requests in flight, every one completes or gets a JSON 503 with
Retry-After (8 of them streams: their last event is `done` or a `shutting_down` error), and the
process exits. (uvicorn alone cancels what is left after its timeout,
and the clients get a plain-text 500 or a dropped connection.)"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import free_port, serve_env, wait_for
from tests.service.test_app import metric
from tests.service.test_stream import parse_sse

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def r2ec_serve(env: dict[str, str], port: int, log_path: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """A real `r2ec serve` process on `port`, ready, with its output in `log_path`; killed on the
    way out if it is still running."""
    with log_path.open("w") as log:
        cmd = [sys.executable, "-m", "cli", "serve", "--port", str(port)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, "the server exited while starting"
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, "the server to be ready", timeout_s=120)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_sigterm_with_16_reasoning_requests_in_flight(tiny_ckpt, tiny_dataset, tmp_path):
    items = [str(i) for i in tiny_dataset.items["item_id"]]
    # 16 different histories, so no two requests share a prompt (and the cache is off anyway)
    histories = [[i] for i in items] + [[items[0], i] for i in items[1:]]
    histories = histories[:16]
    assert len(histories) == 16
    port = free_port()
    env = serve_env(
        tiny_ckpt,
        max_batch="1",  # 16 batches in a row: more work than any grace here allows
        max_wait_ms="50",
        max_reasoning_tokens="1024",  # ~1-3 s per request of the tiny model on 2 cores
        reasoning_token_limit="1024",
        cache_size="0",
        shutdown_grace_s="4",
        log_level="INFO",
    )
    replies: list[httpx.Response | Exception] = []
    with r2ec_serve(env, port, tmp_path / "serve.log") as (proc, base):

        def ask(history: list[str], route: str) -> None:
            body = {"history": [{"item_id": i} for i in history], "k": 3}
            try:
                replies.append(httpx.post(f"{base}{route}", json=body, timeout=120))
            except Exception as exc:  # a dropped connection is a failure to report, not to raise here
                replies.append(exc)

        # half of them streams: a stream in flight gets its answer or an error event, never a cut
        routes = ["/recommend", "/recommend/stream"] * 8
        threads = [threading.Thread(target=ask, args=(h, r)) for h, r in zip(histories, routes, strict=True)]
        for t in threads:
            t.start()

        def all_in_the_batcher() -> bool:  # started batches + queue = every request
            text = httpx.get(f"{base}/metrics", timeout=5).text
            return (metric(text, "r2ec_batch_size_sum") or 0) + metric(text, "r2ec_queue_depth") >= 16

        wait_for(all_in_the_batcher, "the 16 requests to reach the batcher", timeout_s=120)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(180)
        returncode = proc.wait(180)
    output = (tmp_path / "serve.log").read_text()
    assert len(replies) == 16
    answered = refused = streamed = 0
    for r in replies:
        assert isinstance(r, httpx.Response), f"{r!r}\n{output[-3000:]}"
        if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
            streamed += 1
            events = parse_sse(r.text)  # every stream was accepted (queued) before the signal
            names = [n for n, _ in events]
            assert names and names[-1] in ("done", "error"), f"a stream was cut: {r.text}\n{output[-3000:]}"
            if names[-1] == "done":
                assert names[-2] == "items" and len(events[-2][1]["items"]) == 3
                answered += 1
            else:
                assert events[-1][1]["error"]["code"] == "shutting_down", r.text
                refused += 1
        elif r.status_code == 200:
            assert len(r.json()["items"]) == 3 and r.json()["reasoning"] is not None
            answered += 1
        else:
            assert r.status_code == 503, f"{r.status_code} {r.text}\n{output[-3000:]}"
            assert r.headers["content-type"] == "application/json"
            assert json.loads(r.text)["error"]["code"] == "shutting_down"
            assert int(r.headers["retry-after"]) >= 1
            refused += 1
    assert answered + refused == 16 and streamed == 8
    assert returncode in (0, -signal.SIGTERM), output[-3000:]  # uvicorn re-raises the signal it got
    assert "draining: " in output and "Traceback" not in output, output[-3000:]
    # the drain's closing line: every request the deadline cut got a 503, none was dropped
    over = re.search(
        r"drain over after .*: of (\d+) .*, (\d+) answered, (\d+) refused at once .*, (\d+) cut .*, "
        r"(\d+) left .*; (\d+) new",
        output,
    )
    assert over, output[-3000:]
    in_flight, drained, at_once, cut, left, new = map(int, over.groups())
    cut += at_once  # refused when the drain began, as the grace could not reach them
    # the opening line counts the same requests: the decode's joining ones were left out
    began = re.search(r"draining: (\d+) queued, (\d+) running", output)
    assert began and int(began[1]) + int(began[2]) == in_flight, output[-3000:]
    assert (cut, left, new) == (refused, 0, 0) and drained + cut == in_flight and drained <= answered
    print(f"SIGTERM with 16 in flight: {answered} answered, {refused} refused with 503")


def test_json_logs_of_a_real_server_from_start_to_exit(tiny_ckpt, tmp_path):
    """R2EC_LOG_FORMAT=json: every line of `r2ec serve`, uvicorn's included, is one JSON object;
    each request has its access line (probes only at DEBUG), and the exit says how the drain ended."""
    port = free_port()
    env = serve_env(tiny_ckpt, log_format="json", max_reasoning_tokens="4", shutdown_grace_s="2")
    with r2ec_serve(env, port, tmp_path / "serve.log") as (proc, base):
        body = {"history": [{"item_id": "i1"}], "k": 2}
        r = httpx.post(f"{base}/recommend", json=body, headers={"x-request-id": "findme-123"}, timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.get(f"{base}/users/u1/history", timeout=10).status_code == 200
        assert httpx.get(f"{base}/nope", timeout=10).status_code == 404
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(60)
    output = (tmp_path / "serve.log").read_text()
    assert returncode in (0, -signal.SIGTERM), output[-3000:]
    lines = [json.loads(line) for line in output.splitlines()]  # every line: one object
    assert all(list(r)[:4] == ["timestamp", "level", "logger", "message"] for r in lines), output
    access = [r for r in lines if r["logger"] == "service.access"]
    assert [(r["method"], r["route"], r["status"], r["code"]) for r in access] == [
        ("POST", "/recommend", 200, None),
        ("GET", "/users/{user_id}/history", 200, None),
        ("GET", "unmatched", 404, "not_found"),
    ], output  # the /readyz polls: DEBUG, not shown at INFO
    assert access[0]["request_id"] == "findme-123" and access[0]["duration_ms"] > 0
    assert access[1]["path"] == "/users/{user_id}/history"  # no user id in a log line
    assert not any(r["logger"] == "uvicorn.access" or r["logger"] == "faiss.loader" for r in lines), output
    messages = [r["message"] for r in lines]
    assert any(m.startswith("Finished server process") for m in messages), output  # uvicorn's, as JSON
    assert any(m.startswith("drain over after") for m in messages), output


def test_serve_turns_transformers_progress_bars_off(tiny_ckpt, monkeypatch):
    """A load through from_pretrained (SmolLM2, each reload too) drew transformers' "Loading
    weights" bar into the server's log: a line neither text log nor JSON."""
    from transformers.utils import logging as hf_logging

    from service import server
    from service.app import create_app
    from tests.service.conftest import settings_for

    monkeypatch.setattr(server.DrainingServer, "run", lambda self: None)
    hf_logging.enable_progress_bar()
    try:
        settings = settings_for(tiny_ckpt)
        server.run(create_app(settings), settings, "127.0.0.1", free_port())
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_serve_passes_the_connection_limits_to_uvicorn(tiny_ckpt, monkeypatch):
    """R2EC_LIMIT_CONCURRENCY, R2EC_KEEP_ALIVE_TIMEOUT_S and R2EC_BACKLOG reach uvicorn's Config
    (no setting reached them: the SRE's 170 stalled sockets had no cap); a bad value names its
    setting."""
    from pydantic import ValidationError

    from service import server
    from service.app import create_app
    from tests.service.conftest import settings_for

    configs = []
    monkeypatch.setattr(server.DrainingServer, "run", lambda self: configs.append(self.config))
    settings = settings_for(tiny_ckpt, limit_concurrency=64, keep_alive_timeout_s=7, backlog=128)
    server.run(create_app(settings), settings, "127.0.0.1", free_port())
    (config,) = configs
    assert (config.limit_concurrency, config.timeout_keep_alive, config.backlog) == (64, 7, 128)
    for name, bad in [("limit_concurrency", 1), ("body_timeout_s", 0), ("backlog", 0)]:
        with pytest.raises(ValidationError, match=name):
            settings_for(tiny_ckpt, **{name: bad})


def test_serve_warns_when_openmp_spins_on_a_busy_host(tiny_ckpt, monkeypatch, caplog):
    """The spinning `r2ec serve` sets by default made every step 4x slower beside other work
    (SRE journey 39, finding 7): a WARNING says so at startup when the load average shows a
    busy host, and nothing where the host is idle or the threads sleep (GOMP_SPINCOUNT=0)."""
    import logging
    import os

    from service import server
    from service.app import create_app
    from tests.service.conftest import settings_for

    warning = server.spin_warning
    assert warning({"GOMP_SPINCOUNT": "10000"}, 5.5, 2, 2) is not None  # the SRE's host
    assert "load average is 5.5 on 2 CPUs" in warning({"GOMP_SPINCOUNT": "10000"}, 5.5, 2, 2)
    assert warning({"GOMP_SPINCOUNT": "10000"}, 0.3, 2, 2) is None  # idle: background noise
    assert warning({"GOMP_SPINCOUNT": "10000"}, 5.5, 16, 2) is None  # 14 CPUs to spare
    assert warning({"GOMP_SPINCOUNT": "0"}, 5.5, 2, 2) is None
    assert warning({}, 5.5, 2, 2) is None  # libgomp's own policy: PASSIVE (model/__init__.py)

    monkeypatch.setattr(server.DrainingServer, "run", lambda self: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    settings = settings_for(tiny_ckpt, threads=2)
    for spin, warned in (("10000", True), ("0", False)):
        monkeypatch.setenv("GOMP_SPINCOUNT", spin)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="service.server"):
            server.run(create_app(settings), settings, "127.0.0.1", free_port())
        assert any("GOMP_SPINCOUNT" in r.getMessage() for r in caplog.records) == warned, spin
