"""The HTTP API end to end, in process over ASGI with the app's own lifespan: the tiny model
loaded from a checkpoint, and the in-process store or a real redis-server (`client` runs each
test on both)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.state import ClientDisconnected
from service.store import Event
from service.types import Query
from tests.service.conftest import ADMIN, app_for, count_generate, serve

pytestmark = pytest.mark.asyncio

H1 = [
    {"item_id": "i1", "rating": 5, "timestamp": 100},
    {"item_id": "i2", "rating": 4, "timestamp": 200},
    {"item_id": "i3", "rating": 3, "timestamp": 300},
]
H2 = [{"item_id": "i6", "rating": 2}, {"item_id": "i7", "rating": 5}]
H3 = [{"item_id": "i8"}]


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus exposition, None if absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def requests(text: str, route: str, status: str, **labels: str) -> float | None:
    """How many requests the latency histogram counted for a route template and status."""
    return metric(text, "r2ec_request_duration_seconds_count", route=route, status=status, **labels)


def assert_same_answer(a: dict, b: dict) -> None:
    assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
    assert [i["title"] for i in a["items"]] == [i["title"] for i in b["items"]]
    assert [i["rank"] for i in a["items"]] == [i["rank"] for i in b["items"]]
    assert [i["score"] for i in a["items"]] == pytest.approx([i["score"] for i in b["items"]], abs=1e-3)
    assert a["reasoning"] == b["reasoning"]
    assert a["reasoning_tokens"] == b["reasoning_tokens"]


# ---------------------------------------------------------------------------- /recommend
async def test_recommend_with_an_inline_history(app, client):
    r = await client.post("/recommend", json={"history": H1, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    engine = app.state.r2ec.engine
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == 5 and not set(ids) & {"i1", "i2", "i3"}  # history excluded by default
    assert [i["rank"] for i in body["items"]] == [1, 2, 3, 4, 5]
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    for i in body["items"]:
        assert i["title"] == (await client.get(f"/items/{i['item_id']}")).json()["title"]
    assert isinstance(body["reasoning"], str) and 0 < body["reasoning_tokens"] <= 8
    assert body["model_version"] == engine.version
    assert body["history_source"] == "request" and body["cache"] == "miss"
    assert set(body["timings"]) == {"queue_ms", "generate_ms", "score_ms", "total_ms"}
    assert all(v >= 0 for v in body["timings"].values())

    off = (await client.post("/recommend", json={"history": H1, "reasoning": False})).json()
    assert off["reasoning"] is None and off["cache"] == "off" and off["reasoning_tokens"] == 0
    assert len(off["items"]) == len(engine.catalog.index) - 3  # k=10 by default; only 8 items are left

    kept = await client.post(
        "/recommend", json={"history": H1, "k": 100, "exclude_history": False, "reasoning": False}
    )
    assert {"i1", "i2", "i3"} <= {i["item_id"] for i in kept.json()["items"]}


async def test_events_build_the_stored_history_that_recommend_uses(app, client):
    r = await client.post("/users/u1/events", json={"events": H1})
    assert r.status_code == 200, r.text
    assert r.json() == {"user_id": "u1", "appended": 3, "history_length": 3}
    r = await client.post(
        "/users/u1/events", json={"events": [{"item_id": "i4", "rating": 4}, {"item_id": "i5"}]}
    )
    assert r.json()["history_length"] == 3  # capped at the window (3 in these tests)

    history = (await client.get("/users/u1/history")).json()
    assert history["user_id"] == "u1"
    assert [h["item_id"] for h in history["history"]] == ["i3", "i4", "i5"]  # newest last
    assert history["history"][0] == {"item_id": "i3", "title": "Four Rooms", "rating": 3.0, "timestamp": 300}
    assert history["history"][1]["timestamp"] > 1_500_000_000  # no timestamp given: server time
    assert history["history"][2]["rating"] is None
    assert (await client.get("/users/nobody/history")).json()["history"] == []

    # every event, including those the capped history dropped, is in the retraining stream
    stream = await app.state.r2ec.store.read_events()
    assert [(e.user_id, e.event.item_id) for e in stream] == [
        ("u1", "i1"),
        ("u1", "i2"),
        ("u1", "i3"),
        ("u1", "i4"),
        ("u1", "i5"),
    ]

    stored = await client.post("/recommend", json={"user_id": "u1", "k": 4})
    assert stored.status_code == 200, stored.text
    assert stored.json()["history_source"] == "store"
    inline = await client.post(
        "/recommend",
        json={
            "user_id": "u1",
            "k": 4,
            "history": [{"item_id": "i3", "rating": 3}, {"item_id": "i4", "rating": 4}, {"item_id": "i5"}],
        },
    )
    assert inline.json()["history_source"] == "request"  # the request's history wins
    assert_same_answer(stored.json(), inline.json())
    assert not {i["item_id"] for i in stored.json()["items"]} & {"i3", "i4", "i5"}


async def test_get_item(client):
    r = await client.get("/items/i7")
    assert r.status_code == 200
    assert r.json() == {
        "item_id": "i7",
        "title": "Twelve Monkeys",
        "year": "1995",
        "genres": "Drama, Sci-Fi",
        "description": "",
    }


BAD_REQUESTS = [
    # (body or raw bytes, status, substring of the message)
    ({"history": []}, 422, "history is empty"),
    ({"user_id": "ghost"}, 422, "history is empty: user 'ghost' has no stored events"),
    ({}, 422, "give `history` or `user_id`"),
    (
        {"history": [{"item_id": "nope"}, {"item_id": "i1"}, {"item_id": "nada"}]},
        422,
        "unknown item ids in history: 'nope', 'nada'",
    ),
    ({"history": H1, "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ({"history": H1, "k": 101}, 422, "k: Input should be less than or equal to 100"),
    ({"history": H1, "k": "ten"}, 422, "k: Input should be a valid integer"),
    (b'{"history": [{"item_id": "i1"}', 422, "body: invalid JSON"),
    (b"not json at all", 422, "body: invalid JSON"),
    (
        {"history": H1, "max_reasoning_tokens": 1000},
        422,
        "max_reasoning_tokens: Input should be less than or equal to 256",
    ),
    ({"history": H1, "max_reasoning_tokens": -1}, 422, "max_reasoning_tokens: Input should be greater"),
    ({"history": [{"rating": 5}]}, 422, "history.0.item_id: Field required"),
    ({"history": [{"item_id": "i1", "rating": 11}]}, 422, "history.0.rating: Input should be less"),
    ({"history": [{"item_id": "  "}]}, 422, "history.0.item_id: String should have at least 1"),
    ({"history": H1, "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
    ({"history": "i1,i2"}, 422, "history: Input should be a valid list"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
async def test_bad_recommend_requests_get_a_4xx_that_names_the_problem(client, body, status, message):
    if isinstance(body, bytes):
        r = await client.post("/recommend", content=body, headers={"content-type": "application/json"})
    else:
        r = await client.post("/recommend", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["message"]
    assert r.json()["detail"]


async def test_a_stored_history_of_deleted_items_is_empty_and_says_how_to_fill_it(client):
    assert (await client.post("/users/u1/events", json={"events": [{"item_id": "i4"}]})).status_code == 200
    assert (await client.delete("/items/i4", headers=ADMIN)).status_code == 200
    r = await client.post("/recommend", json={"user_id": "u1"})
    assert r.status_code == 422
    assert r.json()["message"] == (
        "history is empty: user 'u1' has no stored events; send `history` or POST /users/u1/events first"
    )


async def test_the_reasoning_budget_ceiling_comes_from_the_settings(ckpt):
    async with serve(app_for(ckpt, reasoning_token_limit=16)) as client:
        spec = (await client.get("/openapi.json")).json()
        r = await client.post("/recommend", json={"history": H1, "max_reasoning_tokens": 17})
        assert r.status_code == 422
        assert r.json()["message"] == "max_reasoning_tokens: Input should be less than or equal to 16"
        assert r.json()["detail"][0]["loc"] == ["body", "max_reasoning_tokens"]
        r = await client.post("/recommend", json={"history": H1, "max_reasoning_tokens": 16})
        assert r.status_code == 200, r.text
    budget = spec["components"]["schemas"]["RecommendRequest"]["properties"]["max_reasoning_tokens"]
    assert budget["anyOf"][0]["maximum"] == 16


async def test_bad_event_and_item_requests(client):
    r = await client.post("/users/u1/events", json={"events": [{"item_id": "i4"}, {"item_id": "zz"}]})
    assert r.status_code == 422 and r.json()["message"] == "unknown item ids in events: 'zz'"
    assert r.json()["unknown_item_ids"] == ["zz"]
    assert (await client.get("/users/u1/history")).json()["history"] == []  # nothing appended
    r = await client.post("/users/u1/events", json={"events": []})
    assert r.status_code == 422 and "events: List should have at least 1 item" in r.json()["message"]
    r = await client.post("/users/u1/events", json={"events": [{"item_id": "i1", "timestamp": -5}]})
    assert r.status_code == 422 and "events.0.timestamp" in r.json()["message"]
    r = await client.get("/items/nope")
    assert r.status_code == 404 and r.json()["message"] == "item 'nope' not found"
    r = await client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["message"] == "Not Found"


# ---------------------------------------------------------------------------- batching and cache
CONCURRENT = [
    {"history": H1, "k": 5},
    {"history": H2, "k": 3, "max_reasoning_tokens": 4},  # a shorter budget rides the same call
    {"history": H3, "k": 8, "reasoning": False},
    {"history": H1 + H3, "k": 10, "exclude_history": False},
    {"history": H1, "k": 2, "max_reasoning_tokens": 6},  # the same prompt as the first
    {"history": [{"item_id": "i9", "rating": 4}, {"item_id": "i5"}], "k": 4},
]


async def test_concurrent_requests_share_one_generate_call_and_match_one_by_one(ckpt):
    # the batch closes as soon as it is full; the long wait only keeps a slow machine from
    # splitting it. Cache off: one-by-one must really generate again to be a fair comparison.
    app = app_for(ckpt, max_batch=len(CONCURRENT), max_wait_ms=10_000, cache_size=0)
    async with serve(app) as client:
        calls = count_generate(app.state.r2ec.engine)
        replies = await asyncio.gather(*(client.post("/recommend", json=b) for b in CONCURRENT))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        batched = [r.json() for r in replies]
        # 6 requests, 5 of them reasoning over 4 distinct prompts: one generate call of 4 rows
        assert calls == [4]
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_batch_size_count") == 1
        assert metric(text, "r2ec_batch_size_sum") == len(CONCURRENT)

        singles = []
        for b in CONCURRENT:
            r = await client.post("/recommend", json=b)
            assert r.status_code == 200, r.text
            singles.append(r.json())
        assert calls[1:] == [1, 1, 1, 1, 1]  # the no-reasoning request never generates
    for b, s in zip(batched, singles, strict=True):
        assert_same_answer(b, s)
    assert [len(b["items"]) for b in batched] == [5, 3, 8, 10, 2, 4]
    assert batched[1]["reasoning_tokens"] <= 4 and batched[4]["reasoning_tokens"] <= 6
    assert batched[2]["reasoning"] is None


async def test_a_repeated_request_is_answered_from_the_reasoning_cache(app, client):
    calls = count_generate(app.state.r2ec.engine)
    first = (await client.post("/recommend", json={"history": H2, "k": 3})).json()
    assert calls == [1] and first["cache"] == "miss"
    again = (await client.post("/recommend", json={"history": H2, "k": 6})).json()
    assert calls == [1], "a cached reasoning must not be generated again"
    assert again["cache"] == "hit" and again["reasoning"] == first["reasoning"]
    assert again["reasoning_tokens"] == first["reasoning_tokens"]
    assert [i["item_id"] for i in again["items"][:3]] == [i["item_id"] for i in first["items"]]

    other = (await client.post("/recommend", json={"history": H2, "max_reasoning_tokens": 5})).json()
    assert calls == [1, 1] and other["cache"] == "miss"  # other settings: another key
    text = (await client.get("/metrics")).text
    assert metric(text, "r2ec_reasoning_cache_total", result="hit") == 1
    assert metric(text, "r2ec_reasoning_cache_total", result="miss") == 2


async def test_a_failing_batch_fails_its_requests_and_the_service_goes_on(app, client):
    model = app.state.r2ec.engine.model
    original = model.reason_from_ids

    def explode(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    model.reason_from_ids = explode
    failed = await asyncio.gather(*(client.post("/recommend", json={"history": h}) for h in (H1, H2)))
    for r in failed:
        assert r.status_code == 500
        assert "recommendation failed" in r.json()["message"]
        assert "RuntimeError: CUDA out of memory (simulated)" in r.json()["message"]
    model.reason_from_ids = original
    r = await client.post("/recommend", json={"history": H1})
    assert r.status_code == 200, r.text
    assert (await client.get("/readyz")).status_code == 200


async def test_a_request_whose_client_left_is_dropped_before_its_batch_runs(app, client):
    """State level, deterministic: the model thread is busy with request A while B waits;
    B's client goes away; B never reaches the model. (test_socket.py does it over TCP.)"""
    state = app.state.r2ec
    calls = count_generate(state.engine)
    gate, entered = threading.Event(), threading.Event()
    original = state.engine.model.reason_from_ids

    def blocking(*args, **kwargs):
        entered.set()
        gate.wait(30)
        return original(*args, **kwargs)

    state.engine.model.reason_from_ids = blocking
    a = asyncio.create_task(state.recommend(Query(tuple(Event(h["item_id"]) for h in H1))))
    await asyncio.to_thread(entered.wait, 30)  # A's batch is in generate
    gone = asyncio.Event()
    b = asyncio.create_task(
        state.recommend(Query(tuple(Event(h["item_id"]) for h in H2)), wait_disconnect=gone.wait)
    )

    async def queued() -> None:
        while state.batcher.queue_depth == 0:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(queued(), 30)  # B waits behind A
    gone.set()
    with pytest.raises(ClientDisconnected):
        await b
    gate.set()
    assert len((await a).items) == 8
    assert len((await client.post("/recommend", json={"history": H3})).json()["items"]) == 10
    assert calls == [1, 1]  # A, then the next request: B was never generated
    assert state.batcher.batches == 2


# ---------------------------------------------------------------------------- probes
async def test_probes_and_metrics(app, client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    engine = app.state.r2ec.engine
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "model_version": engine.version,
        "items": 11,
        "store": "ok",
        "reasons": [],
    }

    assert (await client.post("/recommend", json={"history": H1})).status_code == 200
    assert (await client.post("/recommend", json={"history": []})).status_code == 422
    assert (await client.get("/users/u9/history")).status_code == 200
    text = (await client.get("/metrics")).text
    assert requests(text, "/recommend", "200", method="POST") == 1
    assert requests(text, "/recommend", "422", method="POST") == 1
    # the route template, not the raw path, keeps the label set bounded
    assert requests(text, "/users/{user_id}/history", "200") == 1
    assert metric(text, "r2ec_batch_size_count") == 1
    assert metric(text, "r2ec_queue_depth") == 0
    assert metric(text, "r2ec_generate_seconds_count") == 1
    assert 0 < metric(text, "r2ec_reasoning_tokens_sum") <= 8
    assert metric(text, "r2ec_reasoning_cache_total", result="miss") == 1
    assert metric(text, "r2ec_index_items") == 11
    assert metric(text, "r2ec_model_info", version=engine.version) == 1


async def test_openapi_documents_every_route_and_the_admin_key(client):
    spec = (await client.get("/openapi.json")).json()
    assert set(spec["paths"]) == {
        "/recommend", "/users/{user_id}/events", "/users/{user_id}/history", "/items/{item_id}",
        "/admin/reload", "/healthz", "/readyz", "/metrics", "/items",
    }  # fmt: skip
    assert spec["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    for method, path in (("put", "/items/{item_id}"), ("delete", "/items/{item_id}"),
                         ("post", "/admin/reload")):  # fmt: skip
        assert spec["paths"][path][method]["security"] == [{"APIKeyHeader": []}]
    assert "security" not in spec["paths"]["/items/{item_id}"]["get"]


async def test_settings_come_from_the_environment(ckpt, monkeypatch):
    from pydantic import ValidationError

    from service.app import create_app
    from service.config import Settings

    monkeypatch.setenv("R2EC_CHECKPOINT", str(ckpt))
    monkeypatch.setenv("R2EC_DTYPE", "float32")
    monkeypatch.setenv("R2EC_MAX_BATCH", "3")
    monkeypatch.setenv("R2EC_MAX_WAIT_MS", "7.5")
    monkeypatch.setenv("R2EC_MAX_REASONING_TOKENS", "4")
    monkeypatch.setenv("R2EC_THREADS", "1")
    monkeypatch.setenv("R2EC_API_KEY", "from-env")
    monkeypatch.setenv("R2EC_LOG_LEVEL", "warning")
    monkeypatch.setenv("R2EC_REDIS_URL", "")
    app = create_app()
    async with serve(app) as client:
        s = app.state.r2ec.settings
        assert (s.checkpoint, s.max_batch, s.max_wait_ms, s.threads) == (ckpt, 3, 7.5, 1)
        assert s.log_level == "WARNING" and app.state.r2ec.store.kind == "memory"
        r = await client.post("/recommend", json={"history": H1})
        assert r.json()["reasoning_tokens"] <= 4
        r = await client.delete("/items/i1", headers={"X-API-Key": "from-env"})
        assert r.status_code == 200, r.text

    monkeypatch.setenv("R2EC_MAX_BATCH", "0")
    with pytest.raises(ValidationError, match="max_batch"):
        Settings()
    monkeypatch.setenv("R2EC_MAX_BATCH", "8")
    monkeypatch.setenv("R2EC_MAX_REASONING_TOKENS", "999")
    with pytest.raises(ValidationError, match="R2EC_REASONING_TOKEN_LIMIT"):
        Settings()
