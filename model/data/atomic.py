"""RecBole atomic files (``.inter`` + ``.item``): any dataset in that format, from a path.

Atomic format: tab-separated, UTF-8, a header row of ``name:type`` fields, e.g.
``user_id:token  item_id:token  rating:float  timestamp:float`` and
``item_id:token  movie_title:token_seq  release_year:token  class:token_seq``.
``token_seq`` values are space-separated tokens. Columns are matched by the name before
the colon; see ``ITEM_FIELDS`` for which names feed which item text field.

Files are decoded strictly (UTF-8 unless told another ``encoding``): a byte the encoding
cannot read is a DataError naming the file, line and byte, never a silent U+FFFD (a Latin-1
"Amélie" used to become "Am\ufffdlie"). RecBole's ml-100k files are valid UTF-8. A UTF-8
byte-order mark (Excel's "CSV UTF-8", Notepad) is skipped: it used to stick to the first
column's name, and a file whose first column was not a required one (``title`` first in a
``.item``, ``timestamp`` first in a ``.inter``) silently lost that column. A file that starts with
a UTF-16 or UTF-32 byte-order mark is refused by name unless ``encoding`` is that family's.
"""

from __future__ import annotations

import codecs
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .build import build_prepared, check_dataset_name, check_interactions
from .dataset import DataError
from .splits import check_protocol

logger = logging.getLogger(__name__)

# item text field -> atomic field names that may hold it, first match wins
ITEM_FIELDS: dict[str, tuple[str, ...]] = {
    "title": ("movie_title", "title", "name"),
    "year": ("release_year", "year"),
    "genres": ("class", "genre", "genres", "categories"),
    "description": ("description", "desc", "overview"),
}


DEFAULT_ENCODING = "utf-8"


def check_encoding(encoding: str) -> str:
    """The codec's canonical name; an unknown one, or one that is no text encoding ("hex",
    "base64"), raises DataError."""
    try:
        "".encode(encoding)  # LookupError for a codec that is not bytes <-> text too
        return codecs.lookup(encoding).name
    except LookupError:
        raise DataError(f"unknown text encoding {encoding!r} (try utf-8, latin-1 or cp1252)") from None


# Byte-order marks of the encodings a UTF-8 reader cannot read, longest first (UTF-32 LE's starts
# with UTF-16 LE's), and the codec family each names.
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32 (little-endian)", "utf-32"),
    (codecs.BOM_UTF32_BE, "UTF-32 (big-endian)", "utf-32"),
    (codecs.BOM_UTF16_LE, "UTF-16 (little-endian)", "utf-16"),
    (codecs.BOM_UTF16_BE, "UTF-16 (big-endian)", "utf-16"),
)


def _check_wide_bom(path: Path, encoding: str) -> None:
    """DataError where `path` starts with a UTF-16 or UTF-32 byte-order mark (Excel's and
    Windows' "Unicode text") and `encoding` is not of that family: read as UTF-8 it failed at
    byte 0xff with a hint to try latin-1, and read as latin-1 its header was "ÿþi\x00t\x00..."."""
    with path.open("rb") as f:
        head = f.read(4)
    for bom, name, family in _WIDE_BOMS:
        if head.startswith(bom):
            if codecs.lookup(encoding).name.replace("_", "-").startswith(family):
                return
            raise DataError(
                f"{path}: starts with a {name} byte-order mark ({bom.hex(' ').upper()}): the file is "
                f"{family.upper()} text, not {encoding}; convert it to UTF-8 (e.g. iconv -f {family.upper()} "
                f"-t UTF-8), or pass --encoding {family} if both files are {family.upper()}"
            )


def _decode_error(path: Path, encoding: str) -> DataError:
    """Where `path` stops decoding as `encoding`: its line, the byte's offset in the file and
    in the line, and the byte. Found by decoding the file again line by line (bytes up to each
    b"\n"), which is exact for UTF-8 and every single-byte or ASCII-compatible encoding."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    offset = 0
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                decoder.decode(line)
            except UnicodeDecodeError as exc:
                at = min(max(exc.start, 0), len(line) - 1)
                return DataError(
                    f"{path}: line {lineno}, byte {at + 1} (file offset {offset + at}): 0x{line[at]:02x} "
                    f"is not valid {encoding} ({exc.reason}); pass the file's encoding "
                    "(r2ec data prepare atomic --encoding, e.g. latin-1)"
                )
            offset += len(line)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            return DataError(f"{path}: the file ends inside a {encoding} character ({exc.reason})")
    return DataError(f"{path}: not valid {encoding}")  # not reached: the first decode failed


def read_atomic_table(
    path: str | os.PathLike[str], required: tuple[str, ...], encoding: str = DEFAULT_ENCODING
) -> tuple[pd.DataFrame, dict[str, str], np.ndarray]:
    """Read one atomic file as strings, decoded strictly as `encoding`.

    Returns (frame with one str column per field name, field name -> type, the 1-based
    line number of each row). Blank lines are skipped; a row with the wrong number of
    fields, a missing file, a missing required field or a byte `encoding` cannot decode
    raises DataError.
    """
    path = Path(path)
    encoding = check_encoding(encoding)
    if not path.is_file():
        raise DataError(f"missing file {path}")
    _check_wide_bom(path, encoding)
    try:
        return _read_table(path, required, encoding)
    except UnicodeDecodeError:
        raise _decode_error(path, encoding) from None
    except UnicodeError as exc:  # a stream the codec cannot begin (UTF-16 without its BOM)
        raise DataError(f"{path}: not readable as {encoding}: {exc}") from None


def _read_table(
    path: Path, required: tuple[str, ...], encoding: str
) -> tuple[pd.DataFrame, dict[str, str], np.ndarray]:
    with path.open(encoding=encoding, errors="strict", newline="") as f:
        # a UTF-8 byte-order mark decodes to U+FEFF and would stick to the first column's name
        header = f.readline().rstrip("\r\n").removeprefix("\ufeff")
        if not header.strip():
            raise DataError(f"{path}: empty file or empty header line")
        names, types = [], {}
        for raw in header.split("\t"):
            name, _, kind = raw.strip().partition(":")
            if not name or name in types:
                raise DataError(f"{path}: line 1: bad or repeated header field {raw!r}")
            names.append(name)
            types[name] = kind or "token"
        missing = [r for r in required if r not in types]
        if missing:
            hint = "expected tab-separated fields like 'user_id:token'"
            if len(names) == 1 and "," in header:
                hint = "the file must be tab-separated (RecBole's atomic format); this header has commas"
            raise DataError(f"{path}: header lacks required column(s) {missing}; found {names} ({hint})")
        columns: list[list[str]] = [[] for _ in names]
        lines: list[int] = []
        width = len(names)
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != width:
                raise DataError(
                    f"{path}: line {lineno}: expected {width} tab-separated fields, found {len(parts)}"
                )
            for col, value in zip(columns, parts, strict=True):
                col.append(value)
            lines.append(lineno)
    frame = pd.DataFrame({name: col for name, col in zip(names, columns, strict=True)}, dtype=object)
    return frame, types, np.asarray(lines, dtype=np.int64)


def _numeric(values: pd.Series, lines: np.ndarray, path: Path, field: str, allow_empty: bool) -> np.ndarray:
    """Parse a column as float64; the first non-numeric value raises DataError with its line."""
    stripped = values.astype(str).str.strip()
    parsed = pd.to_numeric(stripped, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(parsed) & ~(stripped.str.lower() == "nan").to_numpy()
    if allow_empty:
        bad &= (stripped != "").to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: line {lines[i]}: {field} {values.iloc[i]!r} is not a number")
    return parsed


def read_atomic_interactions(
    path: str | os.PathLike[str], encoding: str = DEFAULT_ENCODING
) -> tuple[pd.DataFrame, bool]:
    """Canonical interactions from a ``.inter`` file, and whether it had timestamps.

    ``rating`` is optional (empty or absent -> NaN); ``timestamp`` too, in which case the
    row order stands in for time (timestamp = row index).
    """
    path = Path(path)
    frame, _, lines = read_atomic_table(path, required=("user_id", "item_id"), encoding=encoding)
    n = len(frame)
    if n == 0:
        raise DataError(f"{path}: no interactions")
    for key in ("user_id", "item_id"):
        empty = (frame[key].str.strip() == "").to_numpy()
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            raise DataError(f"{path}: line {lines[i]}: empty {key}")
    if "rating" in frame.columns:
        rating = _numeric(frame["rating"], lines, path, "rating", allow_empty=True)
    else:
        rating = np.full(n, np.nan)
    has_time = "timestamp" in frame.columns
    if has_time:
        stamps = _numeric(frame["timestamp"], lines, path, "timestamp", allow_empty=False)
        if not np.isfinite(stamps).all():
            i = int(np.flatnonzero(~np.isfinite(stamps))[0])
            raise DataError(f"{path}: line {lines[i]}: timestamp is not finite")
        timestamp = np.floor(stamps)  # whole seconds; checked, then cast, by check_interactions
    else:
        logger.warning("%s has no timestamp column; row order stands in for time", path)
        timestamp = np.arange(n, dtype=np.int64)
    inter = pd.DataFrame(
        {
            "user_id": frame["user_id"].str.strip(),
            "item_id": frame["item_id"].str.strip(),
            "rating": rating,
            "timestamp": timestamp,
        }
    )
    return check_interactions(inter, str(path)), has_time


def _clean_year(value: str) -> str:
    value = value.strip()
    if value.endswith(".0") and value[:-2].isdigit():  # a float-typed year column
        return value[:-2]
    return value


def read_atomic_items(path: str | os.PathLike[str], encoding: str = DEFAULT_ENCODING) -> pd.DataFrame:
    """The item table (item_id, title, year, genres, description) from a ``.item`` file."""
    path = Path(path)
    frame, types, _ = read_atomic_table(path, required=("item_id",), encoding=encoding)
    out = pd.DataFrame({"item_id": frame["item_id"].str.strip()})
    for target, candidates in ITEM_FIELDS.items():
        field = next((c for c in candidates if c in frame.columns), None)
        if field is None:
            out[target] = ""
            continue
        values = frame[field].astype(str).str.strip()
        if target == "genres" and types[field] == "token_seq":
            values = values.str.split().str.join(", ")
        elif target == "year":
            values = values.map(_clean_year)
        out[target] = values
    out = out[out["item_id"] != ""]
    logger.info("read %d items from %s", len(out), path)
    return out.reset_index(drop=True)


def prepare_atomic(
    inter_path: str | os.PathLike[str],
    item_path: str | os.PathLike[str] | None,
    data_dir: str | os.PathLike[str],
    name: str,
    protocol: str = "loo",
    max_history: int = 20,
    category: str = "item",
    source: dict[str, Any] | None = None,
    encoding: str = DEFAULT_ENCODING,
) -> Path:
    """Prepare any RecBole atomic dataset into ``<data_dir>/<name>/<protocol>/``.

    ``item_path`` may be None (titles become "Item <id>"). The item table keeps every
    item that appears in the interactions plus every catalog item with a title; an
    interacted item the ``.item`` file lacks is logged (and titled "Item <id>").
    ``source`` overrides what meta.json records as the origin. Both files are decoded
    strictly as ``encoding`` (module docstring). Returns the output dir.
    """
    check_protocol(protocol, max_history)
    check_dataset_name(name)  # before the reads
    encoding = check_encoding(encoding)
    inter, has_time = read_atomic_interactions(inter_path, encoding)
    items = read_atomic_items(item_path, encoding) if item_path is not None else None
    logger.info("read %d interactions from %s", len(inter), inter_path)
    record = dict(source) if source else {}
    record.setdefault("inter", str(Path(inter_path).resolve()))
    record.setdefault("item", str(Path(item_path).resolve()) if item_path is not None else None)
    if encoding != check_encoding(DEFAULT_ENCODING):
        record["encoding"] = encoding
    if not has_time:
        record["timestamp"] = "row order (the .inter file has no timestamp column)"
    return build_prepared(
        inter,
        items,
        data_dir=data_dir,
        name=name,
        protocol=protocol,
        category=category,
        max_history=max_history,
        source=record,
    )
