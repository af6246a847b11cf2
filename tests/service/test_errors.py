"""The one error body: every 4xx/5xx is {"error": {...}}, valid JSON of bounded size that names
the field, whatever the client sent (issue 13 rows A, B, E and I)."""

from __future__ import annotations

import json

import pytest

from tests.service.conftest import ADMIN
from tests.service.test_app import H1

pytestmark = pytest.mark.asyncio


def strict_json(raw: bytes) -> dict:
    """Parse as RFC 8259 JSON: NaN / Infinity are refused, and the bytes must be UTF-8."""

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(raw.decode("utf-8"), parse_constant=refuse)


def the_error(r, status: int, field: str | None = None) -> dict:
    """The response's error body, checked for shape; `field` must be named in message and fields."""
    assert r.status_code == status, r.text
    body = strict_json(r.content)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["status"] == status and error["code"] and error["message"]
    if field is not None:
        assert error["message"].startswith(f"{field}: "), error["message"]
        assert field in [f["field"] for f in error["fields"]], error["fields"]
    return error


async def post_raw(client, path: str, raw: str, headers: dict | None = None):
    """A body as JSON text the way a client may write it: NaN, 1e999 and \\ud800 escapes included."""
    headers = {"content-type": "application/json", **(headers or {})}
    return await client.post(path, content=raw.encode("utf-8"), headers=headers)


# Row A: NaN / Infinity / 1e999 used to make the 422 handler copy a non-JSON float into its body
# (500 "Out of range float values are not JSON compliant").
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999"]
NUMBER_FIELDS = [
    ("/recommend", '{{"history": [{{"item_id": "i1", "rating": {v}}}]}}', "history.0.rating"),
    ("/recommend", '{{"history": [{{"item_id": "i1"}}], "k": {v}}}', "k"),
    (
        "/recommend",
        '{{"history": [{{"item_id": "i1"}}], "max_reasoning_tokens": {v}}}',
        "max_reasoning_tokens",
    ),
    ("/recommend", '{{"history": [{{"item_id": "i1", "timestamp": {v}}}]}}', "history.0.timestamp"),
    ("/users/u1/events", '{{"events": [{{"item_id": "i1", "rating": {v}}}]}}', "events.0.rating"),
    ("/users/u1/events", '{{"events": [{{"item_id": "i1", "timestamp": {v}}}]}}', "events.0.timestamp"),
    ("/users/u1/events", '{{"events": [{{"item_id": {v}}}]}}', "events.0.item_id"),
]


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize(("path", "template", "field"), NUMBER_FIELDS, ids=[f for *_, f in NUMBER_FIELDS])
async def test_non_finite_numbers_get_a_422_naming_the_field(client, path, template, field, value):
    the_error(await post_raw(client, path, template.format(v=value)), 422, field)
    assert (await client.get("/healthz")).status_code == 200  # and the service goes on


# Row B: a lone UTF-16 surrogate used to reach the response encoder (500 UnicodeEncodeError).
SURROGATE = r"\ud800"
SURROGATE_BODIES = [
    ("/recommend", '{"user_id": "u\\ud800"}', "user_id"),
    ("/recommend", '{"history": [{"item_id": "\\ud800"}]}', "history.0.item_id"),
    ("/users/u1/events", '{"events": [{"item_id": "i1", "event_id": "e\\udfff"}]}', "events.0.event_id"),
    ("/users/u1/events", '{"events": [{"item_id": "\\ud800x"}]}', "events.0.item_id"),
    ("/recommend", '{"history": [{"item_id": "i1"}], "\\ud800": 1}', "body"),  # an unknown key
]


@pytest.mark.parametrize(("path", "raw", "field"), SURROGATE_BODIES, ids=[f for *_, f in SURROGATE_BODIES])
async def test_a_lone_surrogate_gets_a_422_naming_the_field(client, path, raw, field):
    error = the_error(await post_raw(client, path, raw), 422, field)
    # pydantic's own check, or ours (service/schemas.py)
    assert "unicode string" in error["message"] or "lone UTF-16 surrogate" in error["message"]


async def test_a_lone_surrogate_in_an_item_text_or_a_path_gets_a_422(client):
    r = await client.put(
        "/items/new",
        content=b'{"title": "Am\\udce9lie"}',
        headers={"content-type": "application/json", **ADMIN},
    )
    message = the_error(r, 422, "title")["message"]
    assert "unicode string" in message or "lone UTF-16 surrogate" in message
    assert (await client.get("/items/new")).status_code == 404  # nothing stored
    # %ED%A0%80 is a surrogate's UTF-8 form, which is not UTF-8: decoded as U+FFFD, never a 5xx
    r = await client.get("/users/%ED%A0%80/history")
    assert r.status_code < 500
    strict_json(r.content)


# Row E (the echo): a 422 never copies the input back, however large or strange.
async def test_error_bodies_stay_small_whatever_the_input(client):
    huge = "x" * 500_000
    r = await client.post("/recommend", json={"history": H1, "k": huge})
    error = the_error(r, 422, "k")
    assert len(r.content) < 2_000 and "xxxxxxxxxx" not in r.text
    r = await client.post("/recommend", json={"history": H1, huge: 1})  # an unknown key, 500 KB long
    assert len(r.content) < 4_000 and the_error(r, 422)["fields"][0]["field"].endswith("…")
    r = await client.post("/users/u1/events", json={"events": [{"item_id": "i1", "rating": 99}] * 1000})
    error = the_error(r, 422, "events.0.rating")
    assert error["message"].endswith("(and 995 more)") and len(error["fields"]) == 20
    assert len(r.content) < 6_000
    r = await post_raw(client, "/recommend", '{"history": [{"item_id": "i1"}], "k": ' + "[" * 100_000)
    assert r.status_code in (400, 422) and len(r.content) < 2_000  # too deep or broken: a 4xx
    strict_json(r.content)


async def test_unknown_routes_methods_and_admin_refusals_use_the_same_shape(client):
    the_error(await client.get("/no/such/route"), 404)
    r = await client.delete("/recommend")
    assert the_error(r, 405)["code"] == "method_not_allowed" and r.headers["allow"] == "POST"
    r = await client.post("/items/i1")  # three routes share the path: all their methods
    assert the_error(r, 405)["code"] == "method_not_allowed" and r.headers["allow"] == "DELETE, GET, PUT"
    assert the_error(await client.delete("/items/i1"), 401)["code"] == "unauthorized"
    r = await client.post(
        "/recommend", content=b"\xff\xfe not utf-8", headers={"content-type": "application/json"}
    )
    assert r.status_code in (400, 422)
    strict_json(r.content)


# Row I: every status a route returns is in the OpenAPI document, with the error body's schema.
async def test_openapi_documents_every_status_with_the_error_schema(client):
    spec = (await client.get("/openapi.json")).json()
    body = {"400", "408", "413"}  # a body that does not decode, stops arriving, is too large
    # 401/403: where a key is asked for (R2EC_CLIENT_KEY on the user routes); 429 with them, an
    # address that sent too many wrong keys (service/limits.py AuthThrottle), and on events a
    # user's event rate (service/store.py EventRate)
    key = {"401", "403", "429"}
    expected = {
        # 504: the client's X-Request-Timeout passed first (service/deadline.py)
        ("post", "/recommend"): {"200", "422", "500", "503", "504"} | body | key,
        ("post", "/users/{user_id}/events"): {"200", "422", "500", "503"} | body | key,
        ("get", "/users/{user_id}/history"): {"200", "422", "500", "503"} | key,
        ("delete", "/users/{user_id}"): {"200", "422", "500", "503"} | key,
        ("get", "/items/{item_id}"): {"200", "404", "422", "500", "503"},
        # 507: an edit the checkpoint volume refused to save
        ("put", "/items/{item_id}"): {"200", "201", "422", "500", "503", "507"} | body | key,
        ("delete", "/items/{item_id}"): {"200", "404", "422", "500", "503", "507"} | key,
        ("post", "/items:batch"): {"200", "422", "500", "503", "507"} | body | key,
        ("post", "/admin/reload"): {"200", "409", "422", "500", "503"} | body | key,
        ("get", "/healthz"): {"200", "500"},
        ("get", "/readyz"): {"200", "500", "503"},
        ("get", "/metrics"): {"200", "500", "503"},
    }
    for (method, path), statuses in expected.items():
        responses = spec["paths"][path][method]["responses"]
        assert set(responses) == statuses, (method, path, sorted(responses))
        for status in statuses - {"200", "201"} - ({"503"} if path == "/readyz" else set()):
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's other 422 shape
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    # a path id is text with the body's rules (a body id may also be a JSON integer)
    user_id = spec["paths"]["/users/{user_id}/events"]["post"]["parameters"][0]["schema"]
    item_id = spec["components"]["schemas"]["Interaction"]["properties"]["item_id"]["anyOf"][0]
    assert user_id["type"] == item_id["type"] == "string" and "anyOf" not in user_id
    assert user_id["pattern"] == item_id["pattern"] and user_id["maxLength"] == item_id["maxLength"] == 256
