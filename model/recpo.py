"""RecPO configuration and its group math: advantages and the best trajectories.

R²ec, arXiv 2505.16994 §3.2 and Appendix E; DESIGN §3. The rewards are in
model/rewards.py, the losses in model/losses.py; the training loop in model/train.py
only calls these functions.

Shapes: B users, G generations per user, M = B*G rollouts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from model import distributed as dist

ADVANTAGES = ("grpo", "rloo")
STAGES = ("recpo", "contrastive")


@dataclass
class RecPOConfig:
    """Every knob of `r2ec train`, TRL's names where they exist."""

    # -- what to train -----------------------------------------------------------------------
    stage: str = "recpo"  # "recpo", or "contrastive": the "w/o reasoning" warm-up
    lora: bool = True  # LoRA adapters (fp32) over a frozen base; False = full fine-tuning
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_layers: int | None = None  # adapters on the top this-many decoder layers only (None = all):
    # backward then stops there, which roughly halves a CPU step at 8 of SmolLM2's 30 layers
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    dtype: str = "bfloat16"  # base model dtype; LoRA weights stay fp32
    # With LoRA on the top lora_layers only, item prompts' outputs of the frozen layers below
    # are computed once and kept, up to this many GB (0 = off); see ItemTable.cache_lower.
    item_layer_cache_gb: float = 2.0
    tau: float = 0.02  # temperature of s(u, v) = cos / tau
    # The prompts' system turn when training starts from a backbone (None: the chat template's
    # default). A checkpoint keeps its own prompts, so warm starts and serving render the same.
    system_prompt: str | None = None
    # -- rollout -------------------------------------------------------------------------------
    num_generations: int = 4  # G trajectories per user
    temperature: float = 1.0
    top_k: int = 50
    max_completion_length: int = 64  # reasoning token budget per trajectory
    # -- reward and advantage ------------------------------------------------------------------
    similarity_reward_weight: float = 0.05  # beta in R = beta*R_c + (1-beta)*R_d
    ndcg_k: int = 1000  # cut-off of R_d
    advantage: str = "grpo"  # "grpo": (R - mean)/(std + eps); "rloo": R - mean of the others
    mask_history: bool = True  # drop history items from the reward's ranking (as eval does)
    # -- losses --------------------------------------------------------------------------------
    epsilon: float = 0.2  # clip ratio to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float = 0.28
    best_n: int = 1  # trajectories per user that train rec_head (top advantages)
    num_iterations: int = 1  # policy updates per rollout batch (PPO epochs, TRL's mu)
    # Contrastive stage, which items each user is scored against:
    #   "in_batch": the batch's targets, encoded live with gradient (both towers learn);
    #   "table": the whole catalog from the detached item table, refreshed every
    #     refresh_every steps (only the user side gets gradient; exact full softmax).
    # Never mix the two: live columns next to stale ones let the model learn to tell fresh
    # from stale (train rank 7, valid NDCG ~0 on ml-100k) instead of users from items.
    negatives: str = "in_batch"
    # Subtract log q(item) (its share of training targets) from in-batch logits: in-batch
    # negatives are drawn by popularity, and without it the model learns to demote popular
    # items (sampled-softmax correction, Yi et al., RecSys 2019).
    logq_correction: bool = True
    # "in_batch" only: this many catalog items drawn uniformly per process per step, encoded
    # live with gradient and added to the in-batch columns (mixed negative sampling).
    sampled_negatives: int = 0
    # -- optimisation --------------------------------------------------------------------------
    per_device_batch_size: int = 4  # B users per process per step
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    max_steps: int = 100
    time_budget_minutes: float | None = None  # stop (and save) once this much wall time is spent
    refresh_every: int = 50  # re-encode the whole catalog every this many steps
    # -- eval and checkpoints ------------------------------------------------------------------
    eval_every: int = 25
    eval_limit: int | None = 200  # valid samples per periodic eval (None = all)
    eval_reasoning_tokens: int | None = None  # default: max_completion_length
    save_every: int = 25
    seed: int = 0
    # "auto": this process's GPU (cuda:LOCAL_RANK) when torch sees one, else the CPU.
    device: str = "auto"

    def __post_init__(self) -> None:
        dist.check_device_name(self.device)
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {ADVANTAGES}, got {self.advantage!r}")
        if self.stage == "recpo" and self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: group advantages need a group")
        if self.advantage == "rloo" and self.num_generations < 2:
            raise ValueError("rloo needs num_generations >= 2 (the leave-one-out mean)")
        if not 0.0 <= self.similarity_reward_weight <= 1.0:
            raise ValueError("similarity_reward_weight (beta) must be in [0, 1]")
        if not 1 <= self.best_n <= self.num_generations:
            raise ValueError(f"best_n must be in [1, num_generations={self.num_generations}]")
        if self.epsilon <= 0 or self.epsilon_high <= 0:
            raise ValueError("epsilon and epsilon_high must be > 0")
        for name in (
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "max_steps",
            "refresh_every",
            "eval_every",
            "save_every",
            "num_iterations",
            "ndcg_k",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sampled_negatives < 0:
            raise ValueError(f"sampled_negatives must be >= 0, got {self.sampled_negatives}")
        if self.negatives not in ("in_batch", "table"):
            raise ValueError(f"negatives must be 'in_batch' or 'table', got {self.negatives!r}")
        if self.stage == "contrastive" and self.per_device_batch_size < 2 and self.negatives == "in_batch":
            raise ValueError(
                "in-batch contrastive training needs per_device_batch_size >= 2 (or negatives: table)"
            )
        if self.lora_layers is not None and self.lora_layers < 1:
            raise ValueError(f"lora_layers must be >= 1 or null, got {self.lora_layers}")
        if self.item_layer_cache_gb < 0:
            raise ValueError(f"item_layer_cache_gb must be >= 0, got {self.item_layer_cache_gb}")
        if self.tau <= 0 or self.temperature <= 0:
            raise ValueError("tau and temperature must be > 0")

    @property
    def reasoning_tokens_at_eval(self) -> int:
        return (
            self.max_completion_length if self.eval_reasoning_tokens is None else self.eval_reasoning_tokens
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_yaml(cls, path: Path | str, **overrides: Any) -> RecPOConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})


def group_advantages(rewards: torch.Tensor, num_generations: int, kind: str) -> torch.Tensor:
    """Advantages within each user's group of G rollouts: rewards (B*G,) -> (B*G,).

    grpo: A_i = (R_i - mean) / (std + 1e-8)           (DeepSeekMath GRPO; DESIGN §3 step 3)
    rloo: A_i = R_i - mean of the other G-1 rewards   (Ahmadian et al. 2024)
    A group of equal rewards gives zero advantage under both.
    """
    grouped = rewards.float().view(-1, num_generations)  # (B, G)
    match kind:
        case "grpo":
            mean = grouped.mean(dim=1, keepdim=True)
            std = grouped.std(dim=1, keepdim=True, unbiased=False)
            adv = (grouped - mean) / (std + 1e-8)
        case "rloo":
            others = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
            adv = grouped - others
        case _:
            raise ValueError(f"unknown advantage {kind!r}; use one of {ADVANTAGES}")
    return adv.reshape(-1)


def best_trajectories(advantages: torch.Tensor, num_generations: int, best_n: int) -> torch.Tensor:
    """Flat indices (B*best_n,) of each group's top-`best_n` advantages, user-major.

    RecPO, arXiv 2505.16994 §3.2: only the best trajectory trains rec_head.
    """
    grouped = advantages.view(-1, num_generations)  # (B, G)
    top = grouped.topk(best_n, dim=1).indices  # (B, best_n)
    offsets = torch.arange(grouped.shape[0], device=advantages.device).unsqueeze(1) * num_generations
    return (top + offsets).reshape(-1)
