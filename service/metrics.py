"""Prometheus metrics, one `CollectorRegistry` per app (so apps built by tests never collide).

Names use the `r2ec_` namespace; Prometheus names cannot hold the `/` of training logs.
"""

from __future__ import annotations

import functools
import json
import platform
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from service.build import code_commit, package_version

if TYPE_CHECKING:
    from service.store import StreamInfo

# No `*_created` series beside every counter and histogram: Prometheus 2 stores each as one more
# series, and nothing here reads them.
disable_created_metrics()

STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# up to 300 s: an overloaded replica answers after minutes (R2EC_MAX_QUEUE / throughput in the
# queue, then the decode: 106 s at p90 on a busy 2-core host, SRE journey 39), and above the
# top bucket histogram_quantile can only say "60"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (0, 8, 16, 32, 64, 128, 256, 512)
WATCH_STAGES = ("pointer", "reload", "sync")  # r2ec_watch_errors_total's stages (service/state.py)
# r2ec_rejected_total's
REJECTION_REASONS = (
    "queue_full",
    "shutting_down",
    "body_too_large",
    "body_timeout",
    "queue_timeout",
    "user_event_rate",  # service/store.py EventRate
    "auth_throttled",  # service/limits.py AuthThrottle
)
DEADLINE_STAGES = ("queued", "decoding")  # where a client's deadline passed (service/deadline.py)
# r2ec_store_errors_total's operations (service/store.py's StoreUnavailable.op)
STORE_OPS = (
    "get_history",
    "append_events",
    "get_seen",
    "read_events",
    "cache_get",
    "cache_set",
    "erase_user",
    "ping",
    "stream_info",
    "add_served",  # the exposure log's writes (service/exposure.py)
)
RELOAD_OUTCOMES = ("ok", "failed")
EVENT_RESULTS = ("new", "duplicate")  # r2ec_events_total's
# The labels of the recommendation metrics: the version of the model that answered each request
# (a reload mid-window credits each request to its own model) and R2EC_VARIANT, one value a
# replica. Versions are bounded: the series of the MODEL_VERSIONS_KEPT versions to have served
# last are kept, an older one's are dropped when another begins (`Metrics.model_labels`).
MODEL_LABELS = ("version", "variant")
MODEL_VERSIONS_KEPT = 3
STREAM_OUTCOMES = ("ok", "error", "disconnected", "cancelled")  # service/streaming.py
EXPOSURE_OUTCOMES = ("written", "failed", "dropped", "erased")  # service/exposure.py


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None, variant: str = "") -> None:
        self.registry = registry or CollectorRegistry()
        self.variant = variant  # R2EC_VARIANT: the `variant` label of the model metrics
        # versions with recommendation series, least recently served first, and each one's
        # labelled children; the version serving now is never evicted
        self._versions: list[str] = []
        self._serving: str | None = None
        self._series: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}
        self._versions_lock = threading.Lock()  # the event loop and the model thread observe
        r = self.registry
        self.request_latency = Histogram(
            "r2ec_request_duration_seconds",
            "HTTP request latency by route template and status.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.recommend_seconds = Histogram(
            "r2ec_recommend_seconds",
            "Answered recommendations (/recommend and /recommend/stream), from the request body "
            "read and parsed to the answer: the service's own time, where "
            "r2ec_request_duration_seconds also holds a slow client's upload. By the version of "
            "the model that answered and the replica's R2EC_VARIANT.",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.recommend_errors = Counter(
            "r2ec_recommend_errors_total",
            "/recommend and /recommend/stream requests that failed once the model's path had "
            "them (from the history's check to the answer), by the error body's code "
            "(unknown_items, empty_history, invalid_request, overloaded, shutting_down, "
            "client_disconnected, internal_error), the version of the model serving and "
            "R2EC_VARIANT. Refusals before it (a bad body, a store down) are not the model's.",
            ["code", *MODEL_LABELS],
            registry=r,
        )
        self.queue_wait = Histogram(
            "r2ec_queue_wait_seconds",
            "Time a recommendation waited in the batcher's queue before the model took it (from "
            "its submission, after the history read, the prompt and the cache lookup; cache hits "
            "answered beside the batch are not counted).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "r2ec_batch_size", "Requests per micro-batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("r2ec_queue_depth", "Requests waiting for a micro-batch.", registry=r)
        self.generate_seconds = Histogram(
            "r2ec_generate_seconds",
            "Time writing reasoning: one batched generate call (static batching) or one request's "
            "reasoning from admission to h_T (continuous batching); by model version and variant.",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.reasoning_tokens = Histogram(
            "r2ec_reasoning_tokens",
            "Reasoning tokens written per request that wrote its reasoning (a cache miss; hits are "
            'r2ec_reasoning_cache_total{result="hit"}): sum = tokens generated; by model version '
            "and variant.",
            MODEL_LABELS,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.reasoning_cut = Counter(
            "r2ec_reasoning_cut_total",
            "Answers whose reasoning stopped at its token budget rather than ending (a reply's "
            "reasoning_cut), cache hits included; by model version and variant.",
            MODEL_LABELS,
            registry=r,
        )
        self.cache = Counter(
            "r2ec_reasoning_cache_total",
            "Reasoning cache lookups by result (hit, miss), model version and variant.",
            ["result", *MODEL_LABELS],
            registry=r,
        )
        self.events = Counter(
            "r2ec_events_total",
            "Events of POST /users/{id}/events that the store took, by result: new (stored in the "
            "history, the stream and the seen set) or duplicate (an event_id the user already had: a "
            "retry or a replay, not stored again). A refused request counts in neither.",
            ["result"],
            registry=r,
        )
        for result in EVENT_RESULTS:
            self.events.labels(result)
        self.store_errors = Counter(
            "r2ec_store_errors_total",
            "Failed history-store operations by operation.",
            ["op"],
            registry=r,
        )
        for op in STORE_OPS:  # at 0 from the start, so an alert can rate() them
            self.store_errors.labels(op)
        self.store_seconds = Histogram(
            "r2ec_store_seconds",
            "Time of each history-store operation by operation, failed ones included (a Redis "
            "that slows down shows here before its timeouts count as errors); the in-process "
            "store records none.",
            ["op"],
            buckets=STORE_BUCKETS,
            registry=r,
        )
        for op in STORE_OPS:
            self.store_seconds.labels(op)
        self.store_up = Gauge(
            "r2ec_store_up",
            "1 while the history store answers: 0 from a failed operation to the next that "
            "succeeds (a request's, or a /readyz probe's ping); the in-process store is always 1.",
            registry=r,
        )
        self.queue_capacity = Gauge(
            "r2ec_queue_capacity",
            "Requests the queue holds before refusing with 503 overloaded (R2EC_MAX_QUEUE).",
            registry=r,
        )
        self.batch_capacity = Gauge(
            "r2ec_batch_capacity",
            "Requests the model works on at once (R2EC_MAX_BATCH): a micro-batch's size, or the "
            "continuous decode's slots.",
            registry=r,
        )
        self.batch_active = Gauge(
            "r2ec_batch_active",
            "Requests the model is working on now (of r2ec_batch_capacity).",
            registry=r,
        )
        self.in_flight = Gauge(
            "r2ec_requests_in_flight",
            "HTTP requests received and not yet answered, probes and metrics included.",
            registry=r,
        )
        self.index_size = Gauge("r2ec_index_items", "Items in the served index.", registry=r)
        self.edits_unsaved = Gauge(
            "r2ec_item_edits_unsaved",
            "1 while item edits this replica applied are in memory only: the checkpoint volume "
            "refused their save (full or read-only; retried at each watch tick).",
            registry=r,
        )
        self.model = Info(
            "r2ec_model",
            "The model version being served, its checkpoint (its path relative to the checkpoint "
            "root: 'v2', 'current'), its fingerprint (its files and the serving settings that "
            "change its answers), the replica's R2EC_VARIANT, and its decode steps' matmul path "
            "(bf16_kernel, onednn, cuda or hf; int8+ in front with int8 weights), and its item "
            "index with its search parameters ('flat', 'ivf nlist=1024 nprobe=16', "
            "'hnsw M=32 ef_search=64'), and its backbone: 'sha256:' and 12 hex digits of the one "
            "loaded (or a built-in's name) and backbone_check, how it compares with the one its "
            "r2ec.json records (match, unrecorded, mismatch_allowed, unchecked, none).",
            registry=r,
        )
        self.model_created = Gauge(
            "r2ec_model_created_timestamp_seconds",
            "When the served checkpoint was written (its r2ec.json created_at; 0 when it has none): "
            "time() minus this is the model's age.",
            registry=r,
        )
        self.model_loaded = Gauge(
            "r2ec_model_loaded_timestamp_seconds",
            "When this process began serving the current model (start or reload).",
            registry=r,
        )
        self.model_outdated = Gauge(
            "r2ec_model_outdated",
            "1 while the checkpoint pointer (R2EC_CHECKPOINT, followed by the watch) names another "
            "version than the one served: a reload pending or failing, or a manual /admin/reload "
            "of another path. 0 without a watch (R2EC_WATCH_INTERVAL_S=0).",
            registry=r,
        )
        self.reloads = Counter(
            "r2ec_reloads_total", "Checkpoint reloads by outcome.", ["outcome"], registry=r
        )
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome)
        self.watch_errors = Counter(
            "r2ec_watch_errors_total",
            "Checkpoint watch failures (R2EC_WATCH_INTERVAL_S > 0) by stage: pointer (resolving "
            "the checkpoint path or reading the version it names), reload (loading the version it "
            "moved to), sync (applying item edits saved by other replicas).",
            ["stage"],
            registry=r,
        )
        for stage in WATCH_STAGES:  # exported at 0 from the start, so an alert can rate() them
            self.watch_errors.labels(stage)
        self.rejections = Counter(
            "r2ec_rejected_total",
            "Requests refused before any work, by reason (queue_full, shutting_down, body_too_large, "
            "body_timeout, queue_timeout; user_event_rate: a user's events over "
            "R2EC_USER_EVENTS_PER_S, 429 rate_limited; auth_throttled: an address that sent too many "
            "wrong API keys, 429).",
            ["reason"],
            registry=r,
        )
        for reason in REJECTION_REASONS:  # at 0 from the start, as the watch's stages
            self.rejections.labels(reason)
        self.auth_failures = Counter(
            "r2ec_auth_failures_total",
            "Requests whose X-API-Key matched no key (403 invalid API key); a missing key (401) and "
            "a request refused as auth_throttled before its key was compared are not counted.",
            registry=r,
        )
        self.deadline_exceeded = Counter(
            "r2ec_deadline_exceeded_total",
            "Recommendations whose client deadline (X-Request-Timeout) passed before the answer, "
            "answered 504 deadline_exceeded, by where it passed: queued (dropped before it took a "
            "decode slot) or decoding (dropped from the decode, its slot freed).",
            ["reason"],
            registry=r,
        )
        for stage in DEADLINE_STAGES:
            self.deadline_exceeded.labels(stage)
        self.build = Info(
            "r2ec_build",
            "The r2ec-serve version and git commit serving (commit unknown outside a git checkout, "
            "e.g. in the docker image), and the Python running it.",
            registry=r,
        )
        self.build.info({**_build(), "python": platform.python_version()})
        # the process's memory, CPU, open files and start time; the Python runtime's GC (the
        # default registry's collectors, on this app's own registry)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        # the event stream r2ec:events as the last scrape read it (Redis only; None: not read)
        self.stream_info: StreamInfo | None = None
        self.stream_maxlen: int | None = None
        self.registry.register(_EventStreamCollector(self))

        self.streams = Counter(
            "r2ec_stream_requests_total",
            "POST /recommend/stream responses that began streaming, by how they ended: ok (items "
            "and done sent), error (an error event), disconnected (the client left), cancelled "
            "(the server stopped the stream). Refusals before the stream are JSON errors, counted "
            "by r2ec_request_duration_seconds like any request.",
            ["outcome"],
            registry=r,
        )
        for outcome in STREAM_OUTCOMES:
            self.streams.labels(outcome)
        self.exposures = Counter(
            "r2ec_exposures_total",
            "Exposure-log entries (R2EC_EXPOSURE_LOG=redis: one per answered recommendation) by "
            "outcome: written to r2ec:served; failed (Redis down or full: lost, logged); dropped "
            "(the write queue was full, or left at shutdown); erased (the user was erased after "
            "the answer, before it was written). Nothing while the log is off.",
            ["outcome"],
            registry=r,
        )

    def track_store(self, up: Callable[[], bool]) -> None:
        self.store_up.set_function(lambda: float(up()))

    def store_op(self, op: str, seconds: float) -> None:
        """A store operation took `seconds` (RedisStore's `on_op`)."""
        self.store_seconds.labels(op).observe(seconds)

    def events_appended(self, new: int, duplicates: int) -> None:
        """An append's reply: how many of its events were new, how many duplicates."""
        self.events.labels("new").inc(new)
        self.events.labels("duplicate").inc(duplicates)

    def serving(self, created_at: str, version: str | None = None) -> None:
        """A model began serving now; `created_at` is its r2ec.json's (ISO 8601, or empty). Its
        `version`'s recommendation series start at 0, so a rate() over them reads 0, not nothing,
        before its first answer."""
        self.model_created.set(_timestamp(created_at) or 0.0)
        self.model_loaded.set(time.time())
        if version is not None:
            with self._versions_lock:
                self._serving = version
            for metric in (self.recommend_seconds, self.generate_seconds, self.reasoning_tokens):
                self.by_model(metric, version)
            self.by_model(self.reasoning_cut, version)
            for result in ("hit", "miss"):
                self.by_model(self.cache, version, result)

    def by_model(self, metric: Any, version: str, *labels: str) -> Any:
        """`metric`'s child for `labels` (its own, before MODEL_LABELS), the model `version` that
        answered and this replica's variant. Cardinality stays bounded: the series of the
        MODEL_VERSIONS_KEPT versions that served last are kept (least recently used: each answer
        and each start of serving makes its version the latest), and when another begins, those
        of the one that served longest ago are removed, never the one serving now (Prometheus
        keeps what it scraped; an evicted version's return starts them at 0, which rate() reads
        as a counter reset). So a rollback to a kept version keeps its counts, and the version a
        reload replaced keeps its series while its last requests finish."""
        values = (*labels, version, self.variant)
        with self._versions_lock:
            if version in self._series:
                if self._versions[-1] != version:  # now the latest to serve
                    self._versions.remove(version)
                    self._versions.append(version)
            else:
                self._versions.append(version)
                self._series[version] = set()
                while len(self._versions) > MODEL_VERSIONS_KEPT:
                    oldest = next(v for v in self._versions if v != self._serving)
                    self._versions.remove(oldest)
                    for old_metric, old_values in self._series.pop(oldest):
                        try:
                            old_metric.remove(*old_values)
                        except KeyError:
                            pass
            self._series[version].add((metric, values))
            return metric.labels(*values)

    def track_index_size(self, size: Callable[[], int]) -> None:
        self.index_size.set_function(lambda: float(size()))

    def track_unsaved_edits(self, unsaved: Callable[[], bool]) -> None:
        self.edits_unsaved.set_function(lambda: float(unsaved()))

    def track_retrain(self, state_file: Path) -> None:
        """`r2ec retrain`'s last run and last publish (its ROOT/retrain/state.json, model/retrain.py),
        read at each scrape: the service and the retrain job share the versions root, so the
        job's outcome reaches Prometheus without a push gateway. Nothing while the file is
        missing or unreadable."""
        self.registry.register(_RetrainCollector(state_file, lambda: self.stream_info))

    def track_drafts(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Speculative decoding's draft tokens (model/speculative.py), read at each scrape from
        `counts()` = (checked, confirmed) of the served model's decoder. They start again from 0
        when a reload swaps the model, which Prometheus' rate() reads as a counter reset."""
        self.registry.register(_DraftCollector(counts))

    def render(self) -> bytes:
        return generate_latest(self.registry)


@functools.cache
def _build() -> dict[str, str]:
    """r2ec_build_info's version and commit, asked of git once a process (an app per test)."""
    return {"version": package_version(), "commit": code_commit()["commit"]}


class _DraftCollector(Collector):
    def __init__(self, counts: Callable[[], tuple[int, int]]) -> None:
        self.counts = counts

    def collect(self):
        checked, confirmed = self.counts()
        yield CounterMetricFamily(
            "r2ec_draft_tokens",
            "Draft tokens checked by speculative decoding (model/speculative.py).",
            value=checked,
        )
        yield CounterMetricFamily(
            "r2ec_draft_tokens_accepted",
            "Draft tokens the model confirmed: each one is a decode step saved.",
            value=confirmed,
        )


def _timestamp(iso: object) -> float | None:
    """Seconds since the epoch of an ISO 8601 time (one without a zone is UTC); None if not one."""
    try:
        at = datetime.fromisoformat(str(iso))
    except ValueError:
        return None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


class _EventStreamCollector(Collector):
    """r2ec_stream_entries and r2ec_stream_maxlen, where the last scrape read the stream."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        info, maxlen = self.metrics.stream_info, self.metrics.stream_maxlen
        if info is None:
            return
        yield GaugeMetricFamily(
            "r2ec_stream_entries",
            "Entries in the Redis event stream r2ec:events that retraining reads, at this scrape "
            "(Redis only); capped near r2ec_stream_maxlen, past which the oldest are trimmed, "
            "read or not.",
            value=info.length,
        )
        if maxlen is not None:
            yield GaugeMetricFamily(
                "r2ec_stream_maxlen",
                "The event stream's cap, R2EC_STREAM_MAXLEN (XADD MAXLEN ~: it may hold a few more).",
                value=maxlen,
            )


class _RetrainCollector(Collector):
    def __init__(self, state_file: Path, stream: Callable[[], StreamInfo | None] = lambda: None) -> None:
        self.state_file = state_file
        self.stream = stream

    def collect(self):
        try:
            state = json.loads(self.state_file.read_text(encoding="utf-8"))
            written = self.state_file.stat().st_mtime
        except (OSError, ValueError):
            return
        if not isinstance(state, dict):  # not the job's: nothing, rather than a failed scrape
            return
        last = state.get("last_run")
        ran = _timestamp(last.get("finished_at")) if isinstance(last, dict) else None
        if isinstance(last, dict) and not last.get("finished_at"):
            # a run of an r2ec before 0.2.0 (an upgrade, a code rollback) records no time: it was
            # the file's last write (model/retrain.py `read_state` keeps that time as the run's
            # from the next write on), so R2ecRetrainNotRunning still fires after an upgrade
            ran = written
        if ran is not None:
            family = GaugeMetricFamily(
                "r2ec_retrain_last_run_timestamp_seconds",
                "When `r2ec retrain` last finished a run, by its outcome (published, rejected by the "
                "gate, skipped for too few events, superseded: CURRENT moved during the run, e.g. a "
                "rollback, so nothing was published); a run that failed writes nothing.",
                labels=["status"],
            )
            family.add_metric([str(last.get("status"))], ran)
            yield family
        published = _timestamp(state.get("last_published_at"))
        if published is not None:
            yield GaugeMetricFamily(
                "r2ec_retrain_last_published_timestamp_seconds",
                "When `r2ec retrain` last published a version.",
                value=published,
            )
        yield from _stream_losses(state, last, self.stream())
        yield from _reasoning(last)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _reasoning(last: object):
    """The publish gate's check of the reasoning texts in the last run that reached the gate
    (model/retrain.py `text_gate`): both versions' measures, and which went beyond their
    bounds. Nothing where the run checked none (skipped, a stage without reasoning, turned off)."""
    from model.retrain import TEXT_MEASURES  # here: model.retrain only where it is used

    check = last.get("text_gate") if isinstance(last, dict) else None
    if not isinstance(check, dict) or check.get("checked") is not True:
        return
    values = GaugeMetricFamily(
        "r2ec_retrain_last_run_reasoning",
        "The last `r2ec retrain` run's reasoning texts on the valid samples, the candidate's and the "
        "current version's (model: candidate, current), by measure: loop_share, unknown_title_share, "
        "claims_hold_share, cut_share, empty_share (shares of the texts or claims) and distinct_2.",
        labels=["measure", "model"],
    )
    compared = set()
    for model in ("candidate", "current"):
        measures = check.get(model) if isinstance(check.get(model), dict) else {}
        for measure in TEXT_MEASURES:
            if (value := _number(measures.get(measure))) is not None:
                values.add_metric([measure, model], value)
                compared.add(measure)
    yield values
    failed = check.get("failed") if isinstance(check.get("failed"), list) else []
    beyond = {f.get("measure") for f in failed if isinstance(f, dict)}
    family = GaugeMetricFamily(
        "r2ec_retrain_last_run_reasoning_beyond_bound",
        "1 where the last `r2ec retrain` run's candidate wrote reasoning worse than the current "
        "version's by more than its bound on this measure (model/retrain.py TextGate), and was not "
        "published for it; 0 where it was within.",
        labels=["measure"],
    )
    for measure in TEXT_MEASURES:
        if measure in compared or measure in beyond:
            family.add_metric([measure], float(measure in beyond))
    yield family


def _stream_losses(state: dict, last: object, stream: StreamInfo | None):
    """Retraining against the event stream: what its runs found trimmed before they read it
    (model/retrain.py's events_lost), and how far behind the stream it is now."""
    from service.store import stream_begun_again  # here: the store's module only where it is used

    lost = _number(last.get("events_lost")) if isinstance(last, dict) else None
    if lost is not None:
        yield GaugeMetricFamily(
            "r2ec_retrain_last_run_events_lost",
            "Events the last `r2ec retrain` run found trimmed from the stream before it read them "
            "(its cap, R2EC_STREAM_MAXLEN; a lower bound where r2ec_retrain_last_run_events_lost_exact "
            "is 0): never trained on.",
            value=lost,
        )
    exact = last.get("events_lost_exact") if isinstance(last, dict) else None
    if isinstance(exact, bool):  # None: the run's reader checked nothing (no Redis stream)
        yield GaugeMetricFamily(
            "r2ec_retrain_last_run_events_lost_exact",
            "1 where r2ec_retrain_last_run_events_lost is exact, 0 where it is a lower bound (the "
            "stream was lost and begun again, a Redis before 7.0, a state without counts): events "
            "may have been trimmed unread though it reads 0 (R2ecRetrainLostEvents fires).",
            value=int(exact),
        )
    total = _number(state.get("events_lost"))
    if total is not None:
        yield CounterMetricFamily(
            "r2ec_retrain_events_lost",
            "Events `r2ec retrain` runs found trimmed from the stream before they read them, all runs.",
            value=total,
        )
    mark = state.get("stream_mark")
    # a mark saved with another cursor than the state's (an older release's run moved it on)
    # counts from the wrong place: none then
    fits = isinstance(mark, dict) and mark.get("cursor", state.get("last_event_id")) == state.get(
        "last_event_id"
    )
    seen = _number(mark.get("entries_added")) if fits else None
    if stream is not None and stream.entries_added is not None and seen is not None:
        # a stream lost and begun again (another epoch, a count or an id that went back): all
        # of it unread, however much it has taken since
        again = stream_begun_again(stream, mark)
        behind = stream.entries_added if again else stream.entries_added - seen
        yield GaugeMetricFamily(
            "r2ec_retrain_unread_events",
            "Events the stream took since `r2ec retrain` last read it (from XINFO STREAM "
            "entries-added, at this scrape): past r2ec_stream_maxlen, the oldest of them are "
            "trimmed before it reads them.",
            value=behind,
        )
