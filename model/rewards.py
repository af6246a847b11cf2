"""Pure reward functions for RecPO (R²ec, arXiv 2505.16994 §3.2, docs/architecture.md §3).

Shapes: R rollouts (= B users x G generations), N items.
"""

from __future__ import annotations

import torch


def _drop_masked(scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """scores as float with masked items at -inf; a row's target is never dropped."""
    scores = scores.float()
    if mask is None:
        return scores
    mask = mask.clone()
    mask[torch.arange(len(targets)), targets] = False
    return scores.masked_fill(mask, float("-inf"))


def target_rank(
    scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """1-based rank of each row's target among all items: scores (R, N), targets (R,) -> (R,).

    mask (R, N) bool marks items to drop from the ranking (history); the target never is.
    Ties count against the target: it ranks after every item that scores as high as it does,
    so a model gets no credit for scoring items alike (ml-100k lists 18 films twice under two
    ids, whose identical texts give identical item vectors; a constant score ranks last).
    """
    scores = _drop_masked(scores, targets, mask)
    target_scores = scores.gather(1, targets.view(-1, 1))  # (R, 1)
    ranks = (scores >= target_scores).sum(dim=1)  # the target counts itself
    return torch.where(torch.isnan(target_scores[:, 0]), scores.shape[1], ranks)  # NaN: last


def ndcg_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """NDCG@k of one relevant item at 1-based `ranks` (R,): 1/log2(rank+1) if rank <= k else 0.

    The reward R_d (with k = `ndcg_k`) and the evaluation metric NDCG@K (model/evaluate.py)
    are this one function. Floating ranks keep their dtype (eval averages in float64).
    """
    ranks = ranks if ranks.is_floating_point() else ranks.float()
    return torch.where(ranks <= k, 1.0 / torch.log2(ranks + 1.0), torch.zeros_like(ranks))


def similarity_reward(
    scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """R_c: softmax over all items of s(u, v+), the target's probability. scores are cos/tau."""
    scores = _drop_masked(scores, targets, mask)
    return torch.softmax(scores, dim=-1).gather(1, targets.view(-1, 1)).squeeze(1)


def fused_reward(r_c: torch.Tensor, r_d: torch.Tensor, weight: float) -> torch.Tensor:
    """R = beta * R_c + (1 - beta) * R_d (docs/architecture.md §3 step 2; beta = `weight`)."""
    return weight * r_c + (1.0 - weight) * r_d
