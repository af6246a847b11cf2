"""Continuous batching: requests join the running decode at a token boundary and leave when done.

The MicroBatcher (service/batcher.py) runs one `generate` to completion per batch, so a request
that arrives meanwhile waits for the whole batch (BENCHMARKS.md §4: p50 23.5 s at concurrency
32). Here the model thread runs *ticks*: each tick admits waiting requests into free decode
slots (at most `max_prefill_per_tick` of them), then advances every live sequence by one token
(model/generation.py, ContinuousDecoder), and goes on stepping, up to `steps_per_tick` tokens,
while nothing changes that the event loop must see (no sequence finished, no request arrived or
left); then it answers those that finished. Between ticks the model thread is free for other
work (item edits, reloads), and the event loop resolves futures.

Contract (tests/service/test_continuous.py), the MicroBatcher's where it applies:
- `submit(item)` returns one asyncio future; the runner's output for that item resolves it (an
  exception instance fails only that request).
- At most `slots` requests are in the decode at once, and a tick admits at most
  `max_prefill_per_tick` of them (each admission is a prefill the running rows wait for, so a
  burst of arrivals reaches the decode a few at a time, with a step of the running rows between);
  with `max_queue`, at most that many more wait, and one more is refused at once with
  `QueueFull` (`retry_after_s` estimated from recent request times); with `max_queue_wait_s`, one
  that waited longer is refused with `QueueTimeout` when its turn comes.
- With `prefill_cost` and `prefill_batch_tokens` > 0, a request the runner answers with one
  prefill (`prefill_cost(item)` is its positions, not None: no reasoning) takes no slot and no
  turn of `max_prefill_per_tick`: a tick admits the waiting ones, in order, while their costs
  add up to at most `prefill_batch_tokens` (one at least), past requests that wait for a slot,
  and the runner prefills them in one forward. So a burst of them costs the running decodes
  one forward of bounded size a tick, not one tick each.
- A request cancelled while waiting is never admitted; one cancelled while decoding is dropped
  at the next tick and its slot goes to the next request.
- A runner that raises fails the requests it was running with `BatchFailed`; the loop goes on.
- `drain(grace_s)`: new requests are refused with `ShuttingDown`; queued ones that cannot be
  answered in time (`slots` requests every smoothed request time, once the running ones are
  answered) are refused at once; the running and the other queued ones are served until the
  deadline, then every unanswered one fails with `ShuttingDown`.
- The runner is asked for again at every tick (`get_runner`), so a reload's new model takes new
  requests while the old one finishes the sequences it holds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from service.batcher import (
    BATCH_TIME_SMOOTHING,
    RETRY_AFTER_MAX_S,
    BatcherClosed,
    BatchFailed,
    QueueingBatcher,
    _Pending,
)

log = logging.getLogger(__name__)

Q = TypeVar("Q")
R = TypeVar("R")


@dataclass(frozen=True)
class Running:
    """What `StepRunner.add` returns for a request that now decodes: its handle."""

    handle: Hashable


class StepRunner(Protocol[Q, R]):
    """The model-thread half: it owns the decode state. Every method runs on the model thread."""

    def add(self, item: Q) -> Running | R | BaseException:
        """Start a request: `Running(handle)` while it decodes, or its output at once (an
        error, or a request that needs no decoding step)."""
        ...

    def step(self) -> Sequence[tuple[Hashable, R | BaseException]]:
        """Advance every running request by one token; (handle, output) for those that ended."""
        ...

    def cancel(self, handle: Hashable) -> None: ...

    @property
    def idle(self) -> bool: ...


_UNCOUNTED = -1  # `_Request.cost` before `prefill_cost` is asked


@dataclass(eq=False)
class _Request(_Pending[Q]):
    handle: Any = None
    runner: Any = None
    started: float = 0.0
    cost: int | None = _UNCOUNTED  # `prefill_cost(item)`, asked once


class ContinuousBatcher(QueueingBatcher[Q], Generic[Q, R]):
    def __init__(
        self,
        slots: int,
        get_runner: Callable[[], StepRunner[Q, R]],
        *,
        executor: Executor | None = None,
        on_batch: Callable[[int], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        max_queue: int | None = None,
        steps_per_tick: int = 8,
        max_prefill_per_tick: int | None = None,
        max_queue_wait_s: float | None = None,
        prefill_cost: Callable[[Q], int | None] | None = None,
        prefill_batch_tokens: int = 0,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if steps_per_tick < 1:
            raise ValueError(f"steps_per_tick must be >= 1, got {steps_per_tick}")
        if max_prefill_per_tick is not None and max_prefill_per_tick < 1:
            raise ValueError(f"max_prefill_per_tick must be >= 1, got {max_prefill_per_tick}")
        if prefill_batch_tokens < 0:
            raise ValueError(f"prefill_batch_tokens must be >= 0, got {prefill_batch_tokens}")
        super().__init__(
            executor=executor,
            on_batch=on_batch,
            on_queue_depth=on_queue_depth,
            max_queue=max_queue,
            worker_name="r2ec-continuous-batcher",
            max_queue_wait_s=max_queue_wait_s,
        )
        self.slots = slots
        self.get_runner = get_runner
        # Decode steps one model-thread call may run while nothing changes (no answer, no new
        # request, no cancellation): each call is a round trip through the event loop, which
        # cost ~6 ms a token at concurrency 1 (BENCHMARKS.md §4).
        self.steps_per_tick = steps_per_tick
        # Requests one tick admits (R2EC_MAX_PREFILL_PER_TICK; None: every free slot). Each is a
        # prefill the running rows wait for before their next token, so this bounds how long a
        # burst of arrivals stalls them (docs/architecture.md §4.2.2, BENCHMARKS.md §4).
        self.max_prefill_per_tick = slots if max_prefill_per_tick is None else max_prefill_per_tick
        # Requests answered by one prefill (R2EC_PREFILL_BATCH_TOKENS; module docstring): a tick
        # admits those waiting up to this many positions, for one batched forward. None or 0:
        # each is admitted as a decoding request is.
        self.prefill_cost = prefill_cost if prefill_batch_tokens else None
        self.prefill_batch_tokens = prefill_batch_tokens
        # self._pending and self._running (the base's) hold _Request: waiting, and decoding
        self._orphans: list[_Request[Q]] = []  # failed by a broken step, still in the runner
        self._admitting: list[_Request[Q]] = []  # joining the decode in the tick running now
        self._request_s: float | None = None  # smoothed seconds from admission to answer
        self.ticks = 0  # model-thread ticks run, for tests and logs

    # ------------------------------------------------------------------ requests
    def retry_after_s(self) -> float:
        """When a refused request might find room: the queue ahead, `slots` at a time, at the
        recent time per request."""
        per_request = self._request_s if self._request_s is not None else 1.0
        rounds = math.ceil(self._live_count() / self.slots) + 1
        return min(RETRY_AFTER_MAX_S, max(1.0, rounds * per_request))

    def _reachable(self, grace_s: float) -> int | None:
        """A request takes the smoothed request time from admission to answer, so one admitted
        later than that before the deadline cannot be answered by it. Each slot frees when its
        running request has had that time since its admission (a free slot now), then takes
        one queued request per request time: the starts up to that latest moment, counted per
        slot, are how many queued requests can still be answered."""
        per_request = self._request_s
        if per_request is None or per_request <= 0:
            return None
        now = time.perf_counter()
        # a joining request the model thread has not stamped yet (`started` 0) has just begun
        frees = [
            max(0.0, per_request - (now - (r.started or now))) for r in (*self._running, *self._admitting)
        ]
        frees += [0.0] * max(0, self.slots - len(frees))
        latest_start = grace_s - per_request
        return sum(
            math.floor((latest_start - free) / per_request) + 1 for free in frees if free <= latest_start
        )

    def _new_pending(self, item: Q, future: asyncio.Future, now: float) -> _Request[Q]:
        return _Request(item, future, now)

    # ------------------------------------------------------------------ worker
    @property
    def active(self) -> int:
        """The decode's requests, those joining it in the running tick included."""
        return len(self._running) + len(self._admitting)

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending and not self._running and not self._orphans:
                self._wakeup.clear()
                await self._wakeup.wait()
            # one tick in a call of its own: its requests (and through their runners, the model
            # they ran on) are not held by this frame while it waits, idle, past a reload
            await self._step(loop)

    def _cost(self, r: _Request[Q]) -> int | None:
        """`prefill_cost` of a request, asked once; None (it decodes, or prefills alone) where
        there is none or it fails."""
        if self.prefill_cost is None:
            return None
        if r.cost == _UNCOUNTED:
            try:
                r.cost = self.prefill_cost(r.item)
            except Exception:  # counted as a decoding request: the runner reports what is wrong
                log.exception("counting a request's prefill failed")
                r.cost = None
        return r.cost

    def _admissions(self, now: float) -> list[_Request[Q]]:
        """Take this tick's requests off the queue: decoding ones in order into free slots, at
        most `max_prefill_per_tick`; those answered by one prefill in order, while their costs
        fit `prefill_batch_tokens` (one at least), passing decoding ones that wait for a slot.
        Each kind stops at its first request that does not fit, so neither overtakes its own."""
        admit: list[_Request[Q]] = []
        passed: list[_Request[Q]] = []  # left waiting, in order, behind the ones admitted
        decoding, tokens, batched = 0, 0, 0
        slots_open, batch_open = True, self.prefill_cost is not None
        while self._pending and (slots_open or batch_open):
            r = self._pending[0]
            cost = self._cost(r)
            if cost is None:
                fits = (
                    slots_open
                    and len(self._running) + decoding < self.slots
                    and decoding < self.max_prefill_per_tick
                )
                slots_open = fits
            else:
                fits = batch_open and (not batched or tokens + cost <= self.prefill_batch_tokens)
                batch_open = fits
            self._pending.popleft()
            if not fits:
                passed.append(r)
                continue
            # cancelled while waiting: never admitted; waited too long: refused now
            if r.future.done() or self._waited_too_long(r, now):
                continue
            admit.append(r)
            if cost is None:
                decoding += 1
            else:
                tokens, batched = tokens + cost, batched + 1
        self._pending.extendleft(reversed(passed))
        return admit

    async def _step(self, loop: asyncio.AbstractEventLoop) -> None:
        admit = self._admissions(loop.time())
        self._on_depth(len(self._pending))
        cancelled = [r for r in self._running if r.future.done()] + self._orphans
        self._orphans = []
        self._running = [r for r in self._running if not r.future.done()]
        running = list(self._running)
        self._admitting = admit  # on the model thread this tick, though in neither list yet
        try:
            answered = await loop.run_in_executor(self._executor, self._tick, admit, running, cancelled)
        except asyncio.CancelledError:
            for r in [*admit, *running]:
                if not r.future.done():
                    r.future.set_exception(BatcherClosed("the service is shutting down"))
            raise
        except Exception as exc:  # the runner broke: fail what it held, keep serving
            log.exception("decode step failed with %d requests", len(admit) + len(running))
            for r in [*admit, *running]:
                self._fail(r, exc)
            # still held by the runner: the next tick drops them there
            self._orphans = [r for r in [*admit, *running] if r.handle is not None]
            self._running = []
            return
        finally:
            self._admitting = []
        self.ticks += 1
        now = time.perf_counter()
        done_ids = set()
        for r, output in answered:
            done_ids.add(id(r))
            w = BATCH_TIME_SMOOTHING
            took = now - r.started
            self._request_s = took if self._request_s is None else (1 - w) * self._request_s + w * took
            if r.future.done():  # cancelled or refused by the drain meanwhile
                continue
            if isinstance(output, BaseException):
                r.future.set_exception(output)
            else:
                r.future.set_result(output)
        self._running = [
            r for r in [*self._running, *admit] if id(r) not in done_ids and r.handle is not None
        ]
        admitted = [r for r in admit if r.handle is not None]
        for _ in admitted:  # how many decoded together when it joined (it may be done already)
            self._on_batch(len(running) + len(admitted))
            self.batches += 1

    def _fail(self, r: _Request[Q], exc: Exception) -> None:
        if not r.future.done():
            failed = BatchFailed(f"decode step failed: {type(exc).__name__}: {exc}")
            failed.__cause__ = exc
            r.future.set_exception(failed)

    def _tick(
        self, admit: list[_Request[Q]], running: list[_Request[Q]], cancelled: list[_Request[Q]]
    ) -> list[tuple[_Request[Q], R | BaseException]]:
        """On the model thread: drop the cancelled, admit the new, advance everyone one token."""
        for r in cancelled:
            if r.handle is not None:
                r.runner.cancel(r.handle)
        answered: list[tuple[_Request[Q], R | BaseException]] = []
        runner = self.get_runner()
        for r in admit:
            r.started = time.perf_counter()
            try:
                out = runner.add(r.item)
            except Exception as exc:  # one bad request must not stop the others
                log.exception("admitting a request failed")
                answered.append((r, _batch_failed(exc)))
                continue
            if isinstance(out, Running):
                r.handle, r.runner = out.handle, runner
            else:
                answered.append((r, out))  # type: ignore[arg-type]
        live = [*running, *(a for a in admit if a.handle is not None)]
        by_runner: dict[int, tuple[StepRunner, dict[Any, _Request[Q]]]] = {}
        for r in live:
            by_runner.setdefault(id(r.runner), (r.runner, {}))[1][r.handle] = r
        for step in range(self.steps_per_tick):
            # after the first step, go on only while nothing changed that the loop must see
            if step and (answered or self._pending or any(r.future.done() for r in live)):
                break
            for run, handles in by_runner.values():  # normally one; two while a reload's old one drains
                for handle, output in run.step():
                    if handle in handles:
                        answered.append((handles[handle], output))
        return answered


def _batch_failed(exc: Exception) -> BatchFailed:
    failed = BatchFailed(f"{type(exc).__name__}: {exc}")
    failed.__cause__ = exc
    return failed
