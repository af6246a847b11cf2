"""An append-only log of edits beside a saved index: what changed since the last full save.

A full save (`ItemIndex.save`, index/persist.py) writes every vector, so its cost grows with
the index; an edit logged here costs one line, about the size of the edit. The caller
(service/catalog.py) saves in full now and then, which makes the log's entries part of the
saved index, and then removes the log (`remove`).

Layout: `<directory>/edits.jsonl`, one line per `append`, written in one write and flushed to
the disk (and the directory, when the write created the file) before it returns: an entry alone
is its JSON object; two or more (a batch, POST /items/batch) are ONE line,
{"batch": N, "entries": [...]}, so a batch is read whole or not at all. Logs written before
batches were one line (one entry per line) are read as they were. An entry's "vector", where it
has one, is a float32 array, stored as base64.

Crash safety: a process killed mid-append leaves at most a cut last line, which `read` skips
(it was never acknowledged: for a batch, none of its entries) and the next `append` starts after
on a line of its own; a failed write (a full disk) is cut back off before the error is raised.
Writers take turns under the directory's lock (index/persist.py `locked`); readers take none: a
line being written is not finished yet, and skipped until it is; as a batch is one line, a
reader never sees part of one.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import logging
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from index.persist import fsync_dir

logger = logging.getLogger(__name__)

JOURNAL_NAME = "edits.jsonl"
_BATCH = re.compile(rb'\{"batch": (\d+), ')  # how a batch's line starts (`_encode`)


def path_of(directory: Path) -> Path:
    return Path(directory) / JOURNAL_NAME


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
    """One line: the entry alone, or a batch of them (read whole or not at all)."""
    if len(entries) == 1:
        doc: dict[str, Any] = _jsonable(entries[0])
    else:  # "batch" first: `Counter` reads the count off the line's start
        doc = {"batch": len(entries), "entries": [_jsonable(e) for e in entries]}
    return (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")


def _decode(line: bytes) -> list[dict[str, Any]] | None:
    """A line's entries (a batch's, in order); None where it is not what `_encode` writes."""
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError):  # UnicodeDecodeError is a ValueError too
        return None
    if not isinstance(doc, dict):
        return None
    if "batch" in doc and "item_id" not in doc:
        entries = doc.get("entries")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            return None
        return [_decode_entry(e) for e in entries]
    return [_decode_entry(doc)]


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
    """Append `entries` (JSON objects; a "vector" may be a numpy array) as one line in one
    write, on the disk when this returns: a reader sees all of them or none. The caller holds
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
    does not decode is None."""
    try:
        raw = path_of(directory).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return []
    except (OSError, ValueError) as exc:
        logger.warning("edit log in %s is unreadable (%s): not applied", directory, exc)
        return []
    lines = raw.split(b"\n")
    if lines and lines[-1]:  # not finished (being written now, or cut by a kill)
        lines.pop()
    entries, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        decoded = _decode(line)
        if decoded is None:
            bad += 1
        else:
            entries.extend(decoded)
    if bad:
        logger.warning("edit log in %s: %d damaged line(s) left out", directory, bad)
    return entries


def count(directory: Path) -> int:
    """How many entries the log holds (a batch's line counts its entries; 0 where there is none)."""
    return Counter(directory)()


class Counter:
    """`count` for a caller that asks after every append (service/catalog.py, at each edit):
    it remembers the log it counted (inode, size, lines) and reads only what was appended since,
    so an edit costs its own bytes, not the whole log's (up to 1000 entries of a few kB each).
    It counts entries, not lines: a batch's line says how many it holds at its start. Only
    finished lines are counted (one being written is counted once it is). A log replaced
    (`drop_through`, another inode) or shorter than counted is counted again."""

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
        for line in tail[:done].split(b"\n"):
            if line.strip():
                batch = _BATCH.match(line) if line.endswith(b"]}") else None  # not a cut one
                entries += int(batch.group(1)) if batch else 1
        self._seen = (st.st_ino, start + done, entries)
        return entries


def drop_through(directory: Path, upto: tuple[int, int] | None) -> None:
    """Drop the entries a full save now holds: the first `upto[1]` bytes of the log `upto` is
    the stamp of (taken when the save began), where that is still the log; what was appended
    since stays, in a log written beside it and renamed over it (a kill leaves one or the
    other). The caller holds `locked(directory)`."""
    now = stamp(directory)
    if upto is None or now is None or now[0] != upto[0]:
        return
    for stale in Path(directory).glob(f".{JOURNAL_NAME}.*.tmp"):  # a killed process's: we hold the lock
        stale.unlink(missing_ok=True)
    if now[1] <= upto[1]:
        remove(directory)
        return
    path = path_of(directory)
    with open(path, "rb") as f:
        f.seek(upto[1])
        rest = f.read()
    tmp = Path(directory) / f".{JOURNAL_NAME}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(rest.lstrip(b"\n"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(Path(directory))


def remove(directory: Path) -> None:
    """Remove the log (its entries are in a full save now); the removal flushed to the disk.
    The caller holds `locked(directory)`."""
    path = path_of(directory)
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_dir(Path(directory))
