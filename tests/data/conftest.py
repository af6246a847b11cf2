"""Shared fixtures for the data tests: the tiny atomic dataset and invariant checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.data import PreparedDataset

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"


@pytest.fixture
def tiny_inter() -> Path:
    return FIXTURES / "tiny.inter"


@pytest.fixture
def tiny_item() -> Path:
    return FIXTURES / "tiny.item"


def assert_no_leakage(ds: PreparedDataset, max_history: int) -> None:
    """Every sample: history capped, oldest first, never later than its target."""
    for name, df in ds.splits.items():
        for row in df.itertuples(index=False):
            hist_ts = row.history_timestamps
            assert 1 <= len(row.history_item_ids) <= max_history, name
            assert len(row.history_item_ids) == len(row.history_ratings) == len(hist_ts)
            assert hist_ts == sorted(hist_ts), f"{name}: history not oldest-first"
            assert max(hist_ts) <= row.target_timestamp, f"{name}: history after target"
