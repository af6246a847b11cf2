"""Client deadlines (service/deadline.py): `X-Request-Timeout` on POST /recommend and
/recommend/stream. A malformed value is a 400 naming the header; a deadline that passes while
the request waits behind a model the test holds is a 504 before the request takes a slot; one
that passes while the model works on it frees its decode slot. Real requests against the app
with the tiny model; every deadline passes while the test holds the model thread, so nothing
depends on how fast this machine is."""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time

import pytest

from service.deadline import HEADER, PATTERN, Deadline, DeadlineExceeded, InvalidHeader, parse_timeout
from service.store import Event
from service.types import Query
from tests.service.conftest import HeldModel, app_for, serve
from tests.service.test_app import H1, H2, H3, metric
from tests.service.test_stream import STREAM, parse_sse

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize(
    "value",
    [
        "abc",
        "",
        "-1",
        "+1",
        "0",
        "0.000",
        "1e3",
        "inf",
        "nan",
        "2s",
        "1.2345",
        "3600.001",
        "1 2",
        "٣".encode(),
    ],
)
async def test_a_malformed_or_out_of_range_timeout_is_a_400_naming_the_header(ckpt, value):
    app = app_for(ckpt)
    async with serve(app) as client:
        state = app.state.r2ec
        for path in ("/recommend", STREAM):
            r = await client.post(path, json={"history": H1}, headers={HEADER: value})
            assert r.status_code == 400, (path, value, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_header" and error["message"].startswith(f"{HEADER}: ")
            assert [f["field"] for f in error["fields"]] == [HEADER]
        assert state.batcher.batches == 0  # refused before the model was asked


async def test_a_timeout_sent_twice_is_refused_and_a_generous_one_is_answered(ckpt):
    app = app_for(ckpt)
    async with serve(app) as client:
        twice = [(HEADER, "5"), (HEADER, "10")]
        r = await client.post("/recommend", json={"history": H1}, headers=twice)
        assert r.status_code == 400 and "sent more than once" in r.json()["error"]["message"], r.text
        for value in ("30", "0.5", "3600"):  # the largest allowed too
            r = await client.post("/recommend", json={"history": H1, "k": 3}, headers={HEADER: value})
            assert r.status_code == 200, (value, r.text)
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_deadline_exceeded_total", reason="queued") == 0
        assert metric(text, "r2ec_deadline_exceeded_total", reason="decoding") == 0


async def test_a_deadline_that_passes_in_the_queue_is_a_504_before_it_takes_a_slot(ckpt):
    """H1's request holds the model (max_batch 1, R2EC_MAX_QUEUE_WAIT_S far off); H2's waits
    behind it with a deadline that passes meanwhile: 504 with Retry-After at the deadline, not
    when its turn comes, and the model never runs it."""
    app = app_for(ckpt, max_batch=1, cache_size=0)
    async with serve(app) as client:
        state = app.state.r2ec
        held = HeldModel(state)
        a = asyncio.create_task(client.post("/recommend", json={"history": H1}))
        await held.wait_entered()
        r = await client.post("/recommend", json={"history": H2}, headers={HEADER: "0.05"})
        assert r.status_code == 504, r.text
        error = r.json()["error"]
        assert error["code"] == "deadline_exceeded" and f"{HEADER} of 0.05 s" in error["message"]
        assert "before it took a decode slot" in error["message"] and int(r.headers["retry-after"]) >= 1
        held.release()
        assert (await a).status_code == 200
        assert (await client.post("/recommend", json={"history": H3})).status_code == 200
        assert state.batcher.batches == 2  # H1 and H3: H2 never ran
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_deadline_exceeded_total", reason="queued") == 1
        assert metric(text, "r2ec_deadline_exceeded_total", reason="decoding") == 0
        assert metric(text, "r2ec_recommend_errors_total", code="deadline_exceeded") == 1
        assert metric(text, "r2ec_rejected_total", reason="queue_timeout") == 0


async def test_a_deadline_that_passes_mid_decode_frees_the_slot(ckpt):
    """Continuous batching, one slot: the request is admitted and its first decode step held;
    its deadline passes there: 504 without Retry-After, and once the step goes on the slot is
    free for the next request."""
    app = app_for(ckpt, batching="continuous", max_batch=1, max_reasoning_tokens=200, cache_size=0)
    async with serve(app) as client:
        state = app.state.r2ec
        runner = state.engine.runner()
        decoder = runner.decoder
        gate, stepping = threading.Event(), threading.Event()

        def held(fn):
            def step(*args, **kwargs):
                stepping.set()
                gate.wait(60)
                return fn(*args, **kwargs)

            return step

        decode, extend = decoder.engine.decode, decoder.engine.extend
        decoder.engine.decode, decoder.engine.extend = held(decode), held(extend)
        body = {"history": H1, "max_reasoning_tokens": 200}
        try:
            r = await client.post("/recommend", json=body, headers={HEADER: "0.05"})
            assert r.status_code == 504, r.text
            error = r.json()["error"]
            assert error["code"] == "deadline_exceeded" and "its decode slot freed" in error["message"]
            assert "retry-after" not in r.headers
            assert stepping.is_set()  # it was in the decode, not the queue
        finally:
            decoder.engine.decode, decoder.engine.extend = decode, extend
            gate.set()
        r = await client.post("/recommend", json={"history": H2, "max_reasoning_tokens": 4})
        assert r.status_code == 200, r.text
        assert not runner.jobs and not decoder.active  # the dropped request left the decode
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_deadline_exceeded_total", reason="decoding") == 1
        assert metric(text, "r2ec_deadline_exceeded_total", reason="queued") == 0


async def test_a_stream_whose_deadline_passes_in_the_queue_ends_with_the_504_as_an_error_event(ckpt):
    app = app_for(ckpt, max_batch=1, cache_size=0)
    async with serve(app) as client:
        state = app.state.r2ec
        held = HeldModel(state)
        a = asyncio.create_task(client.post("/recommend", json={"history": H1}))
        await held.wait_entered()
        r = await client.post(STREAM, json={"history": H2}, headers={HEADER: "0.05"})
        assert r.status_code == 200, r.text  # the stream began once the request was queued
        events = parse_sse(r.text)
        assert [n for n, _ in events] == ["error"]
        error = events[0][1]["error"]
        assert error["status"] == 504 and error["code"] == "deadline_exceeded"
        held.release()
        assert (await a).status_code == 200
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_deadline_exceeded_total", reason="queued") == 1
        assert metric(text, "r2ec_stream_requests_total", outcome="error") == 1


async def test_a_deadline_already_past_is_not_queued(ckpt):
    """Through the service's own path (what the route calls): a deadline that passed before the
    request reached the queue (a slow history lookup) never takes a place in it."""
    app = app_for(ckpt)
    async with serve(app):
        state = app.state.r2ec
        query = Query(tuple(Event(h["item_id"]) for h in H1))
        past = Deadline(1.0, time.perf_counter() - 0.5)
        with pytest.raises(DeadlineExceeded) as err:
            await state.recommend(query, deadline=past)
        assert err.value.stage == "queued" and err.value.retry_after_s is not None
        assert state.batcher.batches == 0


async def test_the_openapi_document_describes_the_header_and_the_504(ckpt):
    app = app_for(ckpt)
    async with serve(app) as client:
        doc = (await client.get("/openapi.json")).json()
    for path in ("/recommend", STREAM):
        op = doc["paths"][path]["post"]
        (param,) = [p for p in op["parameters"] if p["name"] == HEADER]
        assert param["in"] == "header" and not param.get("required", False)
        assert "seconds" in param["description"] and "504 deadline_exceeded" in param["description"]
        assert param["schema"]["pattern"] == PATTERN
        assert "504" in op["responses"] and "X-Request-Timeout" in op["responses"]["504"]["description"]


async def test_the_documented_pattern_takes_exactly_the_values_the_service_takes():
    """The OpenAPI pattern and the rule as stated (a decimal number above 0 and at most 3600,
    at most 3 decimals) agree on every number around the edges and on random strings of
    digits and dots."""

    def stated(value: str) -> bool:
        return bool(re.fullmatch(r"[0-9]+(\.[0-9]{1,3})?", value)) and 0 < float(value) <= 3600

    rng = random.Random(0)
    values = {"0", "0.0", "0.001", "0.0001", "3600", "3600.0", "3600.000", "3600.001", "3601", "05", "00.5"}
    values |= {f"{n / 1000:.3f}" for n in range(0, 3_601_500, 997)} | {str(n) for n in range(0, 4000)}
    values |= {"".join(rng.choice("0123456789.") for _ in range(rng.randint(1, 9))) for _ in range(20000)}
    for value in values:
        try:
            taken = parse_timeout([value]) is not None
        except InvalidHeader:
            taken = False
        assert taken == stated(value) == bool(re.fullmatch(PATTERN, value)), value
