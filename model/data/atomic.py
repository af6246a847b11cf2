"""RecBole atomic files (``.inter`` + ``.item``): any dataset in that format, from a path.

Atomic format: tab-separated, UTF-8, a header row of ``name:type`` fields, e.g.
``user_id:token  item_id:token  rating:float  timestamp:float`` and
``item_id:token  movie_title:token_seq  release_year:token  class:token_seq``.
``token_seq`` values are space-separated tokens. Columns are matched by the name before
the colon; see ``ITEM_FIELDS`` for which names feed which item text field.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .build import build_prepared, check_interactions
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


def read_atomic_table(
    path: str | os.PathLike[str], required: tuple[str, ...]
) -> tuple[pd.DataFrame, dict[str, str], np.ndarray]:
    """Read one atomic file as strings.

    Returns (frame with one str column per field name, field name -> type, the 1-based
    line number of each row). Blank lines are skipped; a row with the wrong number of
    fields, a missing file or a missing required field raises DataError.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file {path}")
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        header = f.readline().rstrip("\r\n")
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
            raise DataError(
                f"{path}: header lacks required column(s) {missing}; found {names} "
                "(expected fields like 'user_id:token')"
            )
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


def read_atomic_interactions(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, bool]:
    """Canonical interactions from a ``.inter`` file, and whether it had timestamps.

    ``rating`` is optional (empty or absent -> NaN); ``timestamp`` too, in which case the
    row order stands in for time (timestamp = row index).
    """
    path = Path(path)
    frame, _, lines = read_atomic_table(path, required=("user_id", "item_id"))
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
        timestamp = np.floor(stamps).astype(np.int64)
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


def read_atomic_items(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The item table (item_id, title, year, genres, description) from a ``.item`` file."""
    path = Path(path)
    frame, types, _ = read_atomic_table(path, required=("item_id",))
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
) -> Path:
    """Prepare any RecBole atomic dataset into ``<data_dir>/<name>/<protocol>/``.

    ``item_path`` may be None (titles become "Item <id>"). The item table keeps every
    item that appears in the interactions plus every catalog item with a title.
    ``source`` overrides what meta.json records as the origin. Returns the output dir.
    """
    check_protocol(protocol, max_history)
    inter, has_time = read_atomic_interactions(inter_path)
    items = read_atomic_items(item_path) if item_path is not None else None
    logger.info("read %d interactions from %s", len(inter), inter_path)
    record = dict(source) if source else {}
    record.setdefault("inter", str(Path(inter_path).resolve()))
    record.setdefault("item", str(Path(item_path).resolve()) if item_path is not None else None)
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
