"""The losses the trainer minimises, as pure functions of tensors.

RecPO (R²ec, arXiv 2505.16994 §3.2): a PPO-style clipped surrogate
on the reasoning tokens (`token_loss`) and on the item choice of each user's best
trajectories under an in-batch softmax (`item_loss`). The "w/o reasoning" warm-up: a
sampled softmax over the batch's targets plus uniform catalog items (`contrastive_loss`),
logQ corrected (`log_expected_count`). model/train.py runs the forward passes and the
cross-process gathers that produce the inputs, then calls these.

Shapes: B users, M = B*G rollouts, L padded length, H hidden, V vocabulary,
C candidate columns (items), U rows scored against them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from model.rewards import target_rank

if TYPE_CHECKING:
    from model.r2ec import PaddedBatch


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped objective as a per-element loss (to minimise).

    loss = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    Returns (loss, clipped_low, clipped_high) where the flags mark elements whose
    clipped branch was active (for the clip_ratio/low|high metrics).
    """
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + epsilon_high)
    unclipped_obj = ratio * advantages
    clipped_obj = clipped * advantages
    loss = -torch.minimum(unclipped_obj, clipped_obj)
    low = (ratio < 1.0 - epsilon) & (advantages < 0)
    high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
    return loss, low, high


def completion_log_probs(
    lm_head: torch.nn.Module, hidden: torch.Tensor, batch: PaddedBatch, temperature: float
) -> torch.Tensor:
    """log pi(o_t | prefix) of each reasoning token: (M, L) with zeros off the mask.

    hidden (M, L, H) are the decoder's final states over `batch`. Only the positions that
    predict a reasoning token go through lm_head (49k logits per position are the memory
    hog); logits are divided by the sampling temperature so the ratio compares the
    distribution the tokens were sampled from.
    """
    predicts = torch.zeros_like(batch.completion_mask, dtype=torch.bool)
    predicts[:, :-1] = batch.completion_mask[:, 1:].bool()  # hidden at j predicts token j+1
    logits = lm_head(hidden[predicts]).float() / temperature  # (tokens, V)
    targets = batch.input_ids[:, 1:][batch.completion_mask[:, 1:].bool()]
    token_logp = torch.log_softmax(logits, dim=-1).gather(1, targets.view(-1, 1)).squeeze(1)
    out = torch.zeros(batch.completion_mask.shape, dtype=torch.float32, device=hidden.device)
    out[batch.completion_mask.bool()] = token_logp
    return out


def token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
    epsilon_high: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate per reasoning token, averaged over real tokens (padding masked).

    logp, old_logp, mask: (M, L); advantages: (M,) broadcast over each rollout's tokens.
    A rollout with no reasoning tokens contributes nothing.
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)  # (M, L)
    per_token, low, high = clipped_surrogate(ratio, advantages.unsqueeze(1), epsilon, epsilon_high)
    denom = mask.sum().clamp(min=1.0)
    loss = (per_token * mask).sum() / denom
    stats = {
        "clip_ratio/low": float((low.float() * mask).sum() / denom),
        "clip_ratio/high": float((high.float() * mask).sum() / denom),
    }
    return loss, stats


def in_batch_logits(
    users: torch.Tensor, targets: torch.Tensor, target_ids: list, tau: float, user_targets: list
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (U, C) of each user against the batch's target items, and each user's column.

    users (U, H) and targets (C, H) L2-normalised; target_ids (C,) the items behind the
    columns, user_targets (U,) each user's own item. Columns holding the same item as the
    user's target (duplicates in the batch) other than the first are masked, so an item is
    never its own negative.
    """
    logits = users @ targets.T / tau  # (U, C)
    col_of: dict = {}
    for c, item in enumerate(target_ids):
        col_of.setdefault(item, c)
    own = torch.tensor([col_of[t] for t in user_targets], device=users.device)
    dup = torch.tensor(
        [[target_ids[c] == t and c != col_of[t] for c in range(len(target_ids))] for t in user_targets],
        device=users.device,
    )
    return logits.masked_fill(dup, float("-inf")), own


def in_batch_log_probs(
    users: torch.Tensor, targets: torch.Tensor, target_ids: list, tau: float, user_targets: list
) -> torch.Tensor:
    """log p(target | user) under an in-batch softmax over the batch's target items: (U,)."""
    logits, own = in_batch_logits(users, targets, target_ids, tau, user_targets)
    return torch.log_softmax(logits.float(), dim=-1).gather(1, own.view(-1, 1)).squeeze(1)


def item_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The same clipped form on the item choice: ratio = p / p_old, per best trajectory.

    RecPO, arXiv 2505.16994 §3.2: logp, old_logp and advantages are (B*best_n,), the
    trajectories that train rec_head.
    """
    ratio = torch.exp(logp - old_logp)
    loss, low, high = clipped_surrogate(ratio, advantages, epsilon, epsilon_high)
    return loss.mean(), {"item/clip_ratio": float((low | high).float().mean())}


def catalog_logits(
    users: torch.Tensor, vectors: torch.Tensor, tau: float, own: torch.Tensor, drop: torch.Tensor | None
) -> torch.Tensor:
    """Logits (B, N) of users (B, H) against the whole catalog's vectors (N, H), on the users'
    device; items marked in drop (B, N) (their history) are masked, a user's own item (B,)
    never is."""
    logits = users @ vectors.to(users.device).T / tau  # (B, N)
    if drop is None:
        return logits
    drop = drop.to(logits.device, copy=True)
    drop[torch.arange(len(own)), own] = False  # never mask the target itself
    return logits.masked_fill(drop, float("-inf"))


def log_expected_count(log_q: torch.Tensor, batch: int, sampled: int, num_items: int) -> torch.Tensor:
    """log E[times each column's item is drawn] per process: (C,) from its log q (C,).

    The batch's `batch` targets come by popularity (q, the item's share of training
    targets), `sampled` negatives uniformly from `num_items`; the sampled-softmax (logQ)
    correction subtracts this from the logits (Yi et al., RecSys 2019). With no sampled
    negatives it is log q + log batch, the plain logQ correction.
    """
    return torch.log(batch * log_q.exp() + sampled / num_items)


def contrastive_loss(logits: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Softmax cross-entropy of each user's own column: logits (B, C), own (B,) -> scalar.

    Also the own column's 1-based rank among the C (ties against it, as evaluation counts
    them: model/rewards.py `target_rank`), a training-time view of the ranking the loss improves.
    """
    own = own.to(logits.device)
    loss = F.cross_entropy(logits.float(), own)
    with torch.no_grad():
        rank = target_rank(logits, own).float()  # (B,)
    return loss, {
        "loss/total": float(loss.detach()),
        "loss/contrastive": float(loss.detach()),
        "rank/median": float(rank.median()),
    }
