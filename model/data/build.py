"""Shared last step of every source: catalog, splits, stats, atomic write."""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model.special_text import BIDI_RE, SHOWN_FIELDS, SpecialText, check_shown_text, one_line, strip_bidi

from .dataset import ITEM_COLUMNS, SPLITS, DataError, nfc_items, save_prepared
from .splits import check_protocol, make_splits

logger = logging.getLogger(__name__)


# What the service takes in a request or an event (service/schemas.py), so what training reads
# and what retraining later adds from the service are on one scale: ratings from 0 to 10 (or
# none), times in Unix seconds before 2100-01-01 (a time in milliseconds is refused, not stored:
# read as seconds it would sort every seed event after the service's, and retraining would never
# take a new event as a target).
RATING_RANGE = (0.0, 10.0)
MAX_TIMESTAMP_S = 4_102_444_800


def check_interactions(inter: pd.DataFrame, origin: str) -> pd.DataFrame:
    """Coerce canonical interaction dtypes and check the values (`RATING_RANGE`,
    `MAX_TIMESTAMP_S`), naming ``origin`` and the first bad row's user and item in a DataError;
    rows that repeat another exactly (user, item, rating and time) are dropped, with a warning:
    the service stores a repeated event once too (its default event id is that tuple)."""
    if inter.empty:
        raise DataError(f"{origin}: no interactions")
    # checked as read, before the cast to int64 (1e19 would wrap to a time before 1970)
    out = pd.DataFrame(
        {
            "user_id": inter["user_id"].astype(str).to_numpy(dtype=object),
            "item_id": inter["item_id"].astype(str).to_numpy(dtype=object),
            "rating": inter["rating"].astype(np.float64).to_numpy(),
            "timestamp": inter["timestamp"].to_numpy(),
        }
    )
    low, high = RATING_RANGE
    rating, stamps = out["rating"].to_numpy(), out["timestamp"].to_numpy(dtype=np.float64)
    checks = (
        (~np.isnan(rating) & ~((rating >= low) & (rating <= high)), f"is outside {low:g}-{high:g}", "rating"),
        (stamps < 0, "is before 1970", "timestamp"),
        (stamps > MAX_TIMESTAMP_S, "is after 2100: milliseconds? give Unix seconds (/ 1000)", "timestamp"),
    )
    for bad, why, column in checks:
        if bad.any():
            row = out.iloc[int(np.flatnonzero(bad)[0])]
            where = f"user {row['user_id']!r}, item {row['item_id']!r}"
            value, count = row[column].item(), int(bad.sum())
            value = int(value) if isinstance(value, float) and value.is_integer() else value
            raise DataError(f"{origin}: {column} {value!r} ({where}) {why}; {count} such row(s)")
    out["timestamp"] = out["timestamp"].astype(np.int64)
    repeated = out.duplicated(keep="first").to_numpy()
    if repeated.any():
        logger.warning(
            "%s: %d row(s) repeat an earlier row exactly (user, item, rating, time): dropped",
            origin,
            int(repeated.sum()),
        )
        out = out[~repeated].reset_index(drop=True)
    return out


def check_dataset_name(name: str) -> str:
    """A dataset's name is one folder under the data dir (`<data_dir>/<name>/<protocol>/`): no
    path separator, not "." or "..", not empty, no NUL; anything else (`--name ../../x`) would
    write outside the data dir. Returns it; raises DataError naming it."""
    if (
        not isinstance(name, str)
        or name.strip() in ("", ".", "..")
        or any(c in name for c in ("/", "\\", "\x00"))
    ):
        raise DataError(
            f"dataset name (--name) {name!r} must be one folder name under the data dir: "
            "no '/' or '\\', not '.', '..' or empty"
        )
    return name


MISSING_EXAMPLES = 5  # ids a missing-items warning shows
TEXT_COLUMNS = tuple(c for c in ITEM_COLUMNS if c != "item_id")  # what an item prompt shows


def check_item_text(
    items: pd.DataFrame, origin: str, special: SpecialText | None = None, whose: str = "a chat template"
) -> None:
    """Raise DataError where an item's text holds a special-token string (`special`, those of
    `whose`; default: the default backbone's and every "<|...|>" marker, model/special_text.py),
    naming the item, the field and the string, and how many items hold one: a prompt would
    carry it as a control token of the chat template, not as text."""
    special = special or SpecialText.default()
    found: list[str] = []
    count = 0
    for row in items.itertuples(index=False):
        hits = [(c, s) for c in TEXT_COLUMNS if (s := special.find(str(getattr(row, c) or "")))]
        if hits:
            count += 1
            if len(found) < MISSING_EXAMPLES:
                found.append(f"item {row.item_id!r} {hits[0][0]} holds {hits[0][1]!r}")
    if found:
        more = f" ({count} items in all)" if count > len(found) else ""
        raise DataError(
            f"{origin}: {'; '.join(found)}{more}: a special token of {whose}, which a prompt "
            "would carry as a control token, not as text; remove it from the item text"
        )


def check_shown_fields(items: pd.DataFrame, origin: str, strip: bool = False) -> pd.DataFrame:
    """Refuse (DataError) an item whose title, year or genres hold a bidirectional control
    (model/special_text.py `check_shown_text`, the check ids and PUT /items make), naming the
    item, the field and the character, and how many items hold one. `strip`: remove them
    instead, with a warning (retrain's rebuild of a seed an earlier release prepared, which
    took them). Returns the table."""
    found: list[str] = []
    bad = pd.Series(False, index=items.index)
    for col in SHOWN_FIELDS:
        held = items[col].str.contains(BIDI_RE.pattern, regex=True)  # C speed; then the check's words
        for i, value in items.loc[held, col].items():
            try:
                check_shown_text(value)
            except ValueError as exc:
                bad[i] = True
                if len(found) < MISSING_EXAMPLES:
                    found.append(f"item {items.at[i, 'item_id']!r} {col} {value!r} {exc}")
    if not bad.any():
        return items
    if strip:
        logger.warning(
            "%s: %d item(s) hold a bidirectional control character in a title, year or genre "
            "(prepared by an earlier release), removed: e.g. item %r",
            origin, int(bad.sum()), items.loc[bad, "item_id"].iloc[0],
        )  # fmt: skip
        items = items.copy()
        items[list(SHOWN_FIELDS)] = items[list(SHOWN_FIELDS)].map(strip_bidi)
        return items
    more = f" ({int(bad.sum())} items in all)" if bad.sum() > len(found) else ""
    raise DataError(f"{origin}: {'; '.join(found)}{more}; remove them from the item text")


def complete_items(
    items: pd.DataFrame | None,
    used_ids: set[str],
    keep_catalog: bool,
    origin: str = "the item table",
    plain_special: bool = False,
) -> pd.DataFrame:
    """The item table: every used item, plus (``keep_catalog``) every titled catalog item.

    Catalog items keep their file order; used items missing from it follow, sorted, and
    (when there is an item table at all) are logged as a warning naming ``origin``, with
    their count and a few ids: a wrong or partial item file used to pass silently.

    Missing text fields become ""; a missing or empty title becomes "Item <id>". Text is stored
    in Unicode NFC ("e" + U+0301 becomes "é"; logged with the number of items it changed). Each
    run of control white space in a text field (newlines, tabs, ...) becomes one space, and text
    that holds a chat template's special token is refused (`check_item_text`), as is a title,
    year or genre holding a bidirectional control (`check_shown_fields`); with
    ``plain_special`` (retrain's rebuild of a seed an earlier release prepared, which took such
    text) the special token is made plain text instead (`SpecialText.plain`: "<|im_end|>" ->
    "< |im_end|>"), as the service's prompts do, and the control removed, with a warning naming
    how many items.
    """
    given = items is not None
    if items is None or items.empty:
        items = pd.DataFrame({c: pd.Series(dtype=object) for c in ITEM_COLUMNS})
    items = items.copy()
    for col in ITEM_COLUMNS:
        if col not in items.columns:
            items[col] = ""
        items[col] = items[col].fillna("").astype(str).str.strip()
    items = items.drop_duplicates("item_id", keep="first")
    keep = items["item_id"].isin(used_ids)
    if keep_catalog:
        keep |= items["title"] != ""
    items = items[keep]
    missing = sorted(used_ids - set(items["item_id"]))
    if missing and given:
        logger.warning(
            "%d of %d interacted items are missing from %s and are titled 'Item <id>': %s%s",
            len(missing), len(used_ids), origin,
            ", ".join(repr(i) for i in missing[:MISSING_EXAMPLES]),
            ", ..." if len(missing) > MISSING_EXAMPLES else "",
        )  # fmt: skip
    if missing:
        filler = pd.DataFrame({c: [""] * len(missing) for c in ITEM_COLUMNS})
        filler["item_id"] = missing
        items = pd.concat([items, filler], ignore_index=True)
    untitled = items["title"] == ""
    items.loc[untitled, "title"] = "Item " + items.loc[untitled, "item_id"]
    for col in TEXT_COLUMNS:  # one line each: a prompt's lines are its own (model/special_text.py)
        items[col] = items[col].map(one_line).str.strip()
    items, composed = nfc_items(items)
    if composed.any():
        logger.info(
            "%s: %d item(s) had text not in Unicode NFC, stored in NFC (\"e\" + U+0301 as \"é\": one "
            "title to a reader): e.g. item %r",
            origin, int(composed.sum()), items.loc[composed, "item_id"].iloc[0],
        )  # fmt: skip
    items = check_shown_fields(items, origin, strip=plain_special)
    if plain_special:
        text = items[list(TEXT_COLUMNS)]
        plain = text.map(SpecialText.default().plain)  # text without a special token: unchanged
        held = (plain != text).any(axis=1)
        if held.any():
            logger.warning(
                "%s: %d item(s) hold a chat template's special token (prepared by an earlier "
                "release), made plain text: e.g. item %r",
                origin, int(held.sum()), items.loc[held, "item_id"].iloc[0],
            )  # fmt: skip
            items[list(TEXT_COLUMNS)] = plain
    check_item_text(items, origin)
    return items.loc[:, list(ITEM_COLUMNS)].reset_index(drop=True)  # catalog order, then extras


RAW_FILES = ("inter", "item", "reviews", "meta")  # the keys of `source` that name raw files


def source_digests(source: dict[str, Any]) -> dict[str, str]:
    """sha256 of each raw file `source` names (its RAW_FILES), so a prepared directory says
    which data it came from and two preparations can be compared without the raw files."""
    digests = {}
    for key in RAW_FILES:
        value = source.get(key)
        path = Path(value) if isinstance(value, str) and value else None
        if path is not None and path.is_file():
            with path.open("rb") as fh:  # read in blocks: a raw file may be gigabytes
                digests[key] = hashlib.file_digest(fh, "sha256").hexdigest()
    return digests


def compute_stats(
    inter: pd.DataFrame, items: pd.DataFrame, splits: dict[str, pd.DataFrame]
) -> dict[str, Any]:
    """Counts over the interactions the samples were drawn from, and the sample splits."""
    num_users = int(inter["user_id"].nunique())
    num_items = int(len(items))
    num_inter = int(len(inter))
    lengths = [len(h) for df in splits.values() for h in df["history_item_ids"]]
    stats: dict[str, Any] = {
        "num_users": num_users,
        "num_items": num_items,
        "num_interactions": num_inter,
        "density": num_inter / (num_users * num_items) if num_users and num_items else 0.0,
    }
    for name in SPLITS:
        stats[f"{name}_samples"] = int(len(splits[name]))
    stats["avg_history_length"] = float(np.mean(lengths)) if lengths else 0.0
    return stats


def prior_items(
    inter: pd.DataFrame,
    target_mask: np.ndarray | None,
    users: set[str],
    catalog: set[str],
    prior: dict[str, list[str]] | None = None,
) -> dict[str, list[str]]:
    """Each user's catalog items from the interactions `target_mask` kept from being targets
    (before Amazon's window, of which a history shows only the latest max_history), oldest
    first, after `prior` (a rebuilt dataset's seed's own). Only `users` (those with a sample)
    are kept, and only catalog items: nothing else can be ranked."""
    met = {user: list(items) for user, items in (prior or {}).items()}
    if target_mask is not None:
        rows = inter[~np.asarray(target_mask, dtype=bool)].sort_values("timestamp", kind="stable")
        for user, item in zip(rows["user_id"], rows["item_id"], strict=True):
            met.setdefault(user, []).append(item)
    kept = {
        user: [i for i in dict.fromkeys(items) if i in catalog]
        for user, items in met.items()
        if user in users
    }
    return {user: items for user, items in kept.items() if items}


def build_prepared(
    inter: pd.DataFrame,
    items: pd.DataFrame | None,
    *,
    data_dir: str | Path,
    name: str,
    protocol: str,
    category: str,
    max_history: int,
    source: dict[str, Any],
    target_mask: np.ndarray | None = None,
    keep_catalog: bool = True,
    prior: dict[str, list[str]] | None = None,
    rebuild: bool = False,
) -> Path:
    """Split ``inter``, finish the item table, write ``<data_dir>/<name>/<protocol>/``.

    ``target_mask`` limits which interactions become targets (Amazon's time window); the
    stats count only those interactions, and the others are kept as each user's prior items
    (`prior_items`, after ``prior``) for the `seen` mask. ``rebuild``: retrain's rebuild of a
    prepared seed, which an earlier release may have prepared under rules since tightened: its
    name is not checked again (`check_dataset_name`; "grp/ds" was taken then) and special
    tokens in its item text are made plain rather than refused (`complete_items`), so a
    retrain keeps running across an upgrade (docs/operations.md, "Upgrading"). Returns the
    output directory.
    """
    check_protocol(protocol, max_history)
    if not rebuild:
        check_dataset_name(name)
    origin = str(source.get("inter") or source.get("reviews") or name)
    splits = make_splits(inter, protocol, max_history, target_mask=target_mask, origin=origin)
    counted = inter if target_mask is None else inter[np.asarray(target_mask, dtype=bool)]
    used = set(counted["item_id"])
    for df in splits.values():
        used.update(df["target_item_id"])
        for hist in df["history_item_ids"]:
            used.update(hist)
    origin_items = str(source.get("item") or source.get("meta") or name)
    table = complete_items(items, used, keep_catalog, origin_items, plain_special=rebuild)
    meta = {
        "name": name,
        "protocol": protocol,
        "category": category,
        "max_history": int(max_history),
        "source": source,
        "source_sha256": source_digests(source),
        "stats": compute_stats(counted, table, splits),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    out_dir = Path(data_dir) / name / protocol
    users = {u for df in splits.values() for u in df["user_id"]}
    prior = prior_items(inter, target_mask, users, set(table["item_id"]), prior)
    return save_prepared(out_dir, table, splits, meta, prior)
