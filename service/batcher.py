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
"""

from __future__ import annotations

import asyncio
import logging
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


class BatchFailed(RuntimeError):
    """The batch function raised: every request of that batch gets this error."""


@dataclass
class _Pending(Generic[Q]):
    item: Q
    future: asyncio.Future
    enqueued: float  # loop.time()


class MicroBatcher(Generic[Q, R]):
    def __init__(
        self,
        max_batch: int,
        max_wait_ms: float,
        fn: Callable[[list[Q]], Sequence[R | BaseException]],
        *,
        executor: Executor | None = None,
        on_batch: Callable[[int], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1e3
        self.fn = fn
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="r2ec-batch")
        self._on_batch = on_batch or (lambda n: None)
        self._on_depth = on_queue_depth or (lambda n: None)
        self._pending: deque[_Pending[Q]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.batches = 0  # batches run, for tests and logs

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._worker is not None:
            return
        self._wakeup = asyncio.Event()
        self._worker = asyncio.create_task(self._run(), name="r2ec-micro-batcher")

    async def stop(self) -> None:
        """Stop the worker; requests still queued fail with BatcherClosed."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                pass
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done():
                p.future.set_exception(BatcherClosed("the service is shutting down"))
        self._on_depth(0)
        if self._own_executor:
            self._executor.shutdown(wait=False)

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ requests
    def submit(self, item: Q) -> asyncio.Future:
        if not self.running or self._wakeup is None:
            raise BatcherClosed("the batcher is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append(_Pending(item, future, loop.time()))
        self._on_depth(len(self._pending))
        self._wakeup.set()
        return future

    # ------------------------------------------------------------------ worker
    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._pending[0].enqueued + self.max_wait_s
            while self._live_count() < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._wakeup.wait()
                except TimeoutError:
                    break
            batch = self._take()
            self._on_depth(len(self._pending))
            if batch:
                await self._run_batch(loop, batch)

    def _live_count(self) -> int:
        return sum(1 for p in self._pending if not p.future.done())

    def _take(self) -> list[_Pending[Q]]:
        """Pop up to max_batch live requests; cancelled ones are dropped on the way."""
        batch: list[_Pending[Q]] = []
        while self._pending and len(batch) < self.max_batch:
            p = self._pending.popleft()
            if p.future.done():  # cancelled by its client: never run it
                continue
            batch.append(p)
        return batch

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[Q]]) -> None:
        self.batches += 1
        self._on_batch(len(batch))
        started = time.perf_counter()
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
        for p, out in zip(batch, outputs, strict=True):
            if p.future.done():  # cancelled while the batch ran: the result is dropped
                continue
            if isinstance(out, BaseException):
                p.future.set_exception(out)
            else:
                p.future.set_result(out)
        log.debug("batch of %d in %.1f ms", len(batch), (time.perf_counter() - started) * 1e3)
