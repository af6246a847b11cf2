"""Turn prepared sample rows into the prompt's history entries."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import pandas as pd

from model.cowatch import pair_counts, top, user_sequences
from model.prompts import HistoryEntry
from model.rationale import ItemFacts, history_facts

if TYPE_CHECKING:
    from model.constrained import Grammar
    from model.r2ec import R2ec


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
        rating = None if rating is None else float(rating)
        out.append(HistoryEntry(titles[item_id], rating, ts, age, str(item_id)))
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


class TrainingPrompts:
    """User prompt ids for training rows. With co-watch hints (model/cowatch.py), each row's
    hints leave out its own user's pairs, so a training target is hinted no more often than a
    held-out one: `train` (the whole training split) gives each user's sequence."""

    def __init__(
        self,
        model: R2ec,
        titles: Mapping[str, str],
        train: pd.DataFrame,
        facts: Mapping[str, ItemFacts] | None = None,
    ) -> None:
        """`facts`: item_id -> its genres and decade (model/rationale.py `catalog_facts`), so the
        rollouts' sentences about them are decoded under what holds, as inference decodes them
        (`R2ec.title_lists`); None: free."""
        self.model, self.titles, self.facts = model, titles, facts
        self.sequences = user_sequences(train) if model.prompts.cowatch_hints else {}
        self._own: dict[str, dict[tuple[str, str], float]] = {}

    def own_pairs(self, user: str) -> dict[tuple[str, str], float]:
        if user not in self._own:
            self._own[user] = pair_counts(self.sequences.get(user, []), self.model.prompts.cowatch_window)
        return self._own[user]

    def hints(self, rows: pd.DataFrame) -> list[dict[str, float]]:
        """Each row's hinted items with their co-watch scores (its own user left out): what
        its prompt names, and the teacher of `cowatch_distill` (model/train.py)."""
        table, k = self.model.cowatch, self.model.prompts.cowatch_hints
        if table is None or not k:
            return [{} for _ in range(len(rows))]
        out = []
        for user, history in zip(rows["user_id"], rows["history_item_ids"], strict=True):
            scores = table.scores([str(i) for i in history], self.own_pairs(str(user)))
            out.append({j: scores[j] for j in top(scores, k)})
        return out

    def title_lists(self, rows: pd.DataFrame) -> list[Grammar]:
        """Per row, the grammar its reasoning's title lists are decoded under (model/constrained.py),
        its hints as its prompt names them (its own user left out)."""
        without = [self.own_pairs(str(u)) for u in rows["user_id"]] if self.sequences else None
        histories = sample_histories(rows, self.titles)
        facts = None if self.facts is None else history_facts(histories, self.facts)
        return self.model.title_lists(histories, without, facts=facts)

    def __call__(self, rows: pd.DataFrame) -> list[list[int]]:
        histories = sample_histories(rows, self.titles)
        without = [self.own_pairs(str(u)) for u in rows["user_id"]] if self.sequences else None
        return self.model.user_prompt_ids(histories, without)
