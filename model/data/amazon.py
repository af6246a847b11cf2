"""Amazon Reviews 2023 (the paper's data) from local ``<Category>.jsonl(.gz)`` files.

Reviews: one JSON object a line with ``user_id``, ``parent_asin``, ``rating`` and
``timestamp`` (milliseconds). Meta: ``meta_<Category>.jsonl(.gz)`` with ``parent_asin``,
``title``, ``description`` (list of str), ``features``, ``categories``, ...

The paper's protocol (no k-core): the time window is rolled back from the latest
interaction in 30-day steps until the interactions inside it cover >= ``min_items``
distinct items (the whole data if they never do). Only interactions inside the window
become targets; a target's history is the latest ``max_history`` interactions of that
user before it, *including* ones before the window.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .build import build_prepared, check_interactions
from .dataset import DataError
from .splits import check_protocol

logger = logging.getLogger(__name__)

WINDOW_STEP_S = 30 * 24 * 3600
DESCRIPTION_WORDS = 100
_PROGRESS_EVERY = 20_000  # lines between progress-bar refreshes


def iter_jsonl(path: str | os.PathLike[str], desc: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) from a ``.jsonl`` or ``.jsonl.gz`` file, with a byte bar.

    Blank lines are skipped; bad JSON, a non-object line or a corrupt gzip raise DataError.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file {path}")
    size = path.stat().st_size
    with (
        path.open("rb") as raw,
        tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=None, leave=False) as bar,
    ):
        stream = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace")
        lineno = 0
        try:
            for lineno, line in enumerate(text, start=1):
                if lineno % _PROGRESS_EVERY == 0:
                    bar.update(raw.tell() - bar.n)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {lineno}: bad JSON ({exc.msg})") from exc
                if not isinstance(record, dict):
                    raise DataError(f"{path}: line {lineno}: expected a JSON object")
                yield lineno, record
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: unreadable after line {lineno}: {exc}") from exc
        bar.update(size - bar.n)


def read_reviews(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Canonical interactions (timestamps ms -> s, item_id = parent_asin) in file order."""
    path = Path(path)
    users: list[str] = []
    items: list[str] = []
    ratings: list[float] = []
    stamps: list[int] = []
    for lineno, rec in iter_jsonl(path, desc=f"reviews {path.name}"):
        for key in ("user_id", "parent_asin", "timestamp"):
            if rec.get(key) in (None, ""):
                raise DataError(f"{path}: line {lineno}: missing field {key!r}")
        try:
            ms = rec["timestamp"]
            if isinstance(ms, bool):
                raise ValueError
            stamp = int(ms) // 1000 if isinstance(ms, int) else int(float(ms)) // 1000
        except (TypeError, ValueError, OverflowError) as exc:
            raise DataError(f"{path}: line {lineno}: timestamp {rec['timestamp']!r} is not a number") from exc
        rating = rec.get("rating")
        try:
            rating = float(rating) if rating is not None else math.nan
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: line {lineno}: rating {rating!r} is not a number") from exc
        users.append(str(rec["user_id"]))
        items.append(str(rec["parent_asin"]))
        ratings.append(rating)
        stamps.append(stamp)
    if not users:
        raise DataError(f"{path}: no reviews")
    logger.info("read %d reviews from %s", len(users), path)
    inter = pd.DataFrame({"user_id": users, "item_id": items, "rating": ratings, "timestamp": stamps})
    return check_interactions(inter, str(path))


def _text(value: Any) -> str:
    """Flatten a meta field (str, list of str, None) to one whitespace-normalised string."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(_text(v) for v in value if v is not None).strip()
    return " ".join(str(value).split())


def cut_words(text: str, limit: int = DESCRIPTION_WORDS) -> str:
    """The first ``limit`` whitespace-separated words of ``text``."""
    return " ".join(text.split()[:limit])


def read_meta(path: str | os.PathLike[str], wanted: set[str] | None = None) -> pd.DataFrame:
    """Item table rows from a meta file, only for ``wanted`` parent_asins (all if None).

    description = the description list joined (the features list when it is empty), cut
    to 100 words; genres = ``categories`` joined with ", " (else ``main_category``).
    """
    path = Path(path)
    rows: dict[str, tuple[str, str, str, str]] = {}
    for lineno, rec in iter_jsonl(path, desc=f"meta {path.name}"):
        asin = rec.get("parent_asin")
        if asin in (None, ""):
            raise DataError(f"{path}: line {lineno}: missing field 'parent_asin'")
        asin = str(asin)
        if (wanted is not None and asin not in wanted) or asin in rows:
            continue
        description = _text(rec.get("description")) or _text(rec.get("features"))
        categories = rec.get("categories") or []
        if isinstance(categories, str):
            categories = [categories]
        genres = ", ".join(_text(c) for c in categories if _text(c)) or _text(rec.get("main_category"))
        rows[asin] = (_text(rec.get("title")), "", genres, cut_words(description))
    logger.info("read meta for %d items from %s", len(rows), path)
    return pd.DataFrame(
        [(asin, *fields) for asin, fields in rows.items()],
        columns=["item_id", "title", "year", "genres", "description"],
    )


def window_start(
    item_ids: np.ndarray, timestamps: np.ndarray, min_items: int, step_s: int = WINDOW_STEP_S
) -> int:
    """Start of the smallest window ``[t_max - k*step_s, t_max]`` (k >= 1) holding
    interactions with >= ``min_items`` distinct items; the earliest timestamp if none does.

    An item is inside the window iff its latest interaction is, so the window must reach
    back to the ``min_items``-th latest "last seen" time.
    """
    stamps = np.asarray(timestamps, dtype=np.int64)
    t_min, t_max = int(stamps.min()), int(stamps.max())
    last_seen = pd.Series(stamps).groupby(np.asarray(item_ids, dtype=object)).max()
    if len(last_seen) < min_items:
        return t_min
    needed = int(np.sort(last_seen.to_numpy())[::-1][min_items - 1])
    steps = max(1, math.ceil((t_max - needed) / step_s))
    return max(t_min, t_max - steps * step_s)


def _name_from(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def prepare_amazon(
    reviews_path: str | os.PathLike[str],
    meta_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    name: str | None = None,
    protocol: str = "temporal",
    min_items: int = 10_000,
    max_history: int = 20,
) -> Path:
    """Prepare an Amazon Reviews 2023 category into ``<data_dir>/<name>/<protocol>/``.

    ``name`` defaults to the reviews file name ("All_Beauty.jsonl.gz" -> "All_Beauty").
    See the module docstring for the window. The item table holds the items of the
    window's interactions and of every history. Returns the output dir.
    """
    check_protocol(protocol, max_history)
    if min_items < 1:
        raise DataError(f"min_items must be >= 1, got {min_items}")
    reviews_path, meta_path = Path(reviews_path), Path(meta_path)
    if not meta_path.is_file():  # fail before the long reviews read
        raise DataError(f"missing file {meta_path}")
    inter = read_reviews(reviews_path)
    t_start = window_start(inter["item_id"].to_numpy(), inter["timestamp"].to_numpy(), min_items)
    in_window = (inter["timestamp"] >= t_start).to_numpy()
    # only users with a target in the window matter; keep all their rows for histories
    users = set(inter.loc[in_window, "user_id"])
    keep = inter["user_id"].isin(users).to_numpy()
    inter, in_window = inter[keep].reset_index(drop=True), in_window[keep]
    logger.info(
        "window starts at %d: %d of %d kept interactions inside it",
        t_start, int(in_window.sum()), len(inter),
    )  # fmt: skip
    wanted = set(inter["item_id"])
    items = read_meta(meta_path, wanted)
    return build_prepared(
        inter,
        items,
        data_dir=data_dir,
        name=name or _name_from(reviews_path),
        protocol=protocol,
        category="product",
        max_history=max_history,
        source={
            "reviews": str(reviews_path.resolve()),
            "meta": str(meta_path.resolve()),
            "min_items": int(min_items),
            "window_start": int(t_start),
            "window_end": int(inter["timestamp"].max()),
        },
        target_mask=in_window,
        keep_catalog=False,
    )
