"""`r2ec retrain` end to end: events written with the service's own RedisStore into a real
redis-server, the tiny model trained for 2 RecPO steps, the publish gate, the cursor."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli import app
from model.checkpoint import read_meta, resolve_checkpoint
from model.retrain import read_state
from tests.model.test_retrain import TEXTS_TRAIN, TINY_TRAIN, _damaged, _trains_into
from tests.service.conftest import RedisServer, free_port


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


def _erase(url: str, user_id: str):
    from service.store import RedisStore

    async def go():
        store = RedisStore(url)
        try:
            return await store.erase_user(user_id)
        finally:
            await store.close()

    return asyncio.run(go())


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
    result = CliRunner().invoke(app, ["retrain", *args])
    try:
        payload = json.loads(result.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        payload = None
    return result.exit_code, result.output, payload


@pytest.mark.redis  # RedisServer() skips (or fails under CI) without a redis-server binary
def test_retrain_publishes_reads_only_new_events_and_keeps_current_when_worse(
    redis_server, versions_root, config_file, tiny_dataset
):
    root = versions_root
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
    assert second["paired_samples"] == second["samples"]["valid"]  # the rebuilt valid split, paired
    assert second["reason"].startswith(
        f"ndcg@10 {second['candidate_metric']:.4f} < current {second['current_metric']:.4f} + gain 1 "
        f"(paired on {second['paired_samples']} valid samples: {second['paired_diff']:+.4f} ± "
    )
    assert (root / "CURRENT").read_text().strip() == new
    assert sorted(p.name for p in root.iterdir()) == sorted(["CURRENT", "CURRENT.lock", "retrain", "v0", new])
    assert read_state(root / "retrain")["last_event_id"] == second["last_event_id"] == _last_stream_id(url)


@pytest.mark.redis
def test_retrain_drops_what_it_consumed_of_an_erased_user_and_keeps_what_the_id_posts_later(
    redis_server, versions_root, config_file, tiny_dataset
):
    """Journey 38's reproduction: alice's events were consumed and trained on, then she was
    erased (DELETE /users/{id}); the next run trained on her events all the same. Now it drops
    them from the log and the rebuilt samples, keeps what the id posts after the erasure, and
    leaves an erased seed user (u2 of the tiny seed) out of the samples whole."""
    import pandas as pd

    from model.data import SPLITS, load_prepared

    root, url = versions_root, redis_server.url
    redis_server.flush()
    common = ["--data", str(tiny_dataset.path), "--root", str(root), "--redis-url", url]
    common += ["--config", str(config_file), "--json", "--tolerance", "1"]
    _append(url, "alice", [("i2", 5.0, 900), ("i6", 4.0, 950), ("i1", 2.0, 1000)])
    _append(url, "u9", [("i1", None, 1000), ("i2", 5.0, 1100)])
    code, out, first = _cli(*common)
    assert code == 0 and first["status"] == "published" and first["erased_users"] == 0, out
    log = pd.read_parquet(root / "retrain" / "events.parquet")
    assert (log["user_id"] == "alice").sum() == 3

    assert _erase(url, "alice").stream_entries == 3
    assert _erase(url, "u2").stream_entries == 0  # a seed user: nothing in Redis
    _append(url, "alice", [("i3", 3.0, 2000)])  # the id used again, after the erasure: kept
    _append(url, "u9", [("i4", 4.0, 1200)])
    code, out, second = _cli(*common)
    assert code == 0 and second["status"] == "published", out
    assert second["new_events"] == 2 and second["events_total"] == 4
    assert (second["erased_users"], second["purged_events"], second["purged_users"]) == (2, 3, 1)
    assert second["erased_seed_users"] == 1
    log = pd.read_parquet(root / "retrain" / "events.parquet")
    assert sorted(log["user_id"]) == ["alice", "u9", "u9", "u9"]
    assert list(log.loc[log["user_id"] == "alice", "item_id"]) == ["i3"]
    state = read_state(root / "retrain")
    assert state["purged_events"] == 3 and state["last_run"]["purged_users"] == 1
    assert "alice" not in (root / "retrain" / "state.json").read_text()
    rebuilt = load_prepared(root / "retrain" / "data" / "tiny" / "loo")
    users = {u for name in SPLITS for u in rebuilt.split(name)["user_id"]}
    assert "u2" not in users and "alice" not in users  # her one later event makes no sample
    code, out, _ = _cli(*common[:-3])  # the text report says what the ledger did
    assert code == 0 and "erasures 2 users in the ledger: 0 events of 0 dropped from the log, " in out


def test_redis_down_is_a_clear_error_and_changes_nothing(versions_root, tiny_dataset):
    root = versions_root
    dead = f"redis://127.0.0.1:{free_port()}/0"
    args = ("--data", str(tiny_dataset.path), "--root", str(root), "--redis-url", dead)
    code, out, _ = _cli(*args)
    assert code == 2 and "--redis-url ''" in out
    assert (root / "CURRENT").read_text() == "v0\n" and not (root / "retrain" / "events.parquet").exists()
    # under --json a failed run is one object too, for whatever reads the run's result
    code, _, payload = _cli(
        "--data", str(tiny_dataset.path), "--root", str(root), "--redis-url", dead, "--json"
    )
    assert code == 2 and payload["status"] == "failed" and "--redis-url ''" in payload["error"]


def test_a_failed_scheduled_run_is_retried_with_backoff_not_at_the_next_tick():
    """Issue 13: `--every-minutes 360` used to wait 6 hours after a failure (Redis restarting)."""
    import typer

    from cli.retrain import next_delay_s, run_forever

    every, retry = 360 * 60.0, 5 * 60.0
    assert [next_delay_s(n, every, retry) for n in range(9)] == [
        every, 300, 600, 1200, 2400, 4800, 9600, 19200, every,  # capped at the schedule's own period
    ]  # fmt: skip

    outcomes = iter(["exit", "crash", "exit", "ok", "exit", "ok"])
    slept: list[float] = []

    def run_once() -> None:
        match next(outcomes):
            case "exit":
                raise typer.Exit(2)  # what `fail()` raises: Redis down, a bad dataset
            case "crash":
                raise OSError("disk full")

    class Done(Exception):
        pass

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 6:
            raise Done

    with pytest.raises(Done):
        run_forever(run_once, every, retry, sleep=sleep)
    assert slept == [300, 600, 1200, every, 300, every]


def test_the_report_shows_the_paired_difference_the_gate_used(capsys):
    from cli.retrain import _report
    from model.retrain import RetrainResult

    result = RetrainResult(
        status="rejected",
        reason="ndcg@10 0.0600 < current 0.0700 - tolerance 0 - 2 s.e. (...)",
        current_version="v1",
        candidate_version="v2",
        current_metric=0.07,
        candidate_metric=0.06,
        gate_z=2.0,
        paired_diff=-0.01,
        paired_stderr=0.004,
        paired_samples=200,
    )
    _report(result)
    out = capsys.readouterr().out
    assert "retrain rejected: ndcg@10 0.0600 < current 0.0700" in out
    assert "paired   -0.0100 ± 0.0040 ndcg@10 (candidate - current, 200 valid samples)" in out
    assert "CURRENT ->" not in out


def test_the_report_shows_the_text_check_and_each_measure_beyond_its_bound(capsys):
    from cli.retrain import _report
    from model.retrain import RetrainResult, TextGate

    both = {"texts": 200, "loop_share": 0.0, "unknown_title_share": 0.0, "claims_hold_share": 1.0}
    both |= {"cut_share": 0.0, "empty_share": 0.005, "distinct_2": 0.41, "claims": 590, "mean_words": 19.4}
    failed = {"measure": "loop_share", "candidate": 0.42, "current": 0.0, "setting": "max_loop_rise"}
    check = {"checked": True, "passed": False, "candidate": {**both, "loop_share": 0.42}, "current": both}
    check |= {"bounds": TextGate().bounds(), "failed": [{**failed, "bound": 0.02}]}
    reason = "reasoning worse than current on 200 valid samples: loop_share 0.4200 > current 0.0000 + ..."
    _report(RetrainResult(status="rejected", reason=reason, current_version="v1", text_gate=check))
    out = capsys.readouterr().out
    assert (
        "  texts    candidate / current on 200 valid samples: loops 42.0% / 0.0%, unknown titles 0.0% / 0.0%,"
        " claims hold 100.0% / 100.0%, cut 0.0% / 0.0%, empty 0.5% / 0.5%, distinct-2 0.410 / 0.410\n"
    ) in out
    assert "  WORSE    loop_share 0.4200 against 0.0000: beyond max_loop_rise 0.02 (--max-loop-rise)\n" in out
    off = {"checked": False, "why": "stage contrastive is evaluated without reasoning"}
    _report(RetrainResult(status="published", reason="...", current_version="v1", text_gate=off))
    assert (
        "  texts    not checked: stage contrastive is evaluated without reasoning\n"
        in capsys.readouterr().out
    )


def test_the_text_gate_options_reach_the_gate(versions_root, tiny_dataset, tmp_path, monkeypatch):
    """A candidate whose reasoning loops (tests/model/test_retrain.py `_damaged`), its NDCG@10
    let through (--tolerance 1): rejected by the text gate's defaults, naming the measure in
    the JSON; published by a run whose bounds let those measures through, as by --no-text-gate."""
    _trains_into(monkeypatch, lambda base, out: _damaged(base, out, "loop"))
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump(TEXTS_TRAIN))
    common = ["--data", str(tiny_dataset.path), "--root", str(versions_root), "--redis-url", ""]
    common += ["--config", str(config), "--tolerance", "1", "--json"]
    code, out, rejected = _cli(*common)
    assert code == 0, out
    assert rejected["status"] == "rejected" and rejected["reason"].startswith("reasoning worse than current")
    failed = {f["setting"] for f in rejected["text_gate"]["failed"]}
    assert "max_loop_rise" in failed and "loop_share 1.0000 > current" in rejected["reason"]
    let_through = [arg for setting in sorted(failed) for arg in ("--" + setting.replace("_", "-"), "1")]
    code, out, published = _cli(*common, *let_through)
    assert code == 0, out
    assert published["status"] == "published" and published["text_gate"]["passed"]
    assert {s: published["text_gate"]["bounds"][s] for s in failed} == dict.fromkeys(failed, 1.0)
    code, out, off = _cli(*common, "--no-text-gate")
    assert code == 0, out
    assert off["status"] == "published" and off["text_gate"]["checked"] is False


def test_every_text_gate_bound_has_an_option_that_states_its_default():
    from typer.main import get_command

    from model.retrain import TextGate

    options = {p.name: p for p in get_command(app).commands["retrain"].params}
    for setting, default in TextGate().bounds().items():
        assert options[setting].opts == ["--" + setting.replace("_", "-")]
        assert options[setting].default is None  # unset: TextGate's own default
        assert f"(default {default:g}" in options[setting].help, setting


def test_a_text_gate_bound_out_of_range_is_refused_by_name(versions_root, tiny_dataset):
    common = ["--data", str(tiny_dataset.path), "--root", str(versions_root)]
    code, out, _ = _cli(*common, "--max-loop-rise", "2")
    assert code == 2 and "text gate bound max_loop_rise (--max-loop-rise) must be a number from 0 to 1" in out
    assert "got 2.0" in out
    code, out, _ = _cli(*common, "--max-claims-hold-drop", "-0.1")
    assert code == 2 and "max_claims_hold_drop (--max-claims-hold-drop)" in out
    assert (versions_root / "CURRENT").read_text() == "v0\n" and not (versions_root / "retrain").exists()


def test_a_negative_gate_z_is_refused_by_name(versions_root, tiny_dataset):
    code, out, _ = _cli("--data", str(tiny_dataset.path), "--root", str(versions_root), "--gate-z", "-1")
    assert code == 2 and "gate_z must be a finite number >= 0, got -1.0" in out
    assert (versions_root / "CURRENT").read_text() == "v0\n" and not (versions_root / "retrain").exists()


@pytest.mark.redis
def test_a_backfill_of_the_seeds_history_is_not_trained_on_twice(
    redis_server, versions_root, config_file, tiny_dataset
):
    """Journey 40, finding 1: the warehouse history was the seed dataset and was backfilled
    into Redis too (POST /users/{id}/events, as the service's RedisStore writes it here). The
    next run took every seed interaction as a new event: twice the train samples, targets in
    their own histories, and a run triggered by nothing new."""
    from model.data import SPLITS, load_prepared
    from tests.model.test_retrain import _seed_as_events, _target_in_history

    root, url = versions_root, redis_server.url
    redis_server.flush()
    # u4's one interaction made no seed sample, so the seed cannot tell it was there: it would
    # count as new (tests/model/test_retrain.py); every other user's history is the seed's
    backfill = [e for e in _seed_as_events() if e.user_id != "u4"]
    for user in dict.fromkeys(e.user_id for e in backfill):
        _append(url, user, [(e.item_id, e.rating, e.timestamp) for e in backfill if e.user_id == user])
    common = ["--data", str(tiny_dataset.path), "--root", str(root), "--redis-url", url]
    common += ["--config", str(config_file)]
    code, out, _ = _cli(*common)  # the default --min-events 1
    assert code == 0, out
    assert "retrain skipped: 0 events not trained on yet (11 more already in the seed data)" in out
    assert "11 of them already in the seed data (same user, item, rating, time): not added" in out
    assert read_state(root / "retrain")["last_run"]["events_in_seed"] == 11
    code, out, run = _cli(*common, "--min-events", "0", "--tolerance", "1", "--json")
    assert code == 0 and run["status"] == "published", out
    assert run["events_total"] == 11 and run["events_in_seed"] == 11
    assert run["samples"] == {name: len(tiny_dataset.split(name)) for name in SPLITS}
    rebuilt = load_prepared(root / "retrain" / "data" / "tiny" / "loo")
    for name in SPLITS:
        assert (
            rebuilt.split(name)["target_item_id"].tolist()
            == tiny_dataset.split(name)["target_item_id"].tolist()
        )
        assert rebuilt.split(name)["history_item_ids"].map(list).tolist() == (
            tiny_dataset.split(name)["history_item_ids"].map(list).tolist()
        )
    assert _target_in_history(rebuilt) == 0


@pytest.mark.redis
def test_retrain_warns_of_and_counts_the_events_the_streams_cap_trimmed_unread(
    redis_server, versions_root, config_file, tiny_dataset, caplog
):
    """Journey 40, finding 2: a backfill larger than R2EC_STREAM_MAXLEN lost its first users'
    events before retraining read the stream, and the run said nothing of them."""
    from service.store import Event, RedisStore

    root, url = versions_root, redis_server.url
    redis_server.flush()

    async def backfill(users: range) -> None:
        store = RedisStore(url, stream_maxlen=100)  # the service's R2EC_STREAM_MAXLEN
        try:
            for u in users:
                await store.append_events(f"b{u}", [Event(f"i{1 + n % 9}", 4.0, 1000 + n) for n in range(50)])
        finally:
            await store.close()

    asyncio.run(backfill(range(20)))  # 1000 events; `MAXLEN ~ 100` keeps the newest 100-200
    common = ["--data", str(tiny_dataset.path), "--root", str(root), "--redis-url", url]
    common += ["--config", str(config_file), "--min-events", "100000"]
    code, out, run = _cli(*common, "--json")
    assert code == 0, out
    assert run["events_lost"] == 1000 - run["new_events"] > 0 and run["events_lost_exact"] is True
    assert (
        f"{run['events_lost']} events were dropped from the stream before retraining read them" in caplog.text
    )
    caplog.clear()
    state = read_state(root / "retrain")
    assert state["events_lost"] == run["events_lost"] and state["stream_mark"]["entries_added"] == 1000
    # read in time: nothing lost, nothing said
    asyncio.run(backfill(range(20, 21)))
    code, out, _ = _cli(*common)
    assert code == 0 and "dropped from the stream" not in caplog.text and "LOST" not in out, out
    assert "events   50 new" in out
    # late again: the report says so
    asyncio.run(backfill(range(21, 31)))
    code, out, _ = _cli(*common)
    assert code == 0, out
    lost = read_state(root / "retrain")["last_run"]["events_lost"]
    assert lost > 0 and f"  LOST     {lost} events trimmed from the stream before this run read them" in out
    assert read_state(root / "retrain")["events_lost"] == run["events_lost"] + lost
