"""service/metrics.py: the latency histograms reach the minutes an overloaded replica answers in;
the event stream's series."""

from __future__ import annotations

import json

import pytest
from prometheus_client import generate_latest

from service.metrics import Metrics
from tests.service.conftest import app_for, serve
from tests.service.test_admin import copy_as_new_version
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


@pytest.mark.redis
@pytest.mark.asyncio
async def test_metrics_show_the_event_stream_and_how_far_retraining_is_behind_it(ckpt, tmp_path, redis_url):
    """Journey 40, findings 2 and 7: nothing in /metrics showed the stream's length, how many
    events retraining had not read yet, or that its last run found events trimmed unread."""
    root = tmp_path / "versions"
    copy_as_new_version(ckpt, root / "one", "w1")
    (root / "CURRENT").write_text("one")
    (root / "retrain").mkdir()
    at = "2026-12-07T10:00:00+00:00"
    state = {
        "last_run": {"status": "skipped", "finished_at": at, "events_lost": 880, "events_lost_exact": True},
        "events_lost": 1200,
        "stream_mark": {"entries_added": 2, "erased": 0},  # the last run had read 2 events
    }
    (root / "retrain" / "state.json").write_text(json.dumps(state))
    events = [
        {"item_id": i, "rating": 4, "timestamp": 100 + n}
        for n, i in enumerate(["i1", "i2", "i3", "i4", "i5"])
    ]
    async with serve(app_for(root, redis_url=redis_url, stream_maxlen=1000, watch_interval_s=0)) as client:
        assert (await client.post("/users/u1/events", json={"events": events})).status_code == 200
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_stream_entries") == 5
        assert metric(text, "r2ec_stream_maxlen") == 1000
        assert metric(text, "r2ec_retrain_unread_events") == 3  # 5 added, 2 read
        assert metric(text, "r2ec_retrain_last_run_events_lost") == 880
        assert metric(text, "r2ec_retrain_last_run_events_lost_exact") == 1
        assert metric(text, "r2ec_retrain_events_lost_total") == 1200
        more = [{"item_id": "i6", "rating": 3, "timestamp": 200}]
        assert (await client.post("/users/u2/events", json={"events": more})).status_code == 200
        text = (await client.get("/metrics")).text  # read again at each scrape
        assert metric(text, "r2ec_stream_entries") == 6 and metric(text, "r2ec_retrain_unread_events") == 4


@pytest.mark.asyncio
async def test_unread_events_count_a_stream_begun_again_whole(ckpt, tmp_path, redis_url):
    """Review 40, finding 2: a stream lost and begun again that took more entries than the last
    run saw was counted on from the old count: unread too low, R2ecRetrainFallingBehind late."""
    root = tmp_path / "versions"
    copy_as_new_version(ckpt, root / "one", "w1")
    (root / "CURRENT").write_text("one")
    (root / "retrain").mkdir()
    # the last run read 2 entries of a stream created at another time
    mark = {"entries_added": 2, "last_id": "1-0", "epoch": "1700000000000000", "cursor": "1-0"}
    # it found the stream begun again: 0 lost, not exact (review 40, finding 1: the flag was not
    # exported, so R2ecRetrainLostEvents could not fire)
    last = {"status": "skipped", "finished_at": "2026-12-07T10:00:00+00:00", "events_lost": 0}
    state = {"last_event_id": "1-0", "stream_mark": mark, "last_run": {**last, "events_lost_exact": False}}
    (root / "retrain" / "state.json").write_text(json.dumps(state))
    events = [{"item_id": f"i{n}", "rating": 4, "timestamp": 100 + n} for n in range(1, 6)]
    async with serve(app_for(root, redis_url=redis_url, stream_maxlen=1000, watch_interval_s=0)) as client:
        assert (await client.post("/users/u1/events", json={"events": events})).status_code == 200
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_retrain_unread_events") == 5  # all of the new stream
        assert metric(text, "r2ec_retrain_last_run_events_lost_exact") == 0


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


def test_the_model_series_kept_are_the_versions_that_served_last_never_the_one_serving():
    """Review 40, #3: the versions kept are the last to serve (least recently served evicted),
    not the first seen: after A, B, C, a rollback to A and a reload to D, A (replaced just now,
    its last requests finishing) keeps its counts and B goes; and the serving version is never
    the one evicted, also when older ones answer late."""
    from service.metrics import MODEL_VERSIONS_KEPT

    assert MODEL_VERSIONS_KEPT == 3
    m = Metrics()

    def kept() -> dict[str, float | None]:
        text = generate_latest(m.registry).decode()
        return {v: metric(text, "r2ec_reasoning_cache_total", result="hit", version=v) for v in "ABCDE"}

    for v, answers in (("A", 5), ("B", 1), ("C", 1), ("A", 1), ("D", 0)):  # A again: a rollback
        m.serving("", v)
        for _ in range(answers):
            m.by_model(m.cache, v, "hit").inc()
    assert kept() == {"A": 6, "B": None, "C": 1, "D": 0, "E": None}
    m.by_model(m.cache, "A", "hit").inc()  # A's in-flight answer: counted on, nothing evicted
    assert kept() == {"A": 7, "B": None, "C": 1, "D": 0, "E": None}
    # late answers of evicted versions come back and go, D (serving) stays throughout
    m.by_model(m.cache, "B", "hit").inc()  # evicts C (A answered since)
    m.by_model(m.cache, "E", "hit").inc()  # evicts A; D has not answered, yet it serves
    assert kept() == {"A": None, "B": 1, "C": None, "D": 0, "E": 1}
    m.by_model(m.cache, "C", "hit").inc()  # evicts B, not D
    assert kept() == {"A": None, "B": None, "C": 1, "D": 0, "E": 1}
