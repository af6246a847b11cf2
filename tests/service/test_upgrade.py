"""What the service does on a Redis an older or a newer r2ec used (journey 39): the format marker
r2ec:schema refuses a newer one at start."""

from __future__ import annotations

import json

import pytest
import redis

from service.store import StoreFormatError
from tests.service.conftest import app_for, serve

pytestmark = [pytest.mark.asyncio, pytest.mark.redis]  # redis_url skips (fails under CI) without one


async def test_a_redis_a_newer_r2ec_marked_is_refused_at_start_in_one_line(ckpt, redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.set("r2ec:schema", json.dumps({"format": 2, "written_by": "0.9.0", "since": 1, "held_data": True}))
    app = app_for(ckpt, redis_url=redis_url)
    with pytest.raises(StoreFormatError):
        async with serve(app):
            pass
    assert "holds r2ec data in format 2" in app.state.startup_error
    assert "run r2ec 0.9.0 or newer" in app.state.startup_error
