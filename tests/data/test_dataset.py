"""The prepared form on disk: round trip, atomic writes, loading errors, stats table."""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import time
from pathlib import Path

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
    with pytest.raises(OSError) as raised:  # named: a failed fsync names no file
        atomic_write(target, lambda tmp: tmp.write_text("newer"))
    assert (raised.value.errno, raised.value.filename) == (errno.EIO, str(target))
    assert target.read_text() == "new"


def test_a_failed_write_names_the_file_not_its_temporary_copy(tmp_path, monkeypatch):
    """A full disk: pyarrow's and a plain write's OSError name no file (the CLI printed
    "[Errno 28] No space left on device"), a failed rename names the temporary file."""
    target = tmp_path / "events.parquet"

    def full(tmp):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    with pytest.raises(OSError) as raised:
        atomic_write(target, full)
    assert str(raised.value) == f"[Errno 28] No space left on device: '{target}'"
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(errno.EROFS, "ro", a, b)))
    with pytest.raises(OSError) as raised:
        atomic_write(target, lambda tmp: tmp.write_text("x"))
    assert (raised.value.errno, raised.value.filename) == (errno.EROFS, str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file left either


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (Exception("Error while serializing: I/O error: ... (os error 28)"), errno.ENOSPC),  # safetensors
        (Exception("No space left on device"), errno.ENOSPC),  # tokenizers' bare Exception
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), None),
    ],
)
def test_a_librarys_write_error_becomes_an_oserror_with_its_errno(tmp_path, raised, code):
    error = dataset.write_error(raised, tmp_path / "last" / "adapter")
    assert error.errno == code and str(tmp_path / "last" / "adapter") in str(error)
    if code is None:  # no errno given, and space left: said as it was
        where = tmp_path / "last" / "adapter"
        assert str(error).startswith(f"could not write {where}: RuntimeError: [enforce")


def test_a_prepared_directory_is_on_the_disk_whole_before_its_name(tmp_path, fsynced):
    out = build_prepared(_inter(list("1234")), None, data_dir=tmp_path, **BUILD).resolve()
    top = tmp_path.resolve()
    made = [d for d in out.parents if d.is_relative_to(top) and d != top]
    # each directory the preparation made is named in its parent before anything is written in it
    assert fsynced[: len(made)] == [d.parent for d in reversed(made)]
    # then every file of the temporary directory beside it, that directory, and its rename
    *_, tmp, renamed = fsynced
    assert tmp.parent == out.parent and tmp.name.startswith(".loo.tmp-") and renamed == out.parent
    written = {p.relative_to(tmp) for p in fsynced[len(made) : -2]}
    assert written == {p.relative_to(out) for p in out.iterdir()}
    # no temporary directory left (the lock a preparation holds stays, empty)
    assert sorted(p.name for p in out.parent.iterdir()) == [".loo.lock", "loo"]


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


def test_a_crash_while_preparing_again_leaves_the_previous_preparation_whole(tmp_path, monkeypatch):
    out = build_prepared(_inter(list("1234")), None, data_dir=tmp_path, **BUILD)
    before = load_prepared(out)
    real = dataset.pq.write_table

    def full_disk(table, where, *args, **kwargs):
        if "valid" in str(where):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(dataset.pq, "write_table", full_disk)
    with pytest.raises(OSError, match="No space left"):
        build_prepared(_inter(list("789")), None, data_dir=tmp_path, **BUILD)
    # the new items and train split were written beside it, never over it: the old dataset
    # loads as it was, with no mix of old and new files, and nothing is left beside it
    after = load_prepared(out)
    assert after.meta == before.meta and after.items.equals(before.items)
    assert all(after.split(name).equals(before.split(name)) for name in ("train", "valid", "test"))
    assert sorted(p.name for p in out.parent.iterdir()) == [".loo.lock", "loo"]
    monkeypatch.undo()
    again = load_prepared(build_prepared(_inter(list("789")), None, data_dir=tmp_path, **BUILD))
    assert set(again.items["item_id"]) == set("789")


def test_a_preparation_cut_between_two_renames_is_restored_by_the_next(tmp_path, monkeypatch):
    """Where the filesystem cannot swap two directories (NFS), the old preparation is moved
    aside, then the new one in: a process killed in between leaves it aside, and `recover_dir`,
    which the next preparation calls first, puts it back."""
    out = build_prepared(_inter(list("1234")), None, data_dir=tmp_path, **BUILD)
    monkeypatch.setattr(dataset, "_exchange", lambda a, b: False)
    real = os.replace

    def killed(src, dst):
        if Path(dst) == out and Path(src).name.startswith(".loo.tmp-"):
            raise OSError("killed between the two renames")
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        build_prepared(_inter(list("789")), None, data_dir=tmp_path, **BUILD)
    left = sorted(p.name[:9] for p in out.parent.iterdir() if p.name != ".loo.lock")
    assert not out.exists() and left == [".loo.old-"]
    monkeypatch.setattr(os, "replace", real)
    dataset.recover_dir(out, dataset.META_FILE)
    assert set(load_prepared(out).items["item_id"]) == set("1234")
    assert sorted(p.name for p in out.parent.iterdir()) == [".loo.lock", "loo"]


def test_a_full_disk_while_preparing_names_the_file_being_written(tmp_path, monkeypatch):
    out = tmp_path / "x" / "loo"
    real = dataset.pq.write_table

    def full_disk(table, where, *args, **kwargs):
        if "valid" in str(where):
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left")
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(dataset.pq, "write_table", full_disk)
    with pytest.raises(OSError) as raised:
        build_prepared(_inter(list("1234")), None, data_dir=tmp_path, **BUILD)
    assert str(raised.value) == f"[Errno 28] No space left on device: '{out / 'valid.parquet'}'"
    assert sorted(p.name for p in out.parent.iterdir()) == [".loo.lock"]  # the lock, empty


def test_preparing_into_a_directory_that_holds_other_files_is_refused(tmp_path):
    out = tmp_path / "x" / "loo"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "train.parquet").write_text("an unfinished preparation's")
    with pytest.raises(DataError, match=r"holds files that are not a prepared dataset's \(notes.txt\)"):
        build_prepared(_inter(list("1234")), None, data_dir=tmp_path, **BUILD)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()  # an unfinished preparation alone is replaced
    assert load_prepared(build_prepared(_inter(list("1234")), None, data_dir=tmp_path, **BUILD)).name == "x"


def test_a_second_preparation_of_the_same_directory_is_refused_while_one_runs(
    tiny_inter, tiny_item, tmp_path
):
    """Two preparations into one directory swept each other's temporary copies (`recover_dir`),
    and one died naming a file that was there."""
    import fcntl

    from model.data import prepare_atomic
    from model.data.dataset import Busy

    out = tmp_path / "tiny" / "loo"
    out.parent.mkdir()
    with open(out.parent / ".loo.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(Busy, match=f"another preparation writes {out}"):
            prepare_atomic(tiny_inter, tiny_item, tmp_path, "tiny", "loo")
    assert (prepare_atomic(tiny_inter, tiny_item, tmp_path, "tiny", "loo") / "meta.json").is_file()
