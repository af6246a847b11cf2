"""The service's log lines (the on-call review, journey 37 F6): one access line per request with
its id, route template, status, error code and duration; probes at DEBUG; a rate-limited WARNING
while the store is down or the queue sheds; text or JSON lines for the app and uvicorn alike."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from service.logs import Throttled
from tests.conftest import child_env
from tests.service.conftest import app_for, serve
from tests.service.test_app import H1, H3, one_running_one_queued

ROOT = Path(__file__).resolve().parents[2]


def access_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "service.access"]


@pytest.mark.asyncio
async def test_one_access_line_per_request_with_id_route_template_status_code_and_duration(ckpt, caplog):
    app = app_for(ckpt)
    caplog.set_level(logging.DEBUG, logger="service")  # after create_app, which sets R2EC_LOG_LEVEL
    async with serve(app) as client:
        caplog.clear()
        r = await client.post(
            "/recommend", json={"history": H1, "k": 2}, headers={"x-request-id": "findme-123"}
        )
        assert r.status_code == 200, r.text
        bad = {"user_id": "nobody-here", "k": 2}
        r = await client.post("/recommend", json=bad, headers={"x-request-id": "findme-456"})
        assert r.status_code == 422
        assert (await client.get("/users/u%0A1/history")).status_code == 422  # a control character
        assert (await client.get("/users/alice%40example.com/history")).status_code == 200
        # a path DELETE /users/{user_id} serves (an id may hold "/"), not GET: no route
        assert (await client.get("/users/alice%40example.com/nothing")).status_code == 405
        assert (await client.get("/no/such/path")).status_code == 404
        assert (await client.get("/items/x%0Ay")).status_code == 422  # escaped in the line
        big = b"x" * 2_000_000  # over R2EC_MAX_BODY_BYTES (1 MiB)
        r = await client.post("/recommend", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert (await client.get("/openapi.json")).status_code == 200
        for probe in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(probe)).status_code == 200
    lines = access_lines(caplog)
    assert len(lines) == 12, [r.getMessage() for r in lines]
    ok, empty, bad_id, users, users_unmatched, unmatched, bad_item, too_large, spec, *probes = lines

    assert ok.levelno == logging.INFO
    assert (ok.request_id, ok.method, ok.route, ok.path, ok.status, ok.code) == (
        "findme-123",
        "POST",
        "/recommend",
        "/recommend",
        200,
        None,
    )
    assert 0 < ok.duration_ms < 60_000
    assert (
        ok.getMessage() == f"POST /recommend 200 {ok.duration_ms:.1f} ms request=findme-123 path=/recommend"
    )

    assert (empty.request_id, empty.status, empty.code) == ("findme-456", 422, "empty_history")
    assert "POST /recommend 422 empty_history " in empty.getMessage()
    # the route template, as the latency metric labels it; no user id in a line (a log outlives
    # the user's erasure): under /users/ the template stands for the path too
    assert (bad_id.route, bad_id.path, bad_id.code) == (
        "/users/{user_id}/history",
        "/users/{user_id}/history",
        "invalid_request",
    )
    assert "\n" not in bad_id.getMessage()
    assert (users.route, users.path, users.status) == ("/users/{user_id}/history",) * 2 + (200,)
    # a 405 is labelled by the route whose path it named; its path is the template, no id
    assert (users_unmatched.route, users_unmatched.path, users_unmatched.status) == (
        "/users/{user_id}",
        "/users/{user_id}",
        405,
    )
    assert not [r for r in caplog.records if "alice" in r.getMessage() or "alice" in str(r.__dict__)]
    assert (unmatched.route, unmatched.path, unmatched.status, unmatched.code) == (
        "unmatched",
        "/no/such/path",
        404,
        "not_found",
    )
    assert (bad_item.route, bad_item.path) == ("/items/{item_id}", "/items/x\\ny")
    assert "\n" not in bad_item.getMessage()
    # refused before routing, labelled by the route its path and method name all the same
    assert (too_large.route, too_large.status, too_large.code) == ("/recommend", 413, "body_too_large")
    assert (spec.route, spec.status) == ("/openapi.json", 200)  # FastAPI's own route, not "unmatched"
    assert len({r.request_id for r in lines}) == 12  # each request its own (made-up) id
    assert [(p.route, p.levelno) for p in probes] == [
        (p, logging.DEBUG) for p in ("/healthz", "/readyz", "/metrics")
    ]


@pytest.mark.asyncio
async def test_a_crash_is_logged_as_a_500_internal_error(ckpt, caplog, monkeypatch):
    app = app_for(ckpt)
    caplog.set_level(logging.DEBUG, logger="service")
    async with serve(app) as client:
        monkeypatch.setattr(app.state.r2ec, "readiness", None)  # /readyz calls it: TypeError
        caplog.clear()
        with pytest.raises(TypeError):  # httpx's ASGITransport re-raises what the app raised
            await client.get("/readyz")
    (line,) = access_lines(caplog)
    assert (line.route, line.status, line.code) == ("/readyz", 500, "internal_error")
    assert line.levelno == logging.DEBUG  # a probe's line, even a failed one (its ERROR line says more)


@pytest.mark.asyncio
async def test_a_store_outage_logs_a_warning_at_most_every_10_seconds(ckpt, caplog):
    app = app_for(ckpt, redis_url="redis://127.0.0.1:18451/0")  # nothing listens there
    async with serve(app) as client:
        caplog.clear()
        for _ in range(3):
            r = await client.post("/recommend", json={"user_id": "u1"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
        for _ in range(3):  # answered without the user's seen items: the same outage, no more lines
            r = await client.post("/recommend", json={"user_id": "u1", "history": H1, "reasoning": False})
            assert r.status_code == 200, r.text
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "service.state"
    ]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(
        "history store down: requests that need it get 503 store_unavailable, those that carry "
        "their history are answered without the user's other seen items: redis"
    )
    assert warnings[0].endswith("(1 since the last such line)")
    assert [r.code for r in access_lines(caplog)] == ["store_unavailable"] * 3 + [None] * 3


@pytest.mark.asyncio
async def test_queue_full_shedding_logs_a_warning_when_it_starts(ckpt, caplog):
    app = app_for(ckpt, max_batch=1, max_queue=1, cache_size=0)
    async with serve(app) as client:
        state = app.state.r2ec
        held, a, b = await one_running_one_queued(state, client)
        caplog.clear()
        for _ in range(2):
            r = await client.post("/recommend", json={"history": H3})
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        held.release()
        await asyncio.gather(a, b)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("queue full: shedding requests (503 overloaded)"), (
        warnings
    )
    assert "store" not in warnings[0]  # told apart from an outage's 503s


def test_throttled_logs_once_per_interval_with_the_count_it_stands_for(caplog):
    now = [0.0]
    throttled = Throttled(logging.getLogger("t"), every_s=10, clock=lambda: now[0])
    for t in (0, 1, 2, 9.9, 10, 10.5, 30):
        now[0] = t
        throttled.warn("down: %s", "why")
    assert [r.getMessage() for r in caplog.records] == [
        "down: why (1 since the last such line)",
        "down: why (4 since the last such line)",  # 1, 2, 9.9 and 10
        "down: why (the first after 20s without one; 1 more came after the previous line)",  # 10.5
    ]
    now[0] = 31
    throttled.warn("down: %s", "why")  # within the window of the line at 30: held back
    now[0] = 40.5
    throttled.warn("down: %s", "why")  # no quiet spell (9.5 s): the incident goes on
    assert caplog.records[-1].getMessage() == "down: why (2 since the last such line)"


LOGGING_SCRIPT = """
import logging
from service.logs import setup_logging
setup_logging("INFO", "{fmt}")
setup_logging("INFO", "{fmt}")  # again (the CLI, then service/server.py): still one handler
colour = {{"color_message": "\\x1b[1m7"}}  # uvicorn's ANSI copy of the message
logging.getLogger("uvicorn.error").info("Started server process [%d]", 7, extra=colour)
logging.getLogger("service.access").info("GET /x 200", extra={{"request_id": "r1", "status": 200}})
logging.getLogger("faiss.loader").info("Could not load library with AVX512 support due to: ...")
"""


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_lines_in_either_format_for_the_app_and_uvicorn_alike(fmt):
    out = subprocess.run(
        [sys.executable, "-c", LOGGING_SCRIPT.format(fmt=fmt)],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    lines = out.stderr.splitlines()
    assert len(lines) == 2, out.stderr  # faiss's INFO line is not there
    if fmt == "text":
        assert lines[0].endswith(" INFO uvicorn.error: Started server process [7]")
        assert lines[0][:4].isdigit()  # a timestamp first, as every line of the app's
        return
    started, access = map(json.loads, lines)
    assert list(started) == ["timestamp", "level", "logger", "message"]  # no color_message
    assert started["timestamp"].endswith("+00:00") and started["level"] == "INFO"
    assert started["logger"] == "uvicorn.error" and started["message"] == "Started server process [7]"
    assert access["request_id"] == "r1" and access["status"] == 200


def test_a_path_under_users_is_never_logged_with_its_id():
    from service.access_log import logged_path

    assert logged_path("/users/alice@example.com/history", "/users/{user_id}/history") == (
        "/users/{user_id}/history"
    )
    assert logged_path("/users/alice@example.com/x/y", "unmatched") == "/users/..."
    assert logged_path("/items/a\nb", "/items/{item_id}") == "/items/a\\nb"  # other paths: escaped
