"""Full-ranking evaluation: Hit@K and NDCG@K over the whole catalog (docs/architecture.md §2).

The target's rank is the number of items scored at least as high as it, itself included: ties
count against it (`target_rank`), so scoring items alike earns nothing. Which already-known
items leave the ranking is the `mask`:

- `seen` (the default, the field's protocol: RecBole's and most papers'): every item the user
  interacted with before the target: for a test sample everything in the user's train and
  valid samples, for a valid sample the train samples, plus the sample's own history and the
  user's earlier samples in the same split (`temporal` puts many there; `seen_items`);
- `prompt`: only the sample's stored history (<= 20 items; a prompt shows its latest
  `max_history`);
- `none`: nothing.

The target itself is never masked, so a re-consumed item can still be found. Each metric comes
with its standard error, clustered by user (`mean_stderr`); `paired_difference` compares two
runs on the same samples by a metric, `paired_ranks` by the target's whole rank; `ranks_frame`
/ `write_ranks` keep a run's per-sample ranks so a later run can be paired with it
(`paired_with_saved`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from model.data.dataset import SPLITS, PreparedDataset, atomic_write
from model.prompts import PromptConfig
from model.r2ec import GenerationSettings, R2ec
from model.rationale import Claims, catalog_facts, check_claims, history_facts
from model.rewards import ndcg_at_k, target_rank
from model.samples import sample_histories
from model.text_quality import text_quality

if TYPE_CHECKING:
    from model.generation import Backend
    from model.recpo import RecPOConfig

log = logging.getLogger(__name__)

KS = (5, 10, 20)


def target_ranks(
    scores: torch.Tensor, targets: torch.Tensor, exclude: Sequence[Sequence[int]] | None = None
) -> torch.Tensor:
    """1-based rank of each row's target: scores (B, N), targets (B,) -> (B,) long. A NaN
    score is refused: it compares with nothing, so a row holding one has no ranking to read."""
    if bad := int(torch.isnan(scores).any(dim=1).sum()):
        raise ValueError(f"scores hold NaN in {bad} of {len(scores)} rows; the model's vectors are broken")
    mask = None
    if exclude is not None:
        mask = torch.zeros(scores.shape, dtype=torch.bool)
        for i, cols in enumerate(exclude):
            mask[i, list(cols)] = True
    return target_rank(scores.detach(), targets, mask)


MASKS = ("seen", "prompt", "none")
Mask = Literal["seen", "prompt", "none"]


def per_user_metrics(ranks: Sequence[int] | np.ndarray, ks: Sequence[int] = KS) -> dict[str, np.ndarray]:
    """Hit@K and NDCG@K of each user (one value per rank), for each K in ks."""
    r = torch.as_tensor(np.asarray(ranks, dtype=np.float64))  # (B,)
    if r.numel() == 0:
        raise ValueError("no ranks to average")
    out = {}
    for k in ks:
        out[f"hit@{k}"] = (r <= k).double().numpy()
        out[f"ndcg@{k}"] = ndcg_at_k(r, k).double().numpy()
    return out


def ranking_metrics(ranks: Sequence[int] | np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Hit@K and NDCG@K averaged over 1-based ranks, for each K in ks."""
    return {name: float(v.mean()) for name, v in per_user_metrics(ranks, ks).items()}


Users = Sequence[str] | np.ndarray | None  # each sample's user, to cluster standard errors by


def mean_stderr(values: np.ndarray, users: Users = None) -> float:
    """The standard error of `values`' mean, clustered by user: sqrt(G / (G - 1) * sum over the
    G users of (the sum of their samples' deviations from the mean)^2) / n. With one sample per
    user (`loo`, or `users` None) it is the sample std / sqrt(n) exactly; under `temporal`,
    where a user has many samples, it does not count them as independent. NaN for fewer than
    two users."""
    v = np.asarray(values, dtype=np.float64)
    if users is not None and len(users) != len(v):
        raise ValueError(f"one user per sample: {len(users)} users for {len(v)} samples")
    # without users, each sample is its own
    codes = np.arange(len(v)) if users is None else pd.factorize(np.asarray(users, dtype=object))[0]
    sums = np.bincount(codes, weights=v - v.mean())
    g = len(sums)
    return float(math.sqrt(g / (g - 1) * (sums**2).sum()) / len(v)) if g > 1 else float("nan")


def standard_errors(
    ranks: Sequence[int] | np.ndarray, ks: Sequence[int] = KS, users: Users = None
) -> dict[str, float]:
    """Each metric's standard error, clustered by user (`mean_stderr`)."""
    return {name: mean_stderr(v, users) for name, v in per_user_metrics(ranks, ks).items()}


def paired_difference(
    ranks_a: Sequence[int], ranks_b: Sequence[int], metric: str = "ndcg@10", users: Users = None
) -> dict:
    """a - b on the same samples, in order: the mean difference of the per-sample metric, its
    standard error (the paired one, clustered by user, `mean_stderr`; much smaller than either
    run's own when the users' difficulty dominates), and the ratio of the means."""
    if len(ranks_a) != len(ranks_b):
        raise ValueError(f"paired runs must rank the same users: {len(ranks_a)} vs {len(ranks_b)}")
    k = int(metric.split("@")[1])
    a, b = per_user_metrics(ranks_a, (k,))[metric], per_user_metrics(ranks_b, (k,))[metric]
    d = a - b
    se = mean_stderr(d, users)
    return {
        "metric": metric,
        "a": float(a.mean()),
        "b": float(b.mean()),
        "diff": float(d.mean()),
        "stderr": se,
        "ratio": float(a.mean() / b.mean()) if b.mean() > 0 else float("inf"),
        "users": len(d),
    }


def paired_ranks(ranks_a: Sequence[int], ranks_b: Sequence[int], users: Users = None) -> dict:
    """a against b on the same users, in order, by the target's rank in the whole ranking.

    NDCG@10 is zero for every user whose target both runs put below 10th (most users), so its
    paired difference is blind to a run that moves targets from 150th to 100th. This reads the
    whole rank: how many users each run ranks better, and the mean of log(rank_a / rank_b)
    with its paired standard error; `rank_ratio` = exp(that mean), the geometric mean of
    rank_a / rank_b (below 1: a ranks the targets higher).
    """
    if len(ranks_a) != len(ranks_b):
        raise ValueError(f"paired runs must rank the same users: {len(ranks_a)} vs {len(ranks_b)}")
    a, b = np.asarray(ranks_a, dtype=np.float64), np.asarray(ranks_b, dtype=np.float64)
    if len(a) == 0 or min(a.min(), b.min()) < 1:
        raise ValueError("ranks are 1-based and there must be at least one")
    d = np.log(a) - np.log(b)
    se = mean_stderr(d, users)
    return {
        "a_better": int((a < b).sum()),
        "b_better": int((a > b).sum()),
        "ties": int((a == b).sum()),
        "median_a": float(np.median(a)),
        "median_b": float(np.median(b)),
        "log_rank_diff": float(d.mean()),
        "stderr": se,
        "rank_ratio": float(np.exp(d.mean())),
        "users": len(d),
    }


def paired_cells(ranks_a: Sequence[int], ranks_b: Sequence[int], users: Users = None) -> str:
    """a against b as three markdown table cells, as the bench scripts print them: the paired
    NDCG@10 difference ± s.e. | users a ranks better / worse | mean log(rank_a / rank_b) ± s.e."""
    d, p = paired_difference(ranks_a, ranks_b, users=users), paired_ranks(ranks_a, ranks_b, users)
    return (
        f"{d['diff']:+.4f} ± {d['stderr']:.4f} | {p['a_better']} / {p['b_better']} | "
        f"{p['log_rank_diff']:+.3f} ± {p['stderr']:.3f}"
    )


RANK_COLUMNS = ("user_id", "target_item_id", "split", "mask", "model", "rank")
# the rank columns a ranks file may hold: the run's headline mode, and with --compare-reasoning
# the same model without reasoning
PAIRED_COLUMNS = ("rank", "rank_without_reasoning")


def eval_rows(dataset: PreparedDataset, cfg: EvalConfig) -> pd.DataFrame:
    """The samples a run of `cfg` scores, in the harness's order: `cfg.split`, its first
    `cfg.limit` when set. `evaluate_scores` ranks these, and a ranks file names them."""
    rows = dataset.split(cfg.split)
    return rows.head(cfg.limit) if cfg.limit else rows


def eval_samples(dataset: PreparedDataset, cfg: EvalConfig) -> pd.DataFrame:
    """Who each evaluated sample is (user_id, target_item_id as str), in the harness's order
    (`eval_rows`): known before a run, so a pairing can be checked before it starts."""
    rows = eval_rows(dataset, cfg)
    return pd.DataFrame(
        {
            "user_id": rows["user_id"].astype(str).to_numpy(),
            "target_item_id": rows["target_item_id"].astype(str).to_numpy(),
        }
    )


def ranks_frame(
    samples: pd.DataFrame, cfg: EvalConfig, model: str, ranks: Sequence[int], **extra: Sequence[int]
) -> pd.DataFrame:
    """One row per evaluated sample (`eval_samples`), in the harness's order: who, which
    target, under which split and mask, by which model, and the target's rank (plus `extra`
    rank columns, e.g. the same model without reasoning). What `r2ec eval --ranks-out` writes
    and `--paired-with` reads, so two runs (two checkpoints, a checkpoint and a baseline) can
    be paired per user."""
    if len(samples) != len(ranks) or any(len(v) != len(ranks) for v in extra.values()):
        raise ValueError(f"{len(ranks)} ranks for {len(samples)} samples of {cfg.split}")
    out = samples.assign(split=cfg.split, mask=cfg.mask, model=model, rank=np.asarray(ranks, dtype=np.int64))
    for name, values in extra.items():
        out[name] = np.asarray(values, dtype=np.int64)
    return out


def write_ranks(path: Path, frame: pd.DataFrame) -> None:
    """`frame` (from `ranks_frame`) as parquet, through a temp file and a rename; its `attrs`
    (r2ec eval puts its `run` block there) go into the parquet's metadata, and `read_ranks`
    gives them back."""
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def read_ranks(
    path: Path, samples: pd.DataFrame, split: str, mask: str, column: str = "rank"
) -> pd.DataFrame:
    """A ranks file (`write_ranks`) that pairs with a run of `split` under `mask` over
    `samples` (`eval_samples`): the same users and targets in the same order, ranks >= 1.
    `column` (PAIRED_COLUMNS) is the saved run's mode to pair with, returned as `rank`, e.g.
    `rank_without_reasoning`: a model trained without reasoning read on its fast path.
    ValueError naming what is wrong; read before that run starts, so a file it cannot pair
    with fails in a second, not after the whole eval."""
    if column not in PAIRED_COLUMNS:
        raise ValueError(f"the paired column must be one of {', '.join(PAIRED_COLUMNS)}, got {column!r}")
    if not Path(path).is_file():
        raise ValueError(f"ranks file {path}: no such file")
    try:
        saved = pd.read_parquet(path)
    except Exception as exc:  # OSError, or any of pyarrow's errors for a file that is not parquet
        raise ValueError(f"ranks file {path}: unreadable ({exc})") from exc
    missing = [c for c in RANK_COLUMNS if c not in saved.columns]
    if missing:
        raise ValueError(
            f"ranks file {path}: no column {', '.join(missing)} (r2ec eval --ranks-out writes them)"
        )
    if column not in saved.columns:
        raise ValueError(
            f"ranks file {path}: no column {column} (r2ec eval --compare-reasoning --ranks-out writes it)"
        )
    for name, ours in (("split", split), ("mask", mask)):
        theirs = sorted(set(saved[name].astype(str).fillna("<none>")))
        if theirs != [ours]:
            raise ValueError(f"ranks file {path}: its {name} is {', '.join(theirs)}, this run's is {ours}")
    for name in ("user_id", "target_item_id"):
        if len(saved) != len(samples) or list(saved[name].astype(str)) != list(samples[name]):
            raise ValueError(
                f"ranks file {path}: its {name}s are not this run's ({len(saved)} samples against "
                f"{len(samples)}); evaluate both on the same data, split and --limit"
            )
    rank = pd.to_numeric(saved[column], errors="coerce")
    if rank.isna().any() or (rank < 1).any() or (rank != rank.round()).any():
        raise ValueError(f"ranks file {path}: its {column} values must be whole numbers >= 1")
    model = saved["model"].astype(str) + ("" if column == "rank" else " without reasoning")
    out = saved.assign(rank=rank.astype(np.int64), model=model)
    out.attrs = dict(saved.attrs)  # the saved run's `run` block, when its file has one
    if "run" in out.attrs:
        out.attrs["run"] = run_of_column(out.attrs["run"], column)
    return out


# settings of a `run` block that apply to the reasoning pass only
REASONING_ONLY = ("max_reasoning_tokens", "constrain_titles", "speculative_tokens")


def run_of_column(run: Mapping | None, column: str) -> Mapping | None:
    """A `run` block as the run that wrote `column` was made: a --compare-reasoning run's
    (reasoning "both") `rank` is its reasoning pass, its `rank_without_reasoning` a pass with
    reasoning off, to which the reasoning-only settings do not apply. Any other block as is."""
    if run is None or run.get("reasoning") != "both":
        return run
    if column == "rank":
        return {**run, "reasoning": True}
    return {k: v for k, v in run.items() if k not in REASONING_ONLY} | {"reasoning": False}


def run_differences(a: Mapping | None, b: Mapping | None) -> dict[str, list] | None:
    """The settings two runs' `run` blocks (r2ec eval's JSON, a ranks file's `attrs["run"]`)
    differ in, as {"dotted.key": [a's, b's]}; None when either has none (a file written before
    ranks files carried one)."""
    if a is None or b is None:
        return None

    def flat(d: Mapping, prefix: str = "") -> dict:
        out: dict = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v}
        return out

    fa, fb = flat(a), flat(b)
    return {k: [fa.get(k), fb.get(k)] for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)}


def paired_with_saved(now: pd.DataFrame, saved: pd.DataFrame, path: Path) -> dict:
    """This run (`ranks_frame`) against a saved one (`read_ranks`, already checked to cover
    the same samples): the paired NDCG@10 difference and the rank pairing, this run as a, and
    the settings the two differ in (`run_differences`, from the frames' `attrs["run"]`)."""
    a, b, users = now["rank"].to_numpy(), saved["rank"].to_numpy(), now["user_id"].to_numpy()
    return {
        "a": str(now["model"].iloc[0]),
        "b": str(saved["model"].iloc[0]),
        "path": str(path),
        # this run's `rank` is its headline: with --compare-reasoning, its reasoning pass
        "differs": run_differences(run_of_column(now.attrs.get("run"), "rank"), saved.attrs.get("run")),
        "ndcg@10": paired_difference(a, b, "ndcg@10", users),
        "rank": paired_ranks(a, b, users),
    }


@dataclass(frozen=True)
class SeenItems:
    """For each sample of a split, in its order, every item its user interacted with before its
    target (`seen_items`): each user's items once, in the order first met, and how many of them
    each sample has seen, so a split of many samples per user stores each item once."""

    by_user: dict[str, list[str]]
    users: list[str]  # per sample
    counts: list[int]  # per sample: the first `count` of its user's items

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, r: int) -> list[str]:
        return self.by_user[self.users[r]][: self.counts[r]]


def seen_items(dataset: PreparedDataset, split: str) -> SeenItems:
    """For each sample of `split`, in its order: every item its user interacted with before its
    target. That is the user's items in the splits before `split` (test sees train + valid,
    valid sees train; targets and histories), plus the sample's history and the targets and
    histories of the user's earlier samples in `split` itself, which `temporal` puts there (a
    user active in the test period has many test samples, and a 20-item history alone misses
    what came before it). Under `loo` a user has one sample per split, so only the earlier
    splits add to its history. A user's prior items come first (`PreparedDataset.prior`:
    interactions kept from being targets, e.g. before Amazon's window, beyond what a
    history reaches)."""
    by_user = {user: dict.fromkeys(items) for user, items in dataset.prior.items()}  # ordered sets

    def meet(user: str, items) -> dict[str, None]:
        bucket = by_user.setdefault(user, {})
        bucket.update(dict.fromkeys(map(str, items)))
        return bucket

    def samples(name: str):
        df = dataset.split(name)
        return zip(df["user_id"].astype(str), df["history_item_ids"], df["target_item_id"], strict=True)

    for earlier in SPLITS[: SPLITS.index(split)]:
        for user, hist, target in samples(earlier):
            meet(user, [*hist, target])
    # a split lists each user's samples in their order (model/data/splits.py), so a sample
    # sees its user's earlier ones: what was met before its target is a prefix of the list.
    # A split that does not (written by hand) would leave later items unmasked: refused.
    users, counts, last = [], [], {}
    stamps = dataset.split(split)["target_timestamp"].to_numpy()
    for (user, hist, target), t in zip(samples(split), stamps, strict=True):
        if t < last.get(user, t):
            raise ValueError(f"the {split} split lists user {user}'s samples out of time order")
        users.append(user)
        counts.append(len(meet(user, hist)))
        meet(user, [target])
        last[user] = t
    return SeenItems({u: list(b) for u, b in by_user.items()}, users, counts)


def exclusions(
    rows: pd.DataFrame, col: Mapping[str, int], mask: Mask, seen: Sequence[Sequence[str]] | None
) -> list[list[int]] | None:
    """The catalog columns to drop from each row's ranking under `mask` (the target is kept
    by `target_rank`). `seen`, for `seen`: each row's items seen before its target, aligned
    with `rows` (`seen_items`)."""
    if mask == "none":
        return None
    if mask == "seen":
        if seen is None or len(seen) != len(rows):
            raise ValueError(f"the seen mask needs one seen set per row ({len(rows)})")
        known = [set(seen[r]) for r in range(len(rows))]
    else:
        known = [set(map(str, hist)) for hist in rows["history_item_ids"]]
    return [[col[i] for i in k if i in col] for k in known]


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
        mask (`str`, defaults to `"seen"`):
            Which known items leave the ranking (the target itself never does): `"seen"`,
            every item of the user's before the target (the field's protocol); `"prompt"`,
            the sample's stored history only (the ≤ 20 items a prompt's window is drawn from,
            more than a prompt of `max_history` 10 shows); `"none"`.
        ks (`tuple[int, ...]`, defaults to `(5, 10, 20)`):
            The cut-offs K of Hit@K and NDCG@K.
        constrain_titles (`bool`, defaults to `True`):
            Decode the reasoning's claims (the "Likes" genres, the decades after "mostly", the
            "Rated highest:" list, the "Lately more" genre) under the grammars of what holds for
            the history (model/constrained.py), as the service does; `False` decodes freely.
    """

    split: str = "test"
    reasoning: bool = True
    max_reasoning_tokens: int = 64
    batch_size: int = 8
    limit: int | None = None
    mask: Mask = "seen"
    ks: tuple[int, ...] = KS
    constrain_titles: bool = True

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.max_reasoning_tokens < 0:
            raise ValueError(f"max_reasoning_tokens must be >= 0, got {self.max_reasoning_tokens}")
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {self.mask!r}")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be one or more cut-offs >= 1, got {self.ks}")


def validation_eval_config(cfg: RecPOConfig) -> EvalConfig:
    """The valid-split evaluation of a training run, as its RecPOConfig sets it.

    Training picks OUT/best by NDCG@10 under it, and scheduled retraining's publish gate
    evaluates under it, so the two metrics compare: the first `eval_limit` valid samples,
    with reasoning when the stage trains it (recpo, rationale) at `eval_reasoning_tokens` tokens
    (default: max_completion_length), without it for the contrastive warm-up.
    """
    return EvalConfig(
        split="valid",
        reasoning=cfg.stage in ("recpo", "rationale"),
        max_reasoning_tokens=cfg.reasoning_tokens_at_eval,
        limit=cfg.eval_limit,
    )


@dataclass
class EvalResult:
    metrics: dict[str, float]
    count: int
    seconds: float
    ranks: list[int] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)  # the first users' reasoning texts
    stderr: dict[str, float] = field(default_factory=dict)  # standard errors, clustered by user
    mask: str = "seen"
    text_quality: dict | None = None  # over every reasoning text, when there is reasoning
    by_mask: dict[str, dict[str, float]] = field(default_factory=dict)  # headline metrics per mask
    by_mask_stderr: dict[str, dict[str, float]] = field(default_factory=dict)  # and their standard errors
    users: list[str] = field(default_factory=list)  # each ranked sample's user, as `ranks`

    def to_dict(self) -> dict:
        out = {
            "metrics": self.metrics,
            "stderr": self.stderr,
            "mask": self.mask,
            "count": self.count,
            "seconds": round(self.seconds, 2),
            "examples": self.examples,
        }
        if self.text_quality is not None:
            out["text_quality"] = self.text_quality
        if self.by_mask:
            out["by_mask"] = self.by_mask
            out["by_mask_stderr"] = self.by_mask_stderr
        return out


def _column_index(items: pd.DataFrame) -> dict[str, int]:
    return {str(i): j for j, i in enumerate(items["item_id"].astype(str))}


ScoreBatch = Callable[[pd.DataFrame], torch.Tensor]  # sample rows (B) -> catalog scores (B, N)


def evaluate_scores(
    dataset: PreparedDataset, cfg: EvalConfig, score_batch: ScoreBatch, progress: bool = False
) -> EvalResult:
    """The harness every model and baseline shares: the split's samples in batches of
    `cfg.batch_size`, scored against the whole catalog by `score_batch`, ranked under
    `cfg.mask` (the headline, with standard errors) and, beside it, under every mask."""
    start = time.perf_counter()
    rows = eval_rows(dataset, cfg)
    col = _column_index(dataset.items)
    seen = seen_items(dataset, cfg.split)
    ranks: dict[str, list[int]] = {m: [] for m in MASKS}  # ranking is cheap next to scoring
    bar = tqdm(total=len(rows), desc=f"eval {cfg.split}", unit="user", disable=not progress)
    for lo in range(0, len(rows), cfg.batch_size):
        chunk = rows.iloc[lo : lo + cfg.batch_size]
        scores = score_batch(chunk)  # (B, N)
        targets = torch.tensor([col[str(t)] for t in chunk["target_item_id"]])
        known = [seen[r] for r in range(lo, lo + len(chunk))]
        for m in MASKS:
            ranks[m].extend(target_ranks(scores, targets, exclusions(chunk, col, m, known)).tolist())
        bar.update(len(chunk))
    bar.close()
    headline, users = ranks[cfg.mask], rows["user_id"].astype(str).tolist()
    return EvalResult(
        ranking_metrics(headline, cfg.ks),
        len(headline),
        time.perf_counter() - start,
        headline,
        stderr=standard_errors(headline, cfg.ks, users),
        mask=cfg.mask,
        by_mask={m: ranking_metrics(r, cfg.ks) for m, r in ranks.items()},
        by_mask_stderr={m: standard_errors(r, cfg.ks, users) for m, r in ranks.items()},
        users=users,
    )


def evaluate_model(
    model: R2ec,
    dataset: PreparedDataset,
    item_vectors: torch.Tensor | np.ndarray,
    cfg: EvalConfig,
    progress: bool = True,
    num_examples: int = 3,
    backend: Backend | None = None,
) -> EvalResult:
    """Rank the whole catalog for each sample of `cfg.split`; reasoning (if on) is greedy.
    With reasoning, the result carries every text's quality (its claims checked against the
    prompt's history window, model/rationale.py `check_claims`) and the first users' texts.
    `backend` (model/generation.py) writes the reasoning and reads h_T; None: transformers'
    generate and a second forward (the reference, and the only path for an unmerged LoRA)."""
    titles = dataset.item_titles()
    array = np.asarray(item_vectors, dtype=np.float32)  # (N, H)
    vectors = torch.as_tensor(array if array.flags.writeable else array.copy())  # a mapped table is read-only
    settings = GenerationSettings(max_new_tokens=cfg.max_reasoning_tokens)
    texts: list[str] = []
    cut: list[bool] = []  # stopped at the budget, not on a stop token
    shown: list[dict] = []
    claims: list[Claims] = []
    facts = catalog_facts(dataset.items.to_dict("records")) if cfg.reasoning else {}
    window = model.prompts.max_history

    def score(chunk: pd.DataFrame) -> torch.Tensor:
        histories = sample_histories(chunk, titles)
        known = history_facts(histories, facts) if cfg.reasoning else []  # each entry's genres and decade
        limits = None
        if cfg.reasoning and cfg.constrain_titles:  # as served: every checkable claim over what holds
            limits = model.title_lists(histories, facts=known)
        if backend is not None:
            budget = settings if cfg.reasoning else GenerationSettings(max_new_tokens=0)
            rollout, users = backend.generate(model.user_prompt_ids(histories), budget, limits)
            rollout = rollout if cfg.reasoning else None
        else:
            rollout = model.reason(histories, settings, constraints=limits) if cfg.reasoning else None
            users = model.user_vectors(histories, rollout).cpu()
        if rollout is not None:
            texts.extend(rollout.texts)
            cut.extend(not c or c[-1] not in model.stop_ids for c in rollout.completion_ids)
            for text, h, f in zip(rollout.texts, histories, known, strict=True):  # the window, as read
                claims.append(check_claims(text, list(zip(f, [e.rating for e in h], strict=True))[-window:]))
            for j in range(min(num_examples - len(shown), len(chunk))):
                row = chunk.iloc[j]
                shown.append(
                    {
                        "user_id": str(row["user_id"]),
                        "target": titles[str(row["target_item_id"])],
                        "reasoning": rollout.texts[j],
                    }
                )
        return model.score(users, vectors)  # (B, N)

    result = evaluate_scores(dataset, cfg, score, progress)
    result.examples = [{**ex, "rank": r} for ex, r in zip(shown, result.ranks, strict=False)]
    if cfg.reasoning:
        result.text_quality = text_quality(texts, titles.values(), claims=claims, cut=cut).to_dict()
    return result


def popularity_scores(train: pd.DataFrame, items: pd.DataFrame) -> np.ndarray:
    """(N,) float32: each item's position in the order by how often it was a training target,
    ties broken by a fixed random order, so Pop is not flattered by optimistic tie ranks.
    Positions (`ties_broken`) are exact in float32, where a count plus a small random term
    is not once counts are large (3,000 and a term below 1/2N for N = 3,706 leave 2,048
    distinct values)."""
    col = _column_index(items)
    counts = np.zeros(len(items), dtype=np.int64)
    for item_id, n in train["target_item_id"].astype(str).value_counts().items():
        if item_id in col:
            counts[col[item_id]] = n
    tie_order = np.random.default_rng(0).permutation(len(items))
    return ties_broken(torch.from_numpy(counts)[None], tie_order)[0].numpy()


def evaluate_popularity(dataset: PreparedDataset, cfg: EvalConfig) -> EvalResult:
    """Pop baseline: score = how often the item was a training target, under the same harness."""
    counts = torch.from_numpy(popularity_scores(dataset.split("train"), dataset.items))
    return evaluate_scores(dataset, cfg, lambda chunk: counts.expand(len(chunk), -1))


def ties_broken(scores: torch.Tensor, by: np.ndarray) -> torch.Tensor:
    """(B, N) scores whose ties `by` (N,) breaks, the higher first: each item's position in the
    order by score (to 1e-9, past float noise), then `by`, then the column (a later one
    higher). Positions are exact in the float32 that `target_ranks` reads, where a score plus a
    small tie-breaking term is not."""
    if by.shape != (scores.shape[1],):
        raise ValueError(f"by must hold one value per column, {scores.shape[1]}, got shape {by.shape}")
    by_order = torch.from_numpy(np.argsort(by, kind="stable"))  # the lowest first
    order = torch.argsort(torch.round(scores.double() * 1e9)[:, by_order], dim=1, stable=True)
    positions = torch.arange(scores.shape[1], dtype=torch.float32).expand(len(scores), -1)
    return torch.empty_like(positions).scatter_(1, by_order[order], positions)


def evaluate_cowatch(
    dataset: PreparedDataset,
    cfg: EvalConfig,
    window: int = PromptConfig.cowatch_window,
    score_window: int | None = None,
) -> EvalResult:
    """The co-watch counts alone (model/cowatch.py, from the train split), popularity breaking
    ties: what the hints a prompt can carry know, ranked without any model. Pairs count within
    `window` steps (the hints' default), and the latest
    `score_window` history items (`window` when None, as the hints have it) score the candidates."""
    from model.cowatch import CoWatch

    table = CoWatch.from_samples(dataset.split("train"), dataset.item_titles(), window)
    if score_window is not None:
        table = replace(table, window=score_window)
    pop = popularity_scores(dataset.split("train"), dataset.items)
    col = _column_index(dataset.items)

    def scores(chunk: pd.DataFrame) -> torch.Tensor:
        counts = torch.zeros(len(chunk), len(col), dtype=torch.float64)
        for r, ids in enumerate(chunk["history_item_ids"]):
            for item, score in table.scores([str(i) for i in ids]).items():
                counts[r, col[item]] = score
        return ties_broken(counts, pop)

    return evaluate_scores(dataset, cfg, scores)


def evaluate_sasrec(dataset: PreparedDataset, cfg: EvalConfig, sasrec_cfg=None, progress: bool = True):
    """SASRec trained on the train split's samples, then ranked under the same harness.
    Returns the result and the training stats."""
    from model.sasrec import sasrec_scores, train_sasrec

    model, stats = train_sasrec(dataset.split("train"), dataset.items, sasrec_cfg, progress=progress)
    result = evaluate_scores(dataset, cfg, lambda chunk: sasrec_scores(model, chunk, dataset.items))
    return result, stats
