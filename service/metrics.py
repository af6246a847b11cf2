"""Prometheus metrics, one `CollectorRegistry` per app (so apps built by tests never collide).

Names use the `r2ec_` namespace; Prometheus names cannot hold the `/` of training logs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (0, 8, 16, 32, 64, 128, 256, 512)
WATCH_STAGES = ("pointer", "reload", "sync")  # r2ec_watch_errors_total's stages (service/state.py)
REJECTION_REASONS = ("queue_full", "shutting_down", "body_too_large")  # r2ec_rejected_total's


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_latency = Histogram(
            "r2ec_request_duration_seconds",
            "HTTP request latency by route template and status.",
            ["method", "route", "status"],
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
            "reasoning from admission to h_T (continuous batching).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.reasoning_tokens = Histogram(
            "r2ec_reasoning_tokens",
            "Reasoning tokens per answered request (sum = total tokens).",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.cache = Counter(
            "r2ec_reasoning_cache_total",
            "Reasoning cache lookups by result (hit, miss).",
            ["result"],
            registry=r,
        )
        self.store_errors = Counter(
            "r2ec_store_errors_total",
            "Failed history-store operations by operation.",
            ["op"],
            registry=r,
        )
        self.index_size = Gauge("r2ec_index_items", "Items in the served index.", registry=r)
        self.model = Info(
            "r2ec_model",
            "The model version being served, its checkpoint, and its decode steps' matmul path "
            "(bf16_kernel, onednn, cuda or hf; int8+ in front with int8 weights).",
            registry=r,
        )
        self.reloads = Counter(
            "r2ec_reloads_total", "Checkpoint reloads by outcome.", ["outcome"], registry=r
        )
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
            "Requests refused before any work, by reason (queue_full, shutting_down, body_too_large).",
            ["reason"],
            registry=r,
        )
        for reason in REJECTION_REASONS:  # at 0 from the start, as the watch's stages
            self.rejections.labels(reason)

        self.streams = Counter(
            "r2ec_stream_requests_total",
            "POST /recommend/stream responses that began streaming, by how they ended: ok (items "
            "and done sent), error (an error event), disconnected (the client left), cancelled "
            "(the server stopped the stream). Refusals before the stream are JSON errors, counted "
            "by r2ec_request_duration_seconds like any request.",
            ["outcome"],
            registry=r,
        )

    def track_index_size(self, size: Callable[[], int]) -> None:
        self.index_size.set_function(lambda: float(size()))

    def track_drafts(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Speculative decoding's draft tokens (model/speculative.py), read at each scrape from
        `counts()` = (checked, confirmed) of the served model's decoder. They start again from 0
        when a reload swaps the model, which Prometheus' rate() reads as a counter reset."""
        self.registry.register(_DraftCollector(counts))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Pure ASGI middleware: latency per (method, route template, status).

    The route template (`/users/{user_id}/history`), not the raw path, so labels stay bounded;
    unmatched paths are recorded as "unmatched".
    """

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.request_latency.labels(
                scope.get("method", ""), route_template(scope), str(status["code"])
            ).observe(time.perf_counter() - start)


def route_template(scope) -> str:
    """The template of the route that served a request, once it was routed, else "unmatched"."""
    route = scope.get("route")
    # path_format: the template without convertors ("/items/{item_id}", not "{item_id:id}")
    return getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched"


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
