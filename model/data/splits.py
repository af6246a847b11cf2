"""Turn interactions into (history -> target) samples and split them train/valid/test.

Canonical interactions: a frame with ``user_id`` (str), ``item_id`` (str), ``rating``
(float, NaN = unknown) and ``timestamp`` (int seconds). Row order breaks timestamp ties,
so each user's interactions have one fixed order; a sample's history is the latest
``max_history`` interactions strictly before its target in that order (no leakage), and
a user's first interaction is never a target (its history would be empty).

Protocols (docs/architecture.md §2):
- ``temporal`` (the paper's): every sample, sorted globally by (target timestamp, user_id,
  position), the first ``n*8//10`` train, up to ``n*9//10`` valid, the rest test.
- ``loo`` (RecBole's leave-one-out): per user, the last sample is test, the one before it
  valid, the others train; a user with a single sample (fewer than three interactions)
  goes to train only.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .dataset import SAMPLE_COLUMNS, SPLITS, DataError

logger = logging.getLogger(__name__)

PROTOCOLS = ("temporal", "loo")
INTERACTION_COLUMNS = ("user_id", "item_id", "rating", "timestamp")


def check_protocol(protocol: str, max_history: int) -> None:
    """Reject an unknown protocol or a non-positive history length early, before any I/O."""
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown split protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    if int(max_history) < 1:
        raise DataError(f"max_history must be >= 1, got {max_history}")


def build_samples(
    inter: pd.DataFrame, max_history: int = 20, target_mask: np.ndarray | None = None
) -> pd.DataFrame:
    """One sample per interaction that has at least one earlier interaction of its user.

    ``target_mask`` (aligned with ``inter``'s rows) limits which interactions may be
    targets; histories still draw on every earlier interaction of the user.
    Returns SAMPLE_COLUMNS plus ``position`` (the target's index in the user's order).
    """
    df = inter.loc[:, list(INTERACTION_COLUMNS)].reset_index(drop=True)
    if target_mask is not None:
        mask = np.asarray(target_mask, dtype=bool)
        if mask.shape != (len(df),):
            raise ValueError(f"target_mask has shape {mask.shape}, expected ({len(df)},)")
        df["_target_ok"] = mask
    df = df.assign(_order=np.arange(len(df), dtype=np.int64))
    df = df.sort_values(["user_id", "timestamp", "_order"], kind="stable").reset_index(drop=True)
    pos = df.groupby("user_id", sort=False).cumcount().to_numpy()
    ok = pos >= 1
    if target_mask is not None:
        ok &= df["_target_ok"].to_numpy()
    idx = np.flatnonzero(ok)  # (S,) rows that become targets
    starts = idx - np.minimum(pos[idx], max_history)  # rows of one user are contiguous

    items = df["item_id"].to_numpy(dtype=object)
    ratings = df["rating"].to_numpy(dtype=np.float64)
    stamps = df["timestamp"].to_numpy(dtype=np.int64)
    return pd.DataFrame(
        {
            "user_id": df["user_id"].to_numpy(dtype=object)[idx],
            "history_item_ids": [items[s:e].tolist() for s, e in zip(starts, idx, strict=True)],
            "history_ratings": [ratings[s:e].tolist() for s, e in zip(starts, idx, strict=True)],
            "history_timestamps": [stamps[s:e].tolist() for s, e in zip(starts, idx, strict=True)],
            "target_item_id": items[idx],
            "target_rating": ratings[idx],
            "target_timestamp": stamps[idx],
            "position": pos[idx],
        }
    )


def split_samples(samples: pd.DataFrame, protocol: str) -> dict[str, pd.DataFrame]:
    """Assign samples (from ``build_samples``) to train/valid/test by ``protocol``."""
    match protocol:
        case "temporal":
            ordered = samples.sort_values(
                ["target_timestamp", "user_id", "position"], kind="stable"
            ).reset_index(drop=True)
            n = len(ordered)
            cut_train, cut_valid = n * 8 // 10, n * 9 // 10
            parts = {
                "train": ordered.iloc[:cut_train],
                "valid": ordered.iloc[cut_train:cut_valid],
                "test": ordered.iloc[cut_valid:],
            }
        case "loo":
            ordered = samples.sort_values(["user_id", "position"], kind="stable")
            ordered = ordered.reset_index(drop=True)
            grouped = ordered.groupby("user_id", sort=False)
            from_end = grouped.cumcount(ascending=False).to_numpy()
            count = grouped["position"].transform("size").to_numpy()
            labels = np.where(
                (count >= 2) & (from_end == 0),
                "test",
                np.where((count >= 2) & (from_end == 1), "valid", "train"),
            )
            parts = {name: ordered[labels == name] for name in SPLITS}
        case _:
            raise DataError(f"unknown split protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    return {name: part.loc[:, list(SAMPLE_COLUMNS)].reset_index(drop=True) for name, part in parts.items()}


def make_splits(
    inter: pd.DataFrame,
    protocol: str,
    max_history: int = 20,
    target_mask: np.ndarray | None = None,
    origin: str = "interactions",
) -> dict[str, pd.DataFrame]:
    """``build_samples`` then ``split_samples``; DataError (naming ``origin``) if no sample."""
    check_protocol(protocol, max_history)
    samples = build_samples(inter, max_history=max_history, target_mask=target_mask)
    if samples.empty:
        raise DataError(f"{origin}: no samples, every user has a single interaction (inside the window)")
    splits = split_samples(samples, protocol)
    logger.info(
        "%s split: %s",
        protocol,
        ", ".join(f"{name}={len(df):,}" for name, df in splits.items()),
    )
    return splits
