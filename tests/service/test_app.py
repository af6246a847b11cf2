"""The HTTP API end to end, in process over ASGI with the app's own lifespan: the tiny model
loaded from a checkpoint, and the in-process store or a real redis-server (`client` runs each
test on both)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from datetime import datetime

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import package_version
from service.state import ClientDisconnected
from service.store import Event
from service.types import CachedReasoning, Query
from tests.service.conftest import ADMIN, HeldModel, app_for, count_forward, count_generate, serve

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
    body = r.json()
    assert {k: body[k] for k in ("user_id", "appended", "duplicates", "history_length")} == {
        "user_id": "u1",
        "appended": 3,
        "duplicates": 0,
        "history_length": 3,
    }
    assert [e["new"] for e in body["events"]] == [True, True, True]
    r = await client.post(
        "/users/u1/events", json={"events": [{"item_id": "i4", "rating": 4}, {"item_id": "i5"}]}
    )
    assert r.json()["history_length"] == 3  # capped at the window (3 in these tests)

    history = (await client.get("/users/u1/history")).json()
    assert history["user_id"] == "u1"
    assert [h["item_id"] for h in history["history"]] == ["i3", "i4", "i5"]  # newest last
    first_ids = {e["event_id"] for e in body["events"]}
    assert {h["event_id"] for h in history["history"]} & first_ids == {history["history"][0]["event_id"]}
    assert history["history"][0] == {
        "item_id": "i3",
        "title": "Four Rooms",
        "rating": 3.0,
        "timestamp": 300,
        "event_id": body["events"][2]["event_id"],
    }
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
    ({"history": [{"item_id": ""}]}, 422, "history.0.item_id: String should have at least 1"),
    ({"history": [{"item_id": "  "}]}, 422, "history.0.item_id: must not start or end with whitespace"),
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
    error = r.json()["error"]
    assert error["status"] == status and message in error["message"]
    assert set(r.json()) == {"error"} and set(error) <= {
        "status",
        "code",
        "message",
        "fields",
        "unknown_item_ids",
    }


async def test_a_stored_history_of_deleted_items_is_empty_and_says_how_to_fill_it(client):
    assert (await client.post("/users/u1/events", json={"events": [{"item_id": "i4"}]})).status_code == 200
    assert (await client.delete("/items/i4", headers=ADMIN)).status_code == 200
    r = await client.post("/recommend", json={"user_id": "u1"})
    assert r.status_code == 422
    assert r.json()["error"]["message"] == (
        "history is empty: every item stored for user 'u1' left the catalog; "
        "send `history` or POST /users/u1/events first"
    )


async def test_the_reasoning_budget_ceiling_comes_from_the_settings(ckpt):
    async with serve(app_for(ckpt, reasoning_token_limit=16)) as client:
        spec = (await client.get("/openapi.json")).json()
        r = await client.post("/recommend", json={"history": H1, "max_reasoning_tokens": 17})
        assert r.status_code == 422
        assert (
            r.json()["error"]["message"] == "max_reasoning_tokens: Input should be less than or equal to 16"
        )
        assert r.json()["error"]["fields"] == [
            {"field": "max_reasoning_tokens", "message": "Input should be less than or equal to 16"}
        ]
        r = await client.post("/recommend", json={"history": H1, "max_reasoning_tokens": 16})
        assert r.status_code == 200, r.text
    budget = spec["components"]["schemas"]["RecommendRequest"]["properties"]["max_reasoning_tokens"]
    assert budget["anyOf"][0]["maximum"] == 16


async def test_bad_event_and_item_requests(client):
    r = await client.post("/users/u1/events", json={"events": [{"item_id": "i4"}, {"item_id": "zz"}]})
    assert r.status_code == 422 and r.json()["error"]["message"] == "unknown item ids in events: 'zz'"
    assert r.json()["error"]["unknown_item_ids"] == ["zz"]
    assert (await client.get("/users/u1/history")).json()["history"] == []  # nothing appended
    r = await client.post("/users/u1/events", json={"events": []})
    assert r.status_code == 422 and "events: List should have at least 1 item" in r.json()["error"]["message"]
    r = await client.post("/users/u1/events", json={"events": [{"item_id": "i1", "timestamp": -5}]})
    assert r.status_code == 422 and "events.0.timestamp" in r.json()["error"]["message"]
    r = await client.get("/items/nope")
    assert r.status_code == 404 and r.json()["error"]["message"] == "item 'nope' not found"
    r = await client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"


# ---------------------------------------------------------------------------- issue 13: bounds and ids
async def test_timestamps_are_seconds_within_a_sane_range(app, client):
    """Row D: an event time of 2^63 used to be stored, and the next retrain died on it."""
    for ts in (2**63, 1_700_000_000_000, -1):  # too large for int64, in milliseconds, negative
        r = await client.post("/users/u1/events", json={"events": [{"item_id": "i1", "timestamp": ts}]})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["message"].startswith("events.0.timestamp: Input should be")
    r = await client.post("/recommend", json={"history": [{"item_id": "i1", "timestamp": 2**63}]})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "history.0.timestamp"
    # an event more than a day ahead of the server's clock: a stored history is kept in time
    # order, so it would stay the newest for years
    r = await client.post(
        "/users/u1/events", json={"events": [{"item_id": "i1", "timestamp": 4_102_444_800}]}
    )
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "events.0.timestamp"
    assert "ahead of the server's clock" in r.json()["error"]["message"]
    assert await app.state.r2ec.store.read_events() == []  # nothing reached the stream
    soon = int(time.time()) + 3600  # an hour of clock skew is fine
    r = await client.post("/users/u1/events", json={"events": [{"item_id": "i1", "timestamp": soon}]})
    assert r.status_code == 200, r.text


async def test_a_timestamp_sent_as_a_whole_float_is_that_integer(app, client):
    """A pandas or parquet export writes an int column as float64 once one value is missing
    (journey 40, #6): 1700000000.0 is 1700000000, the same default event id; a fraction is
    refused naming the field, and nothing of the batch is stored."""
    r = await client.post(
        "/users/u1/events", json={"events": [{"item_id": "i1", "rating": 5, "timestamp": 100}]}
    )
    assert r.status_code == 200, r.text
    r = await client.post(
        "/users/u1/events",
        json={
            "events": [
                {"item_id": "i1", "rating": 5.0, "timestamp": 100.0},
                {"item_id": "i2", "timestamp": 200.0},
            ]
        },
    )
    assert r.status_code == 200, r.text
    assert [e["new"] for e in r.json()["events"]] == [False, True]  # the same event as the first post
    history = (await client.get("/users/u1/history")).json()["history"]
    assert [(e["item_id"], e["timestamp"]) for e in history] == [("i1", 100), ("i2", 200)]
    r = await client.post(
        "/users/u1/events",
        json={"events": [{"item_id": "i3", "timestamp": 300.0}, {"item_id": "i4", "timestamp": 300.5}]},
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["fields"][0]["field"] == "events.1.timestamp"
    assert "must be whole Unix seconds, got 300.5" in r.json()["error"]["message"]
    assert len(await app.state.r2ec.store.read_events()) == 2  # the refused batch stored nothing
    r = await client.post("/recommend", json={"history": [{"item_id": "i1", "timestamp": 1.5}]})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "history.0.timestamp"


async def test_metrics_count_events_new_and_duplicate(client):
    """r2ec_events_total{result}: from each append's reply, so a dashboard tells a replay being
    deduplicated from new traffic (journey 40, #7); a refused request counts in neither."""

    async def counts() -> tuple[float | None, float | None]:
        text = (await client.get("/metrics")).text
        return metric(text, "r2ec_events_total", result="new"), metric(
            text, "r2ec_events_total", result="duplicate"
        )

    assert await counts() == (0, 0)  # exported from the start, so rate() works
    events = [{"item_id": "i1", "timestamp": 100}, {"item_id": "i2", "timestamp": 200}]
    assert (await client.post("/users/u1/events", json={"events": events})).status_code == 200
    assert await counts() == (2, 0)
    again = {"events": [*events, {"item_id": "i3", "timestamp": 300}]}
    assert (await client.post("/users/u1/events", json=again)).status_code == 200
    assert await counts() == (3, 2)
    r = await client.post("/users/u1/events", json={"events": [{"item_id": "i4"}, {"item_id": "zz"}]})
    assert r.status_code == 422 and await counts() == (3, 2)


ODD_IDS = [
    ("%20u%20", "leading", "must not start or end with whitespace"),
    ("u%20", "trailing", "must not start or end with whitespace"),
    ("%09u", "tab", "must not contain control characters"),
    ("a%00b", "nul", "must not contain control characters"),
    ("a%1Bb", "escape", "must not contain control characters"),
]


@pytest.mark.parametrize(("raw", "what", "message"), ODD_IDS, ids=[w for _, w, _ in ODD_IDS])
async def test_path_ids_and_body_ids_follow_one_rule(client, raw, what, message):
    """Row F: path ids used to be taken as they came while body ids were trimmed, so a user
    created through the path could never be reached from a body (and the other way round)."""
    from urllib.parse import unquote

    for method, path, body in (
        ("POST", f"/users/{raw}/events", {"events": [{"item_id": "i1"}]}),
        ("GET", f"/users/{raw}/history", None),
        ("GET", f"/items/{raw}", None),
        ("PUT", f"/items/{raw}", {"title": "A Film"}),
        ("DELETE", f"/items/{raw}", None),
    ):
        r = await client.request(method, path, json=body, headers=ADMIN)
        assert r.status_code == 422, (method, path, r.text)
        field = "user_id" if path.startswith("/users") else "item_id"
        assert r.json()["error"]["message"] == f"{field}: {message}", (method, path)
    odd = unquote(raw)
    for body, field in (
        ({"user_id": odd}, "user_id"),
        ({"history": [{"item_id": odd}]}, "history.0.item_id"),
    ):
        r = await client.post("/recommend", json=body)
        assert r.status_code == 422 and r.json()["error"]["message"] == f"{field}: {message}"
    r = await client.post("/users/u1/events", json={"events": [{"item_id": "i1", "event_id": odd}]})
    assert r.json()["error"]["message"] == f"events.0.event_id: {message}"
    r = await client.post("/users/u1/events", json={"events": [{"item_id": odd}]})
    assert r.json()["error"]["message"] == f"events.0.item_id: {message}"


async def test_ids_with_inner_spaces_and_unicode_work_the_same_in_path_and_body(client):
    user = "Zoë B. ✓"
    r = await client.post(f"/users/{user}/events", json={"events": [{"item_id": "i4"}]})
    assert r.status_code == 200 and r.json()["user_id"] == user
    assert [h["item_id"] for h in (await client.get(f"/users/{user}/history")).json()["history"]] == ["i4"]
    r = await client.post("/recommend", json={"user_id": user, "k": 3})
    assert r.status_code == 200 and r.json()["history_source"] == "store"


# ids that hold "/", which the server decodes (%2F) before routing; "x/events" and "x/history"
# end as another route's tail does
SLASHED_IDS = ["x/slash", "a//b", "/lead", "trail/", "x/events", "x/history"]


async def test_ids_holding_a_slash_reach_every_route_with_an_id_in_its_path(client):
    """Such ids are accepted in bodies (and by `r2ec data prepare`), but every route with an id
    in its path used to answer them a bare 404 "Not Found": no route matched the decoded path."""
    from urllib.parse import quote

    for item in SLASHED_IDS:
        path = f"/items/{quote(item, safe='')}"
        r = await client.put(path, json={"title": f"Film {item}"}, headers=ADMIN)
        assert r.status_code == 201, (item, r.text)
        assert r.json()["item"]["item_id"] == item
        r = await client.get(path)
        assert r.status_code == 200 and r.json()["title"] == f"Film {item}"
        assert (await client.put(path, json={"title": f"Film {item} 2"}, headers=ADMIN)).status_code == 200
    for user in SLASHED_IDS:
        path = f"/users/{quote(user, safe='')}"
        events = {"events": [{"item_id": "i4", "timestamp": 100}, {"item_id": "x/slash", "timestamp": 200}]}
        r = await client.post(f"{path}/events", json=events)
        assert r.status_code == 200 and r.json()["user_id"] == user, (user, r.text)
        r = await client.get(f"{path}/history")
        assert r.status_code == 200 and r.json()["user_id"] == user
        assert [(h["item_id"], h["title"]) for h in r.json()["history"]] == [
            ("i4", "Get Shorty"),
            ("x/slash", "Film x/slash 2"),
        ]
        r = await client.post("/recommend", json={"user_id": user, "k": 3, "reasoning": False})
        assert r.status_code == 200 and r.json()["history_source"] == "store"
    # sent unencoded, the id is the same: the route's fixed tail ends it
    r = await client.get("/users/x/events/history")
    assert r.status_code == 200 and r.json()["user_id"] == "x/events"
    # erased by its path too, but for an id whose end makes it a user's events or history
    # (`r2ec user erase` takes those: tests/cli/test_user.py)
    for user in SLASHED_IDS:
        r = await client.delete(f"/users/{quote(user, safe='')}", headers=ADMIN)
        if user.endswith(("/events", "/history")):
            assert r.status_code == 405, (user, r.text)
        else:
            assert r.status_code == 200 and r.json()["user_id"] == user and r.json()["history_events"] == 2
    r = await client.post("/users/x/events/", json={"events": [{"item_id": "i1"}]})
    assert r.status_code == 307 and r.headers["location"].endswith("/users/x/events")
    for item in SLASHED_IDS:
        r = await client.delete(f"/items/{quote(item, safe='')}", headers=ADMIN)
        assert r.status_code == 200 and r.json()["deleted"] == item
    # an unknown id is a 404 that names it, whatever it holds
    for item in ("zzz", "x/slash", "a/zzz/"):
        for method in ("GET", "DELETE"):
            r = await client.request(method, f"/items/{quote(item, safe='')}", headers=ADMIN)
            assert r.status_code == 404, (method, item, r.text)
            assert r.json()["error"]["message"] == f"item {item!r} not found"
    # an empty id is refused by name; a path no route has is still a plain 404; a wrong method a 405
    # an empty id is no id: no route (as before ids could hold "/"), and "/items/" is the search
    r = await client.post("/users//events", json={"events": [{"item_id": "i1"}]})
    assert r.status_code == 404
    r = await client.get("/items/?q=toy")
    assert r.status_code == 307 and r.headers["location"].endswith("/items?q=toy")
    # so is one with a line break or another control character (the `path` convertor's "."
    # stopped at a line break: no route matched, a bare 404; schemathesis found it)
    for bad in ("a\nb", "\x05x"):
        r = await client.post(f"/users/{quote(bad, safe='')}/events", json={"events": [{"item_id": "i1"}]})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "user_id", r.text
        r = await client.get(f"/items/{quote(bad, safe='')}")
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "item_id", r.text
    r = await client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
    for path in ("/users/u1/nothing", "/users/u1"):  # a user, "u1/nothing" or "u1", to erase
        r = await client.get(path)
        assert r.status_code == 405 and r.headers["allow"] == "DELETE", path
    r = await client.get("/users/u1/events")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    text = (await client.get("/metrics")).text  # labels are the templates, without the convertor
    assert requests(text, "/items/{item_id}", "404", method="GET") == 3
    assert requests(text, "/users/{user_id}/events", "200") == len(SLASHED_IDS)


async def test_a_retried_event_post_is_not_stored_twice(app, client):
    """Row H: a client that retries a post whose first attempt landed (it timed out, or got a
    503 from a stalled Redis: test_store.py) must not duplicate the events."""
    body = {"events": [{"item_id": "i1", "rating": 5, "event_id": "evt-1"}, {"item_id": "i2"}]}
    first = (await client.post("/users/u1/events", json=body)).json()
    assert (first["appended"], first["duplicates"]) == (2, 0)
    assert first["events"][0] == {"event_id": "evt-1", "new": True}
    assert first["events"][1]["new"] and len(first["events"][1]["event_id"]) == 32  # derived
    again = (await client.post("/users/u1/events", json=body)).json()
    assert (again["appended"], again["duplicates"], again["history_length"]) == (0, 2, 2)
    assert [e["new"] for e in again["events"]] == [False, False]
    assert [e["event_id"] for e in again["events"]] == [e["event_id"] for e in first["events"]]
    stream = await app.state.r2ec.store.read_events()
    assert [(e.item_id, e.event_id) for e in stream] == [
        (e["item_id"], e2["event_id"]) for e, e2 in zip(body["events"], first["events"], strict=True)
    ]
    assert [h["item_id"] for h in (await client.get("/users/u1/history")).json()["history"]] == ["i1", "i2"]
    # the same item again with another id is a new event
    r = (
        await client.post("/users/u1/events", json={"events": [{"item_id": "i1", "event_id": "evt-2"}]})
    ).json()
    assert (
        r["events"] == [{"event_id": "evt-2", "new": True}]
        and len(await app.state.r2ec.store.read_events()) == 3
    )


async def test_exclude_history_excludes_every_item_the_user_ever_had(client):
    """The history window is 3 here: the 5 items the user had before it are excluded too."""
    had = ["i1", "i2", "i3", "i4", "i5", "i6", "i7", "i8"]
    r = await client.post("/users/u1/events", json={"events": [{"item_id": i} for i in had]})
    assert r.json()["history_length"] == 3

    async def recommended(**body) -> set[str]:
        r = await client.post("/recommend", json={"k": 100, "reasoning": False, **body})
        assert r.status_code == 200, r.text
        return {i["item_id"] for i in r.json()["items"]}

    catalog = await recommended(user_id="u1", exclude_history=False)
    assert len(catalog) == 11 and set(had) < catalog
    assert await recommended(user_id="u1") == catalog - set(had)
    assert await recommended(user_id="u1", history=[{"item_id": "i9"}]) == catalog - set(had) - {"i9"}
    assert await recommended(history=[{"item_id": "i9"}]) == catalog - {"i9"}  # no user: no seen set


async def test_an_item_listed_twice_is_recommended_once_and_not_beside_its_twin(client):
    """Two ids with the same text (ml-100k lists 18 films twice) get one vector and are one film
    to a reader: a list names the better-placed once, and neither where the user has one; a
    list of given candidates keeps both."""
    got = (await client.get("/items/i3")).json()
    twin = {k: got[k] for k in ("title", "year", "genres", "description")}
    assert (await client.put("/items/i3-again", json=twin, headers=ADMIN)).status_code == 201

    async def recommended(**body) -> list[str]:
        r = await client.post("/recommend", json={"k": 100, "reasoning": False, **body})
        assert r.status_code == 200, r.text
        return [i["item_id"] for i in r.json()["items"]]

    listed = await recommended(history=[{"item_id": "i9"}])
    assert len(listed) == 10 and len({"i3", "i3-again"} & set(listed)) == 1
    assert len(await recommended(history=[{"item_id": "i9"}], k=9)) == 9
    assert not {"i3", "i3-again"} & set(await recommended(history=[{"item_id": "i3-again"}]))
    assert not {"i3", "i3-again"} & set(await recommended(history=[{"item_id": "i9"}], exclude_items=["i3"]))
    both = await recommended(history=[{"item_id": "i9"}], candidates=["i3", "i3-again", "i5"])
    assert sorted(both) == ["i3", "i3-again", "i5"]


async def test_candidates_are_reranked_with_the_full_rankings_scores_and_exclusions_hold(client):
    """`candidates` ranks only those items, with the scores the whole-catalog ranking gives them
    (reasoning on, a cache miss and then a hit, and streamed); the history and `exclude_items`
    stay out; bad candidates are a 422 naming the field."""
    whole = (await client.post("/recommend", json={"history": H1, "k": 100})).json()
    score = {i["item_id"]: i["score"] for i in whole["items"]}
    pool = ["i9", "i4", "i2", "i8", "i6"]  # i2 is in the history
    body = {"history": H1, "k": 2, "candidates": pool, "exclude_items": ["i8", "not-an-item"]}
    first = (await client.post("/recommend", json=body)).json()
    want = sorted(["i9", "i4", "i6"], key=lambda i: -score[i])[:2]
    assert [i["item_id"] for i in first["items"]] == want and first["cache"] == "hit"
    assert [i["score"] for i in first["items"]] == pytest.approx([score[i] for i in want], abs=1e-3)
    assert first["reasoning"] == whole["reasoning"]
    streamed = await client.post("/recommend/stream", json=body)
    items = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith('data: {"items')]
    assert [i["item_id"] for i in items[0]["items"]] == want
    more = {**body, "k": 10, "exclude_history": False, "reasoning": False}
    off = (await client.post("/recommend", json=more)).json()
    assert sorted(i["item_id"] for i in off["items"]) == ["i2", "i4", "i6", "i9"]  # fewer than k
    no_pool = await client.post("/recommend", json={"history": H1, "exclude_items": ["i9"], "k": 100})
    assert "i9" not in {i["item_id"] for i in no_pool.json()["items"]}

    r = await client.post("/recommend", json={**body, "candidates": ["i4", "nope", "gone"]})
    error = r.json()["error"]
    assert r.status_code == 422 and error["unknown_item_ids"] == ["gone", "nope"]
    assert error["message"] == "unknown item ids in candidates: 'gone', 'nope'"
    for bad in ([], ["i4", ""], "i4", ["i4"] * 1001):
        r = await client.post("/recommend", json={**body, "candidates": bad})
        assert r.status_code == 422 and "candidates" in r.text, (bad, r.text)
    r = await client.post("/recommend", json={**body, "exclude_items": [None]})
    assert r.status_code == 422 and "exclude_items" in r.text


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

        # one by one, on the same app: a lone request need not wait 10 s for a batch of 6 that
        # never fills (6 x 10 s idle was a quarter of tests/service), so it runs at once
        app.state.r2ec.batcher.max_wait_s = 0
        singles = []
        for b in CONCURRENT:
            r = await client.post("/recommend", json=b)
            assert r.status_code == 200, r.text
            singles.append(r.json())
        assert calls[1:] == [1, 1, 1, 1, 1]  # the no-reasoning request never generates
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_batch_size_count") == 1 + len(CONCURRENT)  # each a batch of its own
        assert metric(text, "r2ec_batch_size_sum") == 2 * len(CONCURRENT)
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
    # tokens count what was written: the two misses, not the hit's copy of the first
    assert metric(text, "r2ec_reasoning_tokens_count") == 2
    assert metric(text, "r2ec_reasoning_tokens_sum") == first["reasoning_tokens"] + other["reasoning_tokens"]
    cut = sum(r["reasoning_cut"] for r in (first, again, other))
    assert other["reasoning_cut"] and metric(text, "r2ec_reasoning_cut_total") == cut


async def test_a_repeated_request_is_one_index_search_without_the_batch(app, client):
    """Issue 12: the entry carries h_T, so a repeat runs neither the batch nor the model; in the
    Redis run the vector went to Redis and back. The search reads the live catalog."""
    state = app.state.r2ec
    body = {"history": H1, "k": 5}
    first = (await client.post("/recommend", json=body)).json()
    assert first["cache"] == "miss"
    batches, generated, forward = (
        state.batcher.batches,
        count_generate(state.engine),
        count_forward(state.engine),
    )
    again = (await client.post("/recommend", json=body)).json()
    assert state.batcher.batches == batches and generated == [] and forward == []
    assert again["cache"] == "hit" and again["items"] == first["items"]  # the same scores, exactly
    assert again["reasoning"] == first["reasoning"] and again["reasoning_tokens"] == first["reasoning_tokens"]
    assert again["timings"]["queue_ms"] == 0 and again["timings"]["generate_ms"] == 0

    gone = first["items"][0]["item_id"]
    assert (await client.delete(f"/items/{gone}", headers=ADMIN)).status_code == 200
    after = (await client.post("/recommend", json=body)).json()
    assert after["cache"] == "hit" and state.batcher.batches == batches and forward == []
    assert [i["item_id"] for i in after["items"][:4]] == [i["item_id"] for i in first["items"][1:]]
    text = (await client.get("/metrics")).text
    assert metric(text, "r2ec_reasoning_cache_total", result="hit") == 2
    assert metric(text, "r2ec_reasoning_cache_total", result="miss") == 1
    assert metric(text, "r2ec_batch_size_count") == 1
    # every answer is timed; only the one that went through the batch waited in its queue
    assert metric(text, "r2ec_recommend_seconds_count") == 3
    assert metric(text, "r2ec_queue_wait_seconds_count") == 1


async def test_an_entry_without_a_vector_goes_through_the_batch_and_gains_one(app, client):
    """An entry written before h_T was cached is still a hit (no generation), rebuilt by the
    batch's forward pass and written back with its vector: the next repeat skips the batch."""
    state = app.state.r2ec
    query = Query(tuple(Event(h["item_id"]) for h in H2), max_reasoning_tokens=8)
    key = state.engine.prepare(query).cache_key
    first = await state.recommend(query)
    entry = json.loads(await state.store.cache_get(key))
    assert entry["vector"]["dim"] == state.engine.model.hidden_size
    await state.store.cache_set(key, json.dumps({"ids": entry["ids"], "text": entry["text"]}))

    batches, generated, forward = (
        state.batcher.batches,
        count_generate(state.engine),
        count_forward(state.engine),
    )
    hit = await state.recommend(query)
    assert hit.cache == "hit" and hit.reasoning == first.reasoning
    assert state.batcher.batches == batches + 1 and generated == [] and forward == [1]
    assert [i.item_id for i in hit.items] == [i.item_id for i in first.items]
    assert "vector" in json.loads(await state.store.cache_get(key))
    again = await state.recommend(query)
    assert again.cache == "hit" and again.items == hit.items
    assert state.batcher.batches == batches + 1 and forward == [1]


async def test_a_corrupt_cached_vector_is_a_miss_and_is_replaced(app, client, caplog):
    state = app.state.r2ec
    query = Query(tuple(Event(h["item_id"]) for h in H3), max_reasoning_tokens=8)
    key = state.engine.prepare(query).cache_key
    first = await state.recommend(query)
    entry = json.loads(await state.store.cache_get(key))
    hidden = state.engine.model.hidden_size
    nan = np.full(hidden, np.nan, np.float32)
    short = np.ones(hidden - 1, np.float32) / np.sqrt(hidden - 1)
    generated = count_generate(state.engine)
    for bad in (nan, short):
        vector = {"dtype": "float32", "dim": len(bad), "b64": base64.b64encode(bad.tobytes()).decode()}
        await state.store.cache_set(key, json.dumps({**entry, "vector": vector}))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="service.state"):
            r = await state.recommend(query)
        assert r.cache == "miss" and r.reasoning == first.reasoning
        assert "ignoring unreadable cache entry" in caplog.text
        CachedReasoning.from_json(await state.store.cache_get(key), hidden)  # rewritten, valid
    assert generated == [1, 1]


async def test_a_draining_service_refuses_a_cached_hit_as_it_refuses_the_batch(ckpt):
    app = app_for(ckpt, shutdown_grace_s=0.2)
    async with serve(app) as client:
        assert (await client.post("/recommend", json={"history": H1})).json()["cache"] == "miss"
        app.state.r2ec.begin_drain()
        r = await client.post("/recommend", json={"history": H1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert int(r.headers["retry-after"]) >= 1
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_reasoning_cache_total", result="hit") == 0


async def test_a_failing_batch_fails_its_requests_and_the_service_goes_on(app, client, caplog):
    model = app.state.r2ec.engine.backend
    original = model.generate

    def explode(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    model.generate = explode
    with caplog.at_level(logging.ERROR, logger="service"):
        failed = await asyncio.gather(*(client.post("/recommend", json={"history": h}) for h in (H1, H2)))
    for r in failed:
        # the client gets the request id, not the exception (it may name a path on the server);
        # the log has it, under that id
        rid = r.headers["x-request-id"]
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert r.json()["error"]["message"] == f"internal error (request {rid})"
        assert "CUDA" not in r.text
        assert f"recommendation failed (request {rid})" in caplog.text
    assert "RuntimeError: CUDA out of memory (simulated)" in caplog.text
    model.generate = original
    r = await client.post("/recommend", json={"history": H1})
    assert r.status_code == 200, r.text
    assert (await client.get("/readyz")).status_code == 200


async def test_a_request_whose_client_left_is_dropped_before_its_batch_runs(app, client):
    """State level, deterministic: the model thread is busy with request A while B waits;
    B's client goes away; B never reaches the model. (test_socket.py does it over TCP.)"""
    state = app.state.r2ec
    calls = count_generate(state.engine)
    held = HeldModel(state)
    a = asyncio.create_task(state.recommend(Query(tuple(Event(h["item_id"]) for h in H1))))
    await held.wait_entered()  # A's batch is in generate
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
    held.release()
    assert len((await a).items) == 8
    assert len((await client.post("/recommend", json={"history": H3})).json()["items"]) == 10
    assert calls == [1, 1]  # A, then the next request: B was never generated
    assert state.batcher.batches == 2


# ---------------------------------------------------------------------------- probes
async def test_queue_time_counts_from_the_queue_not_from_a_slow_history_read(app, client, monkeypatch):
    """A slow store is no queue wait: r2ec_queue_wait_seconds and the reply's queue_ms start when
    the request enters the batcher's queue; total_ms holds the history read."""
    store = app.state.r2ec.store
    assert (await client.post("/users/u1/events", json={"events": H1})).status_code == 200
    read = store.get_history

    async def slow_read(user_id):
        await asyncio.sleep(0.4)
        return await read(user_id)

    monkeypatch.setattr(store, "get_history", slow_read)
    r = await client.post("/recommend", json={"user_id": "u1", "reasoning": False})
    timings = r.json()["timings"]
    assert timings["total_ms"] >= 400 and timings["queue_ms"] < 300, timings
    text = (await client.get("/metrics")).text
    assert metric(text, "r2ec_queue_wait_seconds_sum") < 0.3
    assert metric(text, "r2ec_recommend_seconds_sum") >= 0.4


async def test_probes_and_metrics(app, client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    engine = app.state.r2ec.engine
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "model_version": engine.version,
        "items": 11,
        "index": "flat",
        "store": "ok",
        "reasons": [],
        "backbone": {"status": "match", "loaded": "tiny", "recorded": "tiny"},
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
    # the service's own time for the answered recommendation (the 422 was refused before it)
    assert metric(text, "r2ec_recommend_seconds_count") == metric(text, "r2ec_queue_wait_seconds_count") == 1
    assert 0 < metric(text, "r2ec_reasoning_tokens_sum") <= 8
    assert metric(text, "r2ec_reasoning_cache_total", result="miss") == 1
    assert metric(text, "r2ec_index_items") == 11
    assert metric(text, "r2ec_model_info", version=engine.version, index="flat") == 1
    # saturation: what the queue and the model hold, of how much; this scrape is in flight
    settings = app.state.r2ec.settings
    assert metric(text, "r2ec_queue_capacity") == settings.max_queue
    assert metric(text, "r2ec_batch_capacity") == settings.max_batch
    assert metric(text, "r2ec_batch_active") == 0
    assert metric(text, "r2ec_requests_in_flight") == 1
    # the model's age, the process and the build; no *_created series beside the counters
    created = datetime.fromisoformat(engine.checkpoint.meta["created_at"]).timestamp()
    assert metric(text, "r2ec_model_created_timestamp_seconds") == pytest.approx(created)
    assert time.time() - 600 < metric(text, "r2ec_model_loaded_timestamp_seconds") <= time.time()
    assert metric(text, "process_start_time_seconds") > 0 and metric(text, "python_info") == 1
    assert metric(text, "r2ec_build_info", version=package_version()) == 1
    samples = [s.name for family in text_string_to_metric_families(text) for s in family.samples]
    assert not [name for name in samples if name.endswith("_created")]
    # the decode steps' matmul path: a float32 model never takes the bf16 kernel
    assert engine.decode_matmuls == "onednn"
    assert metric(text, "r2ec_model_info", version=engine.version, decode_matmuls="onednn") == 1
    # speculative decoding's drafts (model/speculative.py): a second history drafts from the
    # first one's text and its own prompt, and /metrics shows what the drafter counted
    assert (await client.post("/recommend", json={"history": H2})).status_code == 200
    text = (await client.get("/metrics")).text
    drafted, accepted = engine.draft_counts()
    assert drafted > 0 and drafted >= accepted
    assert metric(text, "r2ec_draft_tokens_total") == drafted
    assert metric(text, "r2ec_draft_tokens_accepted_total") == accepted


async def test_openapi_documents_every_route_and_the_admin_key(client):
    spec = (await client.get("/openapi.json")).json()
    assert set(spec["paths"]) == {
        "/recommend", "/recommend/stream", "/users/{user_id}/events", "/users/{user_id}/history",
        "/users/{user_id}", "/items/{item_id}", "/admin/reload", "/healthz", "/readyz", "/metrics",
        "/items", "/items:batch",
    }  # fmt: skip
    assert spec["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    for method, path in (("put", "/items/{item_id}"), ("delete", "/items/{item_id}"),
                         ("post", "/items:batch"), ("post", "/admin/reload"),
                         ("delete", "/users/{user_id}")):  # fmt: skip
        assert spec["paths"][path][method]["security"] == [{"APIKeyHeader": []}]
    assert "security" not in spec["paths"]["/items/{item_id}"]["get"]
    # the routes of users' data take no key where R2EC_CLIENT_KEY is unset, and say so
    for method, path in (("post", "/recommend"), ("get", "/users/{user_id}/history")):
        assert "security" not in spec["paths"][path][method], path


async def test_openapi_asks_for_the_key_on_the_user_routes_where_a_client_key_is_set(ckpt):
    async with serve(app_for(ckpt, client_key="client-secret")) as client:
        spec = (await client.get("/openapi.json")).json()
    for method, path in (("post", "/recommend"), ("post", "/users/{user_id}/events")):
        assert spec["paths"][path][method]["security"] == [{"APIKeyHeader": []}], path


async def test_r2ec_docs_false_turns_off_the_docs_pages_and_the_schema(ckpt, monkeypatch):
    """/docs runs Swagger UI's script from a CDN on the service's origin; a deployment that
    does not want that (the k8s config) turns the docs off, and the schema with them."""
    async with serve(app_for(ckpt)) as client:  # on by default
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await client.get(path)).status_code == 200, path
        assert "cdn.jsdelivr.net" in (await client.get("/docs")).text
    monkeypatch.setenv("R2EC_DOCS", "false")
    async with serve(app_for(ckpt)) as client:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            r = await client.get(path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
        r = await client.post("/recommend", json={"history": H1, "k": 2, "reasoning": False})
        assert r.status_code == 200  # the API itself is unchanged


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
    monkeypatch.setenv("R2EC_EXACT_DECODE", "true")
    app = create_app()
    async with serve(app) as client:
        s = app.state.r2ec.settings
        assert (s.checkpoint, s.max_batch, s.max_wait_ms, s.threads) == (ckpt, 3, 7.5, 1)
        assert s.exact_decode and app.state.r2ec.engine.backend.engine.exact
        assert app.state.r2ec.engine.backend.engine.prefix == []  # no prefix cache either
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


async def test_the_model_device_comes_from_r2ec_device(ckpt, monkeypatch, make_engine):
    """Issue 12: R2EC_DEVICE places the model (cpu by default); a bad name, or a GPU this machine
    lacks, is a settings error naming the variable, before anything loads."""
    from pydantic import ValidationError

    from service.config import Settings

    for bad in ("tpu", "cuda:", "cudax", "gpu0"):
        monkeypatch.setenv("R2EC_DEVICE", bad)
        with pytest.raises(ValidationError, match="R2EC_DEVICE: device must be auto, cpu, cuda or cuda:N"):
            Settings()
    monkeypatch.delenv("R2EC_DEVICE")
    assert Settings().device == "cpu"
    if not torch.cuda.is_available():
        for gpu in ("cuda", "cuda:0"):
            with pytest.raises(ValidationError, match="R2EC_DEVICE: device .* torch sees no CUDA device"):
                Settings(device=gpu)
        with pytest.raises(ValueError, match="no CUDA device"):
            make_engine(ckpt, device="cuda")  # the loader checks too, before loading
    app = app_for(ckpt, device="auto")
    async with serve(app) as client:
        expected = "cuda" if torch.cuda.is_available() else "cpu"
        assert app.state.r2ec.engine.model.device.type == expected
        r = await client.post("/recommend", json={"history": H1, "k": 3})
        assert r.status_code == 200 and len(r.json()["items"]) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
async def test_the_service_runs_the_model_on_the_gpu(ckpt):
    """Generation and h_T on the GPU; item vectors, FAISS and the cached h_T on the CPU."""
    app = app_for(ckpt, device="cuda")
    async with serve(app) as client:
        state = app.state.r2ec
        assert state.engine.model.device.type == "cuda"
        first = await client.post("/recommend", json={"history": H1, "k": 5, "max_reasoning_tokens": 4})
        assert first.status_code == 200 and first.json()["cache"] == "miss", first.text
        batches = state.batcher.batches
        again = (
            await client.post("/recommend", json={"history": H1, "k": 5, "max_reasoning_tokens": 4})
        ).json()
        assert again["cache"] == "hit" and again["items"] == first.json()["items"]
        assert state.batcher.batches == batches
        r = await client.put("/items/new", json={"title": "A new film"}, headers=ADMIN)  # encoded on the GPU
        assert r.status_code == 201, r.text
    from pydantic import ValidationError

    from service.config import Settings

    with pytest.raises(ValidationError, match="R2EC_DEVICE: device 'cuda:99' asked for, but torch sees"):
        Settings(device="cuda:99")


# ---------------------------------------------------------------------------- issue 13: load and shutdown
async def queued(state, n: int) -> None:
    async def poll() -> None:
        while state.batcher.queue_depth < n:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), 60)


async def one_running_one_queued(state, client) -> tuple[HeldModel, asyncio.Task, asyncio.Task]:
    """H1's request held on the model thread (max_batch 1) and H2's behind it in the queue."""
    held = HeldModel(state)
    a = asyncio.create_task(client.post("/recommend", json={"history": H1}))
    await held.wait_entered()
    b = asyncio.create_task(client.post("/recommend", json={"history": H2}))
    await queued(state, 1)
    return held, a, b


async def test_a_full_queue_answers_503_with_retry_after(ckpt):
    """Row G: past R2EC_MAX_QUEUE waiting requests, one more is refused at once."""
    app = app_for(ckpt, max_batch=1, max_queue=1, cache_size=0)
    async with serve(app) as client:
        state = app.state.r2ec
        held, a, b = await one_running_one_queued(state, client)
        r = await client.post("/recommend", json={"history": H3})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "overloaded" and "R2EC_MAX_QUEUE" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1
        held.release()
        assert [x.status_code for x in await asyncio.gather(a, b)] == [200, 200]
        assert (await client.post("/recommend", json={"history": H3})).status_code == 200
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_rejected_total", reason="queue_full") == 1
        assert requests(text, "/recommend", "503", method="POST") == 1


async def test_a_request_queued_past_max_queue_wait_gets_503_overloaded(ckpt):
    """R2EC_MAX_QUEUE_WAIT_S: H2's request waits behind the held one past the limit, and is
    refused when its turn comes, counted apart from a full queue's refusals."""
    app = app_for(ckpt, max_batch=1, cache_size=0, max_queue_wait_s=0.05)
    async with serve(app) as client:
        state = app.state.r2ec
        held, a, b = await one_running_one_queued(state, client)
        await asyncio.sleep(0.2)
        held.release()
        assert (await a).status_code == 200
        r = await b
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
        assert "R2EC_MAX_QUEUE_WAIT_S" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_rejected_total", reason="queue_timeout") == 1
        assert metric(text, "r2ec_rejected_total", reason="queue_full") == 0


async def test_a_drain_refuses_new_requests_and_answers_the_rest_by_the_deadline(ckpt):
    """Row C, in process: after SIGTERM (state.begin_drain) a new request is refused, /readyz
    says so, and what cannot finish within the grace gets a JSON 503 with Retry-After."""
    app = app_for(ckpt, max_batch=1, cache_size=0, shutdown_grace_s=0.2)
    async with serve(app) as client:
        state = app.state.r2ec
        held, a, b = await one_running_one_queued(state, client)
        state.begin_drain()
        r = await client.post("/recommend", json={"history": H3})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["reasons"] == ["shutting down"]
        for r in await asyncio.gather(a, b):  # the held batch would end after the deadline
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            assert int(r.headers["retry-after"]) >= 1
        held.release()
        assert (await client.post("/users/u1/events", json={"events": H3})).status_code == 200
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_rejected_total", reason="shutting_down") == 3


async def test_a_drain_with_time_to_spare_answers_everything(ckpt):
    app = app_for(ckpt, max_batch=1, cache_size=0, shutdown_grace_s=120)
    async with serve(app) as client:
        state = app.state.r2ec
        held, a, b = await one_running_one_queued(state, client)
        state.begin_drain()
        held.release()
        assert [r.status_code for r in await asyncio.gather(a, b)] == [200, 200]


async def test_a_cache_hit_is_searched_on_the_hits_thread_without_an_openmp_team(app, client, monkeypatch):
    # FAISS's OpenMP team on a second live thread slows the model thread's forwards
    # (bench/bench_threads.py): hits run on one thread whose FAISS calls use no team
    import threading

    import faiss

    state = app.state.r2ec
    seen: list[tuple[str, int]] = []
    answer = type(state.engine).answer_cached

    def recording(self, prepared):
        seen.append((threading.current_thread().name, faiss.omp_get_max_threads()))
        return answer(self, prepared)

    monkeypatch.setattr(type(state.engine), "answer_cached", recording)
    body = {"history": H1, "k": 5}
    assert (await client.post("/recommend", json=body)).json()["cache"] == "miss"
    for _ in range(2):
        assert (await client.post("/recommend", json=body)).json()["cache"] == "hit"
    assert len(seen) == 2 and all(name.startswith("r2ec-hits") and threads == 1 for name, threads in seen)
