"""What the service does on a Redis an older or a newer r2ec used (journey 39): the format marker
r2ec:schema refuses a newer one at start, and an erasure's receipt names the reasonings an older
release cached while they may remain."""

from __future__ import annotations

import json
import time

import pytest
import redis

from service.store import StoreFormatError
from tests.service.conftest import ADMIN, app_for, serve

pytestmark = [pytest.mark.asyncio, pytest.mark.redis]  # redis_url skips (fails under CI) without one

OLDER = "cached by an r2ec before 0.2.0, which used this Redis, may be indexed by no user"


async def test_a_redis_a_newer_r2ec_marked_is_refused_at_start_in_one_line(ckpt, redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.set("r2ec:schema", json.dumps({"format": 2, "written_by": "0.9.0", "since": 1, "held_data": True}))
    app = app_for(ckpt, redis_url=redis_url)
    with pytest.raises(StoreFormatError):
        async with serve(app):
            pass
    assert "holds r2ec data in format 2" in app.state.startup_error
    assert "run r2ec 0.9.0 or newer" in app.state.startup_error


async def test_the_receipt_names_what_an_older_release_cached_while_it_may_remain(ckpt, redis_url):
    """A release before 0.2.0 indexed no cached reasoning by user (journey 39, F2: bob's stayed
    after his erasure, and the receipt did not say so)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.set("r2ec:reasoning:" + "b1cf" * 16, json.dumps({"text": "Likes Drama."}), ex=3600)
    app = app_for(ckpt, redis_url=redis_url, cache_ttl_s=3600)
    async with serve(app) as c:
        text = " ".join((await c.delete("/users/bob", headers=ADMIN)).json()["remains"])
        app.state.r2ec.store.format = None  # as where Redis was down at the start: not known
        unread = " ".join((await c.delete("/users/bob", headers=ADMIN)).json()["remains"])
    assert OLDER in unread and "by 3600 s after this service version first started on this Redis" in unread
    marker = json.loads(client.get("r2ec:schema"))
    assert marker["held_data"] and abs(marker["since"] - time.time()) < 600
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(marker["since"] + 3600))
    assert OLDER in text and f"by {until} at this service's 3600 s" in text
    # R2EC_CACHE_TTL_S after the first start of 0.2.0 on it, none is left: not said
    client.set("r2ec:schema", json.dumps({**marker, "since": int(time.time()) - 3601}))
    async with serve(app_for(ckpt, redis_url=redis_url, cache_ttl_s=3600)) as c:
        assert OLDER not in " ".join((await c.delete("/users/bob", headers=ADMIN)).json()["remains"])
    # a Redis no older release used
    client.flushall()
    async with serve(app_for(ckpt, redis_url=redis_url, cache_ttl_s=3600)) as c:
        assert OLDER not in " ".join((await c.delete("/users/bob", headers=ADMIN)).json()["remains"])
    assert json.loads(client.get("r2ec:schema"))["held_data"] is False
