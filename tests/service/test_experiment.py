"""What an experiment reads from each replica (journey 40): every answer names its model (the
body's `model`, X-Model-Version, X-Model-Fingerprint, X-R2ec-Variant; F6), and the recommendation
metrics carry the version that answered and the replica's arm (F2), a reload's requests each
under its own model."""

from __future__ import annotations

import pytest

from tests.service.conftest import ADMIN, app_for, serve
from tests.service.test_admin import copy_as_new_version
from tests.service.test_app import H1, H2, metric
from tests.service.test_stream import STREAM, parse_sse

pytestmark = pytest.mark.asyncio

MODEL_KEYS = {"version", "checkpoint", "fingerprint", "variant"}


async def test_each_answer_names_its_model_in_the_body_and_the_headers(ckpt):
    app = app_for(ckpt, variant="candidate")
    async with serve(app) as client:
        engine = app.state.r2ec.engine
        r = await client.post("/recommend", json={"history": H1, "k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == {
            "version": engine.version,
            "checkpoint": "ckpt",  # r2ec_model_info's label: the path under the checkpoint root
            "fingerprint": engine.fingerprint,
            "variant": "candidate",
        }
        assert body["model_version"] == engine.version  # kept: clients read it
        assert r.headers["x-model-version"] == engine.version
        assert r.headers["x-model-fingerprint"] == engine.fingerprint
        assert r.headers["x-r2ec-variant"] == "candidate"

        s = await client.post(STREAM, json={"history": H2, "k": 3})
        assert s.status_code == 200
        assert s.headers["x-model-version"] == engine.version
        assert s.headers["x-model-fingerprint"] == engine.fingerprint
        assert s.headers["x-r2ec-variant"] == "candidate"
        (items,) = [data for name, data in parse_sse(s.text) if name == "items"]
        assert items["model"] == body["model"] and items["model_version"] == engine.version

        info = (await client.get("/metrics")).text
        assert metric(info, "r2ec_model_info", variant="candidate", fingerprint=engine.fingerprint) == 1

        # the error of a request the model's path refused carries none: it was not answered
        bad = await client.post("/recommend", json={"history": [{"item_id": "nope"}]})
        assert bad.status_code == 422 and "x-model-version" not in bad.headers


async def test_without_a_variant_the_answer_says_null_and_sends_no_variant_header(ckpt):
    async with serve(app_for(ckpt)) as client:
        r = await client.post("/recommend", json={"history": H1, "k": 3, "reasoning": False})
        assert r.json()["model"]["variant"] is None
        assert "x-r2ec-variant" not in r.headers and r.headers["x-model-fingerprint"]
        s = await client.post(STREAM, json={"history": H1, "k": 3, "reasoning": False})
        assert "x-r2ec-variant" not in s.headers
        (items,) = [data for name, data in parse_sse(s.text) if name == "items"]
        assert items["model"]["variant"] is None


async def test_the_openapi_document_describes_the_model_and_its_headers(ckpt):
    async with serve(app_for(ckpt)) as client:
        doc = (await client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    assert set(schemas["ModelOut"]["properties"]) == MODEL_KEYS
    assert set(schemas["ModelOut"]["required"]) == MODEL_KEYS
    assert "model" in schemas["RecommendResponse"]["required"]
    content = doc["paths"][STREAM]["post"]["responses"]["200"]["content"]["text/event-stream"]
    (items,) = [
        v["properties"]["data"]["contentSchema"]
        for v in content["itemSchema"]["oneOf"]
        if v["properties"]["event"]["const"] == "items"
    ]
    assert "model" in items["required"]
    assert items["properties"]["model"]["$ref"] == "#/components/schemas/ModelOut"
    for path in ("/recommend", STREAM):
        headers = doc["paths"][path]["post"]["responses"]["200"]["headers"]
        assert set(headers) == {"X-Model-Version", "X-Model-Fingerprint", "X-R2ec-Variant"}, path


async def test_metrics_credit_each_request_to_the_version_that_answered_it(ckpt, tmp_path):
    """A reload mid-window: before, every series lacked the version, and the only join
    (r2ec_model_info on instance) credited the old model's answers to the new one."""
    app = app_for(ckpt, variant="control")
    async with serve(app) as client:
        v1 = app.state.r2ec.engine.version
        for history in (H1, H2):
            assert (await client.post("/recommend", json={"history": history, "k": 3})).status_code == 200
        bad = await client.post("/recommend", json={"history": [{"item_id": "nope"}]})
        assert bad.status_code == 422
        v2 = copy_as_new_version(ckpt, tmp_path / "v2", "v2-test")
        r = await client.post("/admin/reload", json={"checkpoint": str(v2)}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert (await client.post("/recommend", json={"history": H2, "k": 3})).status_code == 200
        text = (await client.get("/metrics")).text
    one = {"version": v1, "variant": "control"}
    two = {"version": "v2-test", "variant": "control"}
    assert metric(text, "r2ec_recommend_seconds_count", **one) == 2
    assert metric(text, "r2ec_recommend_seconds_count", **two) == 1
    assert metric(text, "r2ec_reasoning_cache_total", result="miss", **one) == 2
    assert metric(text, "r2ec_reasoning_cache_total", result="miss", **two) == 1
    assert metric(text, "r2ec_reasoning_tokens_count", **one) == 2
    assert metric(text, "r2ec_generate_seconds_count", **one) == 2
    assert metric(text, "r2ec_generate_seconds_count", **two) == 1
    assert metric(text, "r2ec_reasoning_cut_total", **two) is not None
    assert metric(text, "r2ec_recommend_errors_total", code="unknown_items", **one) == 1
    assert metric(text, "r2ec_recommend_errors_total", code="unknown_items", **two) is None
    assert metric(text, "r2ec_model_info", version="v2-test", checkpoint="v2", variant="control") == 1
