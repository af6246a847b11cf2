"""What a checkpoint directory says without loading its model: which checkpoint a path stands
for (`resolve_checkpoint`), its r2ec.json (`read_meta`), the item edits saved for it
(`saved_item_edits`), and the errors that name a damaged file (`reading`). Nothing here imports
torch, so a command that only reads a checkpoint's catalog (`r2ec user import`: which items
exist) starts in moments; model/checkpoint.py, which loads and writes checkpoints, re-exports
all of it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("model.checkpoint")  # these functions' lines, as before they moved here

FORMAT = "r2ec-checkpoint"
FORMAT_VERSION = 1
META_FILE = "r2ec.json"
ITEMS_FILE = "items.parquet"
CURRENT_FILE = "CURRENT"
INDEX_DIR = "index"  # the service's item index and its record of item edits (service/catalog.py)
ITEM_FIELDS = ("title", "year", "genres", "description")  # an item's text, as the catalog keeps it
EDITS_FILE = "item_edits.json"  # a published version's item edits, carried from the one before
RESUME_STATE_FILE = "trainer_state.pt"  # what a training run's last/ holds besides (model/train.py)


def _out_of_memory() -> tuple[type[BaseException], ...]:
    """The errors that mean memory ran out, not a damaged file: torch's too where it is loaded
    (it raises its own while reading weights; not imported here)."""
    torch = sys.modules.get("torch")
    return (MemoryError,) if torch is None else (MemoryError, torch.OutOfMemoryError)


class CheckpointError(ValueError):
    """A checkpoint is missing a file or disagrees with itself."""


def _pointer(root: Path) -> str:
    name = (root / CURRENT_FILE).read_text().strip()
    if not name:
        raise CheckpointError(f"{root / CURRENT_FILE} is empty")
    return name


def resolve_checkpoint(path: Path | str) -> Path:
    """The checkpoint a path stands for.

    - a checkpoint directory (has r2ec.json): itself;
    - a versions root with a CURRENT file (what retraining publishes): the version it names;
    - a training run directory (`r2ec train --out`): its best/ checkpoint.
    """
    path = Path(path)
    if not path.exists():  # a typo, most often: not "no r2ec.json"
        raise CheckpointError(f"{path} does not exist")
    if (path / META_FILE).is_file():
        return path
    if (path / CURRENT_FILE).is_file():
        name = _pointer(path)
        if not (path / name).exists():
            raise CheckpointError(
                f"{path / CURRENT_FILE} names {name!r}, which does not exist; point it back at a "
                "version that does, as docs/operations.md says (R2ecModelOutdated)"
            )
        return resolve_checkpoint(path / name)
    if (path / "best" / META_FILE).is_file():
        return path / "best"
    raise CheckpointError(
        f"{path} is not an R²ec checkpoint: no {META_FILE}, no {CURRENT_FILE} pointer, no best/ checkpoint"
    )


def read_meta(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not an R²ec checkpoint: {META_FILE} is missing")
    with reading(meta_file, path):
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_file}: format_version {meta['format_version']} is newer than this code "
            f"understands ({FORMAT_VERSION}); upgrade r2ec-serve"
        )
    return meta


@contextmanager
def reading(file: Path, checkpoint: Path) -> Iterator[None]:
    """Any failure to read `file` of `checkpoint` as a CheckpointError that names the file and
    says what to do (`_repair_hint`). numpy, torch, safetensors, tokenizers and pyarrow each
    raise their own error for a truncated, zero-length or unreadable file, most without naming
    it, and click shows an EOFError as a bare "Aborted."."""
    try:
        yield
    except (CheckpointError, *_out_of_memory()):
        raise
    except Exception as exc:  # noqa: BLE001 (each library's own error type: all mean the same here)
        what = f"{file} is damaged or unreadable ({_reason(exc)})"
        raise CheckpointError(f"{what}; {_repair_hint(checkpoint)}") from exc


def _reason(exc: BaseException) -> str:
    """`Type: first line of the message` (torch's run to a dozen lines), at most 200 characters."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    first = first if len(first) <= 200 else first[:197] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _repair_hint(checkpoint: Path) -> str:
    """What to do about a damaged file of `checkpoint`: a published version is rolled back
    from, a training run's last/ (it holds the trainer's resume state) started over, any other
    checkpoint restored or written again."""
    root = checkpoint.parent
    if (root / CURRENT_FILE).is_file():
        return (
            f"copy a good one back, or point {root / CURRENT_FILE} at a version that loads "
            "(docs/operations.md, R2ecModelOutdated)"
        )
    if (checkpoint / RESUME_STATE_FILE).is_file():
        return "the run cannot resume from it: start it over with --overwrite"
    return "copy a good one back, or write the checkpoint again"


def saved_item_edits(path: Path | str) -> dict[str, Any]:
    """The item edits recorded for checkpoint `path`'s own version: the ones carried into it
    when it was published (EDITS_FILE) and the ones its service saved in index/index.json, the
    later one per item (a tie: the saved one), as {"catalog_edits": ..., "edit_times": ...};
    empty maps where there are none or the record is unreadable."""
    path = Path(path)
    carried = read_carried_edits(path)
    records, times = edit_maps(carried)
    try:
        version = str(read_meta(path)["version"])
    except (CheckpointError, OSError, ValueError, KeyError):
        version = None
    saved = index_edits(path / INDEX_DIR, version) if version is not None else {}
    saved_records, saved_times = edit_maps(saved)
    for item_id, record in saved_records.items():
        if saved_times[item_id] >= times.get(item_id, -1):
            records[item_id], times[item_id] = record, saved_times[item_id]
    return {"catalog_edits": records, "edit_times": times}


def read_carried_edits(path: Path | str) -> dict[str, Any]:
    """What `carry_item_edits` wrote into checkpoint `path` ({} if nothing): "from" (the
    directory name of the version they came from, beside this one), "version" (its version),
    "catalog_edits" and "edit_times"."""
    file = Path(path) / EDITS_FILE
    if not file.exists():
        return {}
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
        json.dumps(doc, ensure_ascii=False).encode("utf-8")  # a lone surrogate ("\ud800") is no text
    except (OSError, ValueError) as exc:  # UnicodeError is a ValueError
        doc = exc
    if not isinstance(doc, dict):  # the only copy once the old version is pruned: say so
        log.warning("%s is unreadable (%s); the item edits carried into %s are not applied", file, doc, path)
        return {}
    return doc


def index_edits(directory: Path, version: str) -> dict[str, Any]:
    """The edits record in <directory> for `version`: index.json's (where it was saved for
    `version`) with the entries for `version` appended to the edit log since (index/journal.py,
    `merge_logged`); {} where there is neither."""
    return index_record(directory, version)[0]


def index_record(directory: Path, version: str) -> tuple[dict[str, Any], dict[str, Mapping[str, Any]]]:
    """`index_edits`, and the edit log's entries that won in it, by item (`merge_logged`: each
    with the vector logged beside it, which service/catalog.py applies rather than encode)."""
    from index.journal import read as read_log  # faiss: only where an index is read
    from index.persist import read_metadata

    try:
        metadata = read_metadata(directory)
    except (OSError, ValueError):  # IndexMismatchError is a ValueError
        metadata = {}
    if not isinstance(metadata, dict) or metadata.get("model_version") != version:
        metadata = {}
    logged = [e for e in read_log(directory) if e.get("model_version") == version]
    return merge_logged(metadata, logged) if logged else (metadata, {})


def merge_logged(
    doc: Mapping[str, Any], entries: Iterable[Mapping[str, Any]]
) -> tuple[dict[str, Any], dict[str, Mapping[str, Any]]]:
    """A record (`doc`: an index.json's metadata) with the edit log's entries after it, each
    {"item_id", "record" (None: deleted), "time"}: for an item, the later edit wins, and of two
    as late the one logged last. Returns the merged record ("catalog_edits", "edit_times") and
    the entries that won, by item. An entry without an item id or with a damaged record is left
    out with a warning."""
    records, times = doc.get("catalog_edits"), doc.get("edit_times")
    records = dict(records) if isinstance(records, dict) else {}
    times = dict(times) if isinstance(times, dict) else {}
    won: dict[str, Mapping[str, Any]] = {}
    bad = 0
    for entry in entries:
        item_id, record = entry.get("item_id"), entry.get("record")
        if not isinstance(item_id, str) or not (record is None or _valid_record(record)):
            bad += 1
            continue
        time_ns = _edit_time(entry.get("time"))
        if item_id not in records or time_ns >= _edit_time(times.get(item_id)):
            records[item_id], times[item_id], won[item_id] = record, time_ns, entry
    if bad:
        log.warning("%d damaged item edit(s) in an edit log left out", bad)
    return {**doc, "catalog_edits": records, "edit_times": times}, won


def edit_maps(doc: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """(item_id -> record or None, item_id -> time in ns; 0 where none was kept) of a record
    (an index.json's metadata, or EDITS_FILE); empty maps where it records none."""
    records, times = doc.get("catalog_edits"), doc.get("edit_times")
    records = dict(records) if isinstance(records, dict) else {}
    times = times if isinstance(times, dict) else {}
    # a record is None (deleted) or an item's text fields with a title; any other is damage
    bad = [i for i, r in records.items() if r is not None and not _valid_record(r)]
    if bad:
        log.warning("item edits with damaged records left out: %s", ", ".join(map(repr, bad[:5])))
    # every field present, as the catalog keeps a record (a hand-written {"title": ...} too)
    records = {i: r if r is None else item_record(r) for i, r in records.items() if i not in bad}
    return records, {i: _edit_time(times.get(i)) for i in records}


def item_record(row: Mapping[str, Any]) -> dict[str, str]:
    """An item's text as the catalog keeps it: every field in ITEM_FIELDS, a string ("" where
    the row has none, or NaN)."""
    out = {}
    for key in ITEM_FIELDS:
        value = row.get(key)
        if value is None or (isinstance(value, float) and value != value):
            value = ""
        out[key] = str(value)
    return out


def _valid_record(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and set(record) <= set(ITEM_FIELDS)
        and all(isinstance(v, str) for v in record.values())
        and bool(record.get("title", "").strip())
    )


def _edit_time(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
