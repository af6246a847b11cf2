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
        m.recommend_seconds,
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
