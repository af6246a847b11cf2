"""RecPO configuration and its group math: advantages and the best trajectories.

R²ec, arXiv 2505.16994 §3.2 and Appendix E; docs/architecture.md §3. The rewards are in
model/rewards.py, the losses in model/losses.py; the training loop in model/train.py
only calls these functions.

Shapes: B users, G generations per user, M = B*G rollouts.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from model import distributed as dist

ADVANTAGES = ("grpo", "rloo")
STAGES = ("recpo", "contrastive", "rationale")
NEGATIVES = ("in_batch", "table")


@dataclass
class RecPOConfig:
    r"""Every knob of `r2ec train` (and of `r2ec retrain`'s run), TRL's names where they exist.

    Read from YAML with `from_yaml` (unknown keys are an error); `__post_init__` rejects bad
    values and combinations with a message that says how to fix them. Terms: B users per
    micro-batch, G generations per user; "the table" is the item table H_V, every catalog
    item's vector (model/item_table.py).

    Parameters:
        > What to train

        stage (`str`, defaults to `"recpo"`):
            `"recpo"`: RecPO (R²ec, arXiv 2505.16994 §3.2): G reasoning rollouts per user, fused
            reward, clipped token and item losses. `"contrastive"`: the paper's "w/o reasoning"
            objective as a warm-up: no generation, a softmax of each user over items.
            `"rationale"`: the reasoning cold start (model/rationale.py): teacher-force a
            rationale built from the data (LM loss) and, in the same forward, the contrastive
            loss on h_T after [prompt; rationale; marker], plus the same loss on h_T after the
            model's own greedy rationale for `rationale_self_users` users.
        lora (`bool`, defaults to `True`):
            Train LoRA adapters (fp32) over a frozen base; `False` fine-tunes every weight.
        lora_r (`int`, defaults to `16`):
            LoRA rank.
        lora_alpha (`int`, defaults to `32`):
            LoRA scaling numerator (the update is scaled by lora_alpha / lora_r).
        lora_dropout (`float`, defaults to `0.0`):
            Dropout on the LoRA branch's input, in [0, 1).
        lora_layers (`int` or `None`, defaults to `None`):
            Put adapters on the top this-many decoder layers only (`None`: all). Backward then
            stops there, which roughly halves a CPU step at 8 of SmolLM2's 30 layers, and the
            frozen layers below can be cached (`item_layer_cache_gb`). Needs `lora`.
        lora_target_modules (`list[str]`, defaults to the seven projections below):
            The linear layers that get adapters: by default the attention and MLP projections
            of Llama-style backbones, `["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
            "up_proj", "down_proj"]`.
        dtype (`str`, defaults to `"bfloat16"`):
            The base model's dtype: `"bfloat16"`, `"float32"` or `"float16"`. Trainable
            weights (LoRA adapters) are kept in fp32 whatever this is.
        item_layer_cache_gb (`float`, defaults to `2.0`):
            With adapters on the top `lora_layers` only, each item prompt's output of the
            frozen layers below is computed once and kept if it fits in this many GB (`0`:
            off), so live item encoding runs only the trainable layers
            (`ItemTable.cache_lower`).
        tau (`float`, defaults to `0.02`):
            Temperature of the item score s(u, v) = cos(h_T, h_v) / tau.
        system_prompt (`str` or `None`, defaults to `None`):
            The prompts' system turn when training starts from a backbone (`None`: the chat
            template's default). A checkpoint keeps its own prompts, so warm starts and
            serving render the same.
        user_layer_cache_gb (`float`, defaults to `0.0`):
            Stages contrastive and rationale: keep the frozen lower layers' outputs of each
            training sample's user sequence after its first visit, up to this many GB
            (model/lower_cache.py), so a revisited sample runs only the trainable top layers.
            Pays off when samples come back (`train_samples_per_user`); `0`: off.
        train_samples_per_user (`int` or `None`, defaults to `None`):
            Train on each user's latest this-many training samples only (the ones nearest to
            the valid and test targets); `None`: all of them.
        max_history (`int`, defaults to `20`):
            The user prompt's history window (latest items) when training starts from a
            backbone; the paper's official code uses 10, which makes prompts ~40% shorter.
            Stored in the checkpoint's prompts like `system_prompt`.
        include_time (`bool`, defaults to `False`):
            History lines with the paper's relative time ("2d 3.5h ago: [Fargo] (5)", the time
            before the sample's target; model/prompts.py) when training starts from a backbone.
            Stored in the checkpoint's prompts like `system_prompt`.
        cowatch_hints (`int` or `None`, defaults to `None`):
            End each user prompt with this many items other users watched next after the
            history's items ("Often watched next by others: A; B; C.", model/cowatch.py); `0`:
            none (the paper's prompt); `None`: what the warm start's checkpoint had (none from a
            backbone). The table is counted from the run's training split and saved in its
            checkpoints; a training sample's hints leave out its own user's pairs.
        cowatch_distill (`float`, defaults to `0.0`):
            Stages contrastive and rationale, with hints: weight w of the co-watch
            distillation, the item loss becoming (1 - w) * the target's cross-entropy + w * a
            soft cross-entropy of the user's softmax (the step's columns plus its own hinted
            items) against the hints' co-watch counts (model/train.py). `0`: off.

        > Rollout (stage recpo)

        num_generations (`int`, defaults to `4`):
            G, reasoning trajectories sampled per user; at least 2 for group advantages.
        temperature (`float`, defaults to `1.0`):
            Sampling temperature of the rollouts; the token log-probs of the loss are taken at
            the same temperature.
        top_k (`int`, defaults to `50`):
            Sample from the top-k tokens only (`0`: no cut).
        max_completion_length (`int`, defaults to `64`):
            Reasoning token budget per trajectory.
        constrain_titles (`bool`, defaults to `True`):
            Sample the rollouts' claims (the "Likes" genres, the decades, the "Rated highest:"
            title list, the "Lately more" genre) under the grammars of what holds for the history
            (model/constrained.py), as `r2ec eval` and the service decode them, so RecPO
            rewards the texts inference can write. Sampled freely at temperature 1.0, 64% of the
            shipped model's rollouts named a title the catalog lacks (BENCHMARKS.md §1).

        > Reward and advantage (stage recpo)

        similarity_reward_weight (`float`, defaults to `0.05`):
            beta in the fused reward R = beta * R_c + (1 - beta) * R_d (R_c: the target's
            softmax probability over all items; R_d: NDCG of its rank). Not TRL's KL beta.
        ndcg_k (`int`, defaults to `1000`):
            Cut-off K of R_d = NDCG@K of the target's rank in the whole catalog.
        advantage (`str`, defaults to `"grpo"`):
            `"grpo"`: A = (R - group mean) / (group std + 1e-8); `"rloo"`: A = R - the mean of
            the group's other G - 1 rewards.
        mask_history (`bool`, defaults to `True`):
            Drop the user's history items from the ranking that rewards (and, for
            `negatives: table`, the contrastive softmax) are computed over, as eval does.

        > Losses

        epsilon (`float`, defaults to `0.2`):
            Lower clip of the policy ratio: it is clipped to [1 - epsilon, 1 + epsilon_high].
        epsilon_high (`float`, defaults to `0.28`):
            Upper clip of the policy ratio (DAPO's clip-higher).
        best_n (`int`, defaults to `1`):
            Trajectories per user, by top advantage, whose h_T trains rec_head through the
            item loss (RecPO, arXiv 2505.16994 §3.2: the best one).
        num_iterations (`int`, defaults to `1`):
            Policy updates per rollout batch (TRL's mu, PPO epochs); above 1 the ratio moves
            away from 1 and clipping starts to act.
        negatives (`str`, defaults to `"in_batch"`):
            Stage contrastive: what each user is scored against. `"in_batch"`: the batch's
            targets (plus `sampled_negatives`), encoded live with gradient, so both towers
            learn. `"table"`: the whole catalog from the detached item table, refreshed every
            `refresh_every` steps (an exact full softmax; only the user side learns). The two
            are never mixed: live columns next to stale ones let the model learn to tell
            fresh from stale (train rank 7, valid NDCG ~0 on ml-100k) instead of users from
            items.
        logq_correction (`bool`, defaults to `True`):
            `negatives: in_batch`: subtract log E[times drawn] (from each item's share of
            training targets) from the logits. In-batch negatives are drawn by popularity,
            and without it the model learns to demote popular items (sampled-softmax
            correction, Yi et al., RecSys 2019).
        sampled_negatives (`int`, defaults to `0`):
            `negatives: in_batch`: this many catalog items drawn uniformly per process per
            step, encoded live with gradient and added to the in-batch columns (mixed negative
            sampling, Yang et al. 2020).

        > The rationale stage

        rationale_lm_weight (`float`, defaults to `1.0`):
            Weight of the LM loss (mean over the rationale's tokens, its stop token included).
        rationale_hindsight (`bool`, defaults to `True`):
            End the data-built rationale with the hindsight sentence (the next item's decade
            and genres). `False`: the rationale says what the history says and nothing the
            prompt does not determine, so the teacher-forced text is one the model can learn
            to write exactly and rec_head never learns to trust a leaked label; the
            self-written rows (below) are then not needed.
        rationale_self_users (`int`, defaults to `4`):
            Users per micro-batch whose rationale's hindsight sentence ("Next: ...") the model
            writes itself (greedy, no gradient) after the teacher-forced part that follows from
            the history, and whose h_T is scored too: the hindsight is a guess at inference, so
            rec_head must also learn from guesses the model really makes (exposure bias). `0`:
            teacher forcing only.
        rationale_self_tokens (`int`, defaults to `16`):
            Token budget of that self-written hindsight sentence (the data-built one is ~12).
        rationale_self_weight (`float`, defaults to `0.5`):
            Share of the contrastive loss on the self-written rationales; the teacher-forced
            ones get the rest.
        rationale_hint_picks (`int`, defaults to `0`):
            End the data-built rationale with "Picks: A; B; C." naming this many of the
            prompt's co-watch hints, strongest first (model/rationale.py `picks_line`): a text
            the model can copy from its prompt, read just before h_T. `0`: no such sentence.
            An experiment (BENCHMARKS.md §1, stop 23); needs co-watch hints.

        > Optimisation

        per_device_batch_size (`int`, defaults to `4`):
            B, users per micro-batch on each process.
        gradient_accumulation_steps (`int`, defaults to `1`):
            Micro-batches per optimizer step; their losses are averaged.
        learning_rate (`float`, defaults to `1e-4`):
            AdamW's peak learning rate.
        weight_decay (`float`, defaults to `0.0`):
            AdamW's decoupled weight decay.
        warmup_steps (`int`, defaults to `10`):
            Steps of linear learning-rate warmup from lr / warmup_steps; constant after, or
            decaying when `lr_decay_steps` is set.
        lr_decay_steps (`int` or `None`, defaults to `None`):
            Cosine decay of the learning rate after warmup, reaching `min_lr_ratio` of the peak
            at this step and staying there; `None`: constant.
        min_lr_ratio (`float`, defaults to `0.1`):
            The decayed learning rate, as a share of `learning_rate`.
        max_grad_norm (`float`, defaults to `1.0`):
            Clip the global gradient norm to this before each optimizer step.
        max_steps (`int`, defaults to `100`):
            Optimizer steps to train for, counting the steps of the run being resumed.
        time_budget_minutes (`float` or `None`, defaults to `None`):
            Stop (evaluating and saving first) once this much wall time is spent, counting
            the time of the run being resumed; `None`: no budget.
        refresh_every (`int`, defaults to `50`):
            Re-encode the whole catalog into the item table every this many steps, when the
            stage reads the table (recpo, or `negatives: table`); every eval refreshes too.

        > Evaluation and checkpoints

        eval_every (`int`, defaults to `25`):
            Evaluate on the valid split every this many steps and at the last; the best
            NDCG@10 so far is kept as OUT/best.
        eval_limit (`int` or `None`, defaults to `200`):
            Valid samples per eval, the first this many (`None`: all of them).
        eval_reasoning_tokens (`int` or `None`, defaults to `None`):
            Reasoning budget of the (greedy) evals of stage recpo; `None`: max_completion_length.
        save_every (`int`, defaults to `25`):
            Write OUT/last (the checkpoint plus what --resume needs) every this many steps
            and at the last.
        seed (`int`, defaults to `0`):
            Seeds torch at the start and each step's draw of users, so a resumed run draws
            the same users as an uninterrupted one.
        device (`str`, defaults to `"auto"`):
            `"auto"`: this process's GPU (cuda:LOCAL_RANK) when torch sees one, else the CPU;
            or `"cpu"`, `"cuda"`, `"cuda:N"`.
    """

    # -- what to train
    stage: str = "recpo"
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_layers: int | None = None
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    dtype: str = "bfloat16"
    item_layer_cache_gb: float = 2.0
    tau: float = 0.02
    system_prompt: str | None = None
    user_layer_cache_gb: float = 0.0
    train_samples_per_user: int | None = None
    max_history: int = 20
    include_time: bool = False
    cowatch_hints: int | None = None
    cowatch_distill: float = 0.0
    # -- rollout
    num_generations: int = 4
    temperature: float = 1.0
    top_k: int = 50
    max_completion_length: int = 64
    constrain_titles: bool = True
    # -- reward and advantage
    similarity_reward_weight: float = 0.05
    ndcg_k: int = 1000
    advantage: str = "grpo"
    mask_history: bool = True
    # -- losses
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    best_n: int = 1
    num_iterations: int = 1
    negatives: str = "in_batch"
    logq_correction: bool = True
    sampled_negatives: int = 0
    # -- the rationale stage
    rationale_lm_weight: float = 1.0
    rationale_hindsight: bool = True
    rationale_self_users: int = 4
    rationale_self_tokens: int = 16
    rationale_self_weight: float = 0.5
    rationale_hint_picks: int = 0
    # -- optimisation
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lr_decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_steps: int = 100
    time_budget_minutes: float | None = None
    refresh_every: int = 50
    # -- evaluation and checkpoints
    eval_every: int = 25
    eval_limit: int | None = 200
    eval_reasoning_tokens: int | None = None
    save_every: int = 25
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        dist.check_device_name(self.device)
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {ADVANTAGES}, got {self.advantage!r}")
        if self.negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}, got {self.negatives!r}")
        for name in (
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "max_steps",
            "refresh_every",
            "eval_every",
            "save_every",
            "num_iterations",
            "ndcg_k",
            "num_generations",
            "lora_r",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cowatch_hints is not None and self.cowatch_hints < 0:
            raise ValueError(f"cowatch_hints must be >= 0 or null, got {self.cowatch_hints}")
        if not 0.0 <= self.cowatch_distill <= 1.0:
            raise ValueError(f"cowatch_distill must be in [0, 1], got {self.cowatch_distill}")
        if self.cowatch_distill and self.cowatch_hints == 0:
            raise ValueError("cowatch_distill needs co-watch hints: set cowatch_hints > 0 (or null)")
        if self.lr_decay_steps is not None and self.lr_decay_steps <= self.warmup_steps:
            raise ValueError(
                f"lr_decay_steps must be > warmup_steps ({self.warmup_steps}) or null, "
                f"got {self.lr_decay_steps}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.train_samples_per_user is not None and self.train_samples_per_user < 1:
            raise ValueError(
                f"train_samples_per_user must be >= 1 or null, got {self.train_samples_per_user}"
            )
        for name in (
            "sampled_negatives",
            "warmup_steps",
            "top_k",
            "weight_decay",
            "item_layer_cache_gb",
            "user_layer_cache_gb",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("tau", "temperature", "learning_rate", "max_grad_norm", "lora_alpha", "epsilon_high"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.stage == "recpo" and self.num_generations < 2:
            raise ValueError(
                "num_generations must be >= 2 for stage recpo: group advantages need a group "
                "(for training without rollouts use stage: contrastive)"
            )
        if self.advantage == "rloo" and self.num_generations < 2:
            raise ValueError("rloo needs num_generations >= 2 (the leave-one-out mean)")
        if self.stage == "recpo" and self.max_completion_length < 1:
            raise ValueError(
                "max_completion_length must be >= 1 for stage recpo (it is the reasoning budget); "
                "for training without reasoning use stage: contrastive"
            )
        if not 0.0 <= self.similarity_reward_weight <= 1.0:
            raise ValueError(
                f"similarity_reward_weight (beta) must be in [0, 1], got {self.similarity_reward_weight}"
            )
        if not 1 <= self.best_n <= self.num_generations:
            raise ValueError(
                f"best_n must be in [1, num_generations={self.num_generations}], got {self.best_n}: "
                "lower best_n or raise num_generations"
            )
        if not 0.0 < self.epsilon < 1.0:
            raise ValueError(
                f"epsilon must be in (0, 1) (the ratio's lower clip is 1 - epsilon), got {self.epsilon}"
            )
        if self.stage != "recpo" and self.per_device_batch_size < 2 and self.negatives == "in_batch":
            raise ValueError(
                "in-batch contrastive training needs per_device_batch_size >= 2 (or negatives: table)"
            )
        if self.stage == "rationale" and self.negatives != "in_batch":
            raise ValueError("stage rationale scores users against in-batch items: set negatives: in_batch")
        if self.stage == "rationale" and not self.rationale_hindsight and self.rationale_self_users > 0:
            raise ValueError(
                "rationale_self_users > 0 has the model write the hindsight sentence, which "
                "rationale_hindsight: false leaves out: set rationale_self_users: 0"
            )
        if self.stage == "rationale" and self.rationale_self_users > 0 and self.rationale_self_tokens < 1:
            raise ValueError("rationale_self_users > 0 needs rationale_self_tokens >= 1 (their budget)")
        if self.rationale_hint_picks < 0:
            raise ValueError(f"rationale_hint_picks must be >= 0, got {self.rationale_hint_picks}")
        if self.rationale_hint_picks and self.cowatch_hints == 0:
            raise ValueError("rationale_hint_picks needs co-watch hints: set cowatch_hints > 0 (or null)")
        if self.cowatch_hints is not None and self.rationale_hint_picks > self.cowatch_hints:
            raise ValueError(
                f"rationale_hint_picks ({self.rationale_hint_picks}) names more hints than the prompt's "
                f"cowatch_hints ({self.cowatch_hints})"
            )
        if self.rationale_hint_picks and self.rationale_self_users:
            raise ValueError(
                "rationale_hint_picks ends the teacher-forced rationale only; the self-written "
                "rows would lack it: set rationale_self_users: 0"
            )
        if not 0.0 <= self.rationale_self_weight <= 1.0:
            raise ValueError(f"rationale_self_weight must be in [0, 1], got {self.rationale_self_weight}")
        if self.rationale_lm_weight < 0 or self.rationale_self_users < 0:
            raise ValueError("rationale_lm_weight and rationale_self_users must be >= 0")
        if self.stage == "contrastive" and self.negatives == "table" and self.sampled_negatives > 0:
            raise ValueError(
                "sampled_negatives only applies to negatives: in_batch (negatives: table already "
                "scores every item); set sampled_negatives: 0 or negatives: in_batch"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise ValueError(f"lora_layers must be >= 1 or null (all layers), got {self.lora_layers}")
        if self.lora_layers is not None and not self.lora:
            raise ValueError(
                f"lora_layers={self.lora_layers} needs lora: true (full fine-tuning trains every "
                "layer); set lora: true, or lora_layers: null"
            )
        if self.time_budget_minutes is not None and self.time_budget_minutes <= 0:
            raise ValueError(
                f"time_budget_minutes must be > 0 or null (no budget), got {self.time_budget_minutes}"
            )
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(
                f"eval_limit must be >= 1 or null (the whole valid split), got {self.eval_limit}"
            )
        if self.eval_reasoning_tokens is not None and self.eval_reasoning_tokens < 0:
            raise ValueError(
                "eval_reasoning_tokens must be >= 0 or null (max_completion_length), "
                f"got {self.eval_reasoning_tokens}"
            )

    @property
    def reasoning_tokens_at_eval(self) -> int:
        return (
            self.max_completion_length if self.eval_reasoning_tokens is None else self.eval_reasoning_tokens
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_yaml(cls, path: Path | str, **overrides: Any) -> RecPOConfig:
        data = read_config_file(path, cls)
        return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})


def read_config_file(path: Path | str, cls: type = RecPOConfig) -> dict[str, Any]:
    """A YAML config file's `FIELD: VALUE` pairs, each a field of `cls` (an empty file: none).
    Raises ValueError starting with the path and saying what is wrong: no such file, not
    UTF-8, not YAML (with the line and column), not a mapping, or unknown keys."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a directory, not a YAML file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (a config is a YAML file of FIELD: VALUE lines)") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: holds a {type(data).__name__}, not FIELD: VALUE lines (e.g. `max_steps: 100`)"
        )
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}; known keys: {sorted(known)}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """e.g. "expected ',' or ']', but got '<stream end>' (line 2, column 1)", on one line."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description from a config class's "Parameters:" docstring section, in
    the order documented, each on one line (help texts for a CLI built from the fields)."""
    doc = inspect.getdoc(cls) or ""
    docs: dict[str, list[str]] = {}
    name = None
    for line in doc.partition("Parameters:")[2].splitlines():
        if m := re.match(r"    (\w+) \(.*\):$", line):
            name = m.group(1)
            docs[name] = []
        elif line.startswith(" " * 8) and name is not None:
            docs[name].append(line.strip())
        else:
            name = None  # a blank line or a "> group" heading ends a field
    return {k: " ".join(v) for k, v in docs.items()}


def group_advantages(rewards: torch.Tensor, num_generations: int, kind: str) -> torch.Tensor:
    """Advantages within each user's group of G rollouts: rewards (B*G,) -> (B*G,).

    grpo: A_i = (R_i - mean) / (std + 1e-8)           (DeepSeekMath GRPO; docs/architecture.md §3 step 3)
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
