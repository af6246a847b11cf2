"""The RecPO training loop: rollout -> reward -> advantage -> update -> eval/checkpoint.

All math lives in model/rewards.py and model/recpo.py; this file only wires it.
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
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from model import distributed as dist
from model.checkpoint import read_meta, save_checkpoint
from model.curves import plot_curves
from model.data import PreparedDataset
from model.evaluate import EvalConfig, evaluate_model
from model.item_table import ItemTable
from model.lora import build_model, trainable_parameters, weights_kind
from model.losses import (
    completion_log_probs,
    contrastive_loss,
    in_batch_log_probs,
    in_batch_logits,
    item_loss,
    log_expected_count,
    token_loss,
)
from model.r2ec import GenerationSettings, R2ec, Rollout
from model.recpo import RecPOConfig, best_trajectories, group_advantages
from model.rewards import fused_reward, ndcg_at_k, similarity_reward, target_rank
from model.samples import sample_histories

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


# -- one step of each stage --------------------------------------------------------------------
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


@torch.no_grad()
def make_rollout(model: R2ec, table: ItemTable, rows, titles: dict, cfg: RecPOConfig) -> RolloutBatch:
    """DESIGN §3 steps 1-3: sample G trajectories per user, score them against the full
    item table, fuse the rewards and turn them into group advantages."""
    G = cfg.num_generations
    histories = sample_histories(rows, titles)
    targets = [str(t) for t in rows["target_item_id"]]
    settings = GenerationSettings(cfg.max_completion_length, True, cfg.temperature, cfg.top_k)
    model.lm.eval()
    start = time.perf_counter()
    rollout = model.reason_from_ids(model.user_prompt_ids(histories), settings, G)  # M = B*G rows
    gen_seconds = time.perf_counter() - start
    h_T, token_logp, _ = _policy_forward(model, rollout, cfg.temperature)
    scores = model.score(h_T.cpu(), table.vectors)  # (M, N)
    target_cols = torch.tensor([table.row[t] for t in targets]).repeat_interleave(G)
    mask = table.history_mask(list(rows["history_item_ids"]), G) if cfg.mask_history else None
    ranks = target_rank(scores, target_cols, mask)
    r_d = ndcg_at_k(ranks, cfg.ndcg_k)
    r_c = similarity_reward(scores, target_cols, mask)
    rewards = fused_reward(r_c, r_d, cfg.similarity_reward_weight)
    advantages = group_advantages(rewards, G, cfg.advantage)  # (M,)
    best = best_trajectories(advantages, G, cfg.best_n)
    item_logp = _item_log_probs(model, table, h_T, targets, best, G)
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


def _policy_forward(model: R2ec, rollout: Rollout, temperature: float):
    """One forward pass over [prompt; reasoning; marker]:
    h_T (M, H), token log-probs (M, L) and the reasoning-token mask (M, L)."""
    batch = model.user_batch(rollout.prompt_ids, rollout.completion_ids)
    hidden = model.decoder_hidden(batch)  # (M, L, H)
    h_T = F.normalize(hidden[:, -1].float(), dim=-1)
    logp = completion_log_probs(model.lm.get_output_embeddings(), hidden, batch, temperature)
    return h_T, logp, batch.completion_mask.float()


def _item_log_probs(model, table, h_T, targets, best, G) -> torch.Tensor:
    """log p(target) of the best trajectories under the in-batch softmax over the batch's
    targets, encoded now (with gradient when enabled) and gathered across processes."""
    target_vecs = table.encode(model, targets)  # (B, H)
    all_targets, all_ids = dist.gather_with_grad(target_vecs), dist.gather_objects(targets)
    user_targets = [targets[int(i) // G] for i in best]
    logp = in_batch_log_probs(h_T[best], all_targets, all_ids, model.tau, user_targets)
    if torch.is_grad_enabled():
        table.update(targets, target_vecs)  # DESIGN §3 step 7: the batch's rows are now fresh
    return logp


def policy_loss(
    model: R2ec, table: ItemTable, rb: RolloutBatch, cfg: RecPOConfig
) -> tuple[torch.Tensor, dict]:
    """DESIGN §3 steps 4-6: clipped token loss + clipped item loss, with gradient."""
    model.lm.train()
    h_T, logp, mask = _policy_forward(model, rb.rollout, cfg.temperature)
    adv = rb.advantages.to(logp.device)
    t_loss, t_stats = token_loss(logp, rb.old_token_logp, adv, mask, cfg.epsilon, cfg.epsilon_high)
    # RecPO, arXiv 2505.16994 §3.2: only the best trajectory per user trains rec_head.
    i_logp = _item_log_probs(model, table, h_T, rb.targets, rb.best, cfg.num_generations)
    i_loss, i_stats = item_loss(i_logp, rb.old_item_logp, adv[rb.best], cfg.epsilon, cfg.epsilon_high)
    loss = t_loss + i_loss
    return loss, {
        "loss/total": float(loss.detach()),
        "loss/token": float(t_loss.detach()),
        "loss/item": float(i_loss.detach()),
        **t_stats,
        **i_stats,
    }


def contrastive_step(
    model: R2ec, table: ItemTable, rows, titles: dict, cfg: RecPOConfig
) -> tuple[torch.Tensor, dict]:
    """The "w/o reasoning" objective: h_T straight after the prompt, softmax over the batch's
    targets plus `sampled_negatives` uniform catalog items (negatives "in_batch": encoded with
    gradient, gathered across processes, logQ corrected) or over the whole detached item
    table (negatives "table")."""
    model.lm.train()
    histories = sample_histories(rows, titles)
    targets = [str(t) for t in rows["target_item_id"]]
    prompt_ids = model.user_prompt_ids(histories)
    users = model.user_vectors_from_ids(prompt_ids, [[] for _ in prompt_ids])  # (B, H)
    if cfg.negatives == "table":
        logits = users @ table.vectors.to(users.device).T / model.tau  # (B, N), table detached
        own = torch.tensor([table.row[t] for t in targets], device=logits.device)
        if cfg.mask_history:
            drop = table.history_mask(list(rows["history_item_ids"])).to(logits.device)
            drop[torch.arange(len(targets)), own] = False  # never mask the target itself
            logits = logits.masked_fill(drop, float("-inf"))
    else:
        cols = targets + table.sample_uniform(cfg.sampled_negatives)
        col_vecs = table.encode(model, cols)
        all_vecs, all_ids = dist.gather_with_grad(col_vecs), dist.gather_objects(cols)
        logits, own = in_batch_logits(users, all_vecs, all_ids, model.tau, targets)  # grad both sides
        if cfg.logq_correction and table.log_q is not None:
            log_q = table.log_q_of(all_ids)  # (C,)
            count = log_expected_count(log_q, len(targets), cfg.sampled_negatives, len(table.item_ids))
            logits = logits - count.to(logits.device)
        table.update(cols, col_vecs)
    return contrastive_loss(logits, own)


def _mean_stats(parts: list[dict]) -> dict[str, float]:
    keys = {k for p in parts for k in p}
    return {k: float(np.mean([p[k] for p in parts if k in p])) for k in keys}


class Optimizer:
    """AdamW + linear warmup + gradient clipping, gradients averaged across processes."""

    def __init__(self, params: list[torch.nn.Parameter], cfg: RecPOConfig) -> None:
        self.params, self.cfg = params, cfg
        self.opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg))

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


def recpo_update(model, table, batches: list, titles: dict, cfg: RecPOConfig, opt: Optimizer) -> dict:
    """Roll out every micro-batch, then `num_iterations` clipped updates on them."""
    rbs = [make_rollout(model, table, rows, titles, cfg) for rows in batches]
    parts: list[dict] = []
    for _ in range(cfg.num_iterations):
        for rb in rbs:
            loss, stats = policy_loss(model, table, rb, cfg)
            (loss / len(rbs)).backward()
            parts.append(stats)
        parts.append({"grad_norm": opt.step()})
    return {
        **_mean_stats([rb.stats for rb in rbs]),
        **_mean_stats(parts),
        "trajectories": float(sum(rb.stats["trajectories"] for rb in rbs)),
    }


def contrastive_update(model, table, batches: list, titles: dict, cfg: RecPOConfig, opt: Optimizer) -> dict:
    parts = []
    for rows in batches:
        loss, stats = contrastive_step(model, table, rows, titles, cfg)
        (loss / len(batches)).backward()
        parts.append(stats)
    return {**_mean_stats(parts), "grad_norm": opt.step()}


UPDATES = {"recpo": recpo_update, "contrastive": contrastive_update}


# -- the loop ----------------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0
    best_metric: float = -1.0
    best_metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _lr_lambda(cfg: RecPOConfig):
    def fn(step: int) -> float:  # linear warmup, then constant
        return min(1.0, (step + 1) / max(1, cfg.warmup_steps))

    return fn


def train(
    cfg: RecPOConfig, dataset: PreparedDataset, base: str, out: Path | str, resume: bool = False
) -> Path:
    """Train and return the path of the best checkpoint."""
    out = Path(out)
    dist.init()
    is_main = dist.rank() == 0
    torch.manual_seed(cfg.seed)
    resume_dir = out / "last"
    if resume and not (resume_dir / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume: no {resume_dir / STATE_FILE} to resume from")
    model, base_ref = build_model(cfg, str(resume_dir) if resume else base, dataset.category)
    model.lm.to(dist.resolve_device(cfg.device))
    if resume:
        base_ref = read_meta(resume_dir)["base"]
    params = trainable_parameters(model)
    dist.broadcast_parameters(params)  # identical start on every process
    opt = Optimizer(params, cfg)
    items = dataset.items.to_dict("records")
    table = ItemTable.build(model, items)
    model.lm.eval()
    table.cache_lower(model, cfg.item_layer_cache_gb, progress=is_main)
    state = TrainState()
    if resume:
        blob = torch.load(resume_dir / STATE_FILE, weights_only=False)
        opt.load_state_dict(blob)
        state = TrainState(**blob["state"])
        table.vectors = blob["item_table"]
        _set_rng(blob["rng"][dist.rank()] if dist.rank() < len(blob["rng"]) else blob["rng"][0])
        log.info("resumed from %s at step %d", resume_dir, state.step)
    else:
        model.lm.eval()
        table.refresh(model, progress=is_main)
    out.mkdir(parents=True, exist_ok=True)
    train_rows = dataset.split("train")
    table.set_target_counts([str(t) for t in train_rows["target_item_id"]])
    titles = dataset.item_titles()
    update = UPDATES[cfg.stage]
    start_wall = time.perf_counter() - state.seconds
    # In-batch contrastive training never reads the table between evals (which refresh it).
    reads_table = not (cfg.stage == "contrastive" and cfg.negatives == "in_batch")
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc=f"train {cfg.stage}", disable=not is_main)
    while state.step < cfg.max_steps:
        t0 = time.perf_counter()
        # (a step right after an eval already has a fresh table)
        due = state.step > 0 and state.step % cfg.refresh_every == 0 and state.step % cfg.eval_every != 0
        if reads_table and due:
            model.lm.eval()
            table.refresh(model)
        batches = [
            _batch_rows(train_rows, cfg, state.step, m) for m in range(cfg.gradient_accumulation_steps)
        ]
        stats = update(model, table, batches, titles, cfg, opt)
        state.step += 1
        step_seconds = time.perf_counter() - t0
        state.seconds = time.perf_counter() - start_wall
        record = {
            "step": state.step,
            **stats,
            "lr": opt.sched.get_last_lr()[0],
            "seconds/step": step_seconds,
            "seconds/total": state.seconds,
        }
        if "trajectories" in stats:
            record["trajectories/s"] = stats["trajectories"] * dist.world_size() / step_seconds
        if is_main:
            _append_log(out, record)
            bar.update(1)
            bar.set_postfix({k: f"{record[k]:.3f}" for k in ("loss/total", "reward/mean") if k in record})
        over_budget = cfg.time_budget_minutes is not None and state.seconds > 60 * cfg.time_budget_minutes
        last = state.step >= cfg.max_steps or dist.any_flag(over_budget)
        if state.step % cfg.eval_every == 0 or last:
            model.lm.eval()
            table.refresh(model)  # every process, sharded: eval and checkpoints use a fresh table
            _evaluate_and_keep_best(model, table, dataset, cfg, state, out, base_ref)
        if state.step % cfg.save_every == 0 or last:
            _save_last(model, table, dataset, cfg, state, out, base_ref, opt)
        if last:
            break
    bar.close()
    dist.barrier()
    return out / "best"


def _batch_rows(train_rows, cfg: RecPOConfig, step: int, micro: int):
    # Seeded by (seed, step, micro, rank): a resumed run draws exactly the same users.
    rng = np.random.default_rng([cfg.seed, step, micro, dist.rank()])
    return train_rows.iloc[rng.choice(len(train_rows), size=cfg.per_device_batch_size, replace=False)]


def _evaluate_and_keep_best(model, table, dataset, cfg, state, out, base_ref) -> None:
    if dist.rank() == 0:
        model.lm.eval()
        ecfg = EvalConfig(
            split="valid",
            reasoning=cfg.stage == "recpo",
            max_reasoning_tokens=cfg.reasoning_tokens_at_eval,
            limit=cfg.eval_limit,
        )
        result = evaluate_model(
            model, dataset.split("valid"), dataset.items, table.vectors, ecfg, progress=False
        )
        metrics = {f"valid/{k}": v for k, v in result.metrics.items()}
        _append_log(
            out,
            {
                "step": state.step,
                "eval": True,
                **metrics,
                "eval/seconds": result.seconds,
                "eval/examples": result.examples[:2],
            },
        )
        log.info(
            "step %d valid ndcg@10 %.4f hit@10 %.4f",
            state.step,
            result.metrics["ndcg@10"],
            result.metrics["hit@10"],
        )
        if result.metrics["ndcg@10"] > state.best_metric:
            state.best_metric = result.metrics["ndcg@10"]
            state.best_metrics = {
                "step": state.step,
                "split": "valid",
                "limit": cfg.eval_limit,
                **result.metrics,
            }
            _save(model, table, dataset, cfg, state, out / "best", base_ref)
        plot_curves(out / "log.jsonl", out / "curves.png")
    dist.barrier()


def _save(model, table, dataset, cfg, state, path, base_ref, write_extra=None) -> None:
    save_checkpoint(
        path,
        model,
        base=base_ref,
        weights=weights_kind(model),
        items=dataset.items,
        item_vectors=table.vectors.numpy(),
        dataset={"name": dataset.name, "protocol": dataset.protocol, "path": str(dataset.path)},
        metrics={"valid": state.best_metrics},
        extra={"train": {"step": state.step, "config": cfg.to_dict()}},
        write_extra=write_extra,
    )


def _save_last(model, table, dataset, cfg, state, out, base_ref, opt: Optimizer) -> None:
    rng = dist.gather_objects([_get_rng()])
    if dist.rank() == 0:
        blob = {**opt.state_dict(), "state": state.__dict__, "item_table": table.vectors, "rng": rng}
        _save(
            model,
            table,
            dataset,
            cfg,
            state,
            out / "last",
            base_ref,
            write_extra=lambda tmp: torch.save(blob, tmp / STATE_FILE),
        )
    dist.barrier()


def _get_rng() -> dict:
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()  # sampling on the GPU draws from this one
    return rng


def _set_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])


def _append_log(out: Path, record: dict) -> None:
    with open(out / "log.jsonl", "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
