"""Amazon Reviews 2023: parsing, the time window, broken files."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from model.data import DataError, load_prepared, prepare_amazon
from model.data.amazon import window_start

from .conftest import assert_no_leakage

DAY = 86_400
LONG = " ".join(f"w{k}" for k in range(150))
# (user, item, day, rating); item last seen: A 100, B 95, C 80, D 40, F 30, E 10
REVIEWS = [
    ("ua", "D", 40, 5.0), ("ua", "A", 100, 4.0),
    ("ub", "E", 10, 3.0), ("ub", "B", 95, 2.0), ("ub", "C", 80, 1.0),
    ("uc", "C", 75, 5.0),
    ("ud", "E", 5, 4.0), ("ud", "F", 30, 4.0),
]  # fmt: skip
META = [
    {"parent_asin": "A", "title": "Alpha", "description": [LONG], "categories": ["Beauty", "Skin"]},
    {"parent_asin": "B", "title": "Beta", "description": [], "features": ["soft", "blue"]},
    {"parent_asin": "C", "title": "Gamma", "main_category": "All Beauty"},
    {"parent_asin": "D", "title": None},
    {"parent_asin": "Z", "title": "Unused"},
]


def _write(path, records, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture(params=[False, True], ids=["jsonl", "jsonl.gz"])
def amazon_files(tmp_path, request):
    gz = request.param
    suffix = ".jsonl.gz" if gz else ".jsonl"
    reviews = [
        {"user_id": u, "parent_asin": i, "rating": r, "timestamp": d * DAY * 1000 + 999,
         "text": "nice"}
        for u, i, d, r in REVIEWS
    ]  # fmt: skip
    return (
        _write(tmp_path / f"All_Beauty{suffix}", reviews, gz),
        _write(tmp_path / f"meta_All_Beauty{suffix}", META, gz),
    )


def test_window_start():
    items = np.array([i for _, i, _, _ in REVIEWS], dtype=object)
    days = np.array([d for _, _, d, _ in REVIEWS]) * DAY
    assert window_start(items, days, 2) == 70 * DAY  # B at 95: one 30-day step back
    assert window_start(items, days, 3) == 70 * DAY  # C at 80
    assert window_start(items, days, 4) == 40 * DAY  # D at 40: two steps
    assert window_start(items, days, 100) == 5 * DAY  # never reached: all data


def test_prepare_amazon_window(amazon_files, tmp_path):
    reviews, meta = amazon_files
    ds = load_prepared(prepare_amazon(reviews, meta, tmp_path / "out", min_items=3))
    assert (ds.name, ds.protocol, ds.category) == ("All_Beauty", "temporal", "product")
    samples = {(r.user_id, r.target_item_id): r for df in ds.splits.values() for r in df.itertuples()}
    # window [day 70, day 100]: targets ua:A, ub:C, ub:B; uc's only review is no target
    assert sorted(samples) == [("ua", "A"), ("ub", "B"), ("ub", "C")]
    # 3 samples -> train 2, valid 0, test 1
    assert [len(ds.split(s)) for s in ("train", "valid", "test")] == [2, 0, 1]
    ua = samples[("ua", "A")]
    assert ua.history_item_ids == ["D"]  # history reaches before the window
    assert ua.history_timestamps == [40 * DAY] and ua.target_timestamp == 100 * DAY  # ms -> s
    assert ua.target_rating == 4.0
    assert samples[("ub", "B")].history_item_ids == ["E", "C"]
    items = ds.items.set_index("item_id")
    assert sorted(items.index) == ["A", "B", "C", "D", "E"]  # F: outside window and histories
    assert items.loc["A", "description"].split() == LONG.split()[:100]
    assert items.loc["A", "genres"] == "Beauty, Skin"
    assert items.loc["B", "description"] == "soft blue"  # features when no description
    assert items.loc["C", "genres"] == "All Beauty"
    assert items.loc["D", "title"] == "Item D" and items.loc["E", "title"] == "Item E"
    stats = ds.meta["stats"]
    # in the window: ua:A, ub:B, ub:C, uc:C
    assert (stats["num_users"], stats["num_interactions"], stats["num_items"]) == (3, 4, 5)
    assert ds.meta["source"]["window_start"] == 70 * DAY
    assert_no_leakage(ds, 20)


def test_prepare_amazon_whole_data_loo(amazon_files, tmp_path):
    reviews, meta = amazon_files
    ds = load_prepared(
        prepare_amazon(reviews, meta, tmp_path / "out", name="beauty", protocol="loo",
                       min_items=100)
    )  # fmt: skip
    # ua: 1 sample (train), ub: 2 (valid + test), ud: 1 (train)
    assert [len(ds.split(s)) for s in ("train", "valid", "test")] == [2, 1, 1]
    assert ds.path.name == "loo" and ds.path.parent.name == "beauty"
    assert "F" in ds.item_titles()


def _bad_reviews(tmp_path, lines):
    path = tmp_path / "Bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"user_id": "u", "parent_asin": "A", "rating": 5, "timestamp": 1000})


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"user_id": "u", "parent_asin": ', r"line 2: bad JSON"),
        ('["not", "an", "object"]', r"line 2: expected a JSON object"),
        (json.dumps({"parent_asin": "A", "timestamp": 1}), r"line 2: missing field 'user_id'"),
        (json.dumps({"user_id": "u", "parent_asin": "A", "timestamp": "soon"}),
         r"line 2: timestamp 'soon'"),
    ],
)  # fmt: skip
def test_broken_reviews(tmp_path, line, problem):
    meta = _write(tmp_path / "meta_Bad.jsonl", META)
    with pytest.raises(DataError, match=problem) as info:
        prepare_amazon(_bad_reviews(tmp_path, [GOOD, line]), meta, tmp_path, min_items=1)
    assert "Bad.jsonl" in str(info.value)


def test_broken_meta_and_missing_files(tmp_path):
    reviews = _bad_reviews(tmp_path, [GOOD, GOOD.replace('"A"', '"B"')])
    with pytest.raises(DataError, match="meta_X.jsonl"):
        prepare_amazon(reviews, tmp_path / "meta_X.jsonl", tmp_path)
    with pytest.raises(DataError, match="Nope.jsonl"):
        prepare_amazon(tmp_path / "Nope.jsonl", reviews, tmp_path)
    meta = tmp_path / "meta_Bad.jsonl"
    meta.write_text('{"parent_asin": "A"}\n{oops\n')
    with pytest.raises(DataError, match=r"meta_Bad\.jsonl: line 2: bad JSON"):
        prepare_amazon(reviews, meta, tmp_path, min_items=1)
    corrupt = tmp_path / "Corrupt.jsonl.gz"
    corrupt.write_bytes(gzip.compress(b"x" * 1000)[:20])
    with pytest.raises(DataError, match="Corrupt.jsonl.gz"):
        prepare_amazon(corrupt, meta, tmp_path)
    empty = _bad_reviews(tmp_path, [""])
    with pytest.raises(DataError, match="Bad.jsonl: no reviews"):
        prepare_amazon(empty, meta, tmp_path)
