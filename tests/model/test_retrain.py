"""Scheduled retraining: samples <-> interactions, the event cursor, the publish gate.

The end-to-end run over a real Redis stream is in tests/cli/test_retrain.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model.checkpoint import CheckpointError, current_version, list_versions, publish_version, set_current
from model.data import SPLITS, DataError, load_prepared, prepare_atomic
from model.evaluate import seen_items
from model.recpo import RecPOConfig
from model.retrain import (
    Purge,
    RetrainConfig,
    consume_events,
    events_frame,
    gate,
    purge_erased,
    read_state,
    rebuild_dataset,
    retrain,
    validation_ranks,
)
from service.metrics import Metrics
from tests.conftest import FIXTURES, child_env
from tests.service.test_app import metric

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


@dataclass(frozen=True)
class Ev:
    """An event as any reader may hand it over (an `Interaction`); ids are opaque strings."""

    id: str
    user_id: str
    item_id: str
    rating: float | None
    timestamp: int


class FakeReader:
    """read_events over a list, with cursors no stream uses ("after:<n>"); records each call."""

    def __init__(self, events: list[Ev]) -> None:
        self.events, self.calls = events, []

    def __call__(self, cursor: str | None) -> tuple[list[Ev], str | None]:
        self.calls.append(cursor)
        start = 0 if cursor is None else int(cursor.removeprefix("after:"))
        fresh = self.events[start:]
        return fresh, (f"after:{len(self.events)}" if fresh else cursor)


@dataclass
class FakeLedger:
    """An erasure ledger (`Erasures`) over FakeReader-style ids: each erased user's cutoff is
    the number of the last id of theirs it covers (ids "1", "2", ... as events arrive)."""

    cutoffs: dict[str, int]

    @property
    def users(self) -> set[str]:
        return set(self.cutoffs)

    def covers(self, user_id: str, event_id: str) -> bool:
        return user_id in self.cutoffs and int(event_id) <= self.cutoffs[user_id]


def _users(ds) -> set[str]:
    return {str(u) for name in SPLITS for u in ds.split(name)["user_id"]}


def _same_splits(a, b) -> None:
    for name in SPLITS:
        pd.testing.assert_frame_equal(a.split(name), b.split(name), check_dtype=False)


# -- samples <-> interactions (no model) -------------------------------------------------------
def _tiny_seed(tmp_path: Path, protocol: str):
    """tests/fixtures/data/tiny.{inter,item} prepared under `protocol`, as a seed dataset."""
    data = FIXTURES / "data"
    prepared = prepare_atomic(data / "tiny.inter", data / "tiny.item", tmp_path, "tiny", protocol=protocol)
    return load_prepared(prepared)


@pytest.mark.parametrize("protocol", ["loo", "temporal"])
def test_rebuild_without_events_reproduces_the_seed_samples(tmp_path, protocol):
    # tiny.inter has a timestamp tie (u2: i6 and i7 at 250) and a NaN rating: order must survive.
    seed = _tiny_seed(tmp_path, protocol)
    rebuilt, dropped, _ = rebuild_dataset(seed, events_frame([]), tmp_path / "out")
    assert dropped == 0 and rebuilt.path != seed.path
    _same_splits(rebuilt, seed)
    assert list(rebuilt.items["item_id"]) == list(seed.items["item_id"])
    for split in ("valid", "test"):  # the seen mask too
        assert list(map(sorted, seen_items(rebuilt, split))) == list(map(sorted, seen_items(seed, split)))


def test_rebuild_keeps_the_seeds_prior_items(tmp_path, tiny_dataset):
    # a seed prepared with prior items (Amazon's window): the rebuild masks them as the seed did
    user = str(tiny_dataset.split("test")["user_id"].iloc[0])
    seed = dataclasses.replace(tiny_dataset, prior={user: ["i9"]})  # the fixture is shared
    rebuilt, _, _ = rebuild_dataset(seed, events_frame([]), tmp_path)
    assert rebuilt.prior[user][0] == "i9"
    assert "i9" in seen_items(rebuilt, "test")[0]


def test_events_become_new_targets_and_unknown_items_are_dropped(tmp_path, tiny_dataset):
    events = events_frame(
        [
            Ev("e1", "u1", "i6", 4.0, 900),  # u1's newest: the new loo test target
            Ev("e2", "u9", "i1", None, 2),  # a new user, no rating
            Ev("e3", "u9", "i2", 5.0, 3),
            Ev("e4", "u9", "nope", 5.0, 4),  # not in the catalog
        ]
    )
    ds, dropped, _ = rebuild_dataset(tiny_dataset, events, tmp_path)
    assert dropped == 1
    test = ds.split("test").set_index("user_id")
    valid = ds.split("valid").set_index("user_id")
    assert test.loc["u1", "target_item_id"] == "i6" and test.loc["u1", "history_item_ids"][-1] == "i5"
    assert valid.loc["u1", "target_item_id"] == "i5"  # the old test target moved to valid
    # u9: "i1" at t=2 then "i2" at t=3 -> one sample, i2 after [i1]
    u9 = ds.split("train").query("user_id == 'u9'")
    assert list(u9["target_item_id"]) == ["i2"] and list(u9.iloc[0]["history_item_ids"]) == ["i1"]
    assert list(u9.iloc[0]["history_timestamps"]) == [2]
    assert len(ds.split("train")) == len(tiny_dataset.split("train")) + 2  # u1's old valid + u9


def test_rebuild_leaves_an_erased_users_seed_interactions_out_whole(tmp_path, tiny_dataset):
    """Seed users are erased whole (their prior items too); their events in the log, which
    `purge_erased` kept as later than the erasure, still count."""
    seed = dataclasses.replace(tiny_dataset, prior={"u1": ["i9"], "u2": ["i9"]})  # a shared fixture
    assert {"u1", "u2", "u3"} <= _users(seed)
    events = events_frame([Ev("1", "u2", "i1", 5.0, 1000), Ev("2", "u2", "i3", 4.0, 1001)])
    ds, _, _ = rebuild_dataset(seed, events, tmp_path, erased={"u1", "u2", "nobody"})
    assert _users(ds) == _users(seed) - {"u1"}
    u2 = pd.concat([ds.split(name) for name in SPLITS]).query("user_id == 'u2'")
    # only the two events: one sample, i3 after [i1], none of the seed's five interactions
    assert [(list(h), t) for h, t in zip(u2["history_item_ids"], u2["target_item_id"], strict=True)] == [
        (["i1"], "i3")
    ]
    assert "u1" not in ds.prior and "i9" not in ds.prior.get("u2", [])  # the seed's prior items
    kept, _, _ = rebuild_dataset(seed, events, tmp_path / "all")  # nobody erased: both seed users stay
    assert {"u1", "u2"} <= _users(kept) and kept.prior["u1"][0] == kept.prior["u2"][0] == "i9"


def _seed_as_events(path: Path = FIXTURES / "data" / "tiny.inter") -> list[Ev]:
    """The seed's own interactions as a backfill posts them: ratings and times as JSON integers
    (the service reads them back as floats and ints), an unrated one without a rating."""
    raw = pd.read_csv(path, sep="\t")
    raw.columns = ["user_id", "item_id", "rating", "timestamp"]
    return [
        Ev(str(n), r.user_id, r.item_id, None if pd.isna(r.rating) else int(r.rating), int(r.timestamp))
        for n, r in enumerate(raw.itertuples(index=False), 1)
    ]


def _target_in_history(ds) -> int:
    return sum(
        int(t in h)
        for name in SPLITS
        for t, h in zip(ds.split(name)["target_item_id"], ds.split(name)["history_item_ids"], strict=True)
    )


@pytest.mark.parametrize("protocol", ["loo", "temporal"])
def test_events_that_repeat_the_seed_exactly_add_nothing(tmp_path, protocol):
    """Journey 40, finding 1: the warehouse history was both the seed dataset and backfilled
    into Redis; the rebuild added every seed interaction again, doubling the train samples and
    putting targets in their own histories (415 of 943 valid samples on ml-100k)."""
    seed = _tiny_seed(tmp_path, protocol)
    backfill = _seed_as_events()
    rebuilt, unknown, in_seed = rebuild_dataset(seed, events_frame(backfill), tmp_path / "out")
    # u4's one interaction made no sample, so the seed does not hold it: it is added, and
    # still makes none
    assert (unknown, in_seed) == (0, len(backfill) - 1)
    _same_splits(rebuilt, seed)
    assert _target_in_history(rebuilt) == _target_in_history(seed) == 0
    assert rebuilt.meta["source"]["events"] == 1 and rebuilt.meta["source"]["events_in_seed"] == in_seed


def test_a_re_rating_at_the_same_time_is_no_repeat_of_the_seed(tmp_path, tiny_dataset):
    """The same user, item and time with another rating is another row, as `r2ec data prepare`
    (check_interactions) and the service's default event id both count it: it is added."""
    events = events_frame(
        [Ev("1", "u1", "i2", 4, 200), Ev("2", "u1", "i2", 1.0, 200), Ev("3", "u1", "i2", 4.0, 201)]
    )
    rebuilt, _, in_seed = rebuild_dataset(tiny_dataset, events, tmp_path)
    assert in_seed == 1  # only the first: rating 4 at 200 is the seed's
    assert len(rebuilt.split("train")) == len(tiny_dataset.split("train")) + 2


def test_a_backfill_of_the_seed_is_no_new_work_for_min_events(versions_root, tiny_dataset, caplog):
    """The events a backfill of the seed's history posts would have made the next run train on
    nothing new (with the default min_events=1, on every interaction twice)."""
    reader = FakeReader(_seed_as_events())
    cfg = RetrainConfig(versions_root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), min_events=3)
    with caplog.at_level("INFO", logger="model.retrain"):
        result = retrain(cfg, reader)
    assert result.status == "skipped" and result.new_events == 12 and result.events_in_seed == 11
    assert (
        result.reason
        == "1 events not trained on yet (11 more already in the seed data), fewer than min_events=3"
    )
    assert "12 events logged, 11 of them already in the seed data" in caplog.text
    assert read_state(versions_root / "retrain")["last_run"]["events_in_seed"] == 11
    reader.events.append(Ev("13", "u9", "i1", 4.0, 900))  # one more new event: still too few
    again = retrain(cfg, reader)
    assert again.status == "skipped" and again.reason.startswith("2 events not trained on yet")


# -- erasures ------------------------------------------------------------------------------------
def test_a_purge_drops_an_erased_users_events_up_to_the_erasure_and_keeps_later_ones(tmp_path, fsynced):
    reader = FakeReader(
        [Ev("1", "u1", "i1", 4.0, 10), Ev("2", "u2", "i2", 5.0, 11), Ev("3", "u1", "i3", None, 12)]
    )
    consume_events(tmp_path, reader)
    state = read_state(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps({**state, "trained_events": 3}))  # a run trained on them
    reader.events += [Ev("4", "u1", "i4", 3.0, 13), Ev("5", "u3", "i5", 2.0, 14)]  # u1 again, after
    consume_events(tmp_path, reader)
    fsynced.clear()
    log, purge = purge_erased(tmp_path, FakeLedger({"u1": 3, "u9": 1}))
    assert purge == Purge(erased_users=2, events=2, users=1)
    assert list(log["event_id"]) == ["2", "4", "5"] and list(log["user_id"]) == ["u2", "u1", "u3"]
    assert list(pd.read_parquet(tmp_path / "events.parquet")["event_id"]) == ["2", "4", "5"]
    state = read_state(tmp_path)
    # 2 of the 3 trained on are gone: 1 trained, 2 pending (the two new ones), as before
    assert (state["trained_events"], state["events_total"], state["purged_events"]) == (1, 3, 2)
    assert state["purge_epoch"] == 1 and state["erased_users"] == 2
    assert "u1" not in (tmp_path / "state.json").read_text()  # counts, never the ids
    # the epoch first, then the log (atomically: a temporary file renamed), then the counts
    work = tmp_path.resolve()
    assert [p if p == work else p.name.split(".")[1] for p in fsynced] == [
        "state",
        work,
        "events",
        work,
        "state",
        work,
    ]
    # nothing new: nothing rewritten; a user joining the ledger without events: a new epoch
    fsynced.clear()
    assert purge_erased(tmp_path, FakeLedger({"u1": 3, "u9": 1}))[1] == Purge(2, 0, 0) and not fsynced
    log, purge = purge_erased(tmp_path, FakeLedger({"u1": 3, "u9": 1, "u2": 0}))
    assert purge == Purge(3, 0, 0) and len(log) == 3 and read_state(tmp_path)["purge_epoch"] == 2
    # erased again later: the events since go too
    log, purge = purge_erased(tmp_path, FakeLedger({"u1": 4, "u9": 1, "u2": 0}))
    assert purge == Purge(3, 1, 1) and list(log["event_id"]) == ["2", "5"]


def test_a_run_without_the_ledger_is_refused_once_erasures_were_honoured(versions_root, tiny_dataset):
    """The seed is never rewritten: a run without --redis-url read no ledger, trained on an
    erased seed user's data again and published it (the README's command, R2EC_REDIS_URL unset)."""
    from model.retrain import RetrainError

    reader = FakeReader([Ev("1", "u9", "i1", 4.0, 900), Ev("2", "u9", "i2", 5.0, 901)])
    cfg = RetrainConfig(versions_root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), tolerance=1.0)
    assert retrain(cfg, None).status == "published"  # no erasures yet: no ledger needed
    first = retrain(cfg, reader, lambda: FakeLedger({"u1": 0}))
    assert first.erased_users == 1
    current = (versions_root / "CURRENT").read_text()
    with pytest.raises(RetrainError, match="honoured the erasures of 1 users.*--redis-url"):
        retrain(cfg, None)
    assert (versions_root / "CURRENT").read_text() == current


def test_a_run_refuses_a_current_version_over_another_backbone_unless_allowed(
    versions_root, tiny_dataset, monkeypatch
):
    """The warm start loads CURRENT's version: one whose r2ec.json records other weights than
    its base stands for here is refused before any training; allowed, the candidate records the
    backbone it was trained over."""
    from model.backbone_digest import BackboneMismatch

    meta_file = versions_root / "v0" / "r2ec.json"
    meta = json.loads(meta_file.read_text())
    meta["backbone"] = {"kind": "gguf", "file": "other.gguf", "bytes": 1, "sha256": "ab" * 32}
    meta_file.write_text(json.dumps(meta))
    cfg = RetrainConfig(versions_root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), tolerance=1.0)
    with pytest.raises(BackboneMismatch, match="ab" * 32):
        retrain(cfg, None)
    assert current_version(versions_root) == "v0" and list_versions(versions_root) == ["v0"]
    monkeypatch.setenv("R2EC_ALLOW_BACKBONE_MISMATCH", "true")
    result = retrain(cfg, None)
    assert result.status == "published", result.reason
    published = json.loads((versions_root / current_version(versions_root) / "r2ec.json").read_text())
    assert published["backbone"] == {"kind": "builtin", "name": "tiny"}


def test_a_skipped_run_rebuilds_the_dataset_on_disk_once_erasures_changed_it(
    versions_root, tiny_dataset, monkeypatch
):
    import model.retrain

    work = versions_root / "retrain"
    built = work / "data" / "tiny" / "loo"
    reader = FakeReader([Ev("1", "u9", "i1", 4.0, 900), Ev("2", "u9", "i2", 5.0, 901)])
    cfg = RetrainConfig(versions_root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), tolerance=1.0)
    first = retrain(cfg, reader, lambda: FakeLedger({}))
    assert first.status == "published" and first.erased_users == 0
    assert {"u1", "u9"} <= _users(load_prepared(built))
    rebuilds = []
    real = model.retrain.rebuild_dataset
    monkeypatch.setattr(model.retrain, "rebuild_dataset", lambda *a: rebuilds.append(a[3]) or real(*a))
    skip = dataclasses.replace(cfg, min_events=10)
    ledger = FakeLedger({"u9": 2, "u1": 0})  # u9's events and seed user u1
    result = retrain(skip, reader, lambda: ledger)
    assert result.status == "skipped" and rebuilds == [{"u9", "u1"}]
    assert (result.erased_users, result.purged_events, result.purged_users, result.erased_seed_users) == (
        2,
        2,
        1,
        1,
    )
    assert _users(load_prepared(built)).isdisjoint({"u1", "u9"})
    assert read_state(work)["last_run"]["purged_events"] == 2 and read_state(work)["purged_events"] == 2
    assert read_state(work)["data_epoch"] == read_state(work)["purge_epoch"] == 1
    assert retrain(skip, reader, lambda: ledger).status == "skipped" and len(rebuilds) == 1  # clean
    # the next training run trains without them
    reader.events.append(Ev("3", "u2", "i9", 3.0, 902))
    trained = retrain(cfg, reader, lambda: ledger)
    assert trained.status == "published" and trained.erased_seed_users == 1 and trained.purged_events == 0
    assert rebuilds[-1] == {"u9", "u1"} and _users(load_prepared(built)).isdisjoint({"u1", "u9"})


# -- the cursor ----------------------------------------------------------------------------------
def test_the_cursor_is_stored_and_handed_back_unread(tmp_path):
    reader = FakeReader([Ev("a", "u1", "i1", 4.0, 10), Ev("b", "u1", "i2", None, 11)])
    log, new, cursor, *_ = consume_events(tmp_path, reader)
    assert (new, cursor, list(log["event_id"])) == (2, "after:2", ["a", "b"])
    reader.events.append(Ev("c", "u2", "i3", 1.0, 12))
    log, new, cursor, *_ = consume_events(tmp_path, reader)
    assert (new, cursor, list(log["event_id"])) == (1, "after:3", ["a", "b", "c"])
    assert reader.calls == [None, "after:2"]  # from the start, then exactly what it returned
    assert consume_events(tmp_path, reader)[1:3] == (0, "after:3")


def test_an_event_with_an_impossible_time_is_dropped_not_fatal(tmp_path):
    """Issue 13 row D: a stream written before the service bounded timestamps may hold 2^63
    (which used to end every later run with OverflowError) or a time in milliseconds."""
    reader = FakeReader(
        [
            Ev("a", "u1", "i1", 4.0, 2**63),
            Ev("b", "u1", "i2", None, 11),
            Ev("c", "u1", "i3", None, 1_700_000_000_000),
        ]
    )
    log, new, cursor, *_ = consume_events(tmp_path, reader)
    assert (new, cursor, list(log["event_id"])) == (1, "after:3", ["b"])


def test_events_read_again_are_not_counted_twice(tmp_path):
    """A crash after the log was written but before the cursor: the next run reads them again."""
    reader = FakeReader([Ev("a", "u1", "i1", 4.0, 10), Ev("b", "u1", "i2", None, 11)])
    consume_events(tmp_path, reader)
    (tmp_path / "state.json").unlink()  # the cursor was never saved
    log, new, cursor, *_ = consume_events(tmp_path, reader)
    assert (new, cursor, list(log["event_id"])) == (0, "after:2", ["a", "b"])


@dataclass(frozen=True)
class Keyed(Ev):
    """An event with the client's idempotency key, as service/store.py's StreamEntry has."""

    event_id: str = ""


def test_a_retry_the_stream_took_twice_is_one_event(tmp_path):
    """Redis forgets event ids after R2EC_EVENT_DEDUP_TTL_S (or loses them in a restart): a
    client's retry of a consumed event then got a new stream entry and was trained on twice.
    The client's key, per user, makes it one; events without a key and other users' equal keys
    stay apart, and a log written before the key was kept still reads."""
    import pyarrow.parquet as pq

    from model.retrain import EVENTS_FILE

    first = [Keyed("1-0", "u1", "i1", 4.0, 10, "e-1"), Keyed("1-1", "u1", "i2", None, 11, "")]
    reader = FakeReader(first)
    consume_events(tmp_path, reader)
    reader.events += [
        Keyed("9-0", "u1", "i1", 4.0, 10, "e-1"),  # the retry, a new stream id
        Keyed("9-1", "u2", "i1", 4.0, 10, "e-1"),  # another user's key that happens to match
        Keyed("9-2", "u1", "i2", None, 11, ""),  # no key: not known to be a repeat
        Keyed("9-3", "u3", "i5", 2.0, 12, "e-7"),
        Keyed("9-4", "u3", "i5", 2.0, 12, "e-7"),  # a repeat within one read
    ]
    log, new, *_ = consume_events(tmp_path, reader)
    assert new == 3 and list(log["event_id"]) == ["1-0", "1-1", "9-1", "9-2", "9-3"]
    # a log from before the key column: read with no keys, then keys from here on
    table = pq.read_table(tmp_path / EVENTS_FILE).drop(["key"])
    pq.write_table(table, tmp_path / EVENTS_FILE)
    reader.events.append(Keyed("9-5", "u3", "i5", 2.0, 12, "e-7"))
    log, new, *_ = consume_events(tmp_path, reader)
    assert new == 1 and list(log["key"]) == ["", "", "", "", "", "e-7"]


@pytest.mark.parametrize("text", ['{"last_event_id": "after:2", "events', "[]", "\udcff"])
def test_a_damaged_state_file_is_named_and_not_read_as_no_state(tmp_path, text):
    """A cut state.json said only "Expecting ':' delimiter: line 5 column 13", naming no file."""
    from model.retrain import RetrainError

    reader = FakeReader([Ev("a", "u1", "i1", 4.0, 10)])
    (tmp_path / "state.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(RetrainError) as raised:
        consume_events(tmp_path, reader)
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'state.json'} is damaged or unreadable (")
    assert "move it away" in message
    assert reader.calls == []  # nothing read past a cursor it could not read


def test_the_event_log_reaches_the_disk_before_the_cursor(tmp_path, fsynced):
    """After a power loss the saved cursor never points past events the log does not hold."""
    consume_events(tmp_path, FakeReader([Ev("a", "u1", "i1", 4.0, 10)]))
    work = tmp_path.resolve()
    assert [p if p == work else p.name.split(".")[1] for p in fsynced] == ["events", work, "state", work]


@dataclass
class Checked:
    """A `StreamRead`, as service/store.py's read_stream_checked returns it."""

    events: list[Ev]
    cursor: str | None
    lost: int
    lost_exact: bool
    mark: dict | None


class CheckingReader(FakeReader):
    """FakeReader whose stream says how many events it lost before each read (`losses`, in
    order), and records the marks it is handed back."""

    def __init__(self, events: list[Ev], losses: list[tuple[int, bool]]) -> None:
        super().__init__(events)
        self.losses, self.marks = losses, []

    def __call__(self, cursor: str | None, mark: dict | None = None) -> Checked:
        self.marks.append(mark)
        fresh, cursor = super().__call__(cursor)
        lost, exact = self.losses.pop(0)
        return Checked(fresh, cursor, lost, exact, {"reads": len(self.calls)})


def test_events_the_stream_lost_before_they_were_read_are_warned_of_and_counted(tmp_path, caplog):
    """Journey 40, finding 2: the stream's cap trimmed 410,380 backfilled events before the run
    read the stream, and the run said "read 1000010 new events", nothing else."""
    reader = CheckingReader([Ev("1", "u1", "i1", 4.0, 10)], [(7, True), (0, True), (3, False), (0, False)])
    with caplog.at_level("INFO", logger="model.retrain"):
        consumed = consume_events(tmp_path, reader)
    assert (consumed.new, consumed.lost, consumed.lost_exact) == (1, 7, True)
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].getMessage().startswith(
        "7 events were dropped from the stream before retraining read them"
    )
    assert "R2EC_STREAM_MAXLEN" in warned[0].getMessage()
    state = read_state(tmp_path)
    assert (state["events_lost"], state["stream_mark"]) == (7, {"reads": 1})
    caplog.clear()
    with caplog.at_level("WARNING", logger="model.retrain"):
        assert consume_events(tmp_path, reader)[3:] == (0, True)  # nothing lost: no warning
        assert not caplog.records
        assert consume_events(tmp_path, reader)[3:] == (3, False)
        assert consume_events(tmp_path, reader)[3:] == (0, False)
    assert [r.getMessage().split(" events were")[0] for r in caplog.records] == [
        "at least 3",
        "an unknown number of",
    ]
    # the mark each read returned is handed back to the next; the count adds up
    assert reader.marks == [None, {"reads": 1}, {"reads": 2}, {"reads": 3}]
    assert read_state(tmp_path)["events_lost"] == 10


def test_a_run_reports_the_events_its_stream_lost(versions_root, tiny_dataset):
    reader = CheckingReader([Ev("1", "u1", "i6", 4.0, 900)], [(5, True)])
    cfg = RetrainConfig(versions_root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), min_events=2)
    result = retrain(cfg, reader)
    assert result.status == "skipped" and (result.events_lost, result.events_lost_exact) == (5, True)
    last = read_state(versions_root / "retrain")["last_run"]
    assert (last["events_lost"], last["events_lost_exact"]) == (5, True)


def test_too_few_new_events_skip_training_but_keep_the_cursor(versions_root, tiny_dataset):
    reader = FakeReader([Ev("a", "u1", "i6", 4.0, 900)])
    cfg = RetrainConfig(versions_root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), min_events=2)
    result = retrain(cfg, reader)
    assert result.status == "skipped" and result.new_events == 1 and result.last_event_id == "after:1"
    assert result.candidate_version is None and (versions_root / "CURRENT").read_text() == "v0\n"
    assert retrain(cfg, reader).new_events == 0 and reader.calls == [None, "after:1"]


def test_events_of_a_run_that_failed_stay_pending_for_the_next(versions_root, tiny_dataset, monkeypatch):
    import model.train

    reader = FakeReader([Ev("a", "u1", "i6", 4.0, 900), Ev("b", "u2", "i1", 5.0, 901)])
    cfg = RetrainConfig(versions_root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), tolerance=1.0)

    def killed(*args, **kwargs):
        raise RuntimeError("deadline")

    real = model.train.train
    monkeypatch.setattr(model.train, "train", killed)
    with pytest.raises(RuntimeError, match="deadline"):
        retrain(cfg, reader)
    monkeypatch.setattr(model.train, "train", real)
    result = retrain(cfg, reader)  # nothing new in the stream, but 2 events never trained on
    assert result.new_events == 0 and result.status == "published", result.reason
    skipped = retrain(cfg, reader)  # now they have been
    assert skipped.status == "skipped" and skipped.reason.startswith("0 events not trained on yet")


def test_a_runs_training_log_and_curves_outlive_its_scratch_directory(versions_root, tiny_dataset):
    """ROOT/retrain/run/ goes after each run, and took log.jsonl and curves.png with it: a
    CronJob's stdout was all that was left. A published version now carries its own, and
    ROOT/retrain/last-run/ holds the last run's, rejected ones too."""
    import json as _json

    from model.retrain import LAST_RUN_DIR

    reader = FakeReader([Ev("a", "u1", "i6", 4.0, 900), Ev("b", "u2", "i1", 5.0, 901)])
    cfg = RetrainConfig(versions_root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), tolerance=1.0)
    published = retrain(cfg, reader)
    assert published.status == "published", published.reason
    version = versions_root / published.published_version
    last = versions_root / "retrain" / LAST_RUN_DIR
    for where in (version, last):
        assert (where / "curves.png").stat().st_size > 0
        steps = [_json.loads(line) for line in (where / "log.jsonl").read_text().splitlines()]
        assert steps, where
    (last / "log.jsonl").unlink()  # the next run's record replaces it, rejected or not
    reader.events.append(Ev("c", "u3", "i2", 4.0, 902))
    strict = RetrainConfig(versions_root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), tolerance=-10.0)
    rejected = retrain(strict, reader)
    assert rejected.status == "rejected", rejected.reason
    assert (last / "log.jsonl").is_file() and (last / "curves.png").is_file()
    assert not (versions_root / "retrain" / "run").exists()


def test_a_run_removes_the_temp_files_a_killed_run_left(versions_root, tiny_dataset):
    """A run killed mid-write (SIGKILL: no `except` ran) left its `.NAME.<hex>.tmp` files in
    ROOT/retrain, the event log's as large as the log. Every writer there holds the run lock,
    so the next run removes them all at once; nothing else."""
    work = versions_root / "retrain"
    dead = [
        work / ".events.parquet.0123456789ab.tmp",
        work / ".state.json.0123456789ab.tmp",
        work / "data" / "tiny" / "loo" / ".train.parquet.0123456789ab.tmp",
    ]
    kept = [work / ".events.parquet.tmp", work / "notes.0123456789ab.tmp"]
    for p in dead + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("half")
    # a rebuild killed mid-write: the directory it was writing (a copy of the samples, of users
    # erased since too), which no run had removed
    rebuild = work / "data" / "tiny" / ".loo.tmp-0123456789ab"
    rebuild.mkdir()
    (rebuild / "train.parquet").write_text("half")
    cfg = RetrainConfig(versions_root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), min_events=2)
    assert retrain(cfg, FakeReader([Ev("a", "u1", "i6", 4.0, 900)])).status == "skipped"
    assert not any(p.exists() for p in dead) and all(p.exists() for p in kept)
    assert not rebuild.exists()


def test_a_state_from_before_the_trained_count_does_not_retrain_old_events(versions_root, tiny_dataset):
    reader = FakeReader([Ev("a", "u1", "i6", 4.0, 900)])
    cfg = RetrainConfig(versions_root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), tolerance=1.0)
    work = versions_root / "retrain"
    consume_events(work, reader)  # an older version read the event and trained on it
    state = json.loads((work / "state.json").read_text())
    del state["trained_events"]  # which that version did not count
    (work / "state.json").write_text(json.dumps(state))
    result = retrain(cfg, reader)  # nothing is pending
    assert result.status == "skipped" and result.reason.startswith("0 events not trained on yet")


def test_a_run_reads_current_under_the_lock(versions_root, tiny_dataset, monkeypatch):
    import model.retrain

    # another run publishes v1 while this one loads its seed data, before it takes the lock
    real = model.retrain.load_prepared

    def load_while_another_publishes(path):
        if not (versions_root / "v1").exists():  # once: the rebuilt data loads through here too
            publish_version(versions_root, versions_root / "v0", "v1")
        return real(path)

    monkeypatch.setattr(model.retrain, "load_prepared", load_while_another_publishes)
    cfg = RetrainConfig(versions_root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), tolerance=1.0, keep=1)
    result = retrain(cfg, read_events=None)
    assert result.current_version == "v1" and result.status == "published"


KILLED_RUN = """
import json, os, signal, sys
import model.checkpoint, model.retrain
from model.recpo import RecPOConfig
from model.retrain import RetrainConfig, retrain
from tests.model.test_retrain import TINY_TRAIN, Ev, FakeReader

module, name = sys.argv[3].split(":")
setattr(getattr(model, module), name, lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
cfg = RetrainConfig(sys.argv[1], sys.argv[2], RecPOConfig(**TINY_TRAIN), tolerance=1.0)
retrain(cfg, FakeReader([Ev(*e) for e in json.loads(sys.argv[4])]))
"""


@pytest.mark.parametrize(
    "where", ["checkpoint:flip_current", "retrain:prune_versions"], ids=["before", "after"]
)
def test_a_run_killed_around_its_flip_leaves_the_state_right_for_the_next(
    versions_root, tiny_dataset, tmp_path, where
):
    """Journey 38: killed after the flip (while pruning, a deadline), the state still said the
    events were not trained on, so the next run trained and published them again. Now it says
    so before the flip, and a run killed before its flip has that put back by the next."""
    events = [("a", "u1", "i6", 4.0, 900), ("b", "u2", "i1", 5.0, 901)]
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    env = child_env(OMP_NUM_THREADS="1")
    args = [str(versions_root), str(tiny_dataset.path), where, json.dumps(events)]
    proc = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    work = versions_root / "retrain"
    (version,) = [
        v for v in os.listdir(versions_root) if v not in ("v0", "retrain", "CURRENT", "CURRENT.lock")
    ]
    record = json.loads((versions_root / version / "retrain.json").read_text())
    killed = json.loads((work / "state.json").read_text())
    assert killed["trained_events"] == 2 and killed["last_published_at"] == record["finished_at"]
    cfg = RetrainConfig(versions_root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), tolerance=1.0)
    result = retrain(cfg, FakeReader([Ev(*e) for e in events]))  # the stream holds nothing newer
    state = json.loads((work / "state.json").read_text())
    assert "publishing" not in state and state["trained_events"] == 2
    if where == "retrain:prune_versions":  # published: its events are not trained on again
        assert current_version(versions_root) == version
        assert result.status == "skipped" and result.reason.startswith("0 events not trained on yet")
        assert state["last_published_at"] == record["finished_at"]
    else:  # never published: its events are pending, the next run publishes them
        assert result.status == "published" and result.current_version == "v0" and result.new_events == 0
        assert state["last_published_at"] == result.finished_at
        assert list_versions(versions_root) == ["v0", result.published_version]
        assert not (versions_root / version).exists()  # the version it moved in, never served


def test_a_publish_that_fails_before_its_flip_puts_the_state_back(versions_root, tiny_dataset, monkeypatch):
    """No space for CURRENT's new value: the run fails, CURRENT and the state are as before it
    (its events pending, no publish time), and nothing is left for the next run to settle."""
    import model.checkpoint

    def no_space(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model.checkpoint, "flip_current", no_space)
    cfg = RetrainConfig(versions_root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), tolerance=1.0)
    with pytest.raises(OSError, match="No space"):
        retrain(cfg, FakeReader([Ev("a", "u1", "i6", 4.0, 900)]))
    state = json.loads((versions_root / "retrain" / "state.json").read_text())
    # (data_epoch: the rebuilt samples reflect every erasure so far, model/retrain.py `_rebuild`)
    before = {"trained_events": 0, "last_event_id": "after:1", "events_total": 1, "data_epoch": 0}
    assert state == {"format_version": 1, **before}
    assert current_version(versions_root) == "v0" and list_versions(versions_root) == ["v0"]


def _second_version(root) -> None:
    """v1, a copy of v0 (the same weights, listed after it), and CURRENT naming it."""
    shutil.copytree(root / "v0", root / "v1")
    (root / "CURRENT").write_text("v1\n")


def test_a_rollback_during_the_run_is_not_published_over(versions_root, tiny_dataset, monkeypatch):
    """Journey 38: a retrain that started from v1 flipped CURRENT to its candidate although an
    operator had rolled back to v0 while it trained, with no warning (and had gated against v1,
    carried v0's edits, pruned around the wrong version)."""
    import model.train

    _second_version(versions_root)
    real = model.train.train

    def rolled_back_while_training(*args, **kwargs):
        best = real(*args, **kwargs)
        set_current(versions_root, "v0")  # `r2ec checkpoint rollback ROOT v0`
        return best

    monkeypatch.setattr(model.train, "train", rolled_back_while_training)
    reader = FakeReader([Ev("a", "u1", "i6", 4.0, 900)])
    cfg = RetrainConfig(versions_root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), tolerance=1.0, keep=1)
    result = retrain(cfg, reader)
    assert result.status == "superseded" and result.published_version is None
    assert result.reason == "CURRENT moved from v1 to v0 during the run (a rollback?); not publishing"
    assert result.current_version == "v1" and result.candidate_metric is not None
    assert current_version(versions_root) == "v0" and list_versions(versions_root) == ["v0", "v1"]
    assert not (versions_root / "retrain" / "run").exists()
    state = json.loads((versions_root / "retrain" / "state.json").read_text())
    assert state["last_run"]["status"] == "superseded" and "last_published_at" not in state
    metrics = Metrics()
    metrics.track_retrain(versions_root / "retrain" / "state.json")
    ran = datetime.fromisoformat(result.finished_at).timestamp()
    assert (
        metric(metrics.render().decode(), "r2ec_retrain_last_run_timestamp_seconds", status="superseded")
        == ran
    )
    # no model trained on its event is served: the next run trains it from v0 and publishes
    monkeypatch.setattr(model.train, "train", real)
    again = retrain(cfg, reader)
    assert again.status == "published" and again.new_events == 0 and again.current_version == "v0"
    assert again.pruned == ["v1"] and current_version(versions_root) == again.published_version


def test_prune_keeps_the_runs_start_and_the_version_current_names_then(
    versions_root, tiny_dataset, monkeypatch
):
    import model.retrain

    _second_version(versions_root)
    real = model.retrain.prune_versions

    def rolled_back_after_the_flip(root, keep, **kwargs):
        set_current(root, "v0")
        return real(root, keep, **kwargs)

    monkeypatch.setattr(model.retrain, "prune_versions", rolled_back_after_the_flip)
    cfg = RetrainConfig(versions_root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), tolerance=1.0, keep=1)
    result = retrain(cfg, read_events=None)
    assert result.status == "published" and result.current_version == "v1" and result.pruned == []
    assert list_versions(versions_root) == ["v0", "v1", result.published_version]
    assert current_version(versions_root) == "v0"


# -- the publish gate -------------------------------------------------------------------------
def test_the_gate_pairs_the_same_users_and_allows_z_standard_errors():
    # per-user NDCG@10: candidate 1, 0, 1/log2(3), 0; current 1, 1, 0, 0
    cand, cur = np.array([1, 20, 2, 20]), np.array([1, 1, 20, 20])
    d = np.array([0.0, -1.0, 1 / np.log2(3), 0.0])  # mean -0.0923, paired s.e. 0.3372
    se = d.std(ddof=1) / 2
    ok, paired = gate(cand, cur, tolerance=0.0, z=0.0)
    assert not ok and paired["diff"] == pytest.approx(d.mean()) and paired["stderr"] == pytest.approx(se)
    assert (paired["a"], paired["b"], paired["users"]) == (pytest.approx(0.25 + d[2] / 4), 0.5, 4)
    assert gate(cand, cur, tolerance=0.0, z=0.27)[0] is False  # -0.0923 + 0.27 * 0.3372 < 0
    assert gate(cand, cur, tolerance=0.0, z=0.28)[0] is True
    assert gate(cand, cur, tolerance=0.093, z=0.0)[0] is True and gate(cand, cur, 0.092, 0.0)[0] is False
    assert gate(cur, cur, tolerance=0.0, z=0.0)[0] is True  # equal is not worse
    assert gate(cur, cur, tolerance=-0.01, z=5.0)[0] is False  # a demanded gain no s.e. can give
    ok, paired = gate(np.array([2]), np.array([1]), tolerance=0.0, z=3.0)  # one sample: s.e. 0
    assert not ok and paired["stderr"] == 0.0


def test_the_gate_counts_users_not_samples():
    # four samples of two users: the candidate is better on both of u's and worse on both of v's
    cand, cur, users = np.array([1, 1, 20, 20]), np.array([20, 20, 1, 1]), np.array(["u", "u", "v", "v"])
    _, alone = gate(cand, cur, tolerance=0.0, z=0.0)
    ok, paired = gate(cand, cur, tolerance=0.0, z=0.0, users=users)
    assert paired["diff"] == alone["diff"] == 0.0 and ok
    assert paired["stderr"] == pytest.approx(1.0) and alone["stderr"] == pytest.approx(np.sqrt(4 / 3) / 2)
    # so a demanded gain the unclustered error would grant is refused
    better = np.array([1, 1, 1, 20])  # d = 1, 1, 0, -1: mean 0.25, s.e. 0.479 by sample, 0.75 by user
    assert gate(better, cur, tolerance=-0.01, z=0.4)[0] is True
    assert gate(better, cur, tolerance=-0.01, z=0.4, users=users)[0] is False


def test_a_demanded_gain_must_clear_the_standard_errors_not_hide_in_them():
    cur, cand = np.array([1, 20, 1, 20, 20, 1, 20, 20]), np.array([20, 1, 20, 1, 20, 20, 20, 20])
    ok, paired = gate(cand, cur, tolerance=0.0, z=2.0)  # d = -0.125, se = 0.295: within noise
    assert (
        ok and paired["diff"] == pytest.approx(-0.125) and paired["stderr"] == pytest.approx(0.2950, abs=1e-4)
    )
    assert gate(cand, cur, tolerance=-0.01, z=2.0)[0] is False  # a gain is demanded: z makes it harder
    better, worse = np.array([1] * 7 + [20]), np.array([20] * 7 + [1])  # d = +0.75, se = 0.25
    assert gate(better, worse, tolerance=-0.25, z=1.9)[0] is True  # 0.75 - 1.9 * 0.25 >= 0.25
    assert gate(better, worse, tolerance=-0.25, z=2.1)[0] is False


@pytest.mark.parametrize("z", [-1.0, float("inf"), float("nan")])
def test_gate_z_must_be_a_finite_non_negative_number(tmp_path, z):
    with pytest.raises(ValueError, match="gate_z must be a finite number >= 0"):
        RetrainConfig(tmp_path, tmp_path, gate_z=z)


# -- a run with the tiny model ---------------------------------------------------------------
def test_retrain_without_a_stream_trains_on_the_dataset_and_prunes(versions_root, tiny_dataset, monkeypatch):
    import model.retrain

    scored = []  # both versions go through the path that will serve them (load_checkpoint)
    real = model.retrain.validation_ranks
    monkeypatch.setattr(model.retrain, "validation_ranks", lambda p, *a: scored.append(p.name) or real(p, *a))
    cfg = RetrainConfig(versions_root, tiny_dataset.path, RecPOConfig(**TINY_TRAIN), tolerance=1.0, keep=1)
    result = retrain(cfg, read_events=None)
    assert scored == ["v0", "best"]
    assert result.status == "published" and not result.stream and result.new_events == 0
    assert result.paired_samples == len(tiny_dataset.split("valid"))  # every valid sample, paired
    assert result.reason.startswith(
        f"ndcg@10 {result.candidate_metric:.4f} >= current {result.current_metric:.4f} - tolerance 1 "
        f"(paired on {result.paired_samples} valid samples: "
    )
    assert result.pruned == []  # keep=1, but the version the run started from stays: the rollback target
    assert sorted(p.name for p in versions_root.iterdir()) == sorted(
        ["CURRENT", "CURRENT.lock", "retrain", "v0", result.published_version]
    )
    _same_splits(load_prepared(versions_root / "retrain" / "data" / "tiny" / "loo"), tiny_dataset)
    # the published version's record holds the run's real duration, as the state does (was 0.0)
    record = json.loads((versions_root / result.published_version / "retrain.json").read_text())
    state = json.loads((versions_root / "retrain" / "state.json").read_text())
    assert record["seconds"] > 0 and record["seconds"] == state["last_run"]["seconds"] == result.seconds
    # when it ran, as the service's /metrics reads it from the shared versions root
    assert record["finished_at"] == state["last_run"]["finished_at"] == state["last_published_at"]
    metrics = Metrics()
    metrics.track_retrain(versions_root / "retrain" / "state.json")
    text = metrics.render().decode()
    at = datetime.fromisoformat(state["last_published_at"]).timestamp()
    assert abs(at - time.time()) < 600
    assert metric(text, "r2ec_retrain_last_run_timestamp_seconds", status="published") == at
    assert metric(text, "r2ec_retrain_last_published_timestamp_seconds") == at
    skipped = retrain(dataclasses.replace(cfg, min_events=10**6), FakeReader([]))
    assert skipped.status == "skipped"
    text = metrics.render().decode()
    assert metric(text, "r2ec_retrain_last_run_timestamp_seconds", status="published") is None
    ran = datetime.fromisoformat(skipped.finished_at).timestamp()
    assert metric(text, "r2ec_retrain_last_run_timestamp_seconds", status="skipped") == ran
    assert metric(text, "r2ec_retrain_last_published_timestamp_seconds") == at  # still the publish's


def test_a_run_of_a_release_before_0_2_0_exports_when_the_state_was_written(tmp_path):
    """Its state.json's last_run has no finished_at (journey 39, F3): the run's time is the file's
    last write, so R2ecRetrainNotRunning can fire after an upgrade; the next run's read keeps that
    time, so one that fails after writing the cursor does not pass for a finished run."""
    work = tmp_path / "retrain"
    work.mkdir()
    old = {"last_event_id": "after:1", "events_total": 1, "trained_events": 1}
    old["last_run"] = {"status": "published", "reason": "...", "seconds": 61.2}
    (work / "state.json").write_text(json.dumps(old))
    then = time.time() - 20 * 3600
    os.utime(work / "state.json", (then, then))
    metrics = Metrics()
    metrics.track_retrain(work / "state.json")
    ran = metric(metrics.render().decode(), "r2ec_retrain_last_run_timestamp_seconds", status="published")
    assert ran == pytest.approx(then, abs=1)
    consume_events(work, FakeReader([Ev("2", "u1", "i2", 4.0, 2)]))  # a run that fails after this
    assert (work / "state.json").stat().st_mtime > then + 3600
    state = json.loads((work / "state.json").read_text())
    assert datetime.fromisoformat(state["last_run"]["finished_at"]).timestamp() == int(then)
    ran = metric(metrics.render().decode(), "r2ec_retrain_last_run_timestamp_seconds", status="published")
    assert ran == int(then)


def test_the_state_records_its_format_and_one_newer_than_the_code_is_refused(tmp_path):
    """A future change this code could not read right is refused by name, not misread
    (journey 39, F6); a state without a format_version (before 0.2.0) reads as before."""
    from model.retrain import STATE_FORMAT, RetrainError, read_state

    work = tmp_path / "retrain"
    work.mkdir()
    (work / "state.json").write_text(json.dumps({"last_event_id": "after:0", "trained_events": 0}))
    consume_events(work, FakeReader([Ev("1", "u1", "i1", 4.0, 1)]))
    state = json.loads((work / "state.json").read_text())
    assert state["format_version"] == STATE_FORMAT == 1 and state["last_event_id"] == "after:1"
    for newer in (STATE_FORMAT + 1, "2", None):
        (work / "state.json").write_text(json.dumps({**state, "format_version": newer}))
        with pytest.raises(RetrainError, match=r"state\.json is in format .*a newer r2ec retrain wrote it"):
            read_state(work)


def test_no_retrain_state_exports_nothing(tmp_path):
    metrics = Metrics()
    metrics.track_retrain(tmp_path / "retrain" / "state.json")
    assert "r2ec_retrain" not in metrics.render().decode()
    (tmp_path / "retrain").mkdir()
    for damaged in ("{not json", "[]", "null", '{"last_run": 3, "last_published_at": []}'):
        (tmp_path / "retrain" / "state.json").write_text(damaged)
        assert "r2ec_retrain" not in metrics.render().decode()


def test_an_unchanged_model_scores_the_same_twice(versions_root, tiny_dataset):
    """The gate's two evaluations share one path, so the same weights pair to d = 0."""
    cfg = RecPOConfig(**TINY_TRAIN)
    (a, users_a), (b, users_b) = (validation_ranks(versions_root / "v0", tiny_dataset, cfg) for _ in range(2))
    assert list(users_a) == list(users_b) == list(tiny_dataset.split("valid")["user_id"].astype(str))
    ok, paired = gate(a, b, tolerance=0.0, z=0.0, users=users_a)
    assert ok and (paired["diff"], paired["stderr"], paired["users"]) == (
        0.0,
        0.0,
        len(tiny_dataset.split("valid")),
    )


def test_clear_errors(tmp_path, versions_root, tiny_dataset):
    cfg = RetrainConfig(tmp_path, tiny_dataset.path)
    with pytest.raises(CheckpointError, match="no CURRENT file.*checkpoint init"):
        retrain(cfg)
    with pytest.raises(DataError, match="does not exist"):
        retrain(RetrainConfig(versions_root, tmp_path / "missing"))
    (versions_root / "CURRENT").write_text("gone\n")
    with pytest.raises(CheckpointError, match="'gone', which is not a checkpoint"):
        retrain(RetrainConfig(versions_root, tiny_dataset.path))


def test_a_seed_an_earlier_release_prepared_is_rebuilt_under_its_own_rules(tmp_path):
    """Before 0.2.0, `data prepare` took a name such as "grp/ds" and item text holding a chat
    template's special token; data prepare refuses both now. Retrain's rebuild of such a seed
    keeps its name and makes the text plain (as the service's prompts do), instead of failing
    every run after the upgrade."""
    data = FIXTURES / "data"
    first = prepare_atomic(data / "tiny.inter", data / "tiny.item", tmp_path / "a", "tiny", protocol="loo")
    legacy = tmp_path / "a" / "grp" / "tiny" / "loo"
    legacy.parent.mkdir(parents=True)
    shutil.move(str(Path(first)), legacy)
    meta = json.loads((legacy / "meta.json").read_text())
    (legacy / "meta.json").write_text(json.dumps({**meta, "name": "grp/tiny"}))
    items = pd.read_parquet(legacy / "items.parquet")
    items.loc[0, "title"] = "Best of <|endoftext|> (1999)"
    items.to_parquet(legacy / "items.parquet")

    rebuilt, _, _ = rebuild_dataset(load_prepared(legacy), events_frame([]), tmp_path / "out")
    assert rebuilt.name == "grp/tiny"
    title = rebuilt.items.set_index("item_id").loc[items.loc[0, "item_id"], "title"]
    assert title == "Best of < |endoftext|> (1999)"
