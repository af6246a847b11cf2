"""Crash-safe storage of a faiss index and its json description in one directory.

Layout of a saved directory:
  index.json               the commit record: format, kind, config, dim, ntotal, id map,
                           next id, tombstones, caller metadata, and `faiss_file`/`faiss_bytes`
  index-<token>.faiss      the faiss index that json describes (faiss.write_index)

Write order: (1) faiss file under a fresh unique name, fsync; (2) json to a hidden temp name,
fsync; (3) `os.replace(temp, index.json)` — the commit point; (4) fsync the directory;
(5) delete faiss files and temp files the new json does not name. A crash before (3) leaves the
old json naming the old (untouched) faiss file; after (3) the new pair is complete. So a loader
never sees a json next to a faiss file it does not describe. Writers take turns: each holds an
exclusive lock on `<directory>/.save.lock` (`saving`) from (1) to (5), so two processes saving
into one directory (replicas on a shared volume) cannot delete the file the other's json names;
and `<directory>/.lock` (`locked`) from (2) to (5) only, the short lock that the small writes
beside the index take too (service/catalog.py: reading and appending the edit log,
index/journal.py), so they do not wait while a large faiss file is written. Lock order: the
save lock first. A faiss write failure (a full disk, a read-only volume) is raised as OSError,
like any other.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
JSON_NAME = "index.json"
_FAISS_GLOB = "index-*.faiss"
_TMP_GLOB = f".{JSON_NAME}.*.tmp"

_REQUIRED_FIELDS = (
    *("kind", "config", "dim", "ntotal", "next_id", "item_ids", "faiss_ids", "tombstones"),
    *("metadata", "faiss_file", "faiss_bytes"),
)
# faiss index type a kind must load as (after faiss.read_index's downcast)
_EXPECTED_TYPES = {"flat": "IndexIDMap2", "ivf": "IndexIVFFlat", "hnsw": "IndexIDMap2"}


class IndexMismatchError(ValueError):
    """A saved index does not match what the caller expects (dim, model_version, ...); `field`
    names what differs, where one field does, with what was `expected` and `found` there."""

    def __init__(self, message: str, field: str | None = None, expected: Any = None, found: Any = None):
        super().__init__(message)
        self.field, self.expected, self.found = field, expected, found


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename, a new or removed file) to the disk; a filesystem
    that cannot flush a directory says EINVAL, and that is no error."""
    try:
        _fsync(directory)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


LOCK_NAME = ".lock"  # the short lock: commits, the edit log (`locked`)
SAVE_LOCK_NAME = ".save.lock"  # whole saves take turns (`saving`)
_held = threading.local()  # the (directory, lock) pairs this thread holds


@contextmanager
def locked(directory: Path, name: str = LOCK_NAME) -> Iterator[None]:
    """Hold `<directory>/<name>` exclusively (flock: other processes and threads wait). Re-entrant
    within a thread, so a caller can read the saved record, merge, and save under one hold
    (service/catalog.py `Catalog._persist`): `write_index_dir` takes it again."""
    key = (os.path.realpath(directory), name)
    held = _held.__dict__.setdefault("dirs", set())
    if key in held:
        yield
        return
    if name == SAVE_LOCK_NAME and (key[0], LOCK_NAME) in held:
        raise RuntimeError(f"{directory}: take the save lock before {LOCK_NAME}, not under it (a deadlock)")
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / name, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)


def saving(directory: Path) -> contextlib.AbstractContextManager[None]:
    """Hold the save lock of `directory`: one whole save at a time (module docstring)."""
    return locked(directory, SAVE_LOCK_NAME)


def write_index_dir(directory: Path, index: faiss.Index, doc: dict[str, Any]) -> Path:
    """Save `index` + `doc` (the json body, without file fields) into `directory`."""
    check_metadata(doc)
    with saving(directory):
        return commit_index_dir(directory, write_faiss(directory, index), doc)


def check_metadata(doc: dict[str, Any]) -> None:
    try:
        json.dumps(doc["metadata"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"index metadata must be JSON-serialisable: {e}") from None


def write_faiss(directory: Path, index: faiss.Index) -> Path:
    """Step (1) without its fsync: `index` into a new file in `directory`, for
    `commit_index_dir`, which the caller calls under the same hold of `saving(directory)`."""
    faiss_path = directory / f"index-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.faiss"
    directory.mkdir(parents=True, exist_ok=True)
    try:
        faiss.write_index(index, str(faiss_path))
    except RuntimeError as e:  # faiss reports ENOSPC, EROFS, EACCES this way
        faiss_path.unlink(missing_ok=True)
        raise OSError(f"could not write {faiss_path}: {e}") from e
    except BaseException:
        faiss_path.unlink(missing_ok=True)
        raise
    return faiss_path


def commit_index_dir(directory: Path, faiss_path: Path, doc: dict[str, Any]) -> Path:
    """Steps (1, its fsync) to (5) for a faiss file `write_faiss` wrote: make it the saved index
    that `doc` describes."""
    tmp_json = directory / f".{JSON_NAME}.{faiss_path.stem.removeprefix('index-')}.tmp"
    json_path = directory / JSON_NAME
    committed = False
    try:
        _fsync(faiss_path)
        body = {**doc, "faiss_file": faiss_path.name, "faiss_bytes": faiss_path.stat().st_size}
        with locked(directory):
            with open(tmp_json, "w", encoding="utf-8") as f:
                json.dump(body, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_json, json_path)  # commit point
            committed = True
            fsync_dir(directory)  # the rename
            for stale in [*directory.glob(_FAISS_GLOB), *directory.glob(_TMP_GLOB)]:
                if stale.name != faiss_path.name:
                    stale.unlink(missing_ok=True)
    except BaseException:
        if not committed:
            for p in (tmp_json, faiss_path):
                p.unlink(missing_ok=True)
        raise
    logger.info("saved index to %s (%s, %d bytes)", directory, faiss_path.name, body["faiss_bytes"])
    return json_path


def _read_json(json_path: Path) -> dict[str, Any]:
    if not json_path.is_file():
        raise FileNotFoundError(f"index description not found: {json_path}")
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path} is not valid JSON: {e}") from None
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if version != FORMAT_VERSION:
        raise IndexMismatchError(
            f"format_version: expected {FORMAT_VERSION}, found {version!r} in {json_path}"
        )
    missing = [key for key in _REQUIRED_FIELDS if key not in doc]
    if missing:
        raise ValueError(f"{json_path} lacks field(s) {missing}: not written by ItemIndex.save")
    return doc


def read_metadata(directory: Path) -> dict[str, Any]:
    """The caller metadata a saved directory's index.json records, read without its faiss file
    (which may be missing or damaged); the same errors as a load for a missing or bad json."""
    return _read_json(directory / JSON_NAME).get("metadata", {})


def _check_expectations(
    doc: dict[str, Any], where: Path, expect_dim: int | None, expect_metadata: dict[str, Any] | None
) -> None:
    if expect_dim is not None and doc["dim"] != expect_dim:
        raise IndexMismatchError(f"dim: expected {expect_dim}, found {doc['dim']} in {where}")
    metadata = doc.get("metadata", {})
    for key, want in (expect_metadata or {}).items():
        want = json.loads(json.dumps(want))  # compare as stored: tuples became lists
        if key not in metadata:
            raise IndexMismatchError(f"{key}: expected {want!r}, found no {key!r} in {where}")
        if metadata[key] != want:
            raise IndexMismatchError(
                f"{key}: expected {want!r}, found {metadata[key]!r} in {where}", key, want, metadata[key]
            )


def _faiss_path(directory: Path, doc: dict[str, Any]) -> Path:
    name = doc.get("faiss_file")
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".faiss"):
        raise ValueError(f"{directory / JSON_NAME}: bad faiss_file entry {name!r}")
    return directory / name


def read_index_dir(
    directory: Path, expect_dim: int | None, expect_metadata: dict[str, Any] | None
) -> tuple[dict[str, Any], faiss.Index]:
    """Read and cross-check a saved directory; returns (json body, faiss index)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"index directory not found: {directory}")
    json_path = directory / JSON_NAME
    doc = _read_json(json_path)
    _check_expectations(doc, json_path, expect_dim, expect_metadata)
    faiss_path = _faiss_path(directory, doc)
    if not faiss_path.is_file():
        # a writer may have committed a new pair and deleted this file since we read the json
        doc = _read_json(json_path)
        _check_expectations(doc, json_path, expect_dim, expect_metadata)
        faiss_path = _faiss_path(directory, doc)
        if not faiss_path.is_file():
            raise FileNotFoundError(f"faiss file named by {json_path} not found: {faiss_path}")
    size = faiss_path.stat().st_size
    if size != doc["faiss_bytes"]:
        raise IndexMismatchError(f"faiss_bytes: expected {doc['faiss_bytes']}, found {size} for {faiss_path}")
    index = faiss.read_index(str(faiss_path))
    found = {
        "type": type(index).__name__,
        "dim": index.d,
        "ntotal": index.ntotal,
        "rows": len(doc["item_ids"]) + len(doc["tombstones"]),
    }
    expected = {
        "type": _EXPECTED_TYPES.get(doc["kind"]),
        "dim": doc["dim"],
        "ntotal": doc["ntotal"],
        "rows": doc["ntotal"],
    }
    for field, want in expected.items():
        if found[field] != want:
            raise IndexMismatchError(
                f"{field}: {json_path} says {want!r}, found {found[field]!r} in {faiss_path}"
            )
    if len(doc["item_ids"]) != len(doc["faiss_ids"]):
        raise ValueError(f"{json_path}: item_ids and faiss_ids differ in length")
    return doc, index
