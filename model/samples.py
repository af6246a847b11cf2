"""Turn prepared sample rows into the prompt's history entries."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

from model.prompts import HistoryEntry


def history_entries(
    item_ids: Sequence[str],
    ratings: Sequence[float] | None,
    timestamps: Sequence[int] | None,
    titles: Mapping[str, str],
    now: int | None = None,
) -> list[HistoryEntry]:
    """One entry per past item, oldest first. Every id must have a title: the caller checks its
    ids once, against the catalog it serves (the service) or here in `sample_histories`.
    `now`: when the recommendation is asked for (seconds), which the entries' ages count to."""
    out = []
    for j, item_id in enumerate(item_ids):
        rating = None if ratings is None else ratings[j]
        if rating is not None and (rating != rating or math.isinf(rating)):  # NaN means unknown
            rating = None
        ts = None if timestamps is None else timestamps[j]
        age = None if ts is None or now is None else max(0, now - ts)
        out.append(HistoryEntry(titles[item_id], None if rating is None else float(rating), ts, age))
    return out


def sample_histories(samples: pd.DataFrame, titles: Mapping[str, str]) -> list[list[HistoryEntry]]:
    """History entries for every row of a prepared split, aged to the sample's target time;
    unknown ids raise KeyError naming them."""
    missing = list(dict.fromkeys(i for ids in samples["history_item_ids"] for i in ids if i not in titles))
    if missing:
        raise KeyError(f"unknown item ids in history: {missing[:10]}")
    return [
        history_entries(
            list(row.history_item_ids),
            list(row.history_ratings),
            [int(t) for t in row.history_timestamps],
            titles,
            now=int(row.target_timestamp),
        )
        for row in samples.itertuples(index=False)
    ]
