"""One RecPO step's two halves: the rollout (docs/architecture.md §3 steps 1-3) and the
clipped policy loss on it (steps 4-6). The math is in model/rewards.py, model/recpo.py and
model/losses.py; model/train.py's Trainer calls these once per micro-batch.

Shapes: B users, G generations, M = B*G rollouts, L padded length, H hidden, N items.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from model import distributed as dist
from model import losses
from model.item_table import ItemTable
from model.r2ec import GenerationSettings, R2ec, Rollout
from model.recpo import RecPOConfig, best_trajectories, group_advantages
from model.rewards import fused_reward, ndcg_at_k, similarity_reward, target_rank
from model.samples import TrainingPrompts


@dataclass
class RolloutBatch:
    """One rollout of B users x G trajectories with its rewards, advantages and pi_old."""

    rollout: Rollout
    targets: list[str]  # (B,) target item ids
    advantages: torch.Tensor  # (M,)
    best: torch.Tensor  # (B*best_n,) flat indices of the trajectories that train rec_head
    old_token_logp: torch.Tensor  # (M, L)
    old_item_logp: torch.Tensor  # (B*best_n,)
    stats: dict[str, float]


class RecPOStep:
    """Rollouts and policy losses for one model, its item table and a RecPOConfig."""

    def __init__(
        self,
        model: R2ec,
        table: ItemTable,
        cfg: RecPOConfig,
        prompts: TrainingPrompts,
    ) -> None:
        """`prompts`: training rows -> user prompt ids, and their title grammars (model/samples.py)."""
        self.model, self.table, self.cfg, self.prompts = model, table, cfg, prompts

    @torch.no_grad()
    def rollout(self, rows: pd.DataFrame) -> RolloutBatch:
        """docs/architecture.md §3 steps 1-3: sample G trajectories per user, score them against the full
        item table, fuse the rewards and turn them into group advantages."""
        cfg, model, table, G = self.cfg, self.model, self.table, self.cfg.num_generations
        targets = [str(t) for t in rows["target_item_id"]]
        settings = GenerationSettings(cfg.max_completion_length, True, cfg.temperature, cfg.top_k)
        model.lm.eval()
        start = time.perf_counter()
        constraints = self.prompts.title_lists(rows) if cfg.constrain_titles else None
        rollout = model.reason_from_ids(self.prompts(rows), settings, G, constraints)  # M = B*G rows
        gen_seconds = time.perf_counter() - start
        h_T, token_logp, _ = self._policy_forward(rollout)
        scores = model.score(h_T.cpu(), table.vectors)  # (M, N)
        target_cols = torch.tensor([table.row[t] for t in targets]).repeat_interleave(G)
        mask = table.history_mask(list(rows["history_item_ids"]), G) if cfg.mask_history else None
        ranks = target_rank(scores, target_cols, mask)
        r_d = ndcg_at_k(ranks, cfg.ndcg_k)
        r_c = similarity_reward(scores, target_cols, mask)
        rewards = fused_reward(r_c, r_d, cfg.similarity_reward_weight)
        advantages = group_advantages(rewards, G, cfg.advantage)  # (M,)
        best = best_trajectories(advantages, G, cfg.best_n)
        item_logp = self._item_log_probs(h_T, targets, best)
        n_tokens = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
        stats = {
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.view(-1, G).std(dim=1, unbiased=False).mean()),
            "reward/ndcg/mean": float(r_d.mean()),
            "reward/similarity/mean": float(r_c.mean()),
            "rank/median": float(ranks.float().median()),
            "advantage/mean": float(advantages.mean()),
            "advantage/std": float(advantages.std(unbiased=False)),
            "advantage/best/mean": float(advantages[best].mean()),
            "reasoning/tokens/mean": float(n_tokens.mean()),
            "trajectories": float(len(rollout.completion_ids)),
            "seconds/generate": gen_seconds,
        }
        return RolloutBatch(rollout, targets, advantages, best, token_logp, item_logp, stats)

    def policy_loss(self, rb: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """docs/architecture.md §3 steps 4-6: clipped token loss + clipped item loss, with gradient."""
        cfg = self.cfg
        self.model.lm.train()
        h_T, logp, mask = self._policy_forward(rb.rollout)
        adv = rb.advantages.to(logp.device)
        t_loss, t_stats = losses.token_loss(logp, rb.old_token_logp, adv, mask, cfg.epsilon, cfg.epsilon_high)
        # RecPO, arXiv 2505.16994 §3.2: only the best trajectory per user trains rec_head.
        i_logp = self._item_log_probs(h_T, rb.targets, rb.best)
        i_loss, i_stats = losses.item_loss(
            i_logp, rb.old_item_logp, adv[rb.best], cfg.epsilon, cfg.epsilon_high
        )
        loss = t_loss + i_loss
        return loss, {
            "loss/total": float(loss.detach()),
            "loss/token": float(t_loss.detach()),
            "loss/item": float(i_loss.detach()),
            **t_stats,
            **i_stats,
        }

    def _policy_forward(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward pass over [prompt; reasoning; marker]:
        h_T (M, H), token log-probs (M, L) and the reasoning-token mask (M, L)."""
        model = self.model
        batch = model.user_batch(rollout.prompt_ids, rollout.completion_ids)
        hidden = model.decoder_hidden(batch)  # (M, L, H)
        h_T = F.normalize(hidden[:, -1].float(), dim=-1)
        logp = losses.completion_log_probs(
            model.lm.get_output_embeddings(), hidden, batch, self.cfg.temperature
        )
        return h_T, logp, batch.completion_mask.float()

    def _item_log_probs(self, h_T: torch.Tensor, targets: list[str], best: torch.Tensor) -> torch.Tensor:
        """log p(target) of the best trajectories under the in-batch softmax over the batch's
        targets, encoded now (with gradient when enabled) and gathered across processes."""
        target_vecs = self.table.encode(self.model, targets)  # (B, H)
        all_targets, all_ids = dist.gather_with_grad(target_vecs), dist.gather_objects(targets)
        user_targets = [targets[int(i) // self.cfg.num_generations] for i in best]
        logp = losses.in_batch_log_probs(h_T[best], all_targets, all_ids, self.model.tau, user_targets)
        if torch.is_grad_enabled():
            # docs/architecture.md §3 step 7: the batch's rows are now fresh
            self.table.update(targets, target_vecs)
        return logp
