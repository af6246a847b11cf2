"""What a client integrating the API relies on beyond each route's main job: ids that cannot
collide, the order an inline history is read in, what a reply says about its reasoning, and the
headers and probes an operator's tooling expects."""

from __future__ import annotations

import logging

import httpx
import pytest

from tests.service.conftest import ADMIN, app_for, serve
from tests.service.test_app import metric


@pytest.mark.asyncio
async def test_ids_with_bytes_that_are_not_utf8_are_refused_not_merged(client):
    """%FF and %FE both decode to U+FFFD: taken as ids they would be one user."""
    body = {"events": [{"item_id": "i1"}]}
    for path in ("/users/%FF/events", "/users/Jos%E9/events", "/users/%EF%BF%BD/events"):
        r = await client.post(path, json=body)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"]["fields"][0]["field"] == "user_id" and "U+FFFD" in r.text
    r = await client.post("/recommend", json={"history": [{"item_id": "i\ufffd1"}]})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "history.0.item_id"
    assert (await client.post("/users/Jos%C3%A9/events", json=body)).status_code == 200  # UTF-8: fine


BIDI = ["\u061c", "\u200e", "\u200f", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e"]
BIDI += ["\u2066", "\u2067", "\u2068", "\u2069"]


@pytest.mark.asyncio
async def test_ids_with_bidirectional_controls_are_refused_other_format_characters_are_not(ckpt):
    """U+202E made "u\u202eadmin" display as "unimda" wherever an id is shown, and was taken as a
    user id: every bidi control is now a 422 naming the field, in paths and bodies. The zero-width
    joiner of emoji sequences (also Cf) stays allowed."""
    async with serve(app_for(ckpt)) as client:
        for c in BIDI:
            r = await client.post(f"/users/u{c}admin/events", json={"events": [{"item_id": "i1"}]})
            assert r.status_code == 422, (hex(ord(c)), r.text)
            error = r.json()["error"]
            assert error["fields"][0]["field"] == "user_id" and "bidirectional control" in error["message"]
        for body, field in (
            ({"user_id": "u\u202e1", "history": [{"item_id": "i1"}]}, "user_id"),
            ({"history": [{"item_id": "i1\u2067"}]}, "history.0.item_id"),
        ):
            r = await client.post("/recommend", json=body)
            assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == field, r.text
        r = await client.post("/users/u1/events", json={"events": [{"item_id": "i1", "event_id": "\u200fe"}]})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "events.0.event_id"
        assert (await client.get("/users/%E2%80%AEu1/history")).status_code == 422  # U+202E, encoded
        for user in ("\U0001f469\u200d\U0001f4bb", "a\u200db", "a\u2060b"):  # ZWJ, word joiner: fine
            r = await client.post(f"/users/{user}/events", json={"events": [{"item_id": "i1"}]})
            assert r.status_code == 200, (user, r.text)


@pytest.mark.asyncio
async def test_an_inline_history_with_timestamps_is_read_in_timestamp_order(client):
    events = [{"item_id": f"i{n}", "rating": 4, "timestamp": 100 * n} for n in (1, 2, 3, 4, 5)]
    ask = {"k": 5, "reasoning": False}
    sent_in_order = (await client.post("/recommend", json={**ask, "history": events})).json()
    reversed_ = (await client.post("/recommend", json={**ask, "history": events[::-1]})).json()
    assert reversed_["items"] == sent_in_order["items"]
    assert reversed_["read_items"] == sent_in_order["read_items"] == ["i1", "i2", "i3", "i4", "i5"]
    # without a timestamp on every entry, the order sent is the order read
    partly = [*events[:0:-1], {"item_id": "i1", "rating": 4}]
    r = (await client.post("/recommend", json={**ask, "history": partly})).json()
    assert r["read_items"] == ["i5", "i4", "i3", "i2", "i1"]


@pytest.mark.asyncio
async def test_a_reply_says_what_was_read_and_whether_the_reasoning_was_cut(app, client):
    window = app.state.r2ec.engine.model.prompts.max_history
    long = [{"item_id": f"i{n % 10 + 1}"} for n in range(window + 5)]  # items may repeat
    r = (await client.post("/recommend", json={"history": long, "max_reasoning_tokens": 2})).json()
    assert r["read_items"] == [e["item_id"] for e in long][-window:] and window < len(long)
    # the tiny random model never writes its stop token: two tokens are the budget's
    assert r["reasoning_tokens"] == 2 and r["reasoning_cut"] is True
    for off in ({"reasoning": False}, {"max_reasoning_tokens": 0}):  # no reasoning: null, not ""
        r = (await client.post("/recommend", json={"history": long, **off})).json()
        assert r["reasoning"] is None and r["reasoning_cut"] is False and r["cache"] == "off"


@pytest.mark.asyncio
async def test_a_body_sent_without_a_json_content_type_says_so(client):
    r = await client.post(
        "/recommend",
        content=b'{"history": [{"item_id": "i1"}]}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 422
    assert r.json()["error"]["message"] == (
        "body: send it as JSON, with content-type: application/json "
        "(this one: application/x-www-form-urlencoded)"
    )
    r = await client.post("/recommend", content=b'{"k": 1}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "give `history` or `user_id`" in r.text  # JSON: the real reason
    # the other fields' errors stand beside it
    r = await client.post("/users/%FF/events", content=b"{}", headers={"content-type": "text/plain"})
    assert [f["field"] for f in r.json()["error"]["fields"]] == ["user_id", "body"], r.text


@pytest.mark.asyncio
async def test_every_response_carries_a_request_id_a_client_may_choose(client):
    mine = await client.get("/healthz", headers={"x-request-id": "lb-7f3a:9"})
    assert mine.headers["x-request-id"] == "lb-7f3a:9"
    made = [(await client.get("/healthz")).headers["x-request-id"] for _ in range(2)]
    assert made[0] != made[1] and all(len(m) == 32 for m in made)
    odd = await client.get("/nowhere", headers={"x-request-id": "has space"})
    assert odd.status_code == 404 and len(odd.headers["x-request-id"]) == 32  # not echoed: made


PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


@pytest.mark.asyncio
async def test_every_response_says_nosniff_and_no_referrer_and_the_page_cannot_be_framed(ckpt):
    """Before, responses carried none of these: the page could be framed by any site (its
    buttons post to a user's history) and nothing stopped a browser sniffing a body's type."""
    app = app_for(ckpt, max_body_bytes=1024)
    async with serve(app) as client:
        calls = [
            client.get("/"),
            client.get("/static/app.js"),
            client.get("/static/app.css"),
            client.get("/static/nothing.js"),  # 404
            client.get("/items", params={"q": "star"}),
            client.post("/recommend", json={"history": [{"item_id": "i1"}], "reasoning": False}),
            client.post("/recommend/stream", json={"history": [{"item_id": "i1"}], "reasoning": False}),
            client.post("/recommend", json={"k": 0}),  # 422
            client.post("/recommend", content=b"x" * 2048),  # 413, refused before the app
            client.put("/healthz"),  # 405
            client.get("/healthz"),
            client.get("/metrics"),
            client.get("/openapi.json"),
        ]
        responses = [await call for call in calls]
        for r in responses:
            where = f"{r.request.method} {r.request.url.path} {r.status_code}"
            assert r.headers["x-content-type-options"] == "nosniff", where
            assert r.headers["referrer-policy"] == "no-referrer", where
        assert [r.status_code for r in responses[3:4] + responses[7:10]] == [404, 422, 413, 405]
        for r in responses[:3]:  # the page and its files
            assert r.status_code == 200
            assert r.headers["content-security-policy"] == PAGE_CSP, r.request.url.path
            assert r.headers["x-frame-options"] == "DENY", r.request.url.path
        # a 500 is sent from outside the app's middleware: its handler sets them too
        app.state.r2ec.engine.prepare = lambda query: 1 / 0
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://r2ec.test") as raw:
            r = await raw.post("/recommend", json={"history": [{"item_id": "i1"}]})
        assert r.status_code == 500 and r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"


@pytest.mark.asyncio
async def test_an_unhandled_error_still_carries_the_request_id_in_its_header_and_log(app, client, caplog):
    """Starlette sends that 500 from outside every middleware of the app's own."""

    def broken(query):
        raise RuntimeError("a bug")

    app.state.r2ec.engine.prepare = broken
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://r2ec.test") as raw:
        with caplog.at_level(logging.ERROR):
            r = await raw.post(
                "/recommend", json={"history": [{"item_id": "i1"}]}, headers={"x-request-id": "abc-123"}
            )
    assert r.status_code == 500 and r.headers["x-request-id"] == "abc-123"
    assert "unhandled error on POST /recommend (request abc-123)" in caplog.text
    # the body names the request, not the exception: its text may name a server path
    assert r.json()["error"]["message"] == "internal error (request abc-123)"
    assert "RuntimeError" in caplog.text and "a bug" not in r.text


@pytest.mark.asyncio
async def test_a_reload_while_one_runs_says_when_to_retry(app, client):
    state = app.state.r2ec
    async with state._reload_lock:  # a reload is running
        r = await client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 409 and r.headers["retry-after"] == "10"
    assert r.json()["error"]["code"] == "reload_in_progress"


@pytest.mark.asyncio
async def test_probes_answer_head_and_refusal_counters_exist_before_any_refusal(client):
    for path in ("/healthz", "/readyz"):
        r = await client.head(path)
        assert r.status_code == 200 and r.content == b"", path
    text = (await client.get("/metrics")).text
    reasons = ("queue_full", "queue_timeout", "shutting_down", "body_too_large", "body_timeout")
    for reason in reasons:
        assert metric(text, "r2ec_rejected_total", reason=reason) == 0, reason


def test_the_error_codes_are_one_list_in_the_code_the_schema_and_the_readme():
    """Every code the handlers can send is documented once (schemas.ERROR_CODES), and the
    OpenAPI description and the README list exactly those."""
    import re
    from pathlib import Path

    from service import deps, errors, schemas

    sent = set(errors.CODES.values()) | set(re.findall(r'code="(\w+)"', Path(errors.__file__).read_text()))
    # an HTTPException that names its own code (service/deps.py AuthThrottled)
    sent |= set(re.findall(r'^    code = "(\w+)"', Path(deps.__file__).read_text(), flags=re.M))
    sent -= {"client_disconnected"}  # 499: the client is gone and never reads it
    assert sent == set(schemas.ERROR_CODES)
    assert schemas.ErrorBody.model_fields["code"].description == ", ".join(schemas.ERROR_CODES)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    listed = re.search(r"`code` is one of (.*?); `/docs`", readme, re.S).group(1)
    assert re.findall(r"`(\w+)`", re.sub(r"\(.*?\)", "", listed, flags=re.S)) == list(schemas.ERROR_CODES)
