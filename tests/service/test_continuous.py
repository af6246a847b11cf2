"""The ContinuousBatcher contract (service/continuous.py) with a counting runner instead of a model:
item n decodes for n steps and answers 10 * n; a negative item is refused at admission."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import pytest

from service.batcher import BatcherClosed, BatchFailed, QueueFull, QueueTimeout, ShuttingDown
from service.continuous import ContinuousBatcher, Running

pytestmark = pytest.mark.asyncio


class Counter:
    def __init__(self, gate: threading.Event | None = None, fail_at_step: int | None = None) -> None:
        self.left: dict[int, int] = {}
        self.items: dict[int, int] = {}
        self.ids = itertools.count()
        self.steps: list[list[int]] = []  # the items advanced together, per step
        self.cancelled: list[int] = []
        self.threads: set[str] = set()
        self.gate = gate
        self.fail_at_step = fail_at_step

    def add(self, item: int):
        self.threads.add(threading.current_thread().name)
        if item < 0:
            return ValueError(f"bad {item}")
        if item == 0:
            return 0
        handle = next(self.ids)
        self.left[handle], self.items[handle] = item, item
        return Running(handle)

    def step(self):
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail_at_step is not None and len(self.steps) == self.fail_at_step:
            self.steps.append([])
            raise RuntimeError("boom")
        self.steps.append(sorted(self.items[h] for h in self.left))
        done = []
        for h in list(self.left):
            self.left[h] -= 1
            if self.left[h] == 0:
                del self.left[h]
                done.append((h, 10 * self.items[h]))
        return done

    def cancel(self, handle):
        self.cancelled.append(self.items[handle])
        self.left.pop(handle, None)

    @property
    def idle(self):
        return not self.left


async def started(b: ContinuousBatcher) -> ContinuousBatcher:
    await b.start()
    return b


async def test_a_short_request_joins_and_leaves_while_a_long_one_decodes():
    runner = Counter()
    sizes: list[int] = []
    b = await started(ContinuousBatcher(4, lambda: runner, on_batch=sizes.append))
    try:
        long = b.submit(500)
        while b.ticks < 3:
            await asyncio.sleep(0.001)
        short = b.submit(2)
        assert await short == 20
        assert not long.done()  # the short one did not wait for the long one's batch
        assert await long == 5000
    finally:
        await b.stop()
    assert [2, 500] in runner.steps  # they decoded side by side
    assert sizes == [1, 2] and b.batches == 2
    assert runner.threads and all(t.startswith("r2ec-batch") for t in runner.threads)


async def test_a_tick_runs_several_steps_while_nothing_changes():
    runner = Counter()
    b = await started(ContinuousBatcher(4, lambda: runner, steps_per_tick=8))
    try:
        assert await b.submit(20) == 200
        assert len(runner.steps) == 20 and b.ticks == 3  # 8 + 8 + 4 steps, then the answer
        runner.gate = threading.Event()  # the next step waits for it
        long = b.submit(100)
        while not runner.left:  # admitted; its tick's first step is held
            await asyncio.sleep(0.001)
        short = b.submit(1)  # arrives during that tick: the tick ends after this step
        await asyncio.sleep(0.01)
        runner.gate.set()
        assert await short == 10 and not long.done()
        assert await long == 1000
    finally:
        await b.stop()
    assert runner.steps[20:22] == [[100], [1, 100]]  # joined at the very next step, not 8 later
    with pytest.raises(ValueError, match="steps_per_tick"):
        ContinuousBatcher(2, Counter, steps_per_tick=0)


async def test_at_most_slots_decode_at_once_and_every_request_is_answered():
    runner = Counter()
    b = await started(ContinuousBatcher(2, lambda: runner))
    try:
        results = await asyncio.gather(*(b.submit(n) for n in (3, 1, 2, 4, 1)))
    finally:
        await b.stop()
    assert results == [30, 10, 20, 40, 10]
    assert max(len(s) for s in runner.steps) == 2


async def test_immediate_outputs_and_per_request_errors():
    b = await started(ContinuousBatcher(2, Counter))
    try:
        ok, bad, none = b.submit(1), b.submit(-1), b.submit(0)
        assert await ok == 10 and await none == 0
        with pytest.raises(ValueError, match="bad -1"):
            await bad
    finally:
        await b.stop()


async def test_the_queue_is_bounded_beyond_the_slots():
    gate = threading.Event()
    runner = Counter(gate=gate)
    b = await started(ContinuousBatcher(1, lambda: runner, max_queue=2))
    try:
        first = b.submit(1)
        while not runner.left:  # admitted, its step held by the gate
            await asyncio.sleep(0.001)
        queued = [b.submit(1), b.submit(1)]
        with pytest.raises(QueueFull) as err:
            b.submit(1)
        assert err.value.retry_after_s >= 1.0
        gate.set()
        assert await asyncio.gather(first, *queued) == [10, 10, 10]
    finally:
        gate.set()
        await b.stop()


async def test_a_cancelled_request_leaves_at_the_next_tick_and_frees_its_slot():
    runner = Counter()
    b = await started(ContinuousBatcher(1, lambda: runner))
    try:
        doomed = b.submit(1000)
        while b.ticks < 2:
            await asyncio.sleep(0.001)
        waiting_cancel = b.submit(5)
        waiting_cancel.cancel()  # never admitted
        after = b.submit(3)
        doomed.cancel()
        assert await after == 30
    finally:
        await b.stop()
    assert runner.cancelled == [1000]
    assert all(5 not in s for s in runner.steps)


async def test_a_failing_step_fails_its_requests_and_the_loop_goes_on():
    runner = Counter(fail_at_step=1)
    b = await started(ContinuousBatcher(4, lambda: runner))
    try:
        victim = b.submit(5)
        with pytest.raises(BatchFailed, match="boom"):
            await victim
        assert await b.submit(2) == 20
        assert runner.cancelled == [5]  # the failed request was dropped from the runner too
    finally:
        await b.stop()


async def test_drain_refuses_new_requests_and_answers_or_refuses_the_rest():
    runner = Counter()
    b = await started(ContinuousBatcher(2, lambda: runner))
    try:
        quick, endless = b.submit(2), b.submit(10**9)
        b.drain(0.2)
        with pytest.raises(ShuttingDown):
            b.submit(1)
        assert await quick == 20
        with pytest.raises(ShuttingDown):
            await endless
    finally:
        await b.stop()


async def test_the_drain_line_counts_the_requests_joining_the_decode(caplog):
    """SIGTERM during the tick that admits them: they were in neither the queue nor the running
    list, and the line said "0 running" while 3 were decoding."""
    import logging

    gate = threading.Event()
    runner = Counter(gate=gate)
    b = await started(ContinuousBatcher(4, lambda: runner))
    try:
        futures = [b.submit(2) for _ in range(3)]
        while b.active < 3:  # admitted: the tick waits at the gate
            await asyncio.sleep(0.001)
        with caplog.at_level(logging.INFO, logger="service.batcher"):
            b.drain(30)
        assert "draining: 0 queued, 3 running" in caplog.text
        gate.set()
        assert await asyncio.gather(*futures) == [20, 20, 20]
    finally:
        gate.set()
        await b.stop()


async def test_a_new_runner_takes_new_requests_while_the_old_one_finishes():
    old, new = Counter(), Counter()
    current = [old]
    b = await started(ContinuousBatcher(4, lambda: current[0]))
    try:
        first = b.submit(20)
        while b.ticks < 2:
            await asyncio.sleep(0.001)
        current[0] = new  # a reload
        second = b.submit(3)
        assert await asyncio.gather(first, second) == [200, 30]
    finally:
        await b.stop()
    assert all(s == [20] for s in old.steps) and new.steps[0] == [3]


async def test_stop_fails_what_is_left():
    b = await started(ContinuousBatcher(1, Counter))
    pending = [b.submit(10**9), b.submit(1)]
    await asyncio.sleep(0.01)
    await b.stop()
    for f in pending:
        with pytest.raises(BatcherClosed):
            await f


async def test_active_counts_the_requests_joining_in_the_running_tick():
    """r2ec_batch_active reads `active`: requests admitted in the tick that runs now are on the
    model thread, though neither queued nor yet among the running."""
    gate = threading.Event()
    runner = Counter(gate=gate)
    b = await started(ContinuousBatcher(4, lambda: runner))
    try:
        answers = [b.submit(3), b.submit(2)]
        for _ in range(200):
            if b.active == 2:
                break
            await asyncio.sleep(0.01)
        assert b.active == 2 and b.queue_depth == 0  # held in their first tick by the gate
        gate.set()
        assert await asyncio.gather(*answers) == [30, 20]
        assert b.active == 0
    finally:
        gate.set()
        await b.stop()


@pytest.mark.parametrize("per_tick", [1, 2])
async def test_a_burst_joins_a_few_at_a_time_with_a_step_of_the_running_rows_between(per_tick):
    """R2EC_MAX_PREFILL_PER_TICK: each admission is a prefill the running rows wait for, so a
    burst of arrivals joins `per_tick` requests a tick and the running request advances between
    (with every free slot filled at once, 12 prefills froze a running stream for 3-13 s)."""
    gate = threading.Event()
    runner = Counter(gate=gate)
    b = await started(ContinuousBatcher(8, lambda: runner, max_prefill_per_tick=per_tick))
    try:
        long = b.submit(100)
        while not runner.left:  # decoding; its first step waits at the gate
            await asyncio.sleep(0.001)
        burst = [b.submit(50) for _ in range(5)]  # queued behind the held tick
        gate.set()
        assert await asyncio.gather(*burst) == [500] * 5
        assert await long == 1000
    finally:
        gate.set()
        await b.stop()
    joined = [after - before for before, after in itertools.pairwise(len(s) for s in runner.steps)]
    assert max(joined) == per_tick  # never more than that many joined between two steps
    assert sum(j for j in joined if j > 0) == 5  # every one joined while the long one decoded
    with pytest.raises(ValueError, match="max_prefill_per_tick"):
        ContinuousBatcher(2, Counter, max_prefill_per_tick=0)


async def test_requests_answered_by_one_prefill_share_a_tick_within_the_token_budget_and_take_no_slot():
    """R2EC_PREFILL_BATCH_TOKENS: a request `prefill_cost` counts (no reasoning: one prefill,
    here item 1 at 100 positions) needs no decode slot; a tick admits those waiting while their
    positions fit the budget, past a decoding request that waits for the slot, and the runner
    answers them in the same step."""
    gate = threading.Event()
    runner = Counter(gate=gate)

    def cost(item: int) -> int | None:
        return 100 if item == 1 else None

    b = await started(ContinuousBatcher(1, lambda: runner, prefill_cost=cost, prefill_batch_tokens=250))
    try:
        long = b.submit(30)
        while not runner.left:  # decoding in the one slot; its first step waits at the gate
            await asyncio.sleep(0.001)
        waiting = b.submit(3)  # decodes: waits for the slot
        burst = [b.submit(1) for _ in range(5)]
        gate.set()
        assert await asyncio.gather(*burst) == [10] * 5
        assert await waiting == 30 and await long == 300
    finally:
        gate.set()
        await b.stop()
    ones = [s.count(1) for s in runner.steps]
    assert max(ones) == 2 and sum(ones) == 5  # two a tick: 200 of the 250 positions
    with_burst = [s for s in runner.steps if 1 in s]
    assert all(30 in s and 3 not in s for s in with_burst)  # beside the long one, ahead of the 3
    # 0 turns it off: every request is admitted as a decoding one, cost or not
    assert ContinuousBatcher(1, Counter, prefill_cost=cost).prefill_cost is None
    with pytest.raises(ValueError, match="prefill_batch_tokens"):
        ContinuousBatcher(1, Counter, prefill_cost=cost, prefill_batch_tokens=-1)


async def test_a_request_that_waited_past_max_queue_wait_is_refused_at_admission():
    gate = threading.Event()
    runner = Counter(gate=gate)
    b = await started(ContinuousBatcher(1, lambda: runner, max_queue_wait_s=0.05))
    try:
        first = b.submit(1)
        while not runner.left:  # decoding, its step held
            await asyncio.sleep(0.001)
        late = b.submit(2)
        await asyncio.sleep(0.2)  # past the limit, waiting for the one slot
        gate.set()
        with pytest.raises(QueueTimeout, match="R2EC_MAX_QUEUE_WAIT_S") as info:
            await late
        assert info.value.retry_after_s >= 1
        assert await first == 10 and await b.submit(3) == 30
    finally:
        gate.set()
        await b.stop()
    assert sorted(runner.items.values()) == [1, 3] and b.queue_timeouts == 1  # 2 never decoded


async def test_a_drain_refuses_at_once_the_queued_requests_the_grace_cannot_reach():
    """Requests take 10 s from admission to answer and 2 slots are busy, just admitted: in 25 s
    of grace each slot frees at 10 s and takes one more request, which ends at 20 s (one started
    at 20 s would end past the deadline), so 2 queued requests can still be answered; the other
    4 are refused at once instead of at the deadline."""
    gate = threading.Event()
    runner = Counter(gate=gate)
    b = await started(ContinuousBatcher(2, lambda: runner))
    try:
        running = [b.submit(3), b.submit(3)]
        while len(runner.left) < 2:  # both decoding, the step held
            await asyncio.sleep(0.001)
        queued = [b.submit(2) for _ in range(6)]
        b._request_s = 10.0
        b.drain(25)
        assert [f.done() for f in queued] == [False] * 2 + [True] * 4
        for f in queued[2:]:
            with pytest.raises(ShuttingDown):
                await f
        gate.set()
        assert await asyncio.gather(*running, *queued[:2]) == [30, 30, 20, 20]
    finally:
        gate.set()
        await b.stop()


async def test_a_drain_counts_what_the_running_requests_have_left():
    """Both slots' requests are 9 s into their 10 s: the slots free in 1 s, so with 15 s of
    grace both queued requests start in time (they end at ~11 s) and none is refused at once.
    The first count assumed the running requests had a whole request time left, and refused
    one of them (review 39b)."""
    gate = threading.Event()
    runner = Counter(gate=gate)
    b = await started(ContinuousBatcher(2, lambda: runner))
    try:
        running = [b.submit(3), b.submit(3)]
        while len(runner.left) < 2:  # both decoding, the step held
            await asyncio.sleep(0.001)
        queued = [b.submit(2) for _ in range(3)]
        b._request_s = 10.0
        for r in (*b._running, *b._admitting):  # the held tick is still admitting them
            r.started = time.perf_counter() - 9.0
        b.drain(15)
        assert [f.done() for f in queued] == [False, False, True]
        gate.set()
        assert await asyncio.gather(*running, *queued[:2]) == [30, 30, 20, 20]
    finally:
        gate.set()
        await b.stop()
