"""The MicroBatcher contract, line by line, with a plain function instead of a model."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from service.batcher import BatcherClosed, BatchFailed, MicroBatcher, QueueFull, QueueTimeout, ShuttingDown

pytestmark = pytest.mark.asyncio


class Recorder:
    """A batch function that doubles its inputs and records each batch and its thread."""

    def __init__(self, fail_on=None, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.fail_on = fail_on
        self.gate = gate
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def __call__(self, items: list[int]) -> list:
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if self.gate is not None:
                self.gate.wait(5)
            self.batches.append(list(items))
            self.threads.add(threading.current_thread().name)
            if self.fail_on is not None and self.fail_on in items:
                raise RuntimeError(f"boom on {self.fail_on}")
            return [ValueError(f"bad {i}") if i < 0 else 2 * i for i in items]
        finally:
            with self._lock:
                self.running -= 1


async def started(batcher: MicroBatcher) -> MicroBatcher:
    await batcher.start()
    return batcher


async def test_concurrent_requests_share_a_batch_and_each_gets_its_own_answer():
    fn = Recorder()
    depths, sizes = [], []
    b = await started(MicroBatcher(8, 200, fn, on_batch=sizes.append, on_queue_depth=depths.append))
    try:
        results = await asyncio.gather(*(b.submit(i) for i in range(5)))
    finally:
        await b.stop()
    assert results == [0, 2, 4, 6, 8]
    assert fn.batches == [[0, 1, 2, 3, 4]]
    assert sizes == [5] and max(depths) == 5 and depths[-1] == 0
    assert fn.threads and all(t.startswith("r2ec-batch") for t in fn.threads)


async def test_a_full_batch_goes_without_waiting_and_the_rest_follow():
    fn = Recorder()
    b = await started(MicroBatcher(3, 10_000, fn))  # a long wait: only fullness can close it
    try:
        futures = [b.submit(i) for i in range(7)]
        done, _ = await asyncio.wait(futures[:6], timeout=5)
        assert len(done) == 6
        assert fn.batches == [[0, 1, 2], [3, 4, 5]]
        assert not futures[6].done()  # alone: waits for company up to max_wait
    finally:
        await b.stop()
    with pytest.raises(BatcherClosed):
        await futures[6]


async def test_max_wait_closes_a_partial_batch():
    fn = Recorder()
    b = await started(MicroBatcher(8, 20, fn))
    try:
        assert await asyncio.wait_for(b.submit(1), 5) == 2
    finally:
        await b.stop()
    assert fn.batches == [[1]]


async def test_max_batch_one_means_no_batching():
    fn = Recorder()
    b = await started(MicroBatcher(1, 50, fn))
    try:
        assert await asyncio.gather(*(b.submit(i) for i in range(4))) == [0, 2, 4, 6]
    finally:
        await b.stop()
    assert fn.batches == [[0], [1], [2], [3]]


async def test_a_raising_batch_fails_every_future_and_the_worker_goes_on():
    fn = Recorder(fail_on=3)
    b = await started(MicroBatcher(8, 100, fn))
    try:
        futures = [b.submit(i) for i in (1, 2, 3)]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(o, BatchFailed) and "RuntimeError: boom on 3" in str(o) for o in outcomes)
        assert all(isinstance(o.__cause__, RuntimeError) for o in outcomes)
        assert await b.submit(5) == 10  # still serving
    finally:
        await b.stop()


async def test_an_exception_output_fails_only_its_own_request():
    fn = Recorder()
    b = await started(MicroBatcher(8, 100, fn))
    try:
        outcomes = await asyncio.gather(b.submit(1), b.submit(-1), b.submit(2), return_exceptions=True)
    finally:
        await b.stop()
    assert outcomes[0] == 2 and outcomes[2] == 4
    assert isinstance(outcomes[1], ValueError) and str(outcomes[1]) == "bad -1"
    assert fn.batches == [[1, -1, 2]]


async def test_cancelled_requests_are_dropped_before_running():
    fn = Recorder()
    b = await started(MicroBatcher(8, 200, fn))
    try:
        futures = [b.submit(i) for i in range(4)]
        futures[1].cancel()
        futures[3].cancel()
        assert await futures[0] == 0 and await futures[2] == 4
    finally:
        await b.stop()
    assert fn.batches == [[0, 2]]


async def test_wrong_output_count_fails_the_batch():
    b = await started(MicroBatcher(8, 50, lambda items: items[:-1]))
    try:
        outcomes = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
    finally:
        await b.stop()
    assert all(isinstance(o, BatchFailed) and "1 outputs for 2 inputs" in str(o) for o in outcomes)


async def test_batches_never_overlap_and_requests_queue_while_one_runs():
    gate = threading.Event()
    fn = Recorder(gate=gate)
    b = await started(MicroBatcher(4, 1, fn))
    try:
        first = b.submit(0)
        await asyncio.sleep(0.1)  # batch [0] is running, blocked on the gate
        later = [b.submit(i) for i in range(1, 4)]
        assert b.queue_depth == 3
        gate.set()
        assert await asyncio.gather(first, *later) == [0, 2, 4, 6]
    finally:
        await b.stop()
    assert fn.batches == [[0], [1, 2, 3]]
    assert fn.max_running == 1


async def test_submit_needs_a_running_batcher():
    b = MicroBatcher(2, 1, Recorder())
    with pytest.raises(BatcherClosed):
        b.submit(1)
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(0, 1, Recorder())


async def running(b: MicroBatcher, fn: Recorder) -> None:
    """Until the worker thread is inside fn (held at its gate)."""
    while fn.running == 0:
        await asyncio.sleep(0.01)


async def test_a_full_queue_refuses_at_once_with_a_retry_after():
    gate = threading.Event()
    fn = Recorder(gate=gate)
    b = await started(MicroBatcher(1, 1, fn, max_queue=2))
    try:
        first = b.submit(0)
        await asyncio.wait_for(running(b, fn), 30)  # 0 runs; the queue is empty again
        queued = [b.submit(1), b.submit(2)]
        with pytest.raises(QueueFull, match="2 requests are already waiting") as info:
            b.submit(3)
        assert info.value.retry_after_s >= 1
        queued[0].cancel()  # a request whose client left frees its place
        queued.append(b.submit(4))
        gate.set()
        assert await asyncio.gather(first, queued[1], queued[2]) == [0, 4, 8]
    finally:
        gate.set()
        await b.stop()
    assert fn.batches == [[0], [2], [4]]


async def test_a_drain_sends_queued_requests_at_once_and_refuses_new_ones():
    fn = Recorder()
    b = await started(MicroBatcher(4, 1e9, fn))  # without the drain these two would wait "forever"
    try:
        waiting = [b.submit(1), b.submit(2)]
        b.drain(60)
        assert await asyncio.wait_for(asyncio.gather(*waiting), 60) == [2, 4]
        with pytest.raises(ShuttingDown):
            b.submit(3)
        assert b.draining and b.idle
    finally:
        await b.stop()
    assert fn.batches == [[1, 2]]


async def test_at_the_drain_deadline_every_unanswered_request_is_refused():
    gate = threading.Event()
    fn = Recorder(gate=gate)
    b = await started(MicroBatcher(1, 1, fn))
    try:
        held = b.submit(0)  # its batch runs past the deadline
        await asyncio.wait_for(running(b, fn), 30)
        queued = b.submit(1)
        b.drain(0.05)
        outcomes = await asyncio.wait_for(asyncio.gather(held, queued, return_exceptions=True), 60)
        assert all(isinstance(o, ShuttingDown) for o in outcomes), outcomes
    finally:
        gate.set()
        await b.stop()
    while fn.running:  # the abandoned batch still ends on its thread
        await asyncio.sleep(0.01)
    assert fn.batches == [[0]]  # 1 never ran


async def test_a_draining_batcher_does_not_start_a_batch_that_cannot_end_in_time():
    gate = threading.Event()
    fn = Recorder(gate=gate)
    b = await started(MicroBatcher(1, 1, fn))
    try:
        held = b.submit(0)
        await asyncio.wait_for(running(b, fn), 30)
        queued = b.submit(1)
        b._batch_s = 3600.0  # as if batches took an hour: the next one cannot end before the deadline
        b.drain(60)
        gate.set()
        assert await held == 0  # the running batch finishes and is answered
        with pytest.raises(ShuttingDown):
            await queued  # refused at once, not run
    finally:
        gate.set()
        await b.stop()
    assert fn.batches == [[0]]


async def test_when_a_drained_batcher_stops_one_line_says_how_the_drain_ended(caplog):
    gate = threading.Event()
    fn = Recorder(gate=gate)
    b = await started(MicroBatcher(1, 1, fn))
    caplog.set_level(logging.INFO, logger="service.batcher")
    try:
        held = b.submit(0)  # running when the drain begins: answered
        await asyncio.wait_for(running(b, fn), 30)
        queued, gone = b.submit(1), b.submit(2)
        b.drain(60)
        b._batch_s = 3600.0  # as if batches took an hour: 1 cannot end before the deadline
        gone.cancel()  # its client left
        with pytest.raises(ShuttingDown):
            b.submit(3)  # new: refused
        gate.set()
        assert await held == 0
        with pytest.raises(ShuttingDown):
            await queued
    finally:
        gate.set()
        await b.stop()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("drain over")]
    assert line.endswith(
        "of 3 requests queued or running, 1 answered, 0 refused at once (beyond the grace), 1 cut at "
        "the deadline, 1 left by their clients; 1 new requests refused"
    ), line


async def test_a_request_that_waited_past_max_queue_wait_is_refused_when_its_turn_comes():
    """R2EC_MAX_QUEUE_WAIT_S: the queue was bounded in count only, so on a slow host a queued
    request was run after minutes, for a client that had given up (SRE journey 39, finding 3)."""
    gate = threading.Event()
    fn = Recorder(gate=gate)
    b = await started(MicroBatcher(1, 0, fn, max_queue_wait_s=0.05))
    try:
        first = b.submit(1)
        await asyncio.wait_for(running(b, fn), 30)
        late = b.submit(2)
        await asyncio.sleep(0.2)  # it waits past the limit behind the held batch
        gate.set()
        with pytest.raises(QueueTimeout, match="R2EC_MAX_QUEUE_WAIT_S") as info:
            await late
        assert isinstance(info.value, QueueFull) and info.value.retry_after_s >= 1
        assert await first == 2 and await b.submit(3) == 6  # one that did not wait is run
    finally:
        gate.set()
        await b.stop()
    assert fn.batches == [[1], [3]] and b.queue_timeouts == 1
    with pytest.raises(ValueError, match="max_queue_wait_s"):
        MicroBatcher(1, 0, fn, max_queue_wait_s=0)


async def test_a_drain_counts_what_the_running_batch_has_left():
    """The running batch is 9.5 s into its 10 s: with 25 s of grace two more batches end in
    time, so of 4 queued requests (batches of 1) 2 stay queued and 2 are refused at once. The
    first count took a whole batch time for the running one and kept only 1 (review 39b)."""
    gate = threading.Event()
    fn = Recorder(gate=gate)
    b = await started(MicroBatcher(1, 0, fn))
    try:
        held = b.submit(0)
        await asyncio.wait_for(running(b, fn), 30)
        queued = [b.submit(i) for i in (1, 2, 3, 4)]
        b._batch_s = 10.0
        b._batch_started = time.perf_counter() - 9.5
        b.drain(25)
        assert [f.done() for f in queued] == [False, False, True, True]
        gate.set()
        assert await held == 0 and await asyncio.gather(*queued[:2]) == [2, 4]
    finally:
        gate.set()
        await b.stop()


async def test_a_drain_refuses_at_once_the_queued_requests_the_grace_cannot_reach(caplog):
    """They were held the whole grace, then refused (SRE journey 39, finding 5): with batches of
    10 s and 25 s of grace, the running batch and one more fit, so of 4 queued requests 3 are
    refused at once and their clients can retry elsewhere; the one that fits is answered."""
    gate = threading.Event()
    fn = Recorder(gate=gate)
    b = await started(MicroBatcher(1, 0, fn))
    caplog.set_level(logging.INFO, logger="service.batcher")
    try:
        held = b.submit(0)
        await asyncio.wait_for(running(b, fn), 30)
        queued = [b.submit(i) for i in (1, 2, 3, 4)]
        b._batch_s = 10.0
        b.drain(25)
        assert [f.done() for f in queued] == [False, True, True, True]  # before any batch ended
        for f in queued[1:]:
            with pytest.raises(ShuttingDown):
                await f
        assert b.queue_depth == 1
        gate.set()
        assert await held == 0 and await queued[0] == 2
    finally:
        gate.set()
        await b.stop()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("drain over")]
    assert "of 5 requests queued or running, 2 answered, 3 refused at once (beyond the grace)" in line
