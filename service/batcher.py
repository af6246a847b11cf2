"""Micro-batching: gather concurrent requests into one call of a batch function.

Contract (tests/service/test_batcher.py checks each line):
- `submit(item)` returns one asyncio future per request.
- A batch closes when it holds `max_batch` live requests or when its oldest request has
  waited `max_wait_ms`; requests that queued while the previous batch ran go out at once.
- `fn(items) -> outputs` runs in a worker thread (a single-thread executor by default, so a
  model never runs in two threads at once); the event loop stays free.
- Output i resolves future i. An output that is an exception instance fails only its own
  request (a per-query error); an exception raised by `fn` fails every future of the batch
  with `BatchFailed` (its cause is the original exception); the worker keeps going either way.
- A request cancelled before its batch runs (the client went away) is dropped, not run.
- `fn` must return as many outputs as it got inputs; otherwise every future of the batch
  gets a RuntimeError saying so.
- With `max_queue`, at most that many requests wait (the running batch not counted); one more
  is refused at once with `QueueFull`, whose `retry_after_s` estimates when there is room.
- With `max_queue_wait_s`, a request that waited longer than that is refused with
  `QueueTimeout` (a `QueueFull`) when its turn comes, instead of being run for a client that
  has likely given up.
- `drain(grace_s)` (shutdown): new requests are refused with `ShuttingDown`; queued ones the
  grace cannot reach (by the recent batch time: batches after the running one that would end
  past the deadline) are refused at once, so their clients retry elsewhere now rather than at
  the deadline; the others go out without waiting for batch-mates while a batch still fits in
  the grace; at the deadline every request still unanswered, the running batch's included,
  fails with `ShuttingDown`, so each one gets an answer before the server gives up on it. `stop()`
  after a drain logs how it ended: of the requests queued or running when it began, how many
  were answered, cut at the deadline, or left by their clients, and how many new ones it refused.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

Q = TypeVar("Q")
R = TypeVar("R")


class BatcherClosed(RuntimeError):
    """Submitted to a batcher that is not running (or stopped while the request waited)."""


class ShuttingDown(BatcherClosed):
    """The batcher is draining for shutdown: no new requests, and those that cannot be answered
    within the grace period are refused."""


class QueueFull(RuntimeError):
    """`max_queue` requests are already waiting; `retry_after_s` estimates when there is room."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueTimeout(QueueFull):
    """A request waited in the queue longer than `max_queue_wait_s` (R2EC_MAX_QUEUE_WAIT_S): refused
    when its turn came, as overloaded."""


class BatchFailed(RuntimeError):
    """The batch function raised: every request of that batch gets this error."""


BATCH_TIME_SMOOTHING = 0.3  # weight of the newest batch in the running batch-time estimate
RETRY_AFTER_MAX_S = 60.0


@dataclass
class _Pending(Generic[Q]):
    item: Q
    future: asyncio.Future
    enqueued: float  # loop.time()


class QueueingBatcher(Generic[Q]):
    """What both batchers share (this module's MicroBatcher, service/continuous.py's
    ContinuousBatcher): a worker task, one future per request, the bounded queue, the drain's
    refusals. A subclass runs `_run` and says what one unit of its work takes (`retry_after_s`)."""

    def __init__(
        self,
        *,
        executor: Executor | None,
        on_batch: Callable[[int], None] | None,
        on_queue_depth: Callable[[int], None] | None,
        max_queue: int | None,
        worker_name: str,
        max_queue_wait_s: float | None = None,
    ) -> None:
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 (or None: unbounded), got {max_queue}")
        if max_queue_wait_s is not None and max_queue_wait_s <= 0:
            raise ValueError(f"max_queue_wait_s must be > 0 (or None: no limit), got {max_queue_wait_s}")
        self.max_queue = max_queue
        self.max_queue_wait_s = max_queue_wait_s
        self.queue_timeouts = 0  # requests refused by max_queue_wait_s, for tests and logs
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="r2ec-batch")
        self._on_batch = on_batch or (lambda n: None)
        self._on_depth = on_queue_depth or (lambda n: None)
        self._pending: deque[_Pending[Q]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._worker_name = worker_name
        self._deadline: float | None = None  # loop.time() by which a draining batcher answers all
        self._expiry: asyncio.TimerHandle | None = None
        self._running: list[_Pending[Q]] = []  # requests the model thread has now
        self._unanswered: set[asyncio.Future] = set()  # queued, admitted or running
        self._drained: list[asyncio.Future] = []  # those unanswered when the drain began
        self._drain_started = 0.0  # loop.time()
        self._drain_refused = 0  # new requests refused while draining
        self._drain_unreachable = 0  # queued ones refused when it began: the grace cannot reach them
        self.batches = 0  # batches run (continuous: requests admitted), for tests and logs

    async def start(self) -> None:
        if self._worker is not None:
            return
        self._wakeup = asyncio.Event()
        self._worker = asyncio.create_task(self._run(), name=self._worker_name)

    async def _run(self) -> None:
        raise NotImplementedError

    def retry_after_s(self) -> float:
        raise NotImplementedError

    def _reachable(self, grace_s: float) -> int | None:
        """How many queued requests can still be answered within `grace_s`, by the work's
        recent timing (the running work's included); None while nothing has been timed."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop the worker; requests still waiting or running fail with BatcherClosed."""
        if self._expiry is not None:
            self._expiry.cancel()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                pass
        if self._deadline is not None:
            self._log_drain_outcome()
        for p in [*self._pending, *self._running]:
            if not p.future.done():
                p.future.set_exception(BatcherClosed("the service is shutting down"))
        self._pending.clear()
        self._running = []
        self._on_depth(0)
        if self._own_executor:
            self._executor.shutdown(wait=False)

    def drain(self, grace_s: float) -> None:
        """Begin the shutdown drain (module docstring): answer everything within `grace_s`,
        then `_expire` refuses what is left."""
        if self._deadline is not None:
            return
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + grace_s
        self._drain_started = loop.time()
        self._drained = list(self._unanswered)
        self._expiry = loop.call_later(grace_s, self._expire)
        log.info(
            "draining: %d queued, %d running, %.1fs to answer them",
            self.queue_depth,
            self.active,  # the continuous decode's joining requests too, not only its running
            grace_s,
        )
        reachable = self._reachable(grace_s)
        if reachable is not None:
            self._refuse_unreachable(reachable)
        if self._wakeup is not None:
            self._wakeup.set()  # a batch waiting for company goes now

    def _refuse_unreachable(self, reachable: int) -> None:
        """Refuse at once the queued requests past the first `reachable` live ones: they would
        wait the whole grace and then be refused (a retry elsewhere is better made now)."""
        keep: deque[_Pending[Q]] = deque()
        unreachable: list[_Pending[Q]] = []
        for p in self._pending:
            if p.future.done():
                continue
            (keep if len(keep) < reachable else unreachable).append(p)
        if not unreachable:
            return
        self._pending = keep
        self._drain_unreachable = self._refuse(unreachable)
        self._on_depth(len(self._pending))
        log.warning(
            "draining: refused %d queued requests at once, which cannot be answered within the grace "
            "(by the recent request time); %d stay queued",
            self._drain_unreachable,
            len(keep),
        )

    def _log_drain_outcome(self) -> None:
        """The drain's one closing line (stop() calls it before it fails what is left)."""
        answered = cut = left = 0
        for f in self._drained:
            if f.cancelled():
                left += 1  # its client went away
            elif not f.done() or isinstance(f.exception(), BatcherClosed):
                cut += 1  # refused at the deadline (or by stop(), next)
            else:
                answered += 1  # a result, or its own error (a bad query, a failed batch)
        log.info(
            "drain over after %.1fs: of %d requests queued or running, %d answered, %d refused at "
            "once (beyond the grace), %d cut at the deadline, %d left by their clients; %d new "
            "requests refused",
            asyncio.get_running_loop().time() - self._drain_started,
            len(self._drained),
            answered,
            self._drain_unreachable,
            cut - self._drain_unreachable,
            left,
            self._drain_refused,
        )

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running."""
        return not self._running and self._live_count() == 0

    def _expire(self) -> None:
        """The drain deadline: whatever is still unanswered is refused now (work still running
        on the model thread finishes there; its answers are dropped)."""
        refused = self._refuse(self._running) + self._refuse(self._pending)
        self._pending.clear()
        self._on_depth(0)
        if refused:
            log.warning("drain deadline: refused %d unanswered requests", refused)

    def _refuse(self, pending: Sequence[_Pending[Q]]) -> int:
        n = 0
        for p in pending:
            if not p.future.done():
                p.future.set_exception(ShuttingDown("the service is shutting down; retry"))
                n += 1
        return n

    @property
    def draining(self) -> bool:
        return self._deadline is not None

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        """Requests the model thread has now (a micro-batch, or the continuous decode's slots)."""
        return len(self._running)

    def queued(self, future: asyncio.Future) -> bool:
        """Whether the request of `future` still waits in the queue (False: the model thread has
        taken it, or it is answered), as a client's deadline reports where it passed."""
        return any(p.future is future for p in self._pending)

    def _live_count(self) -> int:
        return sum(1 for p in self._pending if not p.future.done())

    def check_open(self) -> None:
        """Raise what `submit` raises for a batcher that takes no new requests: ShuttingDown
        while draining, BatcherClosed when not running. Work answered beside the batcher (a
        cached h_T, service/state.py) asks here first, so it is refused exactly the same way."""
        if self.draining:
            self._drain_refused += 1
            raise ShuttingDown("the service is shutting down; retry")
        if not self.running or self._wakeup is None:
            raise BatcherClosed("the batcher is not running")

    def submit(self, item: Q) -> asyncio.Future:
        self.check_open()
        assert self._wakeup is not None
        if self.max_queue is not None and self._live_count() >= self.max_queue:
            raise QueueFull(
                f"overloaded: {self.max_queue} requests are already waiting (R2EC_MAX_QUEUE); retry",
                self.retry_after_s(),
            )
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._unanswered.add(future)
        future.add_done_callback(self._unanswered.discard)
        self._pending.append(self._new_pending(item, future, loop.time()))
        self._on_depth(len(self._pending))
        self._wakeup.set()
        return future

    def _new_pending(self, item: Q, future: asyncio.Future, now: float) -> _Pending[Q]:
        return _Pending(item, future, now)

    def _waited_too_long(self, p: _Pending[Q], now: float) -> bool:
        """Refuse `p`, whose turn has come, if it waited longer than `max_queue_wait_s` (its
        client has likely given up, and the model's time goes to those behind it); True if so."""
        waited = now - p.enqueued
        if self.max_queue_wait_s is None or waited <= self.max_queue_wait_s:
            return False
        self.queue_timeouts += 1
        p.future.set_exception(
            QueueTimeout(
                f"overloaded: this request waited {waited:.0f} s for the model, longer than "
                f"R2EC_MAX_QUEUE_WAIT_S ({self.max_queue_wait_s:g} s); retry",
                self.retry_after_s(),
            )
        )
        return True


class MicroBatcher(QueueingBatcher[Q], Generic[Q, R]):
    def __init__(
        self,
        max_batch: int,
        max_wait_ms: float,
        fn: Callable[[list[Q]], Sequence[R | BaseException]],
        *,
        executor: Executor | None = None,
        on_batch: Callable[[int], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        max_queue: int | None = None,
        max_queue_wait_s: float | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        super().__init__(
            executor=executor,
            on_batch=on_batch,
            on_queue_depth=on_queue_depth,
            max_queue=max_queue,
            worker_name="r2ec-micro-batcher",
            max_queue_wait_s=max_queue_wait_s,
        )
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1e3
        self.fn = fn
        self._batch_s: float | None = None  # smoothed seconds per batch (None: none ran yet)
        self._batch_started = 0.0  # perf_counter when the running batch began

    # ------------------------------------------------------------------ requests
    def retry_after_s(self) -> float:
        """When a refused request might find room: the queue's batches at the recent batch time."""
        per_batch = self._batch_s if self._batch_s is not None else 1.0
        batches = math.ceil(self._live_count() / self.max_batch) + 1
        return min(RETRY_AFTER_MAX_S, max(1.0, batches * per_batch))

    def _reachable(self, grace_s: float) -> int | None:
        """Full batches that end within the grace after the running one, whose time left is
        the batch time less what it has run (a batch nearly done holds back almost nothing)."""
        if self._batch_s is None:
            return None
        running_left = (
            max(0.0, self._batch_s - (time.perf_counter() - self._batch_started)) if self._running else 0.0
        )
        return self.max_batch * max(0, math.floor((grace_s - running_left) / self._batch_s))

    # ------------------------------------------------------------------ worker
    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._pending[0].enqueued + self.max_wait_s
            while self._live_count() < self.max_batch and not self.draining:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._wakeup.wait()
                except TimeoutError:
                    break
            batch = self._take(loop.time())
            self._on_depth(len(self._pending))
            if batch and self._fits_before_deadline(loop):
                await self._run_batch(loop, batch)
            elif batch:  # draining, and this batch would end after the deadline: refuse it now
                self._refuse(batch)

    def _fits_before_deadline(self, loop: asyncio.AbstractEventLoop) -> bool:
        if self._deadline is None or self._batch_s is None:
            return True  # not draining, or no batch time known yet: try
        return loop.time() + self._batch_s <= self._deadline

    def _take(self, now: float) -> list[_Pending[Q]]:
        """Pop up to max_batch live requests; cancelled ones are dropped on the way, and those
        that waited too long are refused (`_waited_too_long`)."""
        batch: list[_Pending[Q]] = []
        while self._pending and len(batch) < self.max_batch:
            p = self._pending.popleft()
            if p.future.done() or self._waited_too_long(p, now):  # cancelled by its client: never run it
                continue
            batch.append(p)
        return batch

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[Q]]) -> None:
        self.batches += 1
        self._on_batch(len(batch))
        started = self._batch_started = time.perf_counter()
        self._running = batch
        try:
            outputs: Any = await loop.run_in_executor(self._executor, self.fn, [p.item for p in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"batch function returned {len(outputs)} outputs for {len(batch)} inputs")
        except asyncio.CancelledError:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(BatcherClosed("the service is shutting down"))
            raise
        except Exception as exc:
            log.exception("batch of %d failed", len(batch))
            for p in batch:
                if not p.future.done():
                    failed = BatchFailed(f"batch of {len(batch)} failed: {type(exc).__name__}: {exc}")
                    failed.__cause__ = exc
                    p.future.set_exception(failed)
            return
        finally:
            self._running = []
            seconds = time.perf_counter() - started
            w = BATCH_TIME_SMOOTHING
            self._batch_s = seconds if self._batch_s is None else (1 - w) * self._batch_s + w * seconds
        for p, out in zip(batch, outputs, strict=True):
            if p.future.done():  # cancelled (or refused by the drain) while the batch ran: dropped
                continue
            if isinstance(out, BaseException):
                p.future.set_exception(out)
            else:
                p.future.set_result(out)
        log.debug("batch of %d in %.1f ms", len(batch), seconds * 1e3)
