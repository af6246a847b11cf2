"""service/metrics.py: the latency histograms reach the minutes an overloaded replica answers in."""

from __future__ import annotations

from prometheus_client import generate_latest

from service.metrics import Metrics
from tests.service.test_app import metric


def test_latency_histograms_tell_100_s_from_300_s():
    """Their top bucket was 60 s: the 106-117 s answers of an overloaded replica and the 90 s
    stalled uploads all fell in +Inf, where histogram_quantile reports 60 s."""
    m = Metrics()
    for histogram in (
        m.request_latency.labels("POST", "/recommend", "200"),
        m.by_model(m.recommend_seconds, "v1"),
        m.queue_wait,
    ):
        histogram.observe(100.0)
        histogram.observe(250.0)
    text = generate_latest(m.registry).decode()
    for name in (
        "r2ec_request_duration_seconds_bucket",
        "r2ec_recommend_seconds_bucket",
        "r2ec_queue_wait_seconds_bucket",
    ):
        assert metric(text, name, le="60.0") == 0, name
        assert metric(text, name, le="120.0") == 1, name
        assert metric(text, name, le="300.0") == 2, name


def test_the_model_series_keep_the_last_versions_that_served_and_the_variant():
    """Journey 40, F2: each recommendation series names the version that answered and the arm;
    a replica that reloads for weeks keeps the series of the last MODEL_VERSIONS_KEPT only."""
    from service.metrics import MODEL_VERSIONS_KEPT

    m = Metrics(variant="candidate")
    versions = [f"v{i}" for i in range(MODEL_VERSIONS_KEPT + 2)]
    for v in versions:
        m.serving("", v)  # every series of a version that begins serving starts at 0
        m.by_model(m.cache, v, "hit").inc()
        m.by_model(m.recommend_errors, v, "overloaded").inc()
        m.by_model(m.recommend_seconds, v).observe(1.0)
    text = generate_latest(m.registry).decode()
    kept = versions[-MODEL_VERSIONS_KEPT:]
    for v in versions:
        labels = {"version": v, "variant": "candidate"}
        expected = 1 if v in kept else None
        assert metric(text, "r2ec_reasoning_cache_total", result="hit", **labels) == expected, v
        assert metric(text, "r2ec_reasoning_cache_total", result="miss", **labels) == (
            0 if v in kept else None
        )
        assert metric(text, "r2ec_recommend_errors_total", code="overloaded", **labels) == expected, v
        assert metric(text, "r2ec_recommend_seconds_count", **labels) == expected, v
        for name in (
            "r2ec_generate_seconds_count",
            "r2ec_reasoning_tokens_count",
            "r2ec_reasoning_cut_total",
        ):
            assert metric(text, name, **labels) == (0 if v in kept else None), (name, v)
    # an old version that answers again (a rollback) starts its series anew
    m.by_model(m.cache, versions[0], "hit").inc()
    text = generate_latest(m.registry).decode()
    assert metric(text, "r2ec_reasoning_cache_total", result="hit", version=versions[0]) == 1
    assert metric(text, "r2ec_reasoning_cache_total", result="hit", version=kept[0]) is None
