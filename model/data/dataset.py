"""The prepared form of a dataset on disk: write it atomically, load it back, describe it.

One directory per (dataset, protocol), e.g. ``<data_dir>/ml-100k/loo/``::

    items.parquet   item_id, title, year, genres, description   (all str; "" = unknown)
    train.parquet   user_id, history_item_ids, history_ratings, history_timestamps,
    valid.parquet   target_item_id, target_rating, target_timestamp
    test.parquet    (histories oldest first; ratings may be NaN = unknown; timestamps in s)
    prior.parquet   user_id, item_ids: catalog items of a user's interactions that were kept
                    from being targets, oldest first; only where there are some (Amazon's
                    `window` recipe: before the window, where a history shows only the latest
                    max_history; a retraining rebuild: each user's first history). The `seen`
                    mask of model/evaluate.py removes them too.
    meta.json       name, protocol, category, max_history, source, source_sha256 (the raw
                    files by content), stats, created_at

The whole directory is written beside its target and renamed into place (`swap_into_place`,
as model/checkpoint.py writes a checkpoint), so a crash or a full disk while preparing again
leaves the previous preparation whole, never a mix; ``meta.json`` is written last, so a
directory with a meta file is complete.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from model.special_text import nfc

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
ITEMS_FILE = "items.parquet"
META_FILE = "meta.json"

ITEM_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("year", pa.string()),
        ("genres", pa.string()),
        ("description", pa.string()),
    ]
)
SAMPLE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("history_item_ids", pa.list_(pa.string())),
        ("history_ratings", pa.list_(pa.float64())),
        ("history_timestamps", pa.list_(pa.int64())),
        ("target_item_id", pa.string()),
        ("target_rating", pa.float64()),
        ("target_timestamp", pa.int64()),
    ]
)
PRIOR_FILE = "prior.parquet"
PRIOR_SCHEMA = pa.schema([("user_id", pa.string()), ("item_ids", pa.list_(pa.string()))])
ITEM_COLUMNS = tuple(ITEM_SCHEMA.names)
SAMPLE_COLUMNS = tuple(SAMPLE_SCHEMA.names)
_LIST_COLUMNS = ("history_item_ids", "history_ratings", "history_timestamps", "item_ids")  # as lists


class DataError(ValueError):
    """A data file is missing, malformed or yields nothing usable; the message names the file."""


@dataclass
class PreparedDataset:
    """A prepared dataset loaded from disk (see the module docstring for the layout).

    List columns of the split frames hold plain Python lists.
    """

    path: Path
    name: str
    protocol: str
    category: str
    items: pd.DataFrame
    splits: dict[str, pd.DataFrame]
    meta: dict[str, Any] = field(default_factory=dict)
    prior: dict[str, list[str]] = field(default_factory=dict)  # user -> items met before any target

    def item_titles(self) -> dict[str, str]:
        """item_id -> title for every item in the catalog."""
        return dict(zip(self.items["item_id"], self.items["title"], strict=True))

    def samples_digest(self) -> str:
        """sha256 of every split's (user, target, time) in file order: two preparations with
        the same digest hold the same samples' targets, whatever library wrote the files.
        Training records it (a checkpoint's `dataset.samples_sha256`), so `r2ec eval` can tell
        a split the model trained on from another preparation of the same name and protocol,
        e.g. one a retrain rebuilt with newer events."""
        h = hashlib.sha256()
        for name in SPLITS:
            df = self.splits[name]
            for user, target, ts in zip(
                df["user_id"], df["target_item_id"], df["target_timestamp"], strict=True
            ):
                h.update(f"{name}\t{user}\t{target}\t{ts}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict[str, str]:
        """What a checkpoint records of the data it was made from (its r2ec.json `dataset`)."""
        return {
            "name": self.name,
            "protocol": self.protocol,
            "path": str(self.path),
            "samples_sha256": self.samples_digest(),
        }

    def split(self, name: str) -> pd.DataFrame:
        """The samples of one split ("train", "valid" or "test")."""
        if name not in self.splits:
            raise DataError(f"unknown split {name!r} for {self.path}; choose one of {sorted(self.splits)}")
        return self.splits[name]


# what fsync of a directory returns where the filesystem cannot flush one (some FUSE and virtual
# filesystems; /proc here): the rename it would record has happened all the same
_NO_DIRECTORY_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename into it), to the disk. A
    directory is flushed where the filesystem can (not on Windows, which cannot open one, nor
    where fsync answers EINVAL/ENOTSUP); a file always, or OSError."""
    directory = os.path.isdir(path)
    if directory and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (directory and exc.errno in _NO_DIRECTORY_FSYNC):
            raise
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """``mkdir -p path``, each directory it makes flushed into its parent (`fsync_path`), so a
    power loss cannot drop a new directory's name while what was written into it is on the
    disk."""
    path = Path(path)
    made = []
    p = path
    while not p.exists() and p.parent != p:
        made.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for directory in reversed(made):
        fsync_path(directory.parent)


def fsync_tree(root: Path) -> None:
    """`fsync_path` every file and directory under ``root``, each directory after what it
    holds and ``root`` last: a directory written in one place and renamed into another
    (model/checkpoint.py) is on the disk whole before its new name is."""
    for parent, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(parent) / name)
        fsync_path(Path(parent))


# A temp file or directory nothing has written to for this long belongs to a process that died
# (SIGKILL, a power loss): no write of this project pauses that long. Where no lock says whether
# another process is writing a temp now, only such a stale one is removed (`remove_stale`).
STALE_TEMP_S = 3600.0


def newest_mtime(path: Path) -> float:
    """The latest modification time of `path` and, for a directory, of anything under it (a
    process writing a large file into it moves that file's time, not the directory's); 0 for
    what was removed meanwhile."""

    def mtime(p: str | Path) -> float:
        try:
            return os.lstat(p).st_mtime
        except OSError:  # removed by whoever removes the rest
            return 0.0

    newest = mtime(path)
    if os.path.isdir(path) and not os.path.islink(path):
        for parent, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                newest = max(newest, mtime(os.path.join(parent, name)))
    return newest


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree, nothing if it is gone already."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        Path(path).unlink(missing_ok=True)


def remove_stale(paths: list[Path], older_than_s: float = STALE_TEMP_S) -> list[Path]:
    """Remove each of `paths` that nothing has written to for `older_than_s` (`newest_mtime`);
    returns the ones removed."""
    now = time.time()
    stale = [p for p in paths if now - newest_mtime(p) > older_than_s]
    for p in stale:
        logger.info("removing %s, left by a write that did not finish", p)
        remove_path(p)
    return stale


def atomic_temps(path: Path) -> list[Path]:
    """The temp files `atomic_write(path, ...)` made beside `path` and that are still there
    (`.NAME.<12 hex>.tmp`): only a process killed mid-write leaves one."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{12}}\.tmp")
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    return [path.parent / name for name in names if pattern.fullmatch(name)]


def atomic_temps_under(directory: Path) -> list[Path]:
    """Every temp file `atomic_write` made anywhere under `directory` that is still there."""
    pattern = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")
    return [p for p in Path(directory).rglob(".*.tmp") if pattern.fullmatch(p.name) and p.is_file()]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file next to ``path``, then move it into place.

    A crash leaves either the old file or the new one, never half of one, and no temp file (a
    SIGKILL's is removed by a later write to ``path`` once it is stale, `STALE_TEMP_S`).
    The data is flushed to the disk before the rename and the rename after it (`fsync_path`),
    so a power loss does not leave an empty file under ``path`` either, and a caller's writes
    reach the disk in the order it makes them (retraining's event log before its cursor,
    model/retrain.py `consume_events`; a version before the CURRENT pointer naming it).
    """
    path = Path(path)
    make_dirs(path.parent)
    # a process killed mid-write left its temp file (the except below never ran); another
    # process may be writing `path` now and no lock says so, hence only stale ones (STALE_TEMP_S;
    # a caller holding a lock removes its own at once, e.g. model/retrain.py under its run lock)
    remove_stale(atomic_temps(path))
    # not mkstemp: its 0600 mode would stick to the final file
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full disk names no file, a rename the temporary one
            raise write_error(exc, path) from exc
        raise
    try:
        fsync_path(path.parent)
    except OSError as exc:
        raise write_error(exc, path.parent) from exc


# what a library that keeps no errno says of one (safetensors, tokenizers: "... (os error 28)")
_ERRNO_IN_TEXT = re.compile(r"os error (\d+)|\[errno (\d+)\]", re.IGNORECASE)
_ERRNOS_BY_TEXT = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)


def write_error(exc: BaseException, path: Path) -> OSError:
    """`exc`, raised while writing `path`, as an OSError that names `path`. pyarrow, numpy and
    a plain write name no file on a full disk, safetensors, tokenizers and torch raise their
    own types, and a write into a temporary file names that one. The errno is kept: read from
    the message where the library put it only there, or ENOSPC for a failure that gives none
    (torch: "unexpected pos 576 vs 534") on a filesystem with no space left."""
    if isinstance(exc, OSError) and exc.filename is not None and not Path(exc.filename).name.startswith("."):
        return exc
    code = getattr(exc, "errno", None)
    if not isinstance(code, int):
        text = str(exc)
        found = _ERRNO_IN_TEXT.search(text)
        if found:
            code = int(found.group(1) or found.group(2))
        else:
            code = next((c for c in _ERRNOS_BY_TEXT if os.strerror(c) in text), None)
    if code is None and _no_space_left(path):
        code = errno.ENOSPC
    if code is not None:
        return OSError(code, os.strerror(code), str(path))
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return OSError(f"could not write {path}: {type(exc).__name__}: {first}")


def _no_space_left(path: Path) -> bool:
    """Whether the filesystem `path` is on (or would be on) has no block left to write."""
    for where in (path, *path.parents):
        try:
            return os.statvfs(where).f_bavail == 0
        except OSError:
            continue
    return False


# -- a directory written beside its target and swapped into place (checkpoints, preparations) ---
def new_dir_beside(out: Path) -> Path:
    """An empty temporary directory next to `out`, made by a plain mkdir (the umask's mode):
    mkdtemp's 0700 would stay with the directory once renamed into place, readable only by
    the user who wrote it (a service running as another user could not load it)."""
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def swap_into_place(tmp: Path, out: Path) -> None:
    """Make the finished directory `tmp` the directory `out`: its files reach the disk before
    it is renamed and the rename after (`fsync_tree`), so after a power loss `out` holds no
    empty or truncated file.

    An existing `out` is swapped with `tmp` in one step where Linux can (`_exchange`: ext4,
    xfs, btrfs, tmpfs), so `out` is never missing. Elsewhere (e.g. NFS) it takes two renames,
    `out` to `.NAME.old-*` and `tmp` to `out`, and for a moment there is no `out`. A process
    that dies between the two renames leaves the old directory aside, which `recover_dir`
    restores: writers call it before they write `out` again. The caller checks that `out` may
    be replaced (model/checkpoint.py `_swap_into_place`)."""
    fsync_tree(tmp)
    if not out.exists():
        os.replace(tmp, out)
        fsync_path(out.parent)
        return
    if _exchange(tmp, out):
        old = tmp  # now holds what `out` held
    else:
        old = out.with_name(f".{out.name}.old-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}")
        os.replace(out, old)
        os.replace(tmp, out)
    fsync_path(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def asides(out: Path) -> list[Path]:
    """The copies of `out` that `swap_into_place` moved aside, oldest first: exactly
    `.NAME.old-<time in ns, 20 digits>-<6 hex>`, or `.NAME.old-<6 hex>` as saves before that
    format named them (ordered first); nothing else, however alike its name."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.old-(?:(\d{{20}})-)?[0-9a-f]{{6}}")
    found = []
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m is not None:
            found.append((int(m.group(1) or 0), p.name, p))
    return [p for *_, p in sorted(found)]


def temp_dirs(out: Path) -> list[Path]:
    """The temporary directories of writes to `out` (`new_dir_beside`: exactly
    `.NAME.tmp-<12 hex>`) that are still there: a write killed mid-way (no `finally` ran), or
    killed while removing the old copy an exchange had swapped into its temp name."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.tmp-[0-9a-f]{{12}}")
    return [p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()]


def recover_dir(out: Path | str, marker: str, *, writing: Path | None = None) -> None:
    """Undo a `swap_into_place` cut between its two renames: with `out` missing, the newest
    copy moved aside from it that is complete (holds the file `marker`) goes back; every other
    copy aside is removed, and so is every temporary directory a write to `out` killed mid-way
    left (`temp_dirs`; `writing`: the caller's own, kept). Nothing to do (the common case)
    costs one directory listing. For writers only (a reader must not move what a writer may be
    renaming): the one writer of `out` holds its path, so no other live process writes a temp
    of it."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    found = asides(out)
    if not out.exists():
        restorable = [p for p in found if (p / marker).is_file()]
        if restorable:
            back = restorable[-1]
            os.replace(back, out)
            fsync_path(out.parent)
            found.remove(back)
            logger.warning("restored %s from %s, moved aside by a save that did not finish", out, back.name)
    temps = [p for p in temp_dirs(out) if writing is None or p.name != Path(writing).name]
    for p in temps:
        logger.warning("removing %s, left by a save of %s that did not finish", p.name, out)
    for p in found + temps:
        shutil.rmtree(p, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


@functools.cache
def _renameat2() -> Any:
    """glibc's renameat2 (2.28+), or None (another C library or OS)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap the two existing paths `a` and `b` in one rename (renameat2 RENAME_EXCHANGE);
    False, and nothing moved, where the C library, the kernel or the filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    # a failed exchange moves nothing, so any error falls back to the two renames, whose own
    # errors (ENOENT, EACCES) are the ones to report
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _write_frame(df: pd.DataFrame, schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pandas(df[list(schema.names)], schema=schema, preserve_index=False)
    pq.write_table(table, path)


class Busy(DataError):
    """Another process holds the lock of what this one would write (`exclusive`)."""


@contextmanager
def exclusive(lock_file: Path, writer: str) -> Iterator[None]:
    """Hold `lock_file` (flock, exclusive) while the block runs; where another process holds
    it, Busy at once, naming `writer` (who writes there). Two writers of one directory swept
    each other's temporary directories (`recover_dir`) and killed the other mid-write."""
    make_dirs(lock_file.parent)
    with open(lock_file, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"{writer} (it holds {lock_file}): wait for it to end") from None
        yield  # released when the file closes


def save_prepared(
    out_dir: Path,
    items: pd.DataFrame,
    splits: dict[str, pd.DataFrame],
    meta: dict[str, Any],
    prior: dict[str, list[str]] | None = None,
) -> Path:
    """Write items, the three splits, the prior items when there are any, and (last)
    meta.json into a directory beside ``out_dir``, then put it in ``out_dir``'s place
    (`swap_into_place`): a preparation that fails (a full disk) or is killed leaves the one
    before it whole. ``out_dir`` may hold only a preparation (or an unfinished one)."""
    out_dir = Path(out_dir)
    make_dirs(out_dir.parent)
    with exclusive(out_dir.parent / f".{out_dir.name}.lock", f"another preparation writes {out_dir}"):
        return _save_prepared(out_dir, items, splits, meta, prior)


def _save_prepared(
    out_dir: Path,
    items: pd.DataFrame,
    splits: dict[str, pd.DataFrame],
    meta: dict[str, Any],
    prior: dict[str, list[str]] | None,
) -> Path:
    recover_dir(out_dir, META_FILE)
    _check_replaceable(out_dir)
    try:
        tmp = new_dir_beside(out_dir)
    except OSError as exc:  # a read-only volume: name the preparation, not the temporary directory
        raise write_error(exc, out_dir) from exc
    writing = out_dir  # what a failure names: the file the preparation writes, not its temporary copy
    try:
        frames = [(ITEMS_FILE, items, ITEM_SCHEMA)]
        frames += [(f"{name}.parquet", splits[name], SAMPLE_SCHEMA) for name in SPLITS]
        if prior:
            frame = pd.DataFrame({"user_id": list(prior), "item_ids": list(prior.values())})
            frames.append((PRIOR_FILE, frame, PRIOR_SCHEMA))
        for name, df, schema in frames:
            writing = out_dir / name
            _write_frame(df, schema, tmp / name)
        text = json.dumps(meta, indent=2, sort_keys=False) + "\n"
        writing = out_dir / META_FILE
        (tmp / META_FILE).write_text(text, encoding="utf-8")
        writing = out_dir
        swap_into_place(tmp, out_dir)
    except OSError as exc:
        raise write_error(exc, writing) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote prepared dataset to %s", out_dir)
    return out_dir


_PREPARED_FILES = frozenset({ITEMS_FILE, META_FILE, PRIOR_FILE, *(f"{name}.parquet" for name in SPLITS)})


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory that holds anything but a preparation's files (or their
    temporary files): the whole directory is replaced, and what else it holds would go."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a directory: not replacing it")
    other = sorted(
        p.name for p in out_dir.iterdir() if p.name not in _PREPARED_FILES and not p.name.endswith(".tmp")
    )
    if other:
        raise DataError(
            f"{out_dir} holds files that are not a prepared dataset's ({', '.join(other[:5])}): "
            "not replacing it; move them away or prepare into another --data-dir"
        )


def _read_parquet(path: Path, schema: pa.Schema) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"missing file {path}; run the data preparation again")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    missing = [c for c in schema.names if c not in table.column_names]
    if missing:
        raise DataError(f"{path} lacks columns {missing}")
    df = table.select(schema.names).to_pandas()
    for col in _LIST_COLUMNS:
        if col in df.columns:  # arrow hands back numpy arrays; give callers lists
            df[col] = table.column(col).to_pylist()
    if "history_ratings" in df.columns:  # parquet stores NaN as null: unknown is NaN again
        df["history_ratings"] = [[math.nan if r is None else r for r in rs] for rs in df["history_ratings"]]
    return df


def nfc_items(items: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """The item table with its text columns (all but item_id) in Unicode NFC
    (model/special_text.py `nfc`), and which rows that changed; the table itself where none."""
    text = [c for c in ITEM_COLUMNS if c != "item_id" and c in items.columns]
    changed = pd.Series(False, index=items.index)
    out = items
    for col in text:
        values = items[col].map(lambda v: nfc(v) if isinstance(v, str) else v)
        moved = values != items[col]
        if moved.any():
            out = out.copy() if out is items else out
            out[col] = values
            changed |= moved
    return out, changed


def load_prepared(path: str | os.PathLike[str]) -> PreparedDataset:
    """Load a directory written by one of the ``prepare_*`` functions."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"prepared dataset directory {path} does not exist; prepare it first")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        # a dataset's dir (data/ml-100k) holds one prepared dir per protocol: point at them
        inside = sorted(d.name for d in path.iterdir() if (d / META_FILE).is_file())
        if inside:
            dirs = ", ".join(f"{name}/" for name in inside)
            raise DataError(f"{path} holds the prepared {dirs}; did you mean {path / inside[0]}?")
        raise DataError(f"missing file {meta_path}; the preparation did not finish")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{meta_path}: bad JSON ({exc})") from exc
    for key in ("name", "protocol", "category"):
        if key not in meta:
            raise DataError(f"{meta_path} lacks the key {key!r}")
    items, changed = nfc_items(_read_parquet(path / ITEMS_FILE, ITEM_SCHEMA))
    if changed.any():  # prepared before text was stored in NFC
        logger.info(
            "%s: read %d item(s) in Unicode NFC (prepared before text was stored so), e.g. item %r; "
            "r2ec data prepare again stores them so",
            path, int(changed.sum()), items.loc[changed, "item_id"].iloc[0],
        )  # fmt: skip
    splits = {name: _read_parquet(path / f"{name}.parquet", SAMPLE_SCHEMA) for name in SPLITS}
    prior = {}
    if (path / PRIOR_FILE).is_file():
        table = _read_parquet(path / PRIOR_FILE, PRIOR_SCHEMA)
        prior = dict(zip(table["user_id"], table["item_ids"], strict=True))
    return PreparedDataset(
        path=path,
        name=meta["name"],
        protocol=meta["protocol"],
        category=meta["category"],
        items=items,
        splits=splits,
        meta=meta,
        prior=prior,
    )


def format_stats(meta: dict[str, Any]) -> str:
    """A small two-column table of a dataset's meta/stats, for the CLI to print."""
    stats = meta.get("stats", {})
    rows: list[tuple[str, str]] = [
        ("dataset", str(meta.get("name", "?"))),
        ("protocol", str(meta.get("protocol", "?"))),
        ("category", str(meta.get("category", "?"))),
        ("max_history", str(meta.get("max_history", "?"))),
    ]
    for key, value in stats.items():
        if isinstance(value, float):
            text = f"{value:.6f}" if key == "density" else f"{value:.2f}"
        elif isinstance(value, int):
            text = f"{value:,}"
        else:
            text = str(value)
        rows.append((key, text))
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    lines = [f"{k:<{width}}  {v:>{vwidth}}" for k, v in rows]
    rule = "-" * (width + 2 + vwidth)
    return "\n".join([rule, *lines, rule])
