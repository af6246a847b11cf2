"""The optimizer of a training run and the state that --resume restores."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from model import distributed as dist
from model.recpo import RecPOConfig


@dataclass
class TrainState:
    """Where a run stands; saved in OUT/last/trainer_state.pt so --resume continues exactly."""

    step: int = 0
    best_metric: float = -1.0  # valid NDCG@10 of OUT/best
    best_metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # wall time spent, over all resumptions


def lr_factor(step: int, cfg: RecPOConfig) -> float:
    """The learning rate at `step` as a share of the peak: linear warmup, then constant or,
    with `lr_decay_steps`, cosine down to `min_lr_ratio`."""
    warmup = max(1, cfg.warmup_steps)
    if step + 1 < warmup:
        return (step + 1) / warmup
    if cfg.lr_decay_steps is None:
        return 1.0
    progress = min(1.0, (step + 1 - warmup) / max(1, cfg.lr_decay_steps - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def decay_warning(cfg: RecPOConfig) -> str | None:
    """What to tell a run whose max_steps ends before `lr_decay_steps` (e.g. the recipe's 330
    shortened by `--max-steps`): its learning rate never decays as the schedule meant; None
    when it does (or nothing decays). A time budget can end a run early too, which no one
    knows before it runs: README's Train section says so."""
    if cfg.lr_decay_steps is None or cfg.max_steps >= cfg.lr_decay_steps:
        return None
    last = lr_factor(cfg.max_steps - 1, cfg)  # the rate the last step's update uses
    head = f"max_steps={cfg.max_steps} ends the run before lr_decay_steps={cfg.lr_decay_steps}"
    if cfg.max_steps <= cfg.warmup_steps:
        return (
            f"{head}, within its warmup_steps={cfg.warmup_steps}: the learning rate only rises (to "
            f"{last:.0%} of its peak by the last step) and never decays; to decay within the run, "
            f"lower warmup_steps below {cfg.max_steps} and --set lr_decay_steps={cfg.max_steps}"
        )
    return (
        f"{head}: its learning rate decays only to {last:.0%} of its peak by the last step (the "
        f"schedule reaches min_lr_ratio={cfg.min_lr_ratio:g} at step {cfg.lr_decay_steps}); to "
        f"decay within the run, --set lr_decay_steps={cfg.max_steps}"
    )


class Optimizer:
    """AdamW + linear warmup + gradient clipping, gradients averaged across processes."""

    def __init__(self, params: list[torch.nn.Parameter], cfg: RecPOConfig) -> None:
        self.params, self.cfg = params, cfg
        self.opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: lr_factor(step, cfg))

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


def mean_stats(parts: list[dict]) -> dict[str, float]:
    """Each key's mean over the parts that have it."""
    keys = dict.fromkeys(k for p in parts for k in p)  # first-seen order: stable log.jsonl keys
    return {k: float(np.mean([p[k] for p in parts if k in p])) for k in keys}
