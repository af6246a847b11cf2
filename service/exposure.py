"""The exposure log (R2EC_EXPOSURE_LOG=redis): what the service served, for joining with outcomes.

One `Served` entry per answered POST /recommend and per /recommend/stream that got to its
`items` event (recorded as it is handed to the server: service/streaming.py), in the Redis
stream r2ec:served (service/store.py), so a click posted with the recommendation's `request_id`
(POST /users/{id}/events) can be attributed to the model version, rank and score that produced
it (docs/operations.md, "Attributing outcomes").

The write must never cost the answer: `record` only builds the entry and puts it on a bounded
in-process queue, after the reply is decided; one writer task drains the queue into Redis, up
to WRITE_BATCH entries a round trip (one script, SERVED_SCRIPT), waiting LINGER_S after an
entry for more, so an entry reaches Redis within ~50 ms and many requests share a round trip.
Nothing here raises into a request. A write that fails (Redis down or full) is logged, at most
every 10 s, and counted: r2ec_exposures_total{outcome="failed"} (and
r2ec_store_errors_total{op="add_served"}); those entries are lost, not retried. A full queue
(Redis slower than the traffic) drops new entries, counted as outcome="dropped". An entry made before its
user's erasure that reaches Redis after it is not written (outcome="erased"): one made from the
stored history is checked by that history's events, still stored or not, whenever the erasure
came (during the model's work, the queue wait, the write queue), with no clock compared; one
made from an inline history by its time against the erasure's (service/store.py,
SERVED_SCRIPT). On shutdown the queue gets FLUSH_S to drain; the entries still queued then,
and the batch the writer holds, are counted as dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time

from service.logs import Throttled
from service.metrics import Metrics
from service.store import RedisStore, Served, StoreUnavailable
from service.types import Query, Result

log = logging.getLogger(__name__)

QUEUE_SIZE = 10_000  # entries waiting for Redis at most (~1 KB each in memory); then dropped
# entries per round trip at most: Redis runs such a script in ~0.35 ms, and building its
# arguments holds the event loop ~1-3 ms in one piece on a busy 2-core host (200 entries: 4-12 ms,
# which a request arriving then waits out; BENCHMARKS.md §4)
WRITE_BATCH = 50
# after an entry comes, the writer waits this long for more before it writes: one round trip for
# the entries of many requests, where a round trip each cost ~0.3 ms of CPU a request (the
# client's side of a Redis call runs on the event loop) against ~0.1 ms (BENCHMARKS.md §4)
LINGER_S = 0.05
FLUSH_S = 2.0  # how long shutdown waits for the queue to drain


def served(
    request_id: str,
    user_id: str | None,
    route: str,
    query: Query,
    result: Result,
    history_source: str,
    variant: str = "",
) -> Served:
    """The exposure-log entry of one answer (service/store.py `Served`); `variant` is the
    replica's R2EC_VARIANT."""
    text = result.reasoning
    # the stored history it was made from, by event id: the write checks it is still stored, so
    # an answer made before its user's erasure leaves no entry (service/store.py SERVED_SCRIPT)
    made_from = None
    if query.stored_user is not None:
        made_from = tuple(e.event_id for e in query.history if e.event_id)
    return Served(
        request_id=request_id,
        user_id=user_id or "",
        at_ms=int(time.time() * 1000),
        model_version=result.model_version,
        route=route,
        k=query.k,
        reasoning=text is not None,
        reasoning_sha256="" if text is None else hashlib.sha256(text.encode("utf-8", "replace")).hexdigest(),
        cache=result.cache,
        history_source=history_source,
        items=tuple(i.item_id for i in result.items),
        scores=tuple(float(i.score) for i in result.items),
        ranks=tuple(int(i.rank) for i in result.items),
        fingerprint=result.fingerprint,
        variant=variant,
        made_from=made_from,
    )


class ExposureLog:
    """The queue and its writer task (module docstring)."""

    def __init__(
        self,
        store: RedisStore,
        metrics: Metrics,
        maxlen: int,
        retention_s: int,
        queue_size: int = QUEUE_SIZE,
        variant: str = "",
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.variant = variant  # R2EC_VARIANT, in every entry
        self.maxlen = maxlen
        self.max_age_ms = retention_s * 1000
        self._queue: asyncio.Queue[Served] = asyncio.Queue(queue_size)
        self._writer: asyncio.Task | None = None
        # the entries the writer has taken off the queue and not yet counted: what `close()`
        # counts as dropped if it stops the writer meanwhile (in LINGER_S, or waiting on Redis)
        self._batch: list[Served] = []
        self._failed_log = Throttled(log)
        self._dropped_log = Throttled(log)

    def start(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._run(), name="r2ec-exposure-log")

    def record(
        self,
        request_id: str | None,
        user_id: str | None,
        route: str,
        query: Query,
        result: Result,
        history_source: str,
    ) -> None:
        """Queue the answer's entry; never raises, never waits."""
        try:
            entry = served(request_id or "", user_id, route, query, result, history_source, self.variant)
            self._queue.put_nowait(entry)
        except asyncio.QueueFull:
            self.metrics.exposures.labels("dropped").inc()
            self._dropped_log.warn(
                "exposure log: %d entries waiting for Redis, dropping new ones", self._queue.qsize()
            )
        except Exception:  # a bug here must not fail the answer
            self.metrics.exposures.labels("failed").inc()
            log.exception("exposure log: could not make the entry of request %s", request_id)

    @property
    def pending(self) -> int:
        """Entries queued, not yet written."""
        return self._queue.qsize()

    async def flush(self) -> None:
        """Wait until every entry queued so far has been written or failed (tests, shutdown)."""
        await self._queue.join()

    async def close(self, timeout_s: float = FLUSH_S) -> None:
        """Let the queue drain for up to `timeout_s`, then stop the writer; what is left is
        counted as dropped: the entries still queued and the batch the writer held (taken off
        the queue, its write to Redis not answered yet; it may have reached Redis, its reply did
        not come), so written + failed + dropped + erased is every entry recorded."""
        if self._writer is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout_s)
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        self._writer = None
        left = self._queue.qsize() + len(self._batch)
        self._batch = []
        if left:
            self.metrics.exposures.labels("dropped").inc(left)
            log.warning("exposure log: %d entries not written at shutdown", left)

    async def _run(self) -> None:
        while True:
            batch = self._batch = [await self._queue.get()]  # counted by `close` until counted here
            if self._queue.qsize() < WRITE_BATCH - 1:
                await asyncio.sleep(LINGER_S)  # let more come: one round trip for them all
            while len(batch) < WRITE_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                written = await self.store.add_served(batch, self.maxlen, self.max_age_ms)
                self._batch = []
            except StoreUnavailable as exc:
                self._batch = []
                self.metrics.exposures.labels("failed").inc(len(batch))
                self.metrics.store_errors.labels(exc.op).inc()
                self._failed_log.warn("exposure log: %d entries not written: %s", len(batch), exc)
            except Exception:  # the writer must outlive any one batch
                self._batch = []
                self.metrics.exposures.labels("failed").inc(len(batch))
                log.exception("exposure log: %d entries not written", len(batch))
            else:
                self.metrics.exposures.labels("written").inc(written)
                if written < len(batch):
                    self.metrics.exposures.labels("erased").inc(len(batch) - written)
            finally:
                for _ in batch:
                    self._queue.task_done()
