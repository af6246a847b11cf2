"""Full-ranking evaluation: Hit@K and NDCG@K over the whole catalog (docs/architecture.md §2).

The target's rank is 1 + the number of items scored strictly higher (ties count in
the target's favour). Items in the user's history are masked out by default, except
the target itself, so a re-consumed item can still be found.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from model.data.dataset import SPLITS
from model.r2ec import GenerationSettings, R2ec
from model.rewards import ndcg_at_k, target_rank
from model.samples import sample_histories

if TYPE_CHECKING:
    from model.recpo import RecPOConfig

log = logging.getLogger(__name__)

KS = (5, 10, 20)


def target_ranks(
    scores: torch.Tensor, targets: torch.Tensor, exclude: Sequence[Sequence[int]] | None = None
) -> torch.Tensor:
    """1-based rank of each row's target: scores (B, N), targets (B,) -> (B,) long."""
    mask = None
    if exclude is not None:
        mask = torch.zeros(scores.shape, dtype=torch.bool)
        for i, cols in enumerate(exclude):
            mask[i, list(cols)] = True
    return target_rank(scores.detach(), targets, mask)


def ranking_metrics(ranks: Sequence[int] | np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Hit@K and NDCG@K averaged over 1-based ranks, for each K in ks."""
    ranks = torch.as_tensor(np.asarray(ranks, dtype=np.float64))  # (B,)
    if ranks.numel() == 0:
        raise ValueError("no ranks to average")
    out = {}
    for k in ks:
        out[f"hit@{k}"] = float((ranks <= k).double().mean())
        out[f"ndcg@{k}"] = float(ndcg_at_k(ranks, k).mean())
    return out


@dataclass
class EvalConfig:
    """How `evaluate_model` and `evaluate_popularity` rank the catalog.

    Parameters:
        split (`str`, defaults to `"test"`):
            The prepared split the samples come from: `"train"`, `"valid"` or `"test"` (a
            label here; the caller passes that split's samples).
        reasoning (`bool`, defaults to `True`):
            Write the reasoning (greedy) before taking h_T; `False` is the paper's
            "w/o reasoning" mode, h_T straight after the prompt.
        max_reasoning_tokens (`int`, defaults to `64`):
            Reasoning token budget per user when `reasoning`.
        batch_size (`int`, defaults to `8`):
            Users per generate and forward pass.
        limit (`int` or `None`, defaults to `None`):
            Evaluate the first this many samples only (`None`: all).
        mask_history (`bool`, defaults to `True`):
            Drop the items of the user's history from the ranking, except the target itself,
            so a re-consumed item can still be found.
        ks (`tuple[int, ...]`, defaults to `(5, 10, 20)`):
            The cut-offs K of Hit@K and NDCG@K.
    """

    split: str = "test"
    reasoning: bool = True
    max_reasoning_tokens: int = 64
    batch_size: int = 8
    limit: int | None = None
    mask_history: bool = True
    ks: tuple[int, ...] = KS

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.max_reasoning_tokens < 0:
            raise ValueError(f"max_reasoning_tokens must be >= 0, got {self.max_reasoning_tokens}")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be one or more cut-offs >= 1, got {self.ks}")


def validation_eval_config(cfg: RecPOConfig) -> EvalConfig:
    """The valid-split evaluation of a training run, as its RecPOConfig sets it.

    Training picks OUT/best by NDCG@10 under it, and scheduled retraining's publish gate
    evaluates under it, so the two metrics compare: the first `eval_limit` valid samples,
    with reasoning when the stage trains it (recpo) at `eval_reasoning_tokens` tokens
    (default: max_completion_length), without it for the contrastive warm-up.
    """
    return EvalConfig(
        split="valid",
        reasoning=cfg.stage == "recpo",
        max_reasoning_tokens=cfg.reasoning_tokens_at_eval,
        limit=cfg.eval_limit,
    )


@dataclass
class EvalResult:
    metrics: dict[str, float]
    count: int
    seconds: float
    ranks: list[int] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)  # a few reasoning texts

    def to_dict(self) -> dict:
        return {
            "metrics": self.metrics,
            "count": self.count,
            "seconds": round(self.seconds, 2),
            "examples": self.examples,
        }


def _split_rows(samples: pd.DataFrame, cfg: EvalConfig) -> pd.DataFrame:
    return samples.head(cfg.limit) if cfg.limit else samples


def _column_index(items: pd.DataFrame) -> dict[str, int]:
    return {str(i): j for j, i in enumerate(items["item_id"].astype(str))}


def evaluate_model(
    model: R2ec,
    samples: pd.DataFrame,
    items: pd.DataFrame,
    item_vectors: torch.Tensor | np.ndarray,
    cfg: EvalConfig,
    progress: bool = True,
    num_examples: int = 3,
) -> EvalResult:
    """Rank the whole catalog for each sample; reasoning (if on) is greedy."""
    start = time.perf_counter()
    rows = _split_rows(samples, cfg)
    col = _column_index(items)
    titles = dict(zip(items["item_id"].astype(str), items["title"].astype(str), strict=True))
    vectors = torch.as_tensor(np.asarray(item_vectors, dtype=np.float32))  # (N, H)
    settings = GenerationSettings(max_new_tokens=cfg.max_reasoning_tokens)
    ranks: list[int] = []
    examples: list[dict] = []
    bar = tqdm(total=len(rows), desc=f"eval {cfg.split}", unit="user", disable=not progress)
    for lo in range(0, len(rows), cfg.batch_size):
        chunk = rows.iloc[lo : lo + cfg.batch_size]
        histories = sample_histories(chunk, titles)
        rollout = model.reason(histories, settings) if cfg.reasoning else None
        users = model.user_vectors(histories, rollout).cpu()  # (B, H)
        scores = model.score(users, vectors)  # (B, N)
        targets = torch.tensor([col[str(t)] for t in chunk["target_item_id"]])
        exclude = (
            [[col[i] for i in h if i in col] for h in chunk["history_item_ids"]] if cfg.mask_history else None
        )
        batch_ranks = target_ranks(scores, targets, exclude).tolist()
        ranks.extend(batch_ranks)
        if rollout is not None and len(examples) < num_examples:
            for j in range(min(num_examples - len(examples), len(chunk))):
                examples.append(
                    {
                        "user_id": str(chunk.iloc[j]["user_id"]),
                        "target": titles[str(chunk.iloc[j]["target_item_id"])],
                        "rank": batch_ranks[j],
                        "reasoning": rollout.texts[j],
                    }
                )
        bar.update(len(chunk))
    bar.close()
    return EvalResult(
        ranking_metrics(ranks, cfg.ks), len(ranks), time.perf_counter() - start, ranks, examples
    )


def evaluate_popularity(
    train: pd.DataFrame, samples: pd.DataFrame, items: pd.DataFrame, cfg: EvalConfig
) -> EvalResult:
    """Pop baseline: score = how often the item was a training target, under the same harness."""
    start = time.perf_counter()
    rows = _split_rows(samples, cfg)
    col = _column_index(items)
    counts = np.zeros(len(items), dtype=np.float32)
    for item_id, n in train["target_item_id"].astype(str).value_counts().items():
        if item_id in col:
            counts[col[item_id]] = n
    # Many items share a count; break ties by a fixed random order (never across counts,
    # the jitter is < 1) so the baseline is not flattered by optimistic tie ranks.
    counts += np.random.default_rng(0).permutation(len(items)).astype(np.float32) / (2 * len(items))
    scores = torch.from_numpy(np.broadcast_to(counts, (len(rows), len(items))).copy())
    targets = torch.tensor([col[str(t)] for t in rows["target_item_id"]])
    exclude = (
        [[col[i] for i in h if i in col] for h in rows["history_item_ids"]] if cfg.mask_history else None
    )
    ranks = target_ranks(scores, targets, exclude).tolist()
    return EvalResult(ranking_metrics(ranks, cfg.ks), len(ranks), time.perf_counter() - start, ranks)
