"""R2EC_MAX_BODY_BYTES (issue 13 row E): a body over the limit is refused with 413 before the
app reads it, whether its length is declared or it comes chunked; below the limit nothing changes.
R2EC_BODY_TIMEOUT_S: a body that stops arriving gets 408; a client that hangs up during its upload
is a 499 (over a real socket)."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from service.app import create_app
from tests.service.conftest import app_for, serve, settings_for, uvicorn_serving, wait_for
from tests.service.test_app import H1, metric, requests
from tests.service.test_errors import the_error

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


@pytest.mark.asyncio
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


def _post_head(length: int) -> bytes:
    return (
        "POST /recommend HTTP/1.1\r\nHost: r2ec.test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_a_body_that_stops_arriving_gets_408_and_a_closed_connection(ckpt):
    """R2EC_BODY_TIMEOUT_S over a real socket: headers and part of the body, then nothing. The
    server answered nothing and held the socket until the client gave up (SRE report, 170 of
    them for 90 s); now it answers 408 body_timeout and closes, a declared length or chunked."""
    app = create_app(settings_for(ckpt, body_timeout_s=0.5))
    with uvicorn_serving(app) as base:
        host, port = base.removeprefix("http://").split(":")
        for head, part in [
            (_post_head(200), b'{"history": [{"item_id": "i1"}'),
            (
                b"POST /recommend HTTP/1.1\r\nHost: r2ec.test\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n",
                b'5\r\n{"his\r\n',
            ),
        ]:
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                sock.sendall(head + part)
                reply = _read_all(sock)  # returns: the server closed the connection
            status, _, rest = reply.partition(b"\r\n")
            assert status.startswith(b"HTTP/1.1 408"), reply
            error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
            assert error["code"] == "body_timeout" and "R2EC_BODY_TIMEOUT_S" in error["message"]
        text = httpx.get(f"{base}/metrics").text
        assert metric(text, "r2ec_rejected_total", reason="body_timeout") == 2
        assert requests(text, "/recommend", "408") == 2
        # a body that arrives in time, slowly, is answered
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            body = b'{"history": [{"item_id": "i1"}], "k": 2, "reasoning": false}'
            sock.sendall(_post_head(len(body)) + body[:10])
            time.sleep(0.2)
            sock.sendall(body[10:])
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_client_that_hangs_up_during_its_upload_is_a_499_not_a_400(ckpt):
    """It was logged and counted as `400 invalid_body` (FastAPI's "error parsing the body"), a
    client error nobody sent; a disconnect is 499 client_disconnected, as after the body."""
    app = create_app(settings_for(ckpt))
    with uvicorn_serving(app) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(_post_head(200) + b'{"history": [')
            time.sleep(0.2)  # the body read has begun
        wait_for(
            lambda: requests(httpx.get(f"{base}/metrics").text, "/recommend", "499") == 1,
            "the server to count the disconnect",
        )
        assert requests(httpx.get(f"{base}/metrics").text, "/recommend", "400") is None
