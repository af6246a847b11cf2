"""The prepared form on disk: round trip, atomic writes, loading errors, stats table."""

from __future__ import annotations

import json
import math
import os
import stat
import time

import pandas as pd
import pytest

from model.data import DataError, dataset, format_stats, load_prepared, prepare_atomic
from model.data.build import build_prepared
from model.data.dataset import atomic_write, make_dirs


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


def test_a_temp_file_of_a_killed_write_is_removed_once_stale(tmp_path):
    """A SIGKILL mid-write runs no `except`: its `.NAME.<hex>.tmp` stays. A later write to the
    same path removes it once nothing has written to it for STALE_TEMP_S (no lock says whether
    another process is writing one now), and nothing else."""
    from model.data.dataset import STALE_TEMP_S

    target = tmp_path / "f.txt"
    dead, live = tmp_path / ".f.txt.0123456789ab.tmp", tmp_path / ".f.txt.ba9876543210.tmp"
    others = [tmp_path / ".g.txt.0123456789ab.tmp", tmp_path / ".f.txt.backup.tmp"]
    for p in [dead, live, *others]:
        p.write_text("half")
    old = time.time() - STALE_TEMP_S - 60
    for p in [dead, *others]:
        os.utime(p, (old, old))
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [target, live, *others])


def test_atomic_write_flushes_the_file_before_the_rename_and_the_rename_after(tmp_path, fsynced):
    """After a power loss the path holds the old data or all of the new, never an empty file."""
    target = tmp_path / "f.txt"
    target.write_text("old")
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"
    tmp_file, directory = fsynced
    assert tmp_file.parent == tmp_path.resolve() and tmp_file.name.startswith(".f.txt.")
    assert directory == tmp_path.resolve()


def test_a_directory_that_cannot_be_flushed_does_not_fail_a_write_that_landed(tmp_path, monkeypatch):
    """Some filesystems (FUSE, /proc) answer a directory's fsync with EINVAL: the rename has
    happened, so the write succeeds; a file's fsync failing still fails it."""
    import errno

    real = os.fsync

    def no_directory_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd)

    monkeypatch.setattr(os, "fsync", no_directory_fsync)
    target = tmp_path / "f.txt"
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O"):
        atomic_write(target, lambda tmp: tmp.write_text("newer"))
    assert target.read_text() == "new"


def test_a_prepared_directory_is_on_the_disk_its_names_first_meta_last(tmp_path, fsynced):
    out = build_prepared(_inter(list("1234")), None, data_dir=tmp_path, **BUILD).resolve()
    made = [
        d for d in (out, *out.parents) if d.is_relative_to(tmp_path.resolve()) and d != tmp_path.resolve()
    ]
    # each directory the preparation made is named in its parent before anything is written in it
    assert fsynced[: len(made)] == [d.parent for d in reversed(made)]
    *_, meta, in_dir = fsynced
    assert meta.parent == out and meta.name.startswith(".meta.json.")
    assert in_dir == out


def test_make_dirs_flushes_each_directory_it_makes_into_its_parent(tmp_path, fsynced):
    root = tmp_path.resolve()
    (root / "a").mkdir()
    make_dirs(root / "a" / "b" / "c")
    assert (root / "a" / "b" / "c").is_dir()
    assert fsynced == [root / "a", root / "a" / "b"]  # "a" was there: not flushed again
    fsynced.clear()
    make_dirs(root / "a" / "b")
    assert fsynced == []
    # and atomic_write into a new directory names it before the file's rename
    atomic_write(root / "x" / "f.txt", lambda tmp: tmp.write_text("new"))
    assert fsynced[0] == root and fsynced[-1] == root / "x"


def test_format_stats(prepared):
    text = format_stats(load_prepared(prepared).meta)
    assert "num_users" in text and "train_samples" in text and "loo" in text
    assert len({len(line) for line in text.splitlines()}) == 1  # aligned table


def _inter(items, ratings=None):
    ratings = ratings or [4.0] * len(items)
    rows = [(u, i, r, t) for u in ("a", "b") for t, (i, r) in enumerate(zip(items, ratings, strict=True))]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])


BUILD = dict(name="x", protocol="loo", category="movie", max_history=20, source={})


def test_unknown_history_ratings_load_as_nan(tmp_path):
    # parquet keeps NaN as null; a history must say unknown as the target does, with NaN
    inter = _inter(list("1234"), [math.nan, 4.0, math.nan, 2.0])
    ds = load_prepared(build_prepared(inter, None, data_dir=tmp_path, **BUILD))
    ratings = ds.split("test")["history_ratings"].iloc[0]
    assert len(ratings) == 3 and math.isnan(ratings[0]) and ratings[1] == 4.0 and math.isnan(ratings[2])


def test_a_crash_while_preparing_again_leaves_no_complete_looking_directory(tmp_path, monkeypatch):
    out = build_prepared(_inter(list("1234")), None, data_dir=tmp_path, **BUILD)
    real = dataset.pq.write_table

    def full_disk(table, where, *args, **kwargs):
        if "valid" in str(where):
            raise OSError("disk full")
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(dataset.pq, "write_table", full_disk)
    with pytest.raises(OSError, match="disk full"):
        build_prepared(_inter(list("789")), None, data_dir=tmp_path, **BUILD)
    # new items and train beside the old test split: without meta.json it does not load
    with pytest.raises(DataError, match="did not finish"):
        load_prepared(out)
