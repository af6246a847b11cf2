"""R2EC_MAX_BODY_BYTES (issue 13 row E): a body over the limit is refused with 413 before the
app reads it, whether its length is declared or it comes chunked; below the limit nothing changes."""

from __future__ import annotations

import pytest

from tests.service.conftest import app_for, serve
from tests.service.test_app import H1, metric
from tests.service.test_errors import the_error

pytestmark = pytest.mark.asyncio

LIMIT = 64 * 1024
CHUNK = 1024 * 1024


class Body:
    """A 100 MB JSON body made lazily, one MB at a time; counts the chunks the server pulled."""

    def __init__(self, total: int = 100 * CHUNK) -> None:
        self.total = total
        self.pulled = 0

    def __aiter__(self):
        return self._chunks()

    async def _chunks(self):
        head = b'{"history": [{"item_id": "i1"}], "k": 3, "pad": "'
        for piece in (head, *[b"x" * CHUNK] * (self.total // CHUNK)):
            self.pulled += 1
            yield piece


async def test_a_100_mb_body_is_refused_before_it_is_read(ckpt):
    app = app_for(ckpt, max_body_bytes=LIMIT)
    async with serve(app) as client:
        # declared length: refused before a byte is read
        body = Body()
        r = await client.post(
            "/recommend",
            content=body,
            headers={"content-type": "application/json", "content-length": str(100 * CHUNK + 48)},
        )
        error = the_error(r, 413)
        assert error["code"] == "body_too_large" and str(LIMIT) in error["message"]
        assert r.headers["connection"] == "close" and len(r.content) < 500
        assert body.pulled == 0
        # chunked (no length): read only until the limit is passed
        body = Body()
        r = await client.post("/users/u1/events", content=body, headers={"content-type": "application/json"})
        the_error(r, 413)
        assert body.pulled <= 2  # the head and the first MB, not 100 MB
        # under the limit, chunked or not, the body arrives whole
        small = b'{"history": [{"item_id": "i1"}, {"item_id": "i2"}], "k": 3, "reasoning": false}'

        async def chunked():
            for i in range(0, len(small), 7):
                yield small[i : i + 7]

        for content in (small, chunked()):
            r = await client.post("/recommend", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text
            assert len(r.json()["items"]) == 3
        r = await client.post("/recommend", json={"history": H1, "pad": "x" * (LIMIT - 200)})
        assert the_error(r, 422, "pad")["code"] == "invalid_request"  # parsed: under the limit
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_rejected_total", reason="body_too_large") == 2
        assert (await client.get("/healthz")).status_code == 200
