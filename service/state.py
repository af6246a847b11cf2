"""What a running app holds, and the request paths that need more than one of its parts.

`ServiceState` owns the current `Recommender` (swapped atomically by a reload), the history
store, the micro-batcher and the one model thread. Routes call its methods and stay thin: a
recommendation is resolved here (history), prepared once by the engine (ids, prompt, cache key),
looked up in the reasoning cache with that key, then answered from a cached h_T (one index search)
or submitted to the batch.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import gc
import logging
import os
import random
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from index import search_without_threads
from model.backbone_digest import label as backbone_label
from model.checkpoint import CURRENT_FILE, CheckpointError, read_meta, resolve_checkpoint
from model.retrain import STATE_FILE as RETRAIN_STATE
from model.retrain import WORK_DIR as RETRAIN_DIR
from service.batcher import BatcherClosed, MicroBatcher, QueueFull, QueueTimeout
from service.catalog import BatchEdited, Catalog, NeedsEncoding, ReadyVectors, stored_record
from service.config import Settings
from service.continuous import ContinuousBatcher
from service.deadline import Deadline, DeadlineExceeded
from service.exposure import ExposureLog
from service.logs import Throttled
from service.metrics import EXPOSURE_OUTCOMES, Metrics
from service.recommender import Recommender
from service.store import Appended, Erased, Event, EventRate, HistoryStore, RedisStore, StoreUnavailable
from service.types import (
    CachedReasoning,
    EmptyHistoryError,
    PreparedQuery,
    Query,
    QueryError,
    Result,
    UnknownItemsError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
WATCH_RETRIES = 3  # loads of one new checkpoint version a tick apart, before the watch slows down
WATCH_SLOW_RETRY_S = 300.0  # then one load of it this often (service/state.py `_watch`)
# items of POST /items:batch encoded per turn of the model thread: what a recommendation may wait
# for meanwhile. 8, not 32: as fast per item on 2 contended cores, a quarter of the wait
# (BENCHMARKS.md §5, 'Bulk item edits')
EDIT_BATCH_CHUNK = 8
# a watch tick's sync encodes outside the edit lock, then commits under it; an item edited again
# meanwhile is encoded again, at most this many times a tick (the rest waits for the next tick)
SYNC_ENCODE_ROUNDS = 3
# while a reload loads, the sync's encoding waits for its outcome, looking this often
SYNC_RELOAD_POLL_S = 0.1
CACHE_BACKOFF_S = 5.0  # after a cache error, skip the cache this long, or until the store
# answers another operation (a down Redis is not asked twice per request while it is down;
# histories are still asked, they are needed, and the first one answered ends the skip)


async def in_passing_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a thread of its own that ends with it: model work that must not wait for
    the model thread (a reload's load, warm-up and re-encoding of edited items). Not
    `asyncio.to_thread`, whose pool keeps its thread alive and with it the thread's OpenMP team:
    while two teams live, libgomp likely counts more threads than cores and lets them sleep
    between kernels instead of spinning (`model.spin_between_kernels`). In a process built like
    the service, a load on a pooled thread made the model thread's later prefills 1.3-1.5x as
    slow, one on a thread that ends 1.01-1.04x (bench/bench_threads.py); the service's own
    reload bench did not show the difference, likely because the cache hits before it had
    slowed the model thread already (BENCHMARKS.md §4)."""
    executor = ThreadPoolExecutor(1, thread_name_prefix="r2ec-reload")
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    finally:
        executor.shutdown(wait=False)  # the thread ends once `fn` returns


class ReloadError(RuntimeError):
    """A checkpoint could not be loaded; the running model keeps serving."""


class ReloadInProgress(RuntimeError):
    pass


def checkpoint_root(configured: Path) -> Path:
    """The directory `POST /admin/reload` may load checkpoints from: R2EC_CHECKPOINT itself
    where it is a versions root (it holds a CURRENT pointer), else the directory that holds it
    (checkpoints/current -> checkpoints/), unless that is the filesystem's root: the image's
    /checkpoints with one checkpoint mounted there would open every path on the host (/etc,
    /proc) to reloads; then only the configured checkpoint. Absolute, not resolved."""
    configured = Path(os.path.abspath(configured))
    if (configured / CURRENT_FILE).is_file() or configured.parent == Path(configured.anchor):
        return configured
    return configured.parent


def confine_checkpoint(configured: Path, requested: str) -> Path:
    """The checkpoint a reload asked for, resolved (symlinks too), where it is inside the
    checkpoint root (`checkpoint_root`); a relative one (a version name, "v2") is taken from
    the root. ValueError otherwise, with one message whatever lies outside: a path outside the
    root as written is refused without looking at the disk, so the answer never says whether
    such a path exists. A path inside it that resolves outside (a symlink out) is refused too,
    unless it is the configured checkpoint itself (checkpoints/current may be a link)."""
    root = checkpoint_root(configured)
    outside = ValueError(
        f"must name a checkpoint under the checkpoint root {str(root)!r} (R2EC_CHECKPOINT, or "
        "the directory that holds it): a version name such as 'v2', or a path inside it"
    )
    candidate = root / requested  # an absolute `requested` stands for itself
    if not Path(os.path.normpath(candidate)).is_relative_to(root):
        raise outside
    resolved = candidate.resolve()
    if not any(resolved.is_relative_to(p.resolve()) for p in (root, Path(configured))):
        raise outside
    return resolved


def checkpoint_label(configured: Path, path: Path, version: str) -> str:
    """How /metrics names the served checkpoint (r2ec_model_info's `checkpoint`): its path
    relative to the checkpoint root ("v2", "current"), never an absolute path; the version
    where it lies elsewhere."""
    root = checkpoint_root(configured)
    for base, where in ((root, Path(os.path.abspath(path))), (root.resolve(), Path(path).resolve())):
        if where.is_relative_to(base):
            return where.relative_to(base).as_posix()
    return version


class EditNotSaved(RuntimeError):
    """An item edit this replica applied, in memory only: the volume refused the save. `batch`:
    the number of edits of a batch (POST /items:batch) that `item_id` is the first of."""

    def __init__(self, item_id: str, reason: str, watching: bool, batch: int | None = None) -> None:
        when = "at the next watch tick or edit" if watching else "with the next item edit"
        if batch is None:
            what, verb, it = f"item {item_id!r}", "is", "it"
        else:
            what, verb, it = f"the batch's {batch} item edits (the first: {item_id!r})", "are", "them"
        super().__init__(
            f"{what} {verb} served by this replica from memory but could not be saved "
            f"({reason}): a restart, the other replicas and the next published version do not "
            f"have {it} yet; {'it is' if batch is None else 'they are'} saved {when} once the "
            "volume takes it"
        )


class ClientDisconnected(Exception):
    pass


def _error_code(exc: Exception) -> str:
    """The error body's `code` (service/errors.py) of a recommendation that failed with `exc`,
    for r2ec_recommend_errors_total: a bounded set."""
    match exc:
        case UnknownItemsError():
            return "unknown_items"
        case EmptyHistoryError():
            return "empty_history"
        case QueryError():
            return "invalid_request"
        case QueueFull() | QueueTimeout():
            return "overloaded"
        case BatcherClosed():
            return "shutting_down"
        case ClientDisconnected():
            return "client_disconnected"
        case DeadlineExceeded():
            return "deadline_exceeded"
        case StoreUnavailable():
            return "store_unavailable"
    return "internal_error"


RELEASE_POLL_S = 1.0  # how often `_release` looks whether the replaced model is gone
RELEASE_WAIT_S = 600.0  # longer than any request decodes on it
RELEASE_COLLECT_AT_S = (5.0, 40.0, 120.0, 300.0)  # when `_release` collects while it waits


def release_memory() -> None:
    """Collect, then hand the C heap's free memory back to the OS (glibc's malloc_trim): glibc
    keeps a freed model's ~1.3 GB (SmolLM2) for reuse, so a replica's RSS rose at each reload
    though the old model was gone. Nothing to trim where the C library has no malloc_trim."""
    gc.collect()
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return
    trim(0)


class ServiceState:
    def __init__(
        self,
        settings: Settings,
        engine: Recommender,
        store: HistoryStore,
        metrics: Metrics,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.settings = settings
        self.engine = self._adopt(engine)
        self.store = store
        self.metrics = metrics
        self.model_executor = executor  # the only thread that runs the model
        # cache hits with their h_T: one index search each, off the model thread so they never
        # wait for a decode tick, on one thread whose FAISS calls start no OpenMP team (a team
        # living on a second thread slows the model thread: search_without_threads)
        self.hits_executor = ThreadPoolExecutor(
            1, thread_name_prefix="r2ec-hits", initializer=search_without_threads
        )
        self.continuous = settings.batching == "continuous" and engine.continuous
        if settings.batching == "continuous" and not self.continuous:
            log.warning("continuous batching needs the engine backend; serving with static batches")
        self.batcher: MicroBatcher[PreparedQuery, Result] | ContinuousBatcher[PreparedQuery, Result]
        if self.continuous:  # requests join the running decode at token boundaries
            self.batcher = ContinuousBatcher(
                settings.max_batch,
                lambda: self.engine.runner(),  # read at every tick: a reload's model takes new ones
                executor=executor,
                on_batch=metrics.batch_size.observe,
                on_queue_depth=metrics.queue_depth.set,
                max_queue=settings.max_queue,
                max_prefill_per_tick=settings.max_prefill_per_tick,
                max_queue_wait_s=settings.max_queue_wait_s or None,
                # no-reasoning requests: one prefill forward a tick for those waiting, no slot
                prefill_cost=lambda p: self.engine.prefill_tokens(p),
                prefill_batch_tokens=settings.prefill_batch_tokens,
            )
        else:
            self.batcher = MicroBatcher(
                settings.max_batch,
                settings.max_wait_ms,
                self._run_batch,
                executor=executor,
                on_batch=metrics.batch_size.observe,
                on_queue_depth=metrics.queue_depth.set,
                max_queue=settings.max_queue,
                max_queue_wait_s=settings.max_queue_wait_s or None,
            )
        self._reload_lock = asyncio.Lock()
        self.edit_lock = asyncio.Lock()  # item edits vs. the swap of a reload
        self._cache_down_until = 0.0
        # the store's answered operations when the cache failed (None: it answered that one too)
        self._cache_down_answered: int | None = 0
        self.store_down_log = Throttled(log)  # `store_failed`
        # POST /users/{id}/events: each user's bound on event writes (None: R2EC_USER_EVENTS_PER_S=0)
        self.event_rate = (
            EventRate(settings.user_events_per_s, settings.user_events_burst)
            if settings.user_events_per_s > 0
            else None
        )
        self._watcher: asyncio.Task | None = None
        self._syncer: asyncio.Task | None = None  # the watch's sync of item edits under way
        self._stopping = False  # `stop` has begun: a sync's encoding thread gives up
        self._releases: set[asyncio.Task] = set()  # `_release` tasks, one per reload
        metrics.track_store(lambda: self.store.up)
        if isinstance(store, RedisStore):
            store.on_op = metrics.store_op
            metrics.stream_maxlen = settings.stream_maxlen
        metrics.queue_capacity.set(settings.max_queue)
        metrics.batch_capacity.set(settings.max_batch)
        metrics.batch_active.set_function(lambda: float(self.batcher.active))
        metrics.track_retrain(Path(settings.checkpoint) / RETRAIN_DIR / RETRAIN_STATE)
        metrics.track_index_size(lambda: len(self.engine.catalog.index))
        metrics.track_unsaved_edits(lambda: self.engine.catalog.unsaved is not None)
        metrics.track_drafts(lambda: self.engine.draft_counts())
        # the exposure log (R2EC_EXPOSURE_LOG=redis; Settings refuses it without a Redis URL)
        self.exposures: ExposureLog | None = None
        if settings.exposure_log == "redis":
            if isinstance(store, RedisStore):
                self.exposures = ExposureLog(
                    store,
                    metrics,
                    settings.exposure_maxlen,
                    settings.exposure_retention_s,
                    variant=settings.variant,
                )
                for outcome in EXPOSURE_OUTCOMES:  # at 0 from the start, so an alert can rate() them
                    metrics.exposures.labels(outcome)
            else:
                log.warning("R2EC_EXPOSURE_LOG=redis, but the store is not Redis: nothing is logged")
        self._publish_version()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        # r2ec_model_outdated from the start, watch or no watch: a replica that fell back to an
        # older version (`Recommender.load_or_fall_back`) is outdated before any tick
        try:
            self.metrics.model_outdated.set(self._named_version() != self.engine.version)
        except (CheckpointError, OSError, ValueError):  # CURRENT names what does not read
            self.metrics.model_outdated.set((Path(self.settings.checkpoint) / CURRENT_FILE).is_file())
        await self.batcher.start()
        if self.exposures is not None:
            self.exposures.start()
        if self.settings.watch_interval_s > 0:
            self._watcher = asyncio.create_task(self._watch(), name="r2ec-checkpoint-watch")

    def begin_drain(self) -> None:
        """Shutdown has begun (the server got SIGTERM): /readyz says so, new recommendations are
        refused, the queued ones get `shutdown_grace_s` to be answered (service/batcher.py)."""
        self.batcher.drain(self.settings.shutdown_grace_s)

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._releases):
            task.cancel()
        for task in (self._watcher, self._syncer):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        try:
            await self.batcher.stop()
        finally:
            self.hits_executor.shutdown(wait=False)
            if self.exposures is not None:  # the answers the drain gave are written too
                await self.exposures.close()

    async def run_model(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the model thread (serialised with the batches)."""
        return await asyncio.get_running_loop().run_in_executor(self.model_executor, fn, *args)

    # ------------------------------------------------------------------ histories and items
    async def resolve_history(
        self, user_id: str | None, inline: Sequence[Event] | None, seen: bool = False
    ) -> tuple[tuple[Event, ...], str | None, frozenset[str]]:
        """The request's history, else the user's stored one; the user whose stored history it
        is (None when the request carried it); with `seen` and a user, every item that user has
        an event for (what exclude_history removes beyond the history window). A request's
        history whose every entry has a timestamp is put in timestamp order (ties as sent), as
        the store keeps one, so the prompt reads it oldest first however it was sent. The engine
        checks the ids when it prepares the query; an empty result is its EmptyHistoryError."""
        if inline or user_id is None:  # `history: []` and no user to look up: empty, said later
            items = await self._seen(user_id, required=False) if seen else frozenset()
            history = tuple(inline or ())
            if history and all(e.timestamp is not None for e in history):
                history = tuple(sorted(history, key=lambda e: e.timestamp))
            return history, None, items
        if not seen:
            return tuple(await self.store.get_history(user_id)), user_id, frozenset()
        stored, items = await asyncio.gather(  # StoreUnavailable: the app's 503
            self.store.get_history(user_id), self._seen(user_id, required=True)
        )
        return tuple(stored), user_id, items

    async def _seen(self, user_id: str | None, required: bool) -> frozenset[str]:
        """The user's seen items. A request that carries its history is still answered while
        the store is down (`required=False`), excluding only that history."""
        if user_id is None:
            return frozenset()
        try:
            return await self.store.get_seen(user_id)
        except StoreUnavailable as exc:
            if required:
                raise
            self.store_failed(exc)
            return frozenset()

    async def read_stream_info(self) -> None:
        """/metrics: the event stream's counts, read at each scrape (r2ec_stream_entries,
        r2ec_retrain_unread_events); none where the store is not Redis (no retraining reads the
        in-process one) or did not answer."""
        info = None
        if isinstance(self.store, RedisStore):
            try:
                info = await self.store.stream_info()
            except StoreUnavailable as exc:
                self.store_failed(exc)
        self.metrics.stream_info = info

    def store_failed(self, exc: StoreUnavailable) -> None:
        """Count a failed store operation; a WARNING at most every 10 s while the store is down,
        however requests meet it (a 503 store_unavailable, service/errors.py; a request with its
        own history answered without the user's seen items, `_seen`)."""
        self.metrics.store_errors.labels(exc.op).inc()
        self.store_down_log.warn(
            "history store down: requests that need it get 503 store_unavailable, those that carry "
            "their history are answered without the user's other seen items: %s", exc,
        )  # fmt: skip

    async def append_events(self, user_id: str, events: Sequence[Event]) -> Appended:
        """Append the user's new events (by event id) to the history, the retraining stream and
        the seen set, if every item is known and the user's event rate (`event_rate`) allows
        them all (else UserRateLimited, nothing stored)."""
        unknown = self.engine.catalog.unknown(e.item_id for e in events)
        if unknown:
            raise UnknownItemsError(unknown, where="events")
        return await self.store.append_events(user_id, events, rate=self.event_rate)

    async def erase_user(self, user_id: str) -> Erased:
        """Erase the user from the store (service/store.py `erase_user`): history, seen set,
        event ids, stream entries, exposure-log entries, the reasonings cached for their stored
        history, and the ledger retraining reads. What this cannot reach is `erasure_remains`.
        Logged without the id (the ledger holds it), so the log does not keep the name of whom
        it erased."""
        erased = await self.store.erase_user(user_id)
        log.info(
            "erased a user: %d history events, %d seen items, %d stream entries, %d cached reasonings, "
            "%d exposure-log entries",
            erased.history_events,
            erased.seen_items,
            erased.stream_entries,
            erased.cached_reasonings,
            erased.served_entries,
        )
        return erased

    def erasure_remains(self) -> list[str]:
        """What an erasure leaves, in words for its receipt (docs/operations.md, "Erasing a
        user"), as this service is configured."""
        s = self.settings
        redis = isinstance(self.store, RedisStore)
        out = []
        if redis:
            out.append(
                "Retraining's log ROOT/retrain/events.parquet and its rebuilt dataset "
                "ROOT/retrain/data/ hold the events it consumed before this erasure until the "
                "next `r2ec retrain` run, which reads the erasure from the ledger (r2ec:erasures) "
                "and drops them; from then on every run also leaves this user id's interactions "
                "out of the seed dataset."
            )
        out.append(
            "Model versions already published under the versions root (CURRENT and up to "
            "`--keep` older ones) keep what training on this user's events taught their "
            "weights: each retrain starts from CURRENT, so only a training run from the "
            "backbone (or a version that never saw the user) on data without them, published, "
            "with the older versions removed, takes it out."
        )
        if redis:
            out.append(
                "Redis's append-only file and RDB snapshots hold the erased data until they are "
                "rewritten: BGREWRITEAOF for the AOF, the next BGSAVE for the RDB file."
            )
        else:
            out.append(
                "Without Redis each replica keeps its own in-process store: this call erased "
                "this replica's only; send it to every replica."
            )
        out.append("Backups of Redis, of the versions root and of the seed dataset, until they expire.")
        if s.exposure_log == "redis":
            out.append(
                "Files written by `r2ec exposures export` before this erasure hold the exposure-log "
                "entries it removed (what was recommended to this user): export again and replace them."
            )
        if redis and (older := self._older_release_cache()) is not None:
            out.append(older)
        out.append(
            "Log lines written before this service version logged /users/ paths with the id; "
            "those stay in the log pipeline for its retention (lines since name no user)."
        )
        if s.cache_size > 0:
            lasts = (
                f"expire {s.cache_ttl_s} s after they were written (R2EC_CACHE_TTL_S)"
                if redis
                else f"leave the in-process cache of {s.cache_size} entries as newer ones "
                "replace them, or at a restart"
            )
            out.append(
                "Reasonings cached for requests that sent this user's history inline, or that "
                "read another user's identical stored history, are keyed by the history's "
                f"content, not by a user: they {lasts}."
            )
        drafter = self.engine.backend.drafter
        if drafter is not None:
            out.append(
                f"Each replica keeps the last {drafter.memory} reasoning texts it wrote as "
                "speculative-decoding drafts (R2EC_SPECULATIVE_TOKENS), tied to no user: newer "
                "texts replace them, or a restart."
            )
        return out

    def _older_release_cache(self) -> str | None:
        """The receipt's line for reasonings an r2ec before 0.2.0 cached in this Redis, while some
        may be left: one older than the erasure indexed none by user, so no erasure finds them (and
        which build it was, nothing says). When it used this Redis is
        in the format marker (service/store.py `check_format`); None where it did not, or where
        R2EC_CACHE_TTL_S has passed since this version first started on it."""
        assert isinstance(self.store, RedisStore)
        ttl = self.settings.cache_ttl_s
        marker = self.store.format
        if marker is not None and (not marker.held_data or time.time() >= marker.since + ttl):
            return None
        if marker is None:  # not read at the start (Redis was down): it may have been used so
            until = f"{ttl} s after this service version first started on this Redis"
        else:
            until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(marker.since + ttl))
        return (
            "Reasonings cached by an r2ec before 0.2.0, which used this Redis, may be indexed by no "
            "user (releases before the erasure indexed none), so this erasure may not find them: "
            "none is read again, and they expire "
            f"R2EC_CACHE_TTL_S after they were written, by {until} at this service's {ttl} s (the "
            "older release's own setting decides). docs/operations.md, 'Upgrading', deletes them "
            "all at once."
        )

    async def upsert_item(self, item_id: str, fields: Mapping[str, Any]) -> tuple[Catalog, bool]:
        """Encode an item on the model thread and add or replace it; (the catalog it is in, True
        if it replaced one)."""
        async with self.edit_lock:  # not while a reload swaps models
            catalog = self.engine.catalog
            replaced = await self.run_model(catalog.upsert, item_id, fields)
            if catalog.unsaved is not None:
                raise EditNotSaved(item_id, catalog.unsaved, self.settings.watch_interval_s > 0)
        return catalog, replaced

    async def remove_item(self, item_id: str) -> Catalog:
        """Remove an item (on the model thread, between batches); KeyError when it is unknown."""
        async with self.edit_lock:  # not while a reload swaps models
            catalog = self.engine.catalog
            if catalog.item(item_id) is None:
                raise KeyError(item_id)
            await self.run_model(catalog.remove, item_id)  # KeyError: a concurrent delete won
            if catalog.unsaved is not None:
                raise EditNotSaved(item_id, catalog.unsaved, self.settings.watch_interval_s > 0)
        return catalog

    async def edit_items(
        self, upserts: Mapping[str, Mapping[str, Any]], deletes: Sequence[str]
    ) -> tuple[Catalog, BatchEdited]:
        """A batch of item edits (POST /items:batch), all or nothing: every text checked first
        (ItemBatchError naming each refused field, `upsert.3.title`), then the upserts encoded
        on the model thread EDIT_BATCH_CHUNK items at a time, so recommendation batches run
        between the chunks, then every upsert and delete applied at once, on the model thread
        (`Catalog.edit_many`: one index pass, one edit-log append, one save). The edit lock is
        held throughout: a reload swaps models before the batch or after it, never between its
        chunks, and no other edit lands in between."""
        async with self.edit_lock:  # not while a reload swaps models
            catalog = self.engine.catalog
            catalog.check_texts(list(upserts.values()))
            items = [{"item_id": i, **stored_record(f)} for i, f in upserts.items()]
            chunks = []
            for start in range(0, len(items), EDIT_BATCH_CHUNK):
                chunk = items[start : start + EDIT_BATCH_CHUNK]
                chunks.append(await self.run_model(catalog.encode_items, chunk))
            vectors = np.concatenate(chunks) if chunks else None
            done = await self.run_model(catalog.edit_many, upserts, deletes, vectors)
            if catalog.unsaved is not None and (done.replaced or done.deleted):
                first = next(iter(done.replaced), None) or done.deleted[0]
                edits = len(done.replaced) + len(done.deleted)
                raise EditNotSaved(first, catalog.unsaved, self.settings.watch_interval_s > 0, batch=edits)
        return catalog, done

    # ------------------------------------------------------------------ recommend
    async def recommend(
        self,
        query: Query,
        wait_disconnect: Callable[[], Awaitable[Any]] | None = None,
        on_text: Callable[[str], None] | None = None,
        on_queued: Callable[[], None] | None = None,
        deadline: Deadline | None = None,
    ) -> Result:
        """Prepare -> cache lookup -> micro-batch -> cache fill. A hit whose entry carries h_T
        skips the batch: one index search (`_answer_cached`). `wait_disconnect()` resolves when
        the client goes away; the request is then dropped from its batch (ClientDisconnected).
        `deadline` (the client's X-Request-Timeout, service/deadline.py): where it passes before
        the answer, the request is dropped the same way and DeadlineExceeded says where it was.
        Streaming: `on_text` gets the reasoning as it is written, on the model thread
        (PreparedQuery.on_text); `on_queued()` is called once the request is in the batcher's
        queue, past every check that refuses it, so a stream can start."""
        engine = self.engine
        try:
            prepared = engine.prepare(query)  # QueryError for a bad history: the app's 422
            if on_text is not None:
                prepared = dataclasses.replace(prepared, on_text=on_text)
            if prepared.cache_key is not None:
                cached = await self._cache_get(prepared.cache_key)
                if cached is not None:
                    prepared = dataclasses.replace(prepared, cached=cached)
            result = await self._answer_cached(prepared)
            if result is None:
                result = await self._batched(prepared, wait_disconnect, on_queued, deadline)
                self.metrics.queue_wait.observe(result.timings.queue_ms / 1e3)
        except Exception as exc:  # by the model serving when it failed (the batch's may be newer)
            self.metrics.by_model(self.metrics.recommend_errors, engine.version, _error_code(exc)).inc()
            raise
        # each by the model that answered: a reload between the request and its batch moves it
        m, version = self.metrics, result.model_version
        m.by_model(m.recommend_seconds, version).observe(time.perf_counter() - query.submitted_at)
        if result.cache != "off":
            m.by_model(m.cache, version, result.cache).inc()
            m.by_model(m.reasoning_cut, version).inc(result.reasoning_cut)
        if result.cache == "miss":
            m.by_model(m.reasoning_tokens, version).observe(result.reasoning_tokens)
        if self.continuous and result.cache == "miss":  # (static batches observe per generate call)
            m.by_model(m.generate_seconds, version).observe(result.timings.generate_ms / 1e3)
        if result.generated is not None and result.cache_key is not None:
            # indexed under the user whose stored history it was made from, so their erasure
            # finds it (service/store.py, "Erasure")
            made_from = [e.event_id for e in query.history if e.event_id] if query.stored_user else []
            await self._cache_set(result.cache_key, result.generated, query.stored_user, made_from)
        return result

    async def _answer_cached(self, prepared: PreparedQuery) -> Result | None:
        """The answer for a cache hit that carries h_T for the model serving now: an index
        search, no queue, no model. None when the batch must answer (no hit, an entry without
        h_T, or a reload swapped the model since `prepare`: the batch prepares it again).

        The search runs on the hits thread (`hits_executor`, its FAISS calls without an OpenMP
        team), not on the model thread, where it would wait behind a running batch's
        generation; hits run there one at a time, a few ms each at ml-100k's size.
        Catalog.search holds the catalog's lock (and the index its own), which item edits take
        around every index change, so a search never sees half an edit; an edit's encoding runs
        outside that lock, so a hit waits at most for an index insert or delete, never for the
        model."""
        engine = self.engine
        cached = prepared.cached
        if (
            cached is None
            or cached.vector is None
            or not engine.prepared_here(prepared)
            or cached.vector.shape != (engine.model.hidden_size,)
        ):
            return None
        self.batcher.check_open()  # a draining service refuses it as the batcher would: 503
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.hits_executor, engine.answer_cached, prepared)

    async def _batched(
        self,
        prepared: PreparedQuery,
        wait_disconnect: Callable[[], Awaitable[Any]] | None,
        on_queued: Callable[[], None] | None = None,
        deadline: Deadline | None = None,
    ) -> Result:
        """Submit to the batcher and wait; ClientDisconnected if the client leaves first,
        DeadlineExceeded if `deadline` passes first (before the submit too: the history and
        cache lookups took its time). Either way the request is dropped: a queued one is never
        admitted, a decoding one's slot goes to the next request at the next tick
        (service/continuous.py; a static batch runs to its end, its answer for it unused)."""
        if deadline is not None and deadline.left() <= 0:
            raise DeadlineExceeded(deadline, "queued", self.batcher.retry_after_s())
        future = self.batcher.submit(dataclasses.replace(prepared, queued_at=time.perf_counter()))
        if on_queued is not None:
            on_queued()
        waits = {future}
        if wait_disconnect is not None:
            waits.add(watcher := asyncio.ensure_future(wait_disconnect()))
        timeout = None if deadline is None else deadline.left()
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            future.cancel()  # the handler itself was cancelled (a stream's client left): drop it too
            raise
        finally:
            if wait_disconnect is not None:
                watcher.cancel()
        if future.done():
            return future.result()
        if deadline is not None and deadline.left() <= 0:
            queued = self.batcher.queued(future)
            future.cancel()  # dropped: before its turn, or from the decode at the next tick
            if queued:
                raise DeadlineExceeded(deadline, "queued", self.batcher.retry_after_s())
            raise DeadlineExceeded(deadline, "decoding")
        future.cancel()  # the batcher drops it before its batch runs
        raise ClientDisconnected()

    def _run_batch(self, queries: list[PreparedQuery]) -> list[Result | QueryError]:
        """Runs on the model thread; reads the engine at batch time (a reload swaps it)."""
        engine = self.engine
        calls = engine.generate_calls
        results = engine.recommend_batch(queries)
        if engine.generate_calls > calls:
            generated = next((r for r in results if isinstance(r, Result) and r.generated), None)
            if generated is not None:
                seconds = self.metrics.by_model(self.metrics.generate_seconds, generated.model_version)
                seconds.observe(generated.timings.generate_ms / 1e3)
        return results

    @property
    def _cache_enabled(self) -> bool:
        """Not for CACHE_BACKOFF_S after a cache error, unless the store has answered an
        operation since (RedisStore.answered) where it had not answered the failed one: a Redis
        that stalled for 5 s is asked again as soon as it answers, where a fixed window sent 5 s
        more of cache hits to the model (`_cache_failed`)."""
        if self.settings.cache_size <= 0:
            return False
        if time.monotonic() >= self._cache_down_until:
            return True
        if self._cache_down_answered is None:  # Redis answered with an error: wait the window out
            return False
        return getattr(self.store, "answered", 0) > self._cache_down_answered

    async def _cache_get(self, key: str) -> CachedReasoning | None:
        if not self._cache_enabled:
            return None
        try:
            raw = await self.store.cache_get(key)
            # a vector of another length, not finite or not unit: ValueError, so a miss below
            return None if raw is None else CachedReasoning.from_json(raw, self.engine.model.hidden_size)
        except StoreUnavailable as exc:
            self._cache_failed(exc)
        except (ValueError, KeyError, TypeError) as exc:  # a corrupt entry is a miss
            log.warning("ignoring unreadable cache entry %s: %s", key, exc)
        return None

    async def _cache_set(
        self, key: str, value: CachedReasoning, user_id: str | None = None, made_from: Sequence[str] = ()
    ) -> None:
        if not self._cache_enabled:
            return
        try:
            await self.store.cache_set(key, value.to_json(), user_id, made_from)
        except StoreUnavailable as exc:
            self._cache_failed(exc)

    def _cache_failed(self, exc: StoreUnavailable) -> None:
        self.metrics.store_errors.labels(exc.op).inc()
        self._cache_down_until = time.monotonic() + CACHE_BACKOFF_S
        # Redis did not answer (down, stalled): the next operation it answers ends the skip. It
        # answered with an error (a full Redis refusing the write: `up` stays true): other
        # operations keep succeeding, so only the window ends it, or every request would try
        # the failing write again.
        answered_it = getattr(self.store, "up", False)
        self._cache_down_answered = None if answered_it else getattr(self.store, "answered", 0)
        until = "" if answered_it else ", or until the store answers again"
        log.warning("reasoning cache skipped for %.0fs%s: %s", CACHE_BACKOFF_S, until, exc)

    def record_served(
        self,
        request_id: str | None,
        user_id: str | None,
        route: str,
        query: Query,
        result: Result,
        history_source: str,
    ) -> None:
        """The exposure log's entry of an answer that was given (service/exposure.py): queued,
        written after the reply, never an error for it. Nothing while the log is off."""
        if self.exposures is not None:
            self.exposures.record(request_id, user_id, route, query, result, history_source)

    # ------------------------------------------------------------------ reload
    async def reload(
        self, path: Path | str | None = None, log_failure: bool = True
    ) -> tuple[Recommender, Recommender]:
        """Load `path` (default: the configured checkpoint) beside the running model and swap it
        in; on any failure the old model keeps serving and ReloadError says why (logged unless
        `log_failure` is False: the watch logs its own line, with the attempt)."""
        if self._reload_lock.locked():
            raise ReloadInProgress("a reload is already in progress")
        target = Path(path) if path else self.settings.checkpoint
        async with self._reload_lock:
            old = self.engine
            try:
                # Not the model thread: batches keep running on the old model while this loads.
                new = await in_passing_thread(lambda: Recommender.load(target, **self.settings.load_kwargs()))
            except Exception as exc:
                self.metrics.reloads.labels("failed").inc()
                if log_failure:
                    log.error("reload of %s failed, still serving %s: %s", target, old.version, exc)
                raise ReloadError(
                    f"could not load checkpoint {str(target)!r}: {exc}; still serving {old.version}"
                ) from exc
            # Item edits made on the old model (PUT/DELETE /items) survive the swap: re-encoded
            # with the new model. The edit lock holds new edits back until the swap is done.
            # Not only this replica's: every edit saved beside the old checkpoint (another
            # replica's, not synced here yet), and those saved there after this read, which the
            # new catalog takes at each watch tick (service/catalog.py `Catalog.carry_from`).
            async with self.edit_lock:
                try:
                    carried = await in_passing_thread(new.catalog.carry_from, old.catalog)
                except Exception as exc:
                    self.metrics.reloads.labels("failed").inc()
                    raise ReloadError(
                        f"loaded {str(target)!r} but could not re-apply the item edits: {exc}; "
                        f"still serving {old.version}"
                    ) from exc
                self.engine = self._adopt(new)  # one assignment: the next batch sees the new model
            if carried:
                log.info("re-applied %d item edits to model %s", carried, new.version)
            self.metrics.reloads.labels("ok").inc()
            self._publish_version()
            log.info("swapped model %s -> %s", old.version, new.version)
            task = asyncio.create_task(self._release(weakref.ref(old)), name="r2ec-release-model")
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)
            return old, new

    async def _release(self, old: weakref.ref[Recommender]) -> None:
        """Once nothing holds the model a reload replaced (the requests decoding on it finish
        first, the reload's caller lets go), give its memory back to the OS (`release_memory`).
        Gives up after RELEASE_WAIT_S: something still holds it, and a trim would free nothing."""
        waited, collections = 0.0, iter(RELEASE_COLLECT_AT_S)
        collect_at = next(collections, None)
        while old() is not None and waited < RELEASE_WAIT_S:
            await asyncio.sleep(RELEASE_POLL_S)
            waited += RELEASE_POLL_S
            if old() is not None and collect_at is not None and waited >= collect_at:
                # a model in a reference cycle goes only with a collection, and one holds the
                # event loop ~0.3 s with SmolLM2 loaded: a few, spaced out, not one a poll
                gc.collect()
                collect_at = next(collections, None)
        if old() is None:
            await asyncio.to_thread(release_memory)
        else:
            log.warning("the model a reload replaced is still held after %.0fs: not freed", waited)

    def _adopt(self, engine: Recommender) -> Recommender:
        """A model about to serve, named as /metrics and the answers name its checkpoint
        (`checkpoint_label`: 'v2', 'current'), which depends on R2EC_CHECKPOINT."""
        engine.label = checkpoint_label(self.settings.checkpoint, engine.checkpoint.path, engine.version)
        return engine

    def _publish_version(self) -> None:
        engine = self.engine
        self.metrics.serving(str(engine.checkpoint.meta.get("created_at", "")), engine.version)
        self.metrics.model.info(
            {
                "version": engine.version,
                "checkpoint": engine.label,
                "fingerprint": engine.fingerprint,
                "variant": self.settings.variant,
                "decode_matmuls": engine.decode_matmuls,
                "index": engine.catalog.index.describe(),
                # what r2ec.json records beside what was loaded (model/backbone_digest.py)
                "backbone": backbone_label(engine.checkpoint.backbone.loaded, 12) or "",
                "backbone_check": engine.checkpoint.backbone.status,
            }
        )

    def _named_version(self) -> str:
        """The version the configured checkpoint resolves to now (a versions root: CURRENT's)."""
        return str(read_meta(resolve_checkpoint(self.settings.checkpoint)).get("version"))

    async def _watch(self) -> None:
        """Follow the configured checkpoint: reload when the version it resolves to changes (the
        retrain job flipped CURRENT, or rewrote the directory). Only a change counts, so a manual
        `POST /admin/reload` of another path is not reverted; a version that fails to load is
        tried WATCH_RETRIES times a tick apart, then every WATCH_SLOW_RETRY_S (a checkpoint
        repaired in place is taken then) until it loads or the pointer moves. r2ec_model_outdated
        is 1 meanwhile. Each tick also starts a sync of the item edits other replicas saved
        (`_sync_edits`), unless one is under way: beside the watch, not in its loop, as one that
        must encode many items takes minutes, and the version is polled at every tick meanwhile;
        a reload the watch starts pauses the sync's encoding between two chunks, and ends it
        where it swaps the model (`_encode_between_batches`). Every failure is logged and counted in
        r2ec_watch_errors_total by stage: pointer (resolving the path or reading the version it
        names), reload, sync."""
        # the version being served, not whatever the pointer names at the first poll: the
        # pointer may have moved while the service loaded
        seen: str | None = self.engine.version
        failing: str | None = None  # the version that failed to load, its failures, next try
        failures, retry_at = 0, 0.0
        while True:
            try:
                version = await asyncio.to_thread(self._named_version)
            except Exception as exc:
                self.metrics.watch_errors.labels("pointer").inc()
                log.warning("checkpoint watch: %s", exc)
                version = None
            if version is not None:
                self.metrics.model_outdated.set(version != self.engine.version)
            if seen is None or version == self.engine.version:
                # at the start, a manual reload that loaded it, or the pointer moved back to the
                # version served: a version that failed is tried at once when it is named again
                seen, failing = version, None
            elif version is not None and version != seen:
                if version != failing:  # a new version: try it now
                    failing, failures, retry_at = version, 0, 0.0
                if time.monotonic() >= retry_at:
                    try:
                        await self.reload(self.settings.checkpoint, log_failure=False)
                        seen, failing = version, None
                        self.metrics.model_outdated.set(0)
                    except ReloadInProgress:
                        pass  # try again next tick
                    except Exception as exc:  # ReloadError, or anything else: the watch goes on
                        self.metrics.watch_errors.labels("reload").inc()
                        failures += 1
                        if failures < WATCH_RETRIES:
                            log.warning("checkpoint watch (attempt %d/%d): %s", failures, WATCH_RETRIES, exc)
                        else:
                            retry_at = time.monotonic() + WATCH_SLOW_RETRY_S
                            log.error(
                                "checkpoint watch: version %s failed to load %d times, still serving %s;"
                                " trying it again every %.0fs until it loads or the pointer moves: %s",
                                version,
                                failures,
                                self.engine.version,
                                WATCH_SLOW_RETRY_S,
                                exc,
                            )
            if self._syncer is None or self._syncer.done():
                self._syncer = asyncio.create_task(self._sync_edits(), name="r2ec-edit-sync")
            # ±20%: replicas that started together do not look, and reload, in the same instant
            # (each load costs a second model's memory and the CPU for a while)
            await asyncio.sleep(self.settings.watch_interval_s * random.uniform(0.8, 1.2))

    async def _sync_edits(self) -> None:
        """Apply the item edits other replicas saved beside the served checkpoint
        (service/catalog.py `Catalog.sync_edits`), not during a reload's carry and swap. The
        sync runs on a thread of its own, not the model thread: the edits this version's log
        holds go in with their logged vectors. The ones that must be encoded (another version's,
        a vector a full save took out of the log) are encoded OUTSIDE the edit lock, so PUT,
        DELETE, POST /items:batch and a reload's swap wait for a commit, not the encoding: under
        the lock the sync finds what it must encode (`ReadyVectors` raises NeedsEncoding,
        nothing of it applied), without it those items take turns with the recommendation
        batches on the model thread, EDIT_BATCH_CHUNK items per turn
        (`_encode_between_batches`), and under the lock again the sync runs once more: each
        edit is checked again (a later edit made here meanwhile wins), and an item whose text
        changed meanwhile is encoded again (at most SYNC_ENCODE_ROUNDS rounds a tick). A reload
        under way pauses the sync's encoding; one that swaps the model ends it (the new catalog
        re-encodes and carries those edits itself, `carry_from`), one that fails lets it go on.
        The catalog's locks keep searches consistent meanwhile."""
        ready, catalog, applied = ReadyVectors(), None, 0
        try:
            for _ in range(SYNC_ENCODE_ROUNDS):
                async with self.edit_lock:
                    if catalog is not None and self.engine.catalog is not catalog:
                        return  # a reload swapped models: its catalog carries the edits
                    catalog = self.engine.catalog
                    try:
                        applied = await in_passing_thread(catalog.sync_edits, ready)
                        break
                    except NeedsEncoding as need:
                        items = need.items
                vectors = await in_passing_thread(self._encode_between_batches, catalog, items)
                if vectors is None:
                    log.info("item edits saved by other replicas: left to the model a reload swapped in")
                    return
                ready.add(items, vectors)
            else:
                log.info("item edits saved by other replicas changed while encoded: the rest next tick")
                return
        except Exception as exc:  # a damaged record, an encode that failed: try again next tick
            self.metrics.watch_errors.labels("sync").inc()
            log.warning("item edits saved by other replicas not applied: %s", exc)
            return
        if applied:
            version = catalog.checkpoint.version
            log.info("applied %d item edits saved by another replica to model %s", applied, version)

    def _encode_between_batches(
        self, catalog: Catalog, items: Sequence[Mapping[str, Any]]
    ) -> np.ndarray | None:
        """`catalog.encode_items(items)` from a thread other than the model thread (a sync's):
        EDIT_BATCH_CHUNK items per turn of the model thread, each chunk queued behind the
        recommendation batches that arrived meanwhile, so none waits for more than a chunk.
        A reload under way pauses it between two chunks until the reload ends: None, given up,
        where it swapped `catalog` out (the new catalog encodes those items itself,
        `carry_from`), or once the service stops; where the load failed (the watch retries a
        version that does not load every tick, then every WATCH_SLOW_RETRY_S) `catalog` still
        serves and needs them, and the encoding goes on. It gave up on a failed reload too,
        and the next tick's sync started over: a sync longer than the retries' spacing never
        ended while CURRENT named such a version."""
        chunks = []
        for start in range(0, len(items), EDIT_BATCH_CHUNK):
            while self._reload_lock.locked() and self.engine.catalog is catalog and not self._stopping:
                time.sleep(SYNC_RELOAD_POLL_S)  # not the model thread: it serves meanwhile
            if self._stopping or self.engine.catalog is not catalog:
                return None
            chunk = items[start : start + EDIT_BATCH_CHUNK]
            chunks.append(self.model_executor.submit(catalog.encode_items, chunk).result())
        return np.concatenate(chunks) if chunks else np.empty((0, catalog.index.dim), np.float32)

    # ------------------------------------------------------------------ readiness
    async def readiness(self) -> list[str]:
        """Reasons the service is not ready; empty when it is."""
        reasons = []
        engine = self.engine
        if engine is None:
            reasons.append("model not loaded")
        elif len(engine.catalog.index) == 0:
            reasons.append("item index is empty")
        if self.batcher.draining:
            reasons.append("shutting down")
        elif not self.batcher.running:
            reasons.append("batcher not running")
        try:
            await self.store.ping()
        except StoreUnavailable as exc:
            # the probes are open: the reason names the driver's exception class, never the
            # URL (host, port, db, a password given as ?password=); the WARNING has the rest
            self.store_failed(exc)
            reasons.append(f"store unavailable: {type(exc.__cause__ or exc).__name__}")
        return reasons
