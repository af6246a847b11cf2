"""Scheduled retraining: samples <-> interactions, the event cursor, the publish gate, pruning.

The end-to-end tests write events with the service's own RedisStore into a real redis-server
and run `r2ec retrain` with the tiny model for 2 RecPO steps.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from model.checkpoint import create_base_checkpoint, read_meta, resolve_checkpoint
from model.data import SPLITS, DataError, load_prepared, prepare_atomic
from model.recpo import RecPOConfig
from model.retrain import (
    RetrainConfig,
    RetrainError,
    StreamEvent,
    events_frame,
    prune_versions,
    read_state,
    rebuild_dataset,
    retrain,
)
from tests.conftest import FIXTURES
from tests.service.conftest import RedisServer, free_port

TINY_TRAIN = {
    "dtype": "float32",
    "num_generations": 2,
    "per_device_batch_size": 2,
    "max_completion_length": 4,
    "max_steps": 2,
    "warmup_steps": 1,
    "eval_every": 1000,
    "save_every": 1000,
    "refresh_every": 1000,
    "eval_limit": None,
}


def _same_splits(a, b) -> None:
    for name in SPLITS:
        pd.testing.assert_frame_equal(a.split(name), b.split(name), check_dtype=False)


# -- samples <-> interactions (no model) -------------------------------------------------------
@pytest.mark.parametrize("protocol", ["loo", "temporal"])
def test_rebuild_without_events_reproduces_the_seed_samples(tmp_path, protocol):
    # tiny.inter has a timestamp tie (u2: i6 and i7 at 250) and a NaN rating: order must survive.
    seed = load_prepared(
        prepare_atomic(
            FIXTURES / "data" / "tiny.inter",
            FIXTURES / "data" / "tiny.item",
            tmp_path,
            "tiny",
            protocol=protocol,
        )
    )
    rebuilt, dropped = rebuild_dataset(seed, events_frame([]), tmp_path / "out")
    assert dropped == 0 and rebuilt.path != seed.path
    _same_splits(rebuilt, seed)
    assert list(rebuilt.items["item_id"]) == list(seed.items["item_id"])


def test_events_become_new_targets_and_unknown_items_are_dropped(tmp_path, tiny_dataset):
    events = events_frame(
        [
            StreamEvent("1000-0", "u1", "i6", 4.0, 900),  # u1's newest: the new loo test target
            StreamEvent("2000-0", "u9", "i1", None, None),  # a new user; time from the stream id
            StreamEvent("3000-0", "u9", "i2", 5.0, 3),
            StreamEvent("4000-0", "u9", "nope", 5.0, 4),  # not in the catalog
        ]
    )
    ds, dropped = rebuild_dataset(tiny_dataset, events, tmp_path)
    assert dropped == 1
    test = ds.split("test").set_index("user_id")
    valid = ds.split("valid").set_index("user_id")
    assert test.loc["u1", "target_item_id"] == "i6" and test.loc["u1", "history_item_ids"][-1] == "i5"
    assert valid.loc["u1", "target_item_id"] == "i5"  # the old test target moved to valid
    # u9: "i1" at t=2 (2000 ms) then "i2" at t=3 -> one sample, i2 after [i1]
    u9 = ds.split("train").query("user_id == 'u9'")
    assert list(u9["target_item_id"]) == ["i2"] and list(u9.iloc[0]["history_item_ids"]) == ["i1"]
    assert list(u9.iloc[0]["history_timestamps"]) == [2]
    assert len(ds.split("train")) == len(tiny_dataset.split("train")) + 2  # u1's old valid + u9


def test_prune_keeps_the_newest_and_always_the_current(tmp_path):
    for n, name in enumerate(["a", "b", "c", "d"]):
        (tmp_path / name).mkdir()
        meta = {"format": "r2ec-checkpoint", "format_version": 1, "version": name}
        (tmp_path / name / "r2ec.json").write_text(json.dumps({**meta, "created_at": f"2025-01-0{n + 1}"}))
    (tmp_path / "retrain").mkdir()  # the job's own directory is not a version
    (tmp_path / "CURRENT").write_text("a\n")
    assert prune_versions(tmp_path, keep=2) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT", "a", "c", "d", "retrain"]


# -- end to end with the tiny model ------------------------------------------------------------
@pytest.fixture(scope="module")
def base_root(tiny_dataset, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("versions")
    create_base_checkpoint(root / "v0", "tiny", tiny_dataset.items, dtype="float32", progress=False)
    (root / "CURRENT").write_text("v0\n")
    return root


@pytest.fixture
def root(base_root, tmp_path) -> Path:
    dest = tmp_path / "versions"
    shutil.copytree(base_root, dest)
    return dest


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "retrain.yaml"
    path.write_text(yaml.safe_dump(TINY_TRAIN))
    return path


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()  # a throwaway redis-server on a free loopback port
    yield server
    server.stop()


def _append(url: str, user_id: str, events: list[tuple[str, float | None, int | None]]) -> None:
    from service.store import Event, RedisStore

    async def go() -> None:
        store = RedisStore(url)
        try:
            await store.append_events(user_id, [Event(*e) for e in events])
        finally:
            await store.close()

    asyncio.run(go())


def _last_stream_id(url: str) -> str:
    import redis

    from service.store import EVENTS_STREAM

    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        ((entry_id, _),) = client.xrevrange(EVENTS_STREAM, count=1)
    finally:
        client.close()
    return entry_id


def _cli(*args: str) -> tuple[int, str, dict | None]:
    from service.cli import app

    result = CliRunner().invoke(app, ["retrain", *args])
    try:
        payload = json.loads(result.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        payload = None
    return result.exit_code, result.output, payload


@pytest.mark.redis  # RedisServer() skips (or fails under CI) without a redis-server binary
def test_retrain_publishes_reads_only_new_events_and_keeps_current_when_worse(
    redis_server, root, config_file, tiny_dataset
):
    redis_server.flush()
    url = redis_server.url
    common = ["--data", str(tiny_dataset.path), "--root", str(root), "--redis-url", url]
    common += ["--config", str(config_file), "--json"]
    _append(url, "u1", [("i6", 4.0, 900)])
    _append(url, "u9", [("i1", None, 1000), ("i2", 5.0, 1100)])

    # 1. three new events, a tolerance no candidate can miss -> published, CURRENT flips
    code, out, first = _cli(*common, "--tolerance", "1")
    assert code == 0, out
    assert first["status"] == "published" and first["new_events"] == 3 and first["stream"]
    new = first["published_version"]
    assert (root / "CURRENT").read_text().strip() == new
    assert resolve_checkpoint(root) == root / new
    meta = read_meta(root / new)
    assert meta["weights"] == "lora" and meta["train"]["step"] == 2
    assert json.loads((root / new / "retrain.json").read_text())["current_version"] == "v0"
    assert read_state(root / "retrain")["last_event_id"] == first["last_event_id"] == _last_stream_id(url)
    assert first["samples"]["train"] == len(tiny_dataset.split("train")) + 2
    assert not (root / "retrain" / "run").exists()

    # 2. nothing new -> skipped without training
    code, out, idle = _cli(*common)
    assert code == 0, out
    assert idle["status"] == "skipped" and idle["new_events"] == 0 and idle["candidate_version"] is None

    # 3. two more events; a gate no candidate can pass (must beat current by 1) -> CURRENT stays
    _append(url, "u2", [("i9", 3.0, 1200), ("i1", 4.0, 1300)])
    code, out, second = _cli(*common, "--tolerance", "-1")
    assert code == 0, out
    assert second["new_events"] == 2 and second["events_total"] == 5
    assert second["status"] == "rejected" and second["current_version"] == new
    assert second["candidate_metric"] is not None and second["candidate_version"] != new
    assert (root / "CURRENT").read_text().strip() == new
    assert sorted(p.name for p in root.iterdir()) == sorted(["CURRENT", "retrain", "v0", new])
    assert read_state(root / "retrain")["last_event_id"] == second["last_event_id"] == _last_stream_id(url)


def test_retrain_without_a_stream_trains_on_the_dataset_and_prunes(root, tiny_dataset):
    cfg = RetrainConfig(root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), tolerance=1.0, keep=1)
    result = retrain(cfg, read_events=None)
    assert result.status == "published" and not result.stream and result.new_events == 0
    assert result.pruned == ["v0"]  # keep=1: only the new current survives
    assert sorted(p.name for p in root.iterdir()) == sorted(["CURRENT", "retrain", result.published_version])
    _same_splits(load_prepared(root / "retrain" / "data" / "tiny" / "loo"), tiny_dataset)


def test_clear_errors(tmp_path, root, tiny_dataset):
    cfg = RetrainConfig(tmp_path, tiny_dataset.path)
    with pytest.raises(RetrainError, match="no CURRENT file.*checkpoint init"):
        retrain(cfg)
    with pytest.raises(DataError, match="does not exist"):
        retrain(RetrainConfig(root, tmp_path / "missing"))
    (root / "CURRENT").write_text("gone\n")
    with pytest.raises(RetrainError, match="'gone', which is not a checkpoint"):
        retrain(RetrainConfig(root, tiny_dataset.path))
    (root / "CURRENT").write_text("v0\n")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    code, out, _ = _cli("--data", str(tiny_dataset.path), "--root", str(root), "--redis-url", dead)
    assert code == 2 and "--redis-url ''" in out
    assert (root / "CURRENT").read_text() == "v0\n" and not (root / "retrain" / "events.parquet").exists()
