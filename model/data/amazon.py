"""Amazon Reviews 2023 (the paper's data, arXiv 2505.16994) from local files, two recipes.

``recipe="window"`` (the default) reads the full reviews, ``<Category>.jsonl(.gz)``: one
JSON object a line with ``user_id``, ``parent_asin``, ``rating`` and ``timestamp``
(milliseconds). No k-core: the time window is rolled back from the latest interaction in
30-day steps until the interactions inside it cover >= ``min_items`` distinct items (the
whole data if they never do). Only interactions inside the window become targets; a
target's history is the latest ``max_history`` interactions of that user before it,
*including* ones before the window; every pre-window catalog item of a user is also kept as
their prior items (``prior.parquet``), which the ``seen`` evaluation mask removes.

``recipe="official"`` follows the preprocessing of the paper's official code
(``preprocess.py`` in github.com/YRYangang/RRec), re-implemented here from its rules:

- ratings: the 5-core, rating-only benchmark CSV (``benchmark/5core/rating_only/
  <Category>.csv(.gz)``), header ``user_id,parent_asin,rating,timestamp`` (milliseconds);
- items: a meta record is kept only if its title is a string without ``<span id``, which
  after decoding ``&quot;``/``&amp;`` and trimming spaces, then double quotes, at both
  ends is longer than 1 character and has at most 20 pieces when split on single spaces,
  and if its ``price`` converts to a float (a missing or null price drops the item). The
  kept title is then cleaned, in this order: HTML entities decoded, tags removed, tabs and
  newlines made spaces, runs of spaces collapsed, non-ASCII characters made spaces (so
  "Café  Kit" becomes "Caf  Kit", as in the official data);
- ratings of dropped items are dropped, before the window is chosen;
- the window is ``[start, end]`` (default 2022-10-01 to 2023-10-01, both inclusive, UTC,
  fixed end); while it covers fewer than ``min_items`` distinct items and its start year is
  later than the year of the earliest kept rating, its start moves back three calendar
  months (so it can stop short of ``min_items``);
- only ratings inside the window are kept: they are both the targets and the histories
  (no history from before the window; a user's first rating in it is never a target; a
  history is the latest ``max_history`` ratings, 20 like the official ``window_size``).
  The official code adds an optional in-window k-core that its README runs with K=0 (off);
  it is not reproduced. The split is this project's protocol (``temporal``: the official
  80/10/10 by target time; only the order of ties differs).

Meta (both recipes): ``meta_<Category>.jsonl(.gz)`` with ``parent_asin``, ``title``,
``description`` (list of str), ``features``, ``categories``, ``price``, ...
"""

from __future__ import annotations

import gzip
import html
import io
import json
import logging
import math
import os
import re
import zlib
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .build import build_prepared, check_dataset_name, check_interactions
from .dataset import DataError
from .splits import check_protocol

logger = logging.getLogger(__name__)

RECIPES = ("window", "official")
WINDOW_STEP_S = 30 * 24 * 3600
DESCRIPTION_WORDS = 100
# the official recipe (preprocess.py in YRYangang/RRec)
OFFICIAL_START, OFFICIAL_END = "2022-10-01", "2023-10-01"
OFFICIAL_STEP_MONTHS = 3
MAX_TITLE_WORDS = 20
CSV_COLUMNS = ("user_id", "parent_asin", "rating", "timestamp")
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
        # utf-8-sig: a byte-order mark before the first record is skipped, not bad JSON
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace")
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
    """Canonical interactions (item_id = parent_asin) in time order: sorted by the millisecond
    timestamp (file order on ties) before it is cut to seconds, since the dumps are not in
    time order and `build_samples` orders same-second interactions by row."""
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
            stamp = int(ms) if isinstance(ms, int) else int(float(ms))
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
    inter = pd.DataFrame({"user_id": users, "item_id": items, "rating": ratings, "timestamp_ms": stamps})
    return check_interactions(in_seconds(inter), str(path))


def in_seconds(inter: pd.DataFrame) -> pd.DataFrame:
    """`timestamp_ms` as `timestamp` in seconds, the rows first ordered by the milliseconds (file
    order on ties): once cut to seconds, same-second interactions are ordered by row."""
    inter = inter.sort_values("timestamp_ms", kind="stable").reset_index(drop=True)
    return inter.assign(timestamp=inter["timestamp_ms"] // 1000).drop(columns="timestamp_ms")


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


def read_meta(
    path: str | os.PathLike[str],
    wanted: set[str] | None = None,
    title: Callable[[dict[str, Any]], str | None] | None = None,
) -> pd.DataFrame:
    """Item table rows from a meta file, only for ``wanted`` parent_asins (all if None).

    description = the description list joined (the features list when it is empty), cut
    to 100 words; genres = ``categories`` joined with ", " (else ``main_category``).
    ``title`` (e.g. ``official_title``) maps a record to its title, or to None to leave
    the item out; by default the title field is taken as it is.
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
        name = _text(rec.get("title")) if title is None else title(rec)
        if name is None:
            continue
        description = _text(rec.get("description")) or _text(rec.get("features"))
        categories = rec.get("categories") or []
        if isinstance(categories, str):
            categories = [categories]
        genres = ", ".join(_text(c) for c in categories if _text(c)) or _text(rec.get("main_category"))
        rows[asin] = (name, "", genres, cut_words(description))
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


_TAG = re.compile(r"<[^>]+>")
_SPACE_RUN = re.compile(r" {2,}")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _official_clean(text: str) -> str:
    """The official script's text cleaning: entities decoded, ends trimmed, tags dropped,
    tabs/newlines and then runs of spaces made one space, non-ASCII characters spaces."""
    text = _TAG.sub("", html.unescape(text).strip())
    text = _SPACE_RUN.sub(" ", text.replace("\n", " ").replace("\t", " "))
    return _NON_ASCII.sub(" ", text)


def official_title(record: dict[str, Any]) -> str | None:
    """The title the official recipe keeps for a meta record, or None to drop the item.

    Drop: no string title; a title holding ``<span id``; after ``&quot;``/``&amp;`` are
    decoded and spaces, then double quotes, are trimmed from both ends, a title of more
    than ``MAX_TITLE_WORDS`` pieces split on single spaces or of at most one character;
    a ``price`` that does not convert to a float (missing, null, "$5", ...).
    """
    raw = record.get("title")
    if not isinstance(raw, str) or "<span id" in raw:
        return None
    raw = raw.replace("&quot;", '"').replace("&amp;", "&").strip(" ").strip('"')
    if len(raw) <= 1 or len(raw.split(" ")) > MAX_TITLE_WORDS:
        return None
    try:
        float(record.get("price"))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return _official_clean(raw)


def read_ratings_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A rating-only CSV (``.csv`` or ``.csv.gz``) with header user_id, parent_asin, rating,
    timestamp (ms), as user_id, item_id, rating, timestamp_ms in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        # blank lines kept as rows, then dropped, so a row's index gives its line in the file
        raw = pd.read_csv(  # utf-8-sig: a byte-order mark is not part of the first column's name
            path, dtype=str, keep_default_na=False, skip_blank_lines=False, encoding="utf-8-sig"
        )
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: empty file, expected the header {','.join(CSV_COLUMNS)}") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: unreadable CSV: {exc}") from exc
    missing = [c for c in CSV_COLUMNS if c not in raw.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; expected the header "
            f"{','.join(CSV_COLUMNS)}, got {','.join(map(str, raw.columns))}"
        )
    raw = raw[(raw.apply(lambda col: col.str.strip()) != "").any(axis=1)]  # blank lines, spaces or not
    if raw.empty:
        raise DataError(f"{path}: no ratings")
    for col in ("user_id", "parent_asin", "timestamp"):
        blank = raw[col].str.strip() == ""
        if blank.any():
            raise DataError(
                f"{path}: line {raw.index[np.argmax(blank.to_numpy())] + 2}: missing field {col!r}"
            )
    stamps = pd.to_numeric(raw["timestamp"], errors="coerce")
    ratings = pd.to_numeric(raw["rating"], errors="coerce")  # an empty rating is unknown (NaN)
    for col, bad in (
        ("timestamp", stamps.isna()),
        ("rating", ratings.isna() & (raw["rating"].str.strip() != "")),
    ):
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            raise DataError(
                f"{path}: line {raw.index[row] + 2}: {col} {raw[col].iloc[row]!r} is not a number"
            )
    logger.info("read %d ratings from %s", len(raw), path)
    return pd.DataFrame(
        {
            "user_id": raw["user_id"].to_numpy(dtype=object),
            "item_id": raw["parent_asin"].to_numpy(dtype=object),
            "rating": ratings.astype(np.float64).to_numpy(),
            "timestamp_ms": stamps.astype(np.int64).to_numpy(),
        }
    )


def _day(value: str, what: str) -> pd.Timestamp:
    try:
        return pd.Timestamp(date.fromisoformat(str(value)))
    except ValueError as exc:
        raise DataError(f"{what} {value!r} is not a date (YYYY-MM-DD)") from exc


def _ms(day: pd.Timestamp) -> int:
    return int(day.value // 1_000_000)


def official_window(
    item_ids: np.ndarray,
    timestamps_ms: np.ndarray,
    min_items: int,
    start: str = OFFICIAL_START,
    end: str = OFFICIAL_END,
    step_months: int = OFFICIAL_STEP_MONTHS,
) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The official recipe's window ``[start', end]`` (both inclusive, UTC midnights).

    ``start`` moves back ``step_months`` calendar months at a time while the ratings in
    the window hold fewer than ``min_items`` distinct items and its year is later than the
    year of the earliest rating; ``end`` never moves.
    """
    begin, stop = _day(start, "window start"), _day(end, "window end")
    if begin >= stop:
        raise DataError(f"window start {start} is not before its end {end}")
    stamps = np.asarray(timestamps_ms, dtype=np.int64)
    items = np.asarray(item_ids, dtype=object)
    first_year = pd.Timestamp(int(stamps.min()), unit="ms").year
    upto = stamps <= _ms(stop)
    # an item is in [begin, stop] iff its latest rating up to stop is at or after begin
    latest = pd.Series(stamps[upto]).groupby(items[upto]).max().to_numpy()
    while int((latest >= _ms(begin)).sum()) < min_items and begin.year > first_year:
        begin -= pd.DateOffset(months=step_months)
    return begin, stop


def _name_from(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json", ".csv"):
        name = name.removesuffix(suffix)
    return name


def _official_data(
    ratings_path: Path, meta_path: Path, min_items: int, start: str, end: str
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """The official recipe's interactions (all inside the window), its items, its source."""
    items = read_meta(meta_path, title=official_title)
    if items.empty:
        raise DataError(f"{meta_path}: no item has a short title and a price (the official filter)")
    ratings = read_ratings_csv(ratings_path)
    n_read = len(ratings)
    ratings = ratings[ratings["item_id"].isin(items["item_id"])]
    if ratings.empty:
        raise DataError(
            f"{ratings_path}: none of its {n_read} ratings is of an item kept from {meta_path.name} "
            "(a short title and a price)"
        )
    begin, stop = official_window(
        ratings["item_id"].to_numpy(), ratings["timestamp_ms"].to_numpy(), min_items, start, end
    )
    ms = ratings["timestamp_ms"]
    ratings = ratings[(ms >= _ms(begin)) & (ms <= _ms(stop))]
    if ratings.empty:
        raise DataError(f"{ratings_path}: no rating of a kept item between {begin.date()} and {stop.date()}")
    inter = in_seconds(ratings)
    logger.info(
        "official window %s..%s: %d of %d ratings, %d items",
        begin.date(), stop.date(), len(inter), n_read, inter["item_id"].nunique(),
    )  # fmt: skip
    source = {
        "window_start": _ms(begin) // 1000,
        "window_end": _ms(stop) // 1000,
        "window_start_date": begin.date().isoformat(),
        "window_end_date": stop.date().isoformat(),
        "max_title_words": MAX_TITLE_WORDS,
    }
    return check_interactions(inter, str(ratings_path)), items, source


def prepare_amazon(
    reviews_path: str | os.PathLike[str],
    meta_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    name: str | None = None,
    protocol: str = "temporal",
    min_items: int = 10_000,
    max_history: int = 20,
    recipe: str = "window",
    start: str | None = None,
    end: str | None = None,
) -> Path:
    """Prepare an Amazon Reviews 2023 category into ``<data_dir>/<name>/<protocol>/``.

    ``recipe`` (see the module docstring): "window" reads the full reviews jsonl and keeps
    pre-window histories; "official" reads the 5-core rating-only CSV as ``reviews_path``
    and follows the official preprocessing (title/price filter, the window from ``start``
    to ``end``, default 2022-10-01..2023-10-01, moved back until ``min_items``, histories
    inside it only). ``name`` defaults to the reviews file name ("All_Beauty.jsonl.gz" ->
    "All_Beauty"). The item table holds the items of every interaction inside the window
    and of every history. meta.json's ``source`` records the recipe and the window.
    Returns the output dir.
    """
    check_protocol(protocol, max_history)
    if recipe not in RECIPES:
        raise DataError(f"unknown Amazon recipe {recipe!r}; choose one of {list(RECIPES)}")
    if min_items < 1:
        raise DataError(f"min_items must be >= 1, got {min_items}")
    if recipe == "window" and (start is not None or end is not None):
        raise DataError("a window start/end date applies to the 'official' recipe only")
    reviews_path, meta_path = Path(reviews_path), Path(meta_path)
    name = check_dataset_name(name or _name_from(reviews_path))  # before the long reads
    for path in (meta_path, reviews_path) if recipe == "official" else (meta_path,):
        if not path.is_file():  # fail before the long reads
            raise DataError(f"missing file {path}")
    source: dict[str, Any] = {
        "recipe": recipe,
        "reviews": str(reviews_path.resolve()),
        "meta": str(meta_path.resolve()),
        "min_items": int(min_items),
    }
    if recipe == "official":
        inter, items, window = _official_data(
            reviews_path, meta_path, min_items, start or OFFICIAL_START, end or OFFICIAL_END
        )
        in_window = None
        source.update(window)
    else:
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
        items = read_meta(meta_path, set(inter["item_id"]))
        source.update(window_start=int(t_start), window_end=int(inter["timestamp"].max()))
    return build_prepared(
        inter,
        items,
        data_dir=data_dir,
        name=name,
        protocol=protocol,
        category="product",
        max_history=max_history,
        source=source,
        target_mask=in_window,
        keep_catalog=False,
    )
