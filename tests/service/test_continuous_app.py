"""The service with continuous batching (R2EC_BATCHING=continuous, the default): the same answers
as static batching, requests decoding side by side, token-level streaming, a client that leaves
freeing its decode slot, and the metrics. In process over ASGI; nothing here is timed."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest

from service.store import Event
from service.types import Query
from tests.service.conftest import app_for, serve
from tests.service.test_app import CONCURRENT, H1, H2, assert_same_answer, metric
from tests.service.test_stream import STREAM, assert_order, parse_sse

pytestmark = pytest.mark.asyncio


async def test_continuous_answers_equal_static_ones_under_concurrency(ckpt):
    answers = {}
    for mode in ("static", "continuous"):
        app = app_for(ckpt, batching=mode, max_batch=3, cache_size=0)
        async with serve(app) as client:
            state = app.state.r2ec
            assert state.continuous == (mode == "continuous")
            replies = await asyncio.gather(*(client.post("/recommend", json=b) for b in CONCURRENT))
            assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
            answers[mode] = [r.json() for r in replies]
            if mode == "continuous":
                text = (await client.get("/metrics")).text
                # 6 requests through 3 slots: they joined a running decode, several at a time
                assert metric(text, "r2ec_batch_size_count") == len(CONCURRENT)
                assert metric(text, "r2ec_batch_size_sum") > len(CONCURRENT)
                assert metric(text, "r2ec_generate_seconds_count") == 5  # the 5 reasoning requests
                assert state.batcher.ticks > 1
    for s, c in zip(answers["static"], answers["continuous"], strict=True):
        assert_same_answer(s, c)
        assert s["reasoning"] == c["reasoning"] and s["reasoning_tokens"] == c["reasoning_tokens"]
        assert s["cache"] == c["cache"]


async def test_a_continuous_stream_sends_the_reasoning_token_by_token(ckpt):
    app = app_for(ckpt, batching="continuous", max_reasoning_tokens=16)
    async with serve(app) as client:
        r = await client.post(STREAM, json={"history": H1, "k": 4})
        assert r.status_code == 200, r.text
        events = parse_sse(r.text)
        assert_order(events)
        pieces = [d["text"] for n, d in events if n == "reasoning"]
        reply = (await client.post("/recommend", json={"history": H1, "k": 4})).json()
    assert "".join(pieces) == reply["reasoning"]
    assert reply["cache"] == "hit"
    if reply["reasoning_tokens"] > 3:
        assert len(pieces) > 1  # written as it was decoded, not in one piece at the end
    assert events[-2][1]["items"] == reply["items"]


async def test_a_client_that_leaves_mid_decode_frees_its_slot(ckpt):
    app = app_for(ckpt, batching="continuous", max_batch=1, max_reasoning_tokens=200, cache_size=0)
    async with serve(app) as client:
        state = app.state.r2ec
        runner = state.engine.runner()
        gone = asyncio.Event()
        long = asyncio.create_task(
            state.recommend(
                Query(tuple(Event(h["item_id"]) for h in H1), max_reasoning_tokens=200),
                wait_disconnect=gone.wait,
            )
        )
        while not runner.decoder.active:  # admitted and decoding
            await asyncio.sleep(0.001)
        gone.set()
        with pytest.raises(Exception) as err:
            await long
        assert type(err.value).__name__ == "ClientDisconnected"
        # the one slot is free again: the next request decodes and is answered
        r = await client.post("/recommend", json={"history": H2, "max_reasoning_tokens": 4})
        assert r.status_code == 200, r.text
        assert not runner.decoder.active and not runner.jobs


async def test_a_failing_decode_fails_its_requests_and_the_service_goes_on(ckpt):
    app = app_for(ckpt, batching="continuous")
    async with serve(app) as client:
        decoder = app.state.r2ec.engine.runner().decoder
        original = decoder.step

        def explode():
            raise RuntimeError("decode failed (simulated)")

        decoder.step = explode
        r = await client.post("/recommend", json={"history": H1})
        assert r.status_code == 500 and "decode failed" not in r.text  # the log has it, not the client
        assert r.json()["error"]["message"] == f"internal error (request {r.headers['x-request-id']})"
        decoder.step = original
        r = await client.post("/recommend", json={"history": H2})
        assert r.status_code == 200, r.text
        runner = app.state.r2ec.engine.runner()  # the failed request was dropped from the decode
        assert not runner.jobs and not decoder.active and not decoder.waiting


@pytest.mark.parametrize("per_tick", [1, 3])
async def test_a_running_decode_steps_between_the_prefills_of_a_burst(ckpt, per_tick):
    """R2EC_MAX_PREFILL_PER_TICK, with R2EC_PREFILL_BATCH_TOKENS=0 (each no-reasoning request
    prefilled alone, an admission like any other): a burst of them is prefilled `per_tick` at a
    time, with a decode step of the running request between, not all before its next token
    (docs/architecture.md §4.2.2). Counted on the decoder, not timed."""
    app = app_for(
        ckpt,
        batching="continuous",
        max_batch=8,
        max_reasoning_tokens=200,
        cache_size=0,
        max_prefill_per_tick=per_tick,
        prefill_batch_tokens=0,
    )
    async with serve(app) as client:
        state = app.state.r2ec
        decoder = state.engine.runner().decoder
        calls: list[str] = []
        gate = threading.Event()  # the first decode step waits for it: the burst queues meanwhile
        admit = decoder._admit

        def prefill(seq):
            calls.append("prefill")
            return admit(seq)

        def stepping(fn):
            def step(*args, **kwargs):
                calls.append("step")
                gate.wait(30)
                return fn(*args, **kwargs)

            return step

        decoder._admit = prefill
        decoder.engine.decode = stepping(decoder.engine.decode)
        decoder.engine.extend = stepping(decoder.engine.extend)  # a speculative step
        body = {"history": H1, "max_reasoning_tokens": 200}
        long = asyncio.create_task(client.post("/recommend", json=body))
        while "step" not in calls:  # admitted, its first step held
            await asyncio.sleep(0.001)
        histories = [[{"item_id": f"i{n}"}, {"item_id": f"i{n + 1}"}] for n in range(1, 7)]
        burst = [
            asyncio.create_task(client.post("/recommend", json={"history": h, "reasoning": False}))
            for h in histories
        ]
        while state.batcher.queue_depth < len(burst):
            await asyncio.sleep(0.001)
        gate.set()
        replies = await asyncio.gather(*burst)
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        assert (await long).status_code == 200
    first, last = 1, len(calls) - 1 - calls[::-1].index("prefill")  # the burst's prefills
    window = calls[first : last + 1]
    assert window.count("prefill") == len(burst)
    runs = [len(list(g)) for k, g in itertools.groupby(window) if k == "prefill"]
    assert max(runs) == per_tick  # at most that many prefills before the running row's next step


async def test_a_burst_without_reasoning_shares_prefills_within_the_token_budget(ckpt):
    """R2EC_PREFILL_BATCH_TOKENS: a burst of no-reasoning requests beside a running decode is
    prefilled a few at a time in one forward each (`DecoderEngine.prefill_many`), each forward
    within the budget of positions, with a decode step of the running request between; they
    take no slot (one here, held by the running request). Counted on the engine, not timed."""
    budget = 100  # the tiny prompts compute ~30-45 positions after the shared head
    app = app_for(
        ckpt, batching="continuous", max_batch=1, max_reasoning_tokens=200, cache_size=0,
        prefill_batch_tokens=budget,
    )  # fmt: skip
    async with serve(app) as client:
        state = app.state.r2ec
        engine = state.engine.runner().decoder.engine
        calls: list[tuple[str, int, int]] = []  # ("prefill", prompts, positions) or ("step", 0, 0)
        gate = threading.Event()  # the first decode step waits for it: the burst queues meanwhile
        many = engine.prefill_many

        def prefill_many(prompts, **kwargs):
            positions = sum(engine.computed_tokens(p, reuse_prefix=True) for p in prompts)
            calls.append(("prefill", len(prompts), positions))
            return many(prompts, **kwargs)

        def stepping(fn):
            def step(*args, **kwargs):
                calls.append(("step", 0, 0))
                gate.wait(30)
                return fn(*args, **kwargs)

            return step

        engine.prefill_many = prefill_many
        engine.decode = stepping(engine.decode)
        engine.extend = stepping(engine.extend)  # a speculative step
        long = asyncio.create_task(
            client.post("/recommend", json={"history": H1, "max_reasoning_tokens": 200})
        )
        while not calls:  # admitted, its first step held
            await asyncio.sleep(0.001)
        histories = [[{"item_id": f"i{n}"}, {"item_id": f"i{n + 1}"}] for n in range(1, 8)]
        burst = [
            asyncio.create_task(client.post("/recommend", json={"history": h, "reasoning": False, "k": 5}))
            for h in histories
        ]
        while state.batcher.queue_depth < len(burst):
            await asyncio.sleep(0.001)
        gate.set()
        replies = await asyncio.gather(*burst)
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        assert all(r.json()["cache"] == "off" and len(r.json()["items"]) == 5 for r in replies)
        assert (await long).status_code == 200
    forwards = [(n, positions) for kind, n, positions in calls if kind == "prefill"]
    assert sum(n for n, _ in forwards) == len(burst)
    assert 1 < len(forwards) < len(burst) and max(n for n, _ in forwards) > 1  # shared, in parts
    assert all(positions <= budget or n == 1 for n, positions in forwards)
    # the running request stepped between every two forwards of the burst
    assert ("prefill", "prefill") not in itertools.pairwise(kind for kind, _, _ in calls)
