"""The prepared form on disk: round trip, atomic writes, loading errors, stats table."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from model.data import DataError, format_stats, load_prepared, prepare_atomic
from model.data.dataset import atomic_write


@pytest.fixture
def prepared(tiny_inter, tiny_item, tmp_path):
    return prepare_atomic(tiny_inter, tiny_item, tmp_path / "data", "tiny", "loo")


def test_layout_and_no_temp_files(prepared, tmp_path):
    assert prepared == tmp_path / "data" / "tiny" / "loo"
    names = sorted(p.name for p in prepared.iterdir())
    assert names == sorted(["items.parquet", "meta.json", "train.parquet", "valid.parquet", "test.parquet"])
    meta = json.loads((prepared / "meta.json").read_text())
    assert set(meta) >= {"name", "protocol", "category", "max_history", "source", "stats",
                         "created_at"}  # fmt: skip
    assert meta["stats"]["train_samples"] == 4


def test_round_trip(prepared, tiny_inter, tiny_item, tmp_path):
    ds = load_prepared(prepared)
    assert (ds.name, ds.protocol) == ("tiny", "loo")
    row = ds.split("train").iloc[0]
    assert isinstance(row.history_item_ids, list) and isinstance(row.history_timestamps, list)
    assert isinstance(row.target_timestamp, (int,)) or row.target_timestamp.dtype.kind == "i"
    # preparing again overwrites in place and gives the same samples
    again = load_prepared(prepare_atomic(tiny_inter, tiny_item, tmp_path / "data", "tiny", "loo"))
    for name in ("train", "valid", "test"):
        pd.testing.assert_frame_equal(ds.split(name), again.split(name))
    with pytest.raises(DataError, match="unknown split 'dev'"):
        ds.split("dev")


def test_load_errors(prepared, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_prepared(tmp_path / "nowhere")
    (prepared / "valid.parquet").unlink()
    with pytest.raises(DataError, match=r"valid\.parquet"):
        load_prepared(prepared)
    (prepared / "meta.json").write_text("{broken")
    with pytest.raises(DataError, match=r"meta\.json"):
        load_prepared(prepared)
    (prepared / "meta.json").unlink()
    with pytest.raises(DataError, match=r"meta\.json"):
        load_prepared(prepared)


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_format_stats(prepared):
    text = format_stats(load_prepared(prepared).meta)
    assert "num_users" in text and "train_samples" in text and "loo" in text
    assert len({len(line) for line in text.splitlines()}) == 1  # aligned table
