"""The edit log beside a saved index (index/journal.py): entries with vectors round-trip, a kill
mid-append or a failed write costs only the entry being written, a full save's cut keeps what
was appended after it began."""

import base64
import errno
import json
import os

import numpy as np
import pytest

from index import journal


def test_entries_and_their_vectors_round_trip(tmp_path):
    v = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    journal.append(tmp_path, [{"item_id": "a", "record": {"title": "A"}, "vector": v}])
    journal.append(tmp_path, [{"item_id": "b", "record": None, "vector": None}, {"item_id": "c"}])
    got = journal.read(tmp_path)
    assert [e["item_id"] for e in got] == ["a", "b", "c"] and journal.count(tmp_path) == 3
    np.testing.assert_array_equal(got[0]["vector"], v)
    assert got[0]["record"] == {"title": "A"} and got[1]["vector"] is None
    assert journal.read(tmp_path / "nowhere") == [] and journal.stamp(tmp_path / "nowhere") is None


def test_a_cut_line_is_skipped_and_the_next_append_starts_a_line_of_its_own(tmp_path, caplog):
    journal.append(tmp_path, [{"item_id": "a"}])
    with open(journal.path_of(tmp_path), "ab") as f:
        f.write(b'{"item_id": "cut')  # a kill mid-append
    assert [e["item_id"] for e in journal.read(tmp_path)] == ["a"]  # unfinished: not read
    journal.append(tmp_path, [{"item_id": "b"}])
    assert [e["item_id"] for e in journal.read(tmp_path)] == ["a", "b"]
    assert "1 damaged line(s) left out" in caplog.text
    with open(journal.path_of(tmp_path), "ab") as f:
        f.write(b'{"item_id": "x", "vector": "not base64!"}\n')
    assert journal.read(tmp_path)[-1] == {"item_id": "x", "vector": None}


def test_a_write_the_disk_refuses_leaves_the_log_as_it_was(tmp_path, monkeypatch):
    journal.append(tmp_path, [{"item_id": "a"}])
    before = journal.path_of(tmp_path).read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        journal.append(tmp_path, [{"item_id": "b", "vector": np.ones(4, np.float32)}])
    monkeypatch.undo()
    assert journal.path_of(tmp_path).read_bytes() == before


def test_the_cut_after_a_full_save_keeps_what_was_appended_since(tmp_path):
    """...and keeps what it cut as the previous log (the other replicas' source of vectors for
    the items the save holds), until the next cut replaces it."""
    journal.append(tmp_path, [{"item_id": "a"}, {"item_id": "b", "vector": np.ones(4, np.float32)}])
    at_save = journal.stamp(tmp_path)
    journal.append(tmp_path, [{"item_id": "c"}])  # another replica, while the save wrote
    journal.drop_through(tmp_path, at_save)
    assert [e["item_id"] for e in journal.read(tmp_path)] == ["c"]
    previous = journal.read_previous(tmp_path)
    assert [e["item_id"] for e in previous] == ["a", "b"] and previous[1]["vector"].tolist() == [1.0] * 4
    journal.drop_through(tmp_path, at_save)  # another log now (its inode): left alone
    assert [e["item_id"] for e in journal.read(tmp_path)] == ["c"]
    assert [e["item_id"] for e in journal.read_previous(tmp_path)] == ["a", "b"]
    journal.drop_through(tmp_path, journal.stamp(tmp_path))  # all of it: no log
    assert not journal.path_of(tmp_path).exists()
    assert [e["item_id"] for e in journal.read_previous(tmp_path)] == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [journal.PREVIOUS_NAME]  # no temp file left


def test_a_kill_while_the_cut_writes_the_previous_log_leaves_the_log_whole(tmp_path, monkeypatch):
    """The previous log is written (beside, renamed over) before the log is cut: a kill while
    it is written leaves the log as it was, and the next cut clears the killed one's file."""
    journal.append(tmp_path, [{"item_id": "a"}, {"item_id": "b"}])
    at_save = journal.stamp(tmp_path)
    journal.append(tmp_path, [{"item_id": "c"}])
    before = journal.path_of(tmp_path).read_bytes()

    def killed(src, dst):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        journal.drop_through(tmp_path, at_save)
    monkeypatch.undo()
    assert journal.path_of(tmp_path).read_bytes() == before and journal.read_previous(tmp_path) == []
    (tmp_path / f".{journal.PREVIOUS_NAME}.dead0000.tmp").write_bytes(b"half")  # a kill -9's
    journal.drop_through(tmp_path, at_save)
    assert [e["item_id"] for e in journal.read(tmp_path)] == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [journal.JOURNAL_NAME, journal.PREVIOUS_NAME]


def test_a_kill_between_the_two_renames_leaves_the_cut_entries_in_both_logs(tmp_path, monkeypatch):
    """The order the previous test names, where it shows: killed after the first rename of the
    cut (the previous log written) and before the second (the log cut), the entries cut are in
    both files, never in neither (index.json holds no vectors: the other replicas would encode
    them). The test before it kills at the first rename, which leaves the log whole in either
    order."""
    journal.append(tmp_path, [{"item_id": "a"}, {"item_id": "b"}])
    at_save = journal.stamp(tmp_path)
    journal.append(tmp_path, [{"item_id": "c"}])
    before = journal.path_of(tmp_path).read_bytes()
    renames = []
    replace = os.replace

    def killed_at_the_second(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise KeyboardInterrupt("killed")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        journal.drop_through(tmp_path, at_save)
    monkeypatch.undo()
    assert journal.path_of(tmp_path).read_bytes() == before  # the log, whole
    assert [e["item_id"] for e in journal.read_previous(tmp_path)] == ["a", "b"]


def test_the_counter_reads_what_was_appended_since_and_follows_a_replaced_log(tmp_path, monkeypatch):
    """journal.Counter (asked at every item edit) agrees with a whole count through appends, a
    full save's cut (a new file), a removal and a log started again; it reads only the bytes
    appended since its last count."""
    counter = journal.Counter(tmp_path)
    assert counter() == 0
    journal.append(tmp_path, [{"item_id": "a"}, {"item_id": "b"}])
    assert counter() == 2
    cut = journal.stamp(tmp_path)
    journal.append(tmp_path, [{"item_id": "c"}])
    reads = []

    def spying_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        real_read = f.read
        f.read = lambda n=-1: reads.append(n) or real_read(n)
        return f

    monkeypatch.setattr(journal, "open", spying_open, raising=False)  # the module's `open` only
    assert counter() == 3
    monkeypatch.undo()
    assert reads == [len(b'{"item_id": "c"}\n')]  # the new entry's bytes, not the whole log
    journal.drop_through(tmp_path, cut)  # "a" and "b" are in the saved index now: a new file
    assert counter() == journal.count(tmp_path) == 1
    journal.remove(tmp_path)
    assert counter() == 0
    journal.append(tmp_path, [{"item_id": "d"}])
    assert counter() == journal.count(tmp_path) == 1


def test_a_batch_is_a_line_per_entry_that_a_reader_sees_whole_or_not_at_all(tmp_path, caplog):
    """Review 40 (sync), #1: a batch is a line per entry, each tagged with the batch's id and
    size, written in one write. While it is being written a reader of this build sees none of
    it, then all of it; a batch cut by a kill is skipped once later lines follow it, and never
    holds them back. The counter counts entries (lines)."""
    v = np.arange(8, dtype=np.float32)
    journal.append(tmp_path, [{"item_id": "a"}])
    batch = [{"item_id": f"b{n}", "record": {"title": f"B{n}"}, "vector": v} for n in range(50)]
    data = journal._encode(batch)
    lines = data.split(b"\n")[:-1]
    assert len(lines) == 50 and data.endswith(b"\n")
    tags = {(json.loads(line)["batch"], json.loads(line)["of"]) for line in lines}
    assert len(tags) == 1 and next(iter(tags))[1] == 50
    counter = journal.Counter(tmp_path)
    assert counter() == 1
    path = journal.path_of(tmp_path)
    written = 0
    ends = [data.index(b"\n") + 1, len(data) // 2, len(data) - 2]  # a whole first line, half, all but the end
    with open(path, "ab") as f:
        for cut in ends:  # a write under way, seen at three points
            f.write(data[written:cut])
            f.flush()
            written = cut
            assert [e["item_id"] for e in journal.read(tmp_path)] == ["a"], cut
    assert "incomplete" not in caplog.text  # held back at the end: no warning
    journal.append(tmp_path, [{"item_id": "c"}])  # after the cut batch (a kill): it is skipped
    assert [e["item_id"] for e in journal.read(tmp_path)] == ["a", "c"]
    assert "1 incomplete batch(es) left out" in caplog.text
    journal.append(tmp_path, batch)
    got = journal.read(tmp_path)
    assert [e["item_id"] for e in got] == ["a", "c", *(f"b{n}" for n in range(50))]
    np.testing.assert_array_equal(got[-1]["vector"], v)
    assert counter() == journal.count(tmp_path) == 2 + 49 + 1 + 50  # the cut batch's lines count


def test_a_batch_cut_right_after_a_whole_line_is_skipped_too(tmp_path):
    """A kill that cut a batch exactly at a line's end leaves whole lines of it, no damaged
    one: the next entries still end it, and another batch right after it is read whole."""
    data = journal._encode([{"item_id": f"b{n}"} for n in range(4)])
    journal.path_of(tmp_path).write_bytes(data[: data.index(b"\n") + 1])  # 1 of its 4 lines
    assert journal.read(tmp_path) == []
    journal.append(tmp_path, [{"item_id": "x"}, {"item_id": "y"}])
    assert [e["item_id"] for e in journal.read(tmp_path)] == ["x", "y"]


def test_an_older_release_reads_each_entry_of_a_batch_as_an_entry_of_its_own(tmp_path):
    """A release before batches were tagged (2d388f0) decodes the log a line at a time, each a
    JSON object with its model_version, item_id, record, time and vector: a batch is read as
    its N entries, not ignored (and then cut off by that release's full save)."""
    v = np.ones(4, np.float32)
    batch = [
        {"model_version": "v1", "item_id": f"b{n}", "record": {"title": f"B{n}"}, "time": n + 1, "vector": v}
        for n in range(3)
    ]
    journal.append(tmp_path, batch)
    old_read = []  # 2d388f0's read: json.loads per finished line, a dict is an entry
    for line in journal.path_of(tmp_path).read_bytes().split(b"\n")[:-1]:
        entry = json.loads(line)
        assert isinstance(entry, dict)
        old_read.append(entry)
    assert [e["item_id"] for e in old_read] == ["b0", "b1", "b2"]
    for n, entry in enumerate(old_read):
        assert entry["model_version"] == "v1" and entry["time"] == n + 1
        assert entry["record"] == {"title": f"B{n}"}
        raw = base64.b64decode(entry["vector"])
        np.testing.assert_array_equal(np.frombuffer(raw, "<f4"), v)


def test_the_unreleased_one_line_batch_is_left_out_as_damaged(tmp_path, caplog):
    """The form only unreleased builds wrote ({"batch": N, "entries": [...]}) is not read."""
    line = json.dumps({"batch": 2, "entries": [{"item_id": "a"}, {"item_id": "b"}]}).encode()
    journal.path_of(tmp_path).write_bytes(line + b"\n")
    journal.append(tmp_path, [{"item_id": "c"}])
    assert [e["item_id"] for e in journal.read(tmp_path)] == ["c"]
    assert "1 damaged line(s) left out" in caplog.text


def test_a_log_written_one_entry_a_line_reads_as_before(tmp_path):
    """Logs written before batches were one line (a line per entry) keep their meaning."""
    lines = [b'{"item_id": "a", "record": {"title": "A"}, "time": 1}', b'{"item_id": "b", "record": null}']
    journal.path_of(tmp_path).write_bytes(b"\n".join(lines) + b"\n")
    assert [e["item_id"] for e in journal.read(tmp_path)] == ["a", "b"]
    assert journal.count(tmp_path) == 2
    journal.append(tmp_path, [{"item_id": "c"}, {"item_id": "d"}])
    assert [e["item_id"] for e in journal.read(tmp_path)] == ["a", "b", "c", "d"]
    assert journal.count(tmp_path) == 4


def test_a_reader_never_sees_part_of_a_batch_while_another_thread_appends(tmp_path):
    """The review's repro, smaller: a reader looping beside a writer of large batches only ever
    counts whole batches."""
    import threading

    v = np.ones(576, np.float32)
    batch = [{"item_id": f"i{n}", "record": {"title": "t"}, "vector": v} for n in range(300)]
    done, seen = threading.Event(), set()

    def write():
        for _ in range(8):
            journal.append(tmp_path, batch)
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    while not done.is_set():
        seen.add(len(journal.read(tmp_path)))
    writer.join()
    seen.add(len(journal.read(tmp_path)))
    assert {n % 300 for n in seen} == {0} and max(seen) == 2400
