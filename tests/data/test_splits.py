"""Split protocols: hand-counted samples on the tiny fixture, and a reference check."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from model.data import DataError, load_prepared, prepare_atomic
from model.data.splits import build_samples, make_splits

from .conftest import assert_no_leakage

# tiny.inter, per user in time order (ties by file order):
#   u1: i1@100 i2@200 i3@300 i4@400 i5@500   -> 4 samples
#   u2: i2@150 i6@250 i7@250 i8@600          -> 3 samples (i6 before i7: file order)
#   u3: i1@50 i9@700                         -> 1 sample (< 3 interactions: train only)
#   u4: i10@800                              -> 0 samples


def test_loo_counts_and_targets(tiny_inter, tiny_item, tmp_path):
    ds = load_prepared(prepare_atomic(tiny_inter, tiny_item, tmp_path, "tiny", "loo"))
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 4, "valid": 2, "test": 2}
    test = ds.split("test").set_index("user_id")
    valid = ds.split("valid").set_index("user_id")
    assert test.loc["u1", "target_item_id"] == "i5" and test.loc["u2", "target_item_id"] == "i8"
    assert valid.loc["u1", "target_item_id"] == "i4" and valid.loc["u2", "target_item_id"] == "i7"
    train = ds.split("train")
    assert sorted(zip(train.user_id, train.target_item_id, strict=True)) == [
        ("u1", "i2"), ("u1", "i3"), ("u2", "i6"), ("u3", "i9"),
    ]  # fmt: skip
    assert test.loc["u2", "history_item_ids"] == ["i2", "i6", "i7"]
    assert math.isnan(test.loc["u1", "target_rating"])  # empty rating cell -> NaN
    assert_no_leakage(ds, 20)


def test_loo_test_target_is_each_users_last(tiny_inter, tiny_item, tmp_path):
    ds = load_prepared(prepare_atomic(tiny_inter, tiny_item, tmp_path, "tiny", "loo"))
    everything = pd.concat(ds.splits.values())
    last = everything.sort_values("target_timestamp").groupby("user_id").tail(1)
    test = ds.split("test")
    multi = last[last.user_id.isin(test.user_id)]
    assert sorted(zip(multi.user_id, multi.target_item_id, strict=True)) == sorted(
        zip(test.user_id, test.target_item_id, strict=True)
    )


def test_temporal_counts_and_order(tiny_inter, tiny_item, tmp_path):
    ds = load_prepared(prepare_atomic(tiny_inter, tiny_item, tmp_path, "tiny", "temporal"))
    # 8 samples: train 8*8//10 = 6, valid 8*9//10 - 6 = 1, test 1
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 6, "valid": 1, "test": 1}
    train, valid, test = (ds.split(s) for s in ("train", "valid", "test"))
    assert train.target_timestamp.max() <= valid.target_timestamp.min()
    assert valid.target_timestamp.max() <= test.target_timestamp.min()
    assert list(train.target_timestamp) == [200, 250, 250, 300, 400, 500]
    assert list(train.target_item_id[1:3]) == ["i6", "i7"]  # tie kept in user order
    assert (valid.target_item_id[0], test.target_item_id[0]) == ("i8", "i9")
    assert ds.meta["stats"]["num_users"] == 4 and ds.meta["stats"]["num_interactions"] == 12
    assert_no_leakage(ds, 20)


def test_history_capped_oldest_first(tiny_inter, tiny_item, tmp_path):
    path = prepare_atomic(tiny_inter, tiny_item, tmp_path, "tiny", "loo", max_history=2)
    ds = load_prepared(path)
    test = ds.split("test").set_index("user_id")
    assert test.loc["u1", "history_item_ids"] == ["i3", "i4"]
    assert test.loc["u1", "history_timestamps"] == [300, 400]
    assert test.loc["u1", "history_ratings"] == [3.0, 2.0]
    assert ds.meta["max_history"] == 2
    assert_no_leakage(ds, 2)


def _reference_samples(inter: pd.DataFrame, max_history: int) -> list[tuple]:
    """Plain-loop reference: per user, stable sort by time, each later row is a target."""
    out = []
    for user, rows in inter.assign(_o=range(len(inter))).groupby("user_id"):
        rows = rows.sort_values(["timestamp", "_o"], kind="stable")
        items, stamps = list(rows.item_id), list(rows.timestamp)
        for p in range(1, len(items)):
            lo = max(0, p - max_history)
            out.append((user, tuple(items[lo:p]), tuple(stamps[lo:p]), items[p], stamps[p]))
    return sorted(out)


@pytest.mark.parametrize("protocol", ["temporal", "loo"])
def test_random_data_matches_reference(protocol):
    rng = np.random.default_rng(0)
    n = 600
    inter = pd.DataFrame(
        {
            "user_id": rng.integers(0, 40, n).astype(str),
            "item_id": rng.integers(0, 50, n).astype(str),
            "rating": rng.integers(1, 6, n).astype(float),
            "timestamp": rng.integers(0, 200, n),  # many ties
        }
    )
    splits = make_splits(inter, protocol, max_history=5)
    got = sorted(
        (r.user_id, tuple(r.history_item_ids), tuple(r.history_timestamps),
         r.target_item_id, r.target_timestamp)
        for df in splits.values() for r in df.itertuples()
    )  # fmt: skip
    assert got == _reference_samples(inter, 5)
    users = inter.user_id.value_counts()
    if protocol == "loo":
        assert len(splits["test"]) == len(splits["valid"]) == int((users >= 3).sum())
    else:
        total = n - len(users)
        assert len(splits["train"]) == total * 8 // 10
        assert len(splits["test"]) == total - total * 9 // 10


def test_target_mask_limits_targets_not_histories():
    inter = pd.DataFrame(
        {"user_id": ["a"] * 4, "item_id": list("wxyz"), "rating": [1.0] * 4,
         "timestamp": [1, 2, 3, 4]}
    )  # fmt: skip
    samples = build_samples(inter, max_history=20, target_mask=np.array([0, 0, 1, 1], bool))
    assert list(samples.target_item_id) == ["y", "z"]
    assert samples.history_item_ids.iloc[0] == ["w", "x"]


def test_bad_protocol_and_no_samples(tiny_inter, tiny_item, tmp_path):
    with pytest.raises(DataError, match="protocol"):
        prepare_atomic(tiny_inter, tiny_item, tmp_path, "tiny", "random")
    single = tmp_path / "single.inter"
    single.write_text("user_id:token\titem_id:token\ttimestamp:float\na\tx\t1\nb\ty\t2\n")
    with pytest.raises(DataError, match=r"single\.inter: no samples"):
        prepare_atomic(single, None, tmp_path, "single", "loo")
