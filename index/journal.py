"""An append-only log of edits beside a saved index: what changed since the last full save.

A full save (`ItemIndex.save`, index/persist.py) writes every vector, so its cost grows with
the index; an edit logged here costs one line, about the size of the edit. The caller
(service/catalog.py) saves in full now and then, which makes the log's entries part of the
saved index, and then cuts them out of the log (`drop_through`).

Layout: `<directory>/edits.jsonl`, one JSON object per entry, one entry per line, as every
release wrote it. An `append` of two or more entries (a batch, POST /items:batch) tags each with
the batch's id and size, `"batch": "<uuid hex>", "of": N`, and writes all N lines in one write,
flushed to the disk (and the directory, when the write created the file) before it returns.
A reader of this build applies a batch only once all N of its lines are there: an incomplete
batch at the log's end is held back (it is being written), and an incomplete batch followed by
other lines is skipped with a warning (a kill cut it mid-write: it was never acknowledged, and
it must not hold back the entries after it). A release before batches were tagged reads each
line as an entry of its own, the batch's too: during a rolling upgrade such a replica may apply
part of a batch for a moment (while it is being written), and never loses one. (A form written
only by unreleased builds, a batch as ONE line `{"batch": N, "entries": [...]}`, is no longer
read: such a line is left out as damaged, with a warning.) An entry's "vector", where it has
one, is a float32 array, stored as base64.

A full save takes the entries it holds out of the log (`drop_through`) and keeps them in
`<directory>/edits.prev.jsonl`, the previous log, until the next full save replaces it: the
other replicas read the saved record then (index.json holds no vectors), and take the vectors
of this model version's items from there instead of encoding them again
(service/catalog.py `Catalog._vectors_of`). Nothing else reads it: it is no part of the record,
and a release before it leaves it alone. Readers take no lock here either: it is replaced by a
rename, never written in place.

Crash safety: a process killed mid-append leaves at most a cut last line, which `read` skips
(it was never acknowledged: for a batch, none of its entries, as the batch is then incomplete)
and the next `append` starts after on a line of its own; a failed write (a full disk) is cut
back off before the error is raised. Writers take turns under the directory's lock
(index/persist.py `locked`); readers take none: a line being written is not finished yet, and
skipped until it is, and a batch whose lines are not all there yet is held back.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from index.persist import fsync_dir

logger = logging.getLogger(__name__)

JOURNAL_NAME = "edits.jsonl"
PREVIOUS_NAME = "edits.prev.jsonl"  # what the last full save took out of the log (`drop_through`)


def path_of(directory: Path) -> Path:
    return Path(directory) / JOURNAL_NAME


def previous_of(directory: Path) -> Path:
    return Path(directory) / PREVIOUS_NAME


def stamp(directory: Path) -> tuple[int, int] | None:
    """Which log is there and how far it goes (inode, size); None: none."""
    try:
        st = os.stat(path_of(directory))
    except (OSError, ValueError):  # ValueError: a path no filesystem has (a NUL byte)
        return None
    return st.st_ino, st.st_size


def _jsonable(entry: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(entry)
    vector = out.get("vector")
    if vector is not None:
        a = np.ascontiguousarray(vector, dtype="<f4").reshape(-1)
        out["vector"] = base64.b64encode(a.tobytes()).decode("ascii")
    return out


def _encode(entries: Sequence[Mapping[str, Any]]) -> bytes:
    """A line per entry; two or more (a batch) each tagged with the batch's id and size."""
    if len(entries) == 1:
        docs = [_jsonable(entries[0])]
    else:
        batch = uuid.uuid4().hex
        docs = [{**_jsonable(e), "batch": batch, "of": len(entries)} for e in entries]
    return b"".join((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8") for d in docs)


def _decode(line: bytes) -> dict[str, Any] | None:
    """A line's entry; None where it is not what `_encode` writes (an object with an item_id)."""
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError):  # UnicodeDecodeError is a ValueError too
        return None
    if not isinstance(doc, dict) or "item_id" not in doc:
        return None
    return _decode_entry(doc)


def _batch_of(entry: Mapping[str, Any]) -> tuple[str, int] | None:
    """(id, size) of the batch an entry is part of; None: an entry alone."""
    batch, of = entry.get("batch"), entry.get("of")
    if isinstance(batch, str) and isinstance(of, int) and not isinstance(of, bool) and of > 1:
        return batch, of
    return None


def _decode_entry(entry: dict[str, Any]) -> dict[str, Any]:
    vector = entry.get("vector")
    if vector is not None:
        entry["vector"] = None
        try:
            raw = base64.b64decode(vector, validate=True) if isinstance(vector, str) else b""
        except (binascii.Error, ValueError):
            raw = b""
        if raw and len(raw) % 4 == 0:
            entry["vector"] = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return entry


def append(directory: Path, entries: Sequence[Mapping[str, Any]]) -> None:
    """Append `entries` (JSON objects; a "vector" may be a numpy array), a line each, in one
    write, on the disk when this returns; two or more are a batch, which a reader of this
    build applies whole or not at all (module docstring). The caller holds
    `locked(directory)`; OSError where the volume refuses the write, with nothing of it left in
    the log."""
    if not entries:
        return
    data = _encode(entries)
    path = path_of(directory)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a cut line: a process killed mid-append
            data = b"\n" + data
        try:
            written = os.write(fd, data)
            if written != len(data):  # a short write: the disk filled up
                raise OSError(errno.ENOSPC, f"wrote {written} of {len(data)} bytes to {path}")
            os.fsync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, size)  # leave the log as it was
            except OSError:
                pass
            raise
    finally:
        os.close(fd)
    if created:  # the new file's name, flushed into the directory
        fsync_dir(Path(directory))


def read(directory: Path) -> list[dict[str, Any]]:
    """The log's entries in the order they were written ([] where there is none); a line that
    is not a JSON object (cut by a kill, or damaged) is left out with a warning, a vector that
    does not decode is None. A batch's entries are there once all its lines are: an incomplete
    batch at the end is left out (being written), one followed by other lines is left out with
    a warning (cut by a kill, never acknowledged)."""
    return _read(path_of(directory), "edit log")


def read_previous(directory: Path) -> list[dict[str, Any]]:
    """The entries the last full save took out of the log (`drop_through`), as `read` gives
    them; [] where there are none. Only a source of vectors (module docstring): what they record
    is in index.json."""
    return _read(previous_of(directory), "previous edit log")


def _read(path: Path, what: str) -> list[dict[str, Any]]:
    directory = path.parent
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return []
    except (OSError, ValueError) as exc:
        logger.warning("%s in %s is unreadable (%s): not applied", what, directory, exc)
        return []
    lines = raw.split(b"\n")
    if lines and lines[-1]:  # not finished (being written now, or cut by a kill)
        lines.pop()
    entries: list[dict[str, Any]] = []
    group: list[dict[str, Any]] = []  # the lines of the batch being read
    bad = cut = 0
    for line in lines:
        if not line.strip():
            continue
        entry = _decode(line)
        if entry is None:
            bad += 1
            continue
        batch = _batch_of(entry)
        if group and (batch is None or batch[0] != group[0]["batch"]):
            cut += 1  # another line after an incomplete batch: a kill cut it
            group = []
        if batch is None:
            entries.append(entry)
            continue
        group.append(entry)
        if len(group) >= batch[1]:
            entries.extend(group)
            group = []
    if bad:
        logger.warning("%s in %s: %d damaged line(s) left out", what, directory, bad)
    if cut:
        logger.warning("%s in %s: %d incomplete batch(es) left out (cut by a kill)", what, directory, cut)
    return entries


def count(directory: Path) -> int:
    """How many entries the log holds (lines; 0 where there is none)."""
    return Counter(directory)()


class Counter:
    """`count` for a caller that asks after every append (service/catalog.py, at each edit):
    it remembers the log it counted (inode, size, lines) and reads only what was appended since,
    so an edit costs its own bytes, not the whole log's (up to 1000 entries of a few kB each).
    It counts finished lines, an entry each (a batch's lines too; a damaged or cut line counts
    as one, so a save may come a little early). A log replaced (`drop_through`, another inode)
    or shorter than counted is counted again."""

    def __init__(self, directory: Path) -> None:
        self._path = path_of(directory)
        self._seen: tuple[int, int, int] | None = None  # inode, size counted, entries

    def __call__(self) -> int:
        try:
            with open(self._path, "rb") as f:
                st = os.fstat(f.fileno())
                start, entries = 0, 0
                if self._seen is not None and self._seen[0] == st.st_ino and self._seen[1] <= st.st_size:
                    start, entries = self._seen[1], self._seen[2]
                f.seek(start)
                tail = f.read(st.st_size - start)
        except OSError:
            self._seen = None
            return 0
        done = tail.rfind(b"\n") + 1  # the finished lines
        entries += sum(1 for line in tail[:done].split(b"\n") if line.strip())
        self._seen = (st.st_ino, start + done, entries)
        return entries


def drop_through(directory: Path, upto: tuple[int, int] | None) -> None:
    """Drop the entries a full save now holds: the first `upto[1]` bytes of the log `upto` is
    the stamp of (taken when the save began), where that is still the log; what was appended
    since stays, in a log written beside it and renamed over it (a kill leaves one or the
    other). The entries dropped become the previous log (`read_previous`): the whole log renamed
    to it, or the dropped part written beside it and renamed over it, before the log is cut (a
    kill in between leaves them in both). The caller holds `locked(directory)`."""
    now = stamp(directory)
    if upto is None or now is None or now[0] != upto[0]:
        return
    for name in (JOURNAL_NAME, PREVIOUS_NAME):  # a killed process's: we hold the lock
        for stale in Path(directory).glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    path = path_of(directory)
    if now[1] <= upto[1]:
        os.replace(path, previous_of(directory))  # one rename: the log, or the previous one
        fsync_dir(Path(directory))
        return
    with open(path, "rb") as f:
        dropped = f.read(upto[1])
        rest = f.read()
    _write_over(previous_of(directory), dropped)
    _write_over(path, rest.lstrip(b"\n"))
    fsync_dir(Path(directory))


def _write_over(path: Path, data: bytes) -> None:
    """`data` into a file beside `path`, flushed, renamed over `path` (the caller flushes the
    directory)."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove(directory: Path) -> None:
    """Remove the log (its entries are in a full save now); the removal flushed to the disk.
    The caller holds `locked(directory)`."""
    path = path_of(directory)
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_dir(Path(directory))
