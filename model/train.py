"""The RecPO training loop: rollout -> reward -> advantage -> update -> eval/checkpoint.

`Trainer` owns one run: the model, its optimizer, the item table, the training state and
the run directory, and only wires them. The math lives in model/rewards.py (rewards),
model/recpo.py (advantages) and model/losses.py (losses); the item table in
model/item_table.py, model setup in model/lora.py.
Runs the same on one CPU process or under `torchrun --nproc_per_node N` (gloo on
CPU, nccl on GPU): each process rolls out its own users, gradients are averaged
across processes after every backward, and the item loss's negatives are gathered
from all processes.

Run directory (`--out`)::

    OUT/best/        the best checkpoint by valid NDCG@10 (what eval and the service load)
    OUT/last/        the latest checkpoint + trainer_state.pt, for --resume
    OUT/log.jsonl    one JSON object per step and per eval
    OUT/curves.png   reward, valid NDCG@10, reasoning length

Shapes: B users, G generations, M = B*G rollouts, T tokens, L padded length, H hidden, N items.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from model import distributed as dist
from model import losses
from model.checkpoint import read_meta, save_checkpoint
from model.curves import plot_curves
from model.data import PreparedDataset
from model.evaluate import evaluate_model, validation_eval_config
from model.item_table import ItemTable
from model.lora import build_model, trainable_parameters, weights_kind
from model.r2ec import GenerationSettings, Rollout
from model.recpo import RecPOConfig, best_trajectories, group_advantages
from model.rewards import fused_reward, ndcg_at_k, similarity_reward, target_rank
from model.samples import sample_histories

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


def train(
    cfg: RecPOConfig, dataset: PreparedDataset, base: str, out: Path | str, resume: bool = False
) -> Path:
    """Train and return the path of the best checkpoint."""
    return Trainer(cfg, dataset, base, out, resume=resume).fit()


@dataclass
class TrainState:
    """Where a run stands; saved in OUT/last/trainer_state.pt so --resume continues exactly."""

    step: int = 0
    best_metric: float = -1.0  # valid NDCG@10 of OUT/best
    best_metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # wall time spent, over all resumptions


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


class Optimizer:
    """AdamW + linear warmup + gradient clipping, gradients averaged across processes."""

    def __init__(self, params: list[torch.nn.Parameter], cfg: RecPOConfig) -> None:
        self.params, self.cfg = params, cfg
        self.opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        warmup = max(1, cfg.warmup_steps)  # linear warmup, then constant
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: min(1.0, (step + 1) / warmup))

    def step(self) -> float:
        dist.all_reduce_gradients(self.params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(grad_norm)

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load_state_dict(self, blob: dict) -> None:
        self.opt.load_state_dict(blob["optimizer"])
        self.sched.load_state_dict(blob["scheduler"])


class Trainer:
    """One training run. Build it on every process (under torchrun, each builds its own);
    `fit()` runs to `max_steps` or the time budget and returns OUT/best. Its steps, evals
    and saves are collective: every process calls them in the same order.

    `base` is a backbone reference or a checkpoint to warm-start from (model/lora.py);
    `resume=True` continues OUT/last exactly (weights, optimizer, item table, RNG, state).
    """

    def __init__(
        self, cfg: RecPOConfig, dataset: PreparedDataset, base: str, out: Path | str, resume: bool = False
    ) -> None:
        self.cfg, self.dataset, self.out = cfg, dataset, Path(out)
        dist.init()
        self.is_main = dist.rank() == 0
        torch.manual_seed(cfg.seed)
        resume_dir = self.out / "last"
        if resume and not (resume_dir / STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume: no {resume_dir / STATE_FILE} to resume from")
        self.model, self.base_ref = build_model(cfg, str(resume_dir) if resume else base, dataset.category)
        self.model.lm.to(dist.resolve_device(cfg.device))
        if resume:
            self.base_ref = read_meta(resume_dir)["base"]
        self.params = trainable_parameters(self.model)
        dist.broadcast_parameters(self.params)  # identical start on every process
        self.opt = Optimizer(self.params, cfg)
        self.table = ItemTable.build(self.model, dataset.items.to_dict("records"))
        self.model.lm.eval()
        self.table.cache_lower(self.model, cfg.item_layer_cache_gb, progress=self.is_main)
        self.state = TrainState()
        if resume:
            self._load(resume_dir)
        else:
            self.table.refresh(self.model, progress=self.is_main)
        self.out.mkdir(parents=True, exist_ok=True)
        self.train_rows = dataset.split("train")
        self.table.set_target_counts([str(t) for t in self.train_rows["target_item_id"]])
        self.titles = dataset.item_titles()
        # In-batch contrastive training never reads the table between evals (which refresh it).
        self.reads_table = not (cfg.stage == "contrastive" and cfg.negatives == "in_batch")

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Step until max_steps or the time budget, evaluating and saving on schedule."""
        cfg, state = self.cfg, self.state
        start_wall = time.perf_counter() - state.seconds
        bar = tqdm(
            total=cfg.max_steps, initial=state.step, desc=f"train {cfg.stage}", disable=not self.is_main
        )
        while state.step < cfg.max_steps:
            t0 = time.perf_counter()
            stats = self.step()
            step_seconds = time.perf_counter() - t0
            state.seconds = time.perf_counter() - start_wall
            record = {
                "step": state.step,
                **stats,
                "lr": self.opt.sched.get_last_lr()[0],
                "seconds/step": step_seconds,
                "seconds/total": state.seconds,
            }
            if "trajectories" in stats:
                record["trajectories/s"] = stats["trajectories"] * dist.world_size() / step_seconds
            if self.is_main:
                self._log(record)
                bar.update(1)
                bar.set_postfix({k: f"{record[k]:.3f}" for k in ("loss/total", "reward/mean") if k in record})
            over_budget = cfg.time_budget_minutes is not None and state.seconds > 60 * cfg.time_budget_minutes
            last = state.step >= cfg.max_steps or dist.any_flag(over_budget)
            if state.step % cfg.eval_every == 0 or last:
                self.evaluate()
            if state.step % cfg.save_every == 0 or last:
                self.save_last()
            if last:
                break
        bar.close()
        dist.barrier()
        return self.out / "best"

    def step(self) -> dict[str, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; its stats."""
        cfg, step = self.cfg, self.state.step
        # (a step right after an eval already has a fresh table)
        due = step > 0 and step % cfg.refresh_every == 0 and step % cfg.eval_every != 0
        if self.reads_table and due:
            self.model.lm.eval()
            self.table.refresh(self.model)
        batches = [self._batch_rows(m) for m in range(cfg.gradient_accumulation_steps)]
        match cfg.stage:
            case "recpo":
                stats = self._recpo_update(batches)
            case "contrastive":
                stats = self._contrastive_update(batches)
            case _:
                raise ValueError(f"unknown stage {cfg.stage!r}")
        self.state.step += 1
        return stats

    def _batch_rows(self, micro: int) -> pd.DataFrame:
        # Seeded by (seed, step, micro, rank): a resumed run draws exactly the same users.
        rng = np.random.default_rng([self.cfg.seed, self.state.step, micro, dist.rank()])
        rows = rng.choice(len(self.train_rows), size=self.cfg.per_device_batch_size, replace=False)
        return self.train_rows.iloc[rows]

    def _recpo_update(self, batches: list[pd.DataFrame]) -> dict[str, float]:
        """Roll out every micro-batch, then `num_iterations` clipped updates on them."""
        rbs = [self.rollout(rows) for rows in batches]
        parts: list[dict] = []
        for _ in range(self.cfg.num_iterations):
            for rb in rbs:
                loss, stats = self.policy_loss(rb)
                (loss / len(rbs)).backward()
                parts.append(stats)
            parts.append({"grad_norm": self.opt.step()})
        return {
            **_mean_stats([rb.stats for rb in rbs]),
            **_mean_stats(parts),
            "trajectories": float(sum(rb.stats["trajectories"] for rb in rbs)),
        }

    def _contrastive_update(self, batches: list[pd.DataFrame]) -> dict[str, float]:
        parts = []
        for rows in batches:
            loss, stats = self.contrastive_loss(rows)
            (loss / len(batches)).backward()
            parts.append(stats)
        return {**_mean_stats(parts), "grad_norm": self.opt.step()}

    # -- RecPO ---------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, rows: pd.DataFrame) -> RolloutBatch:
        """docs/architecture.md §3 steps 1-3: sample G trajectories per user, score them against the full
        item table, fuse the rewards and turn them into group advantages."""
        cfg, model, table, G = self.cfg, self.model, self.table, self.cfg.num_generations
        histories = sample_histories(rows, self.titles)
        targets = [str(t) for t in rows["target_item_id"]]
        settings = GenerationSettings(cfg.max_completion_length, True, cfg.temperature, cfg.top_k)
        model.lm.eval()
        start = time.perf_counter()
        rollout = model.reason_from_ids(model.user_prompt_ids(histories), settings, G)  # M = B*G rows
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

    # -- the contrastive warm-up ---------------------------------------------------------------
    def contrastive_loss(self, rows: pd.DataFrame) -> tuple[torch.Tensor, dict[str, float]]:
        """The "w/o reasoning" objective: h_T straight after the prompt, softmax over the batch's
        targets plus `sampled_negatives` uniform catalog items (negatives "in_batch": encoded with
        gradient, gathered across processes, logQ corrected) or over the whole detached item
        table (negatives "table")."""
        cfg, model, table = self.cfg, self.model, self.table
        model.lm.train()
        histories = sample_histories(rows, self.titles)
        targets = [str(t) for t in rows["target_item_id"]]
        prompt_ids = model.user_prompt_ids(histories)
        users = model.user_vectors_from_ids(prompt_ids, [[] for _ in prompt_ids])  # (B, H)
        if cfg.negatives == "table":
            own = torch.tensor([table.row[t] for t in targets], device=users.device)
            drop = table.history_mask(list(rows["history_item_ids"])) if cfg.mask_history else None
            logits = losses.catalog_logits(users, table.vectors, model.tau, own, drop)  # table detached
        else:
            cols = targets + table.sample_uniform(cfg.sampled_negatives)
            col_vecs = table.encode(model, cols)
            all_vecs, all_ids = dist.gather_with_grad(col_vecs), dist.gather_objects(cols)
            logits, own = losses.in_batch_logits(users, all_vecs, all_ids, model.tau, targets)  # grad both
            if cfg.logq_correction and table.log_q is not None:
                log_q = table.log_q_of(all_ids)  # (C,)
                count = losses.log_expected_count(
                    log_q, len(targets), cfg.sampled_negatives, len(table.item_ids)
                )
                logits = logits - count.to(logits.device)
            table.update(cols, col_vecs)
        return losses.contrastive_loss(logits, own)

    # -- evaluation and checkpoints ------------------------------------------------------------
    def evaluate(self) -> None:
        """Refresh the item table, then NDCG@10 on valid (main process): logged, and OUT/best
        replaced when it beats the best so far."""
        self.model.lm.eval()
        self.table.refresh(self.model)  # every process, sharded: eval and checkpoints use a fresh table
        if self.is_main:
            self._validate()
        dist.barrier()

    def _validate(self) -> None:
        ds, state, ecfg = self.dataset, self.state, validation_eval_config(self.cfg)
        result = evaluate_model(self.model, ds, self.table.vectors, ecfg, progress=False)
        m = result.metrics
        self._log(
            {
                "step": state.step,
                "eval": True,
                **{f"valid/{k}": v for k, v in m.items()},
                "eval/seconds": result.seconds,
                "eval/examples": result.examples[:2],
            }
        )
        log.info("step %d valid ndcg@10 %.4f hit@10 %.4f", state.step, m["ndcg@10"], m["hit@10"])
        if m["ndcg@10"] > state.best_metric:
            state.best_metric = m["ndcg@10"]
            state.best_metrics = {
                "step": state.step,
                "split": "valid",
                "limit": self.cfg.eval_limit,
                "mask": ecfg.mask,
                **m,
            }
            self.save(self.out / "best")
        plot_curves(self.out / "log.jsonl", self.out / "curves.png")

    def save(self, path: Path, write_extra: Callable[[Path], None] | None = None) -> None:
        """A self-describing checkpoint of the model and the current item table at `path`."""
        ds = self.dataset
        save_checkpoint(
            path,
            self.model,
            base=self.base_ref,
            weights=weights_kind(self.model),
            items=ds.items,
            item_vectors=self.table.vectors.numpy(),
            dataset={"name": ds.name, "protocol": ds.protocol, "path": str(ds.path)},
            metrics={"valid": self.state.best_metrics},
            extra={"train": {"step": self.state.step, "config": self.cfg.to_dict()}},
            write_extra=write_extra,
        )

    def save_last(self) -> None:
        """OUT/last: the checkpoint plus what --resume needs (optimizer, state, table, RNGs)."""
        rng = dist.gather_rng_states()
        if self.is_main:
            blob = {
                **self.opt.state_dict(),
                "state": self.state.__dict__,
                "item_table": self.table.vectors,
                "rng": rng,
            }
            self.save(self.out / "last", write_extra=lambda tmp: torch.save(blob, tmp / STATE_FILE))
        dist.barrier()

    def _load(self, resume_dir: Path) -> None:
        blob = torch.load(resume_dir / STATE_FILE, weights_only=False)
        self.opt.load_state_dict(blob)
        self.state = TrainState(**blob["state"])
        self.table.vectors = blob["item_table"]
        dist.restore_rng_state(blob["rng"])
        log.info("resumed from %s at step %d", resume_dir, self.state.step)

    def _log(self, record: dict) -> None:
        with open(self.out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")


def _mean_stats(parts: list[dict]) -> dict[str, float]:
    keys = dict.fromkeys(k for p in parts for k in p)  # first-seen order: stable log.jsonl keys
    return {k: float(np.mean([p[k] for p in parts if k in p])) for k in keys}
