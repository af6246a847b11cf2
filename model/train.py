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
    OUT/curves.png   reward, valid NDCG@10, reasoning length (or the losses): drawn at each
                     validation and save, and when the run stops (Ctrl-C included)

Shapes: B users, G generations, M = B*G rollouts, T tokens, L padded length, H hidden, N items.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from model import distributed as dist
from model import losses
from model.checkpoint import (
    RESUME_STATE_FILE,
    CheckpointError,
    read_meta,
    reading,
    recover_checkpoint,
    save_checkpoint,
)
from model.cowatch import CoWatch
from model.curves import log_record, plot_curves
from model.data import PreparedDataset
from model.data.dataset import atomic_write, exclusive, write_error
from model.evaluate import evaluate_model, validation_eval_config
from model.item_table import ItemTable
from model.lora import build_model, trainable_parameters, weights_kind
from model.lower_cache import LowerCache
from model.optim import Optimizer, TrainState, decay_warning, mean_stats
from model.r2ec import GenerationSettings, left_pad
from model.rationale import catalog_facts, picks_line, rationale_parts
from model.recpo import RecPOConfig
from model.rollout import RecPOStep
from model.samples import TrainingPrompts

log = logging.getLogger(__name__)

STATE_FILE = RESUME_STATE_FILE  # in OUT/last

try:  # numpy's legacy RNG state is an ndarray in the resume states of earlier versions
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct
# What torch.load's weights_only unpickler may build besides tensors and plain Python values:
# numpy arrays of plain dtypes (their items are unpickled under the same rules), as the uint32
# RNG key of trainer_state.pt files written before that key was saved as a tensor.
RESUME_SAFE_GLOBALS = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_resume_state(path: Path, resume_dir: Path) -> dict:
    """OUT/last/trainer_state.pt, read with torch.load(weights_only=True): tensors, plain Python
    values and numpy arrays only, never a pickled object's code (a file planted in a run
    directory could run any). A file cut short is a CheckpointError naming it (`reading`); one
    holding anything else too is a CheckpointError saying so, and to start the run over."""
    with reading(path, resume_dir):
        try:
            with torch.serialization.safe_globals(RESUME_SAFE_GLOBALS):
                return torch.load(path, weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only" not in str(exc).lower():
                raise
            unsafe = re.findall(r"GLOBAL ([\w.]+)", str(exc))
            raise CheckpointError(
                f"{path} holds objects other than tensors, numpy arrays and plain Python values"
                f"{' (' + ', '.join(sorted(set(unsafe))) + ')' if unsafe else ''}, which --resume "
                "does not unpickle (they could run code): it was not written by `r2ec train`; "
                "start the run over with --overwrite"
            ) from None


LOG_FILE = "log.jsonl"
CURVES_FILE = "curves.png"
RUN_MARKS = ("best", "last", LOG_FILE)  # any of them: OUT holds a run a new one must not mix into
LossFn = Callable[[pd.DataFrame], tuple[torch.Tensor, dict[str, float]]]


def train(
    cfg: RecPOConfig,
    dataset: PreparedDataset,
    base: str,
    out: Path | str,
    resume: bool = False,
    overwrite: bool = False,
) -> Path:
    """Train and return the path of the best checkpoint. The main process holds `.OUT.lock`
    beside OUT throughout (OUT itself is not made before the run's checks pass): a second run
    into OUT is refused before it touches anything there (it swept the live run's save in
    progress, which then died)."""
    out = Path(out)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun's other processes: rank 0 holds it
        return Trainer(cfg, dataset, base, out, resume=resume, overwrite=overwrite).fit()
    with exclusive(out.parent / f".{out.name}.lock", f"another training run writes into {out}"):
        return Trainer(cfg, dataset, base, out, resume=resume, overwrite=overwrite).fit()


def held_run(out: Path) -> list[str]:
    """What of a run `out` holds (`RUN_MARKS`, a directory with a slash): empty when none."""
    return [f"{name}/" if (out / name).is_dir() else name for name in RUN_MARKS if (out / name).exists()]


def clear_run(out: Path) -> None:
    """Remove what a run wrote into `out` (checkpoints, their leftovers, the log, the curves)
    and nothing else, so that a run replacing it starts clean."""
    if not out.is_dir():
        return
    for path in out.iterdir():
        name = path.name
        if name in (*RUN_MARKS, CURVES_FILE) or re.match(r"\.(best|last)\.(old|tmp)-", name):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def training_samples(cfg: RecPOConfig, dataset: PreparedDataset) -> pd.DataFrame:
    """The train split's rows a run draws its batches from: every one, or each user's latest
    `train_samples_per_user` (nearest to valid/test). ValueError when a micro-batch, which
    draws `per_device_batch_size` distinct rows, cannot be filled from them."""
    rows = dataset.split("train")
    total, detail = len(rows), ""
    if cfg.train_samples_per_user is not None:
        rows = rows.groupby("user_id", sort=False).tail(cfg.train_samples_per_user)
        if len(rows) < total:
            detail = (
                f" (the train split's {total}, each user's latest "
                f"train_samples_per_user={cfg.train_samples_per_user})"
            )
    if not len(rows):
        raise ValueError(f"{dataset.path}: the train split has no samples to train on")
    if cfg.per_device_batch_size > len(rows):
        raise ValueError(
            f"per_device_batch_size={cfg.per_device_batch_size} is more than the {len(rows)} "
            f"training samples{detail} of {dataset.path}; each micro-batch draws that many distinct "
            f"samples: lower it, e.g. --set per_device_batch_size={len(rows)}"
        )
    return rows


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `Trainer.fit` after `step` steps, its curves drawn. OUT/last holds
    `saved_step` (None: nothing saved yet, the first save comes at step `save_every`); `main`:
    raised on the process that reports (rank 0)."""

    def __init__(self, out: Path, step: int, saved_step: int | None, save_every: int, main: bool) -> None:
        super().__init__(f"interrupted after step {step}")
        self.out, self.step, self.saved_step, self.save_every, self.main = (
            out,
            step,
            saved_step,
            save_every,
            main,
        )


class Trainer:
    """One training run. Build it on every process (under torchrun, each builds its own);
    `fit()` runs to `max_steps` or the time budget and returns OUT/best. Its steps, evals
    and saves are collective: every process calls them in the same order.

    `base` is a backbone reference or a checkpoint to warm-start from (model/lora.py);
    `resume=True` continues OUT/last exactly (weights, optimizer, item table, RNG, state).
    An OUT that already holds a run (`held_run`) is refused unless `resume` continues it or
    `overwrite` replaces it (`clear_run`, once everything else has been checked).
    """

    def __init__(
        self,
        cfg: RecPOConfig,
        dataset: PreparedDataset,
        base: str,
        out: Path | str,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        if resume and overwrite:
            raise ValueError(
                "--resume and --overwrite contradict (one continues the run in OUT, the other "
                "replaces it): pass one"
            )
        self.cfg, self.dataset, self.out = cfg, dataset, Path(out)
        self.dataset_info = dataset.describe()  # each checkpoint's `dataset`, its digest once
        dist.init()
        self.is_main = dist.rank() == 0
        torch.manual_seed(cfg.seed)
        resume_dir = self.out / "last"
        if self.is_main:  # a save cut between two renames left the old copy aside (model/checkpoint.py)
            for name in ("best", "last"):
                recover_checkpoint(self.out / name)
        dist.barrier()
        if resume and not (resume_dir / STATE_FILE).is_file():
            if not resume_dir.exists():  # stopped before its first save (best/ may be there)
                raise FileNotFoundError(
                    f"--resume: {self.out} holds no last/ checkpoint: nothing was saved to resume "
                    "from yet; start the run over with --overwrite"
                )
            raise FileNotFoundError(
                f"--resume: no {resume_dir / STATE_FILE} to resume from; start the run over with --overwrite"
            )
        if not resume and not overwrite and (held := held_run(self.out)):
            raise ValueError(
                f"{self.out} already holds a run ({', '.join(held)}); pass --resume to continue it, "
                "a new --out to keep it, or --overwrite to replace it (its checkpoints, log and curves)"
            )
        if overwrite and Path(base).exists() and Path(base).resolve().is_relative_to(self.out.resolve()):
            raise ValueError(
                f"--base {base} is inside --out {self.out}, which --overwrite would delete before the "
                "new run saved anything: copy it out of OUT first"
            )
        self.train_rows = training_samples(cfg, dataset)  # checked before the model loads
        if self.is_main and (warning := decay_warning(cfg)):
            log.warning("%s", warning)
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
        self.saved_step: int | None = None  # the step OUT/last holds from this run (or resumed from)
        if resume:
            self._load(resume_dir)
            self.saved_step = self.state.step
            if self.is_main:
                self._cut_log()
        else:
            self.table.refresh(self.model, progress=self.is_main)
        frozen = self.table.lower_layers  # `cacheable_layers()`, checked by cache_lower
        caches_users = cfg.user_layer_cache_gb > 0 and cfg.stage != "recpo" and frozen > 0
        self.user_cache = LowerCache(frozen, cfg.user_layer_cache_gb) if caches_users else None
        self.table.set_target_counts([str(t) for t in self.train_rows["target_item_id"]])
        self.titles = dataset.item_titles()
        self._set_cowatch(dataset)
        self.facts = catalog_facts(dataset.items.to_dict("records"))
        self.prompt_ids = TrainingPrompts(self.model, self.titles, dataset.split("train"), self.facts)
        self.recpo = RecPOStep(self.model, self.table, cfg, self.prompt_ids)
        # In-batch training never reads the table between evals (which refresh it).
        self.reads_table = cfg.stage == "recpo" or cfg.negatives == "table"
        if overwrite and self.is_main:  # last: every check above may still refuse the run
            clear_run(self.out)
        dist.barrier()
        self.out.mkdir(parents=True, exist_ok=True)

    def _set_cowatch(self, dataset: PreparedDataset) -> None:
        """Co-watch hints in the prompts (model/cowatch.py): `cowatch_hints` when set, else
        what the warm start's checkpoint had. The table is rebuilt from this run's training
        split either way, so retraining on new interactions refreshes it."""
        hints = self.cfg.cowatch_hints
        if hints is None:
            hints = self.model.prompts.cowatch_hints
        if self.cfg.cowatch_distill and not hints:
            raise ValueError("cowatch_distill needs co-watch hints: the config and the warm start name none")
        if self.cfg.rationale_hint_picks and not hints:
            raise ValueError(
                "rationale_hint_picks needs co-watch hints: the config and the warm start name none"
            )
        # the "Picks:" sentence the model writes (inference decodes it under the hints' grammar):
        # a rationale run's labels say (`rationale_hint_picks`); other stages keep the warm
        # start's, as far as the prompts still name hints
        if self.cfg.rationale_hint_picks > hints:
            raise ValueError(
                f"rationale_hint_picks ({self.cfg.rationale_hint_picks}) names more hints than the "
                f"prompts' cowatch_hints ({hints}, from the config or the warm start)"
            )
        if self.cfg.stage == "rationale":
            picks = self.cfg.rationale_hint_picks
        else:
            warm = self.model.prompts.hint_picks
            picks = min(warm, hints)
            if picks < warm:
                log.warning(
                    "the warm start was trained to write %d picks; the prompts now name %d hints", warm, hints
                )
        # likewise whether it ends with the "Next:" guess (the grammars let it follow the list)
        hindsight = (
            self.cfg.rationale_hindsight if self.cfg.stage == "rationale" else self.model.prompts.hindsight
        )
        # and whether it writes the taste format at all: a rationale run teaches it, later stages
        # keep what their warm start was taught
        taste = self.cfg.stage == "rationale" or self.model.prompts.taste_format
        self.model.prompts = dataclasses.replace(
            self.model.prompts, cowatch_hints=hints, hint_picks=picks, hindsight=hindsight, taste_format=taste
        )
        self.model.cowatch = None
        if hints:
            train = dataset.split("train")
            self.model.cowatch = CoWatch.from_samples(train, self.titles, self.model.prompts.cowatch_window)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Step until max_steps or the time budget, evaluating and saving on schedule."""
        cfg, state = self.cfg, self.state
        start_wall = time.perf_counter() - state.seconds
        bar = tqdm(
            total=cfg.max_steps, initial=state.step, desc=f"train {cfg.stage}", disable=not self.is_main
        )
        try:
            self._steps(bar, start_wall)
        except BaseException as exc:
            bar.close()
            if self.is_main:  # whatever stopped the run, its curves show how far it got
                self._plot()
            if isinstance(exc, KeyboardInterrupt):
                raise TrainingInterrupted(
                    self.out, state.step, self.saved_step, cfg.save_every, self.is_main
                ) from None
            raise
        bar.close()
        dist.barrier()
        return self.out / "best"

    def _steps(self, bar: tqdm, start_wall: float) -> None:
        cfg, state = self.cfg, self.state
        while state.step < cfg.max_steps:
            t0 = time.perf_counter()
            stats = self.step()
            step_seconds = time.perf_counter() - t0
            state.seconds = time.perf_counter() - start_wall
            record = {
                "step": state.step,
                **stats,
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
            evaluated = state.step % cfg.eval_every == 0 or last
            if evaluated:
                self.evaluate()
            saved = state.step % cfg.save_every == 0 or last
            if saved:
                self.save_last(fresh_table=evaluated)
            if (evaluated or saved) and self.is_main:  # curves during a run that validates rarely
                self._plot()
            if last:
                break

    def step(self) -> dict[str, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; its stats."""
        cfg, step = self.cfg, self.state.step
        # (a step right after an eval already has a fresh table)
        due = step > 0 and step % cfg.refresh_every == 0 and step % cfg.eval_every != 0
        if self.reads_table and due:
            self.model.lm.eval()
            self.table.refresh(self.model)
        batches = [self._batch_rows(m) for m in range(cfg.gradient_accumulation_steps)]
        lr = self.opt.sched.get_last_lr()[0]  # the rate this step's update uses
        match cfg.stage:
            case "recpo":
                stats = self._recpo_update(batches)
            case "contrastive":
                stats = self._loss_update(batches, self.contrastive_loss)
            case "rationale":
                stats = self._loss_update(batches, self.rationale_loss)
            case _:
                raise ValueError(f"unknown stage {cfg.stage!r}")
        self.state.step += 1
        stats["lr"] = lr
        if self.user_cache is not None:
            stats.update(self.user_cache.stats())
        return stats

    def _batch_rows(self, micro: int) -> pd.DataFrame:
        # Seeded by (seed, step, micro, rank): a resumed run draws exactly the same users.
        rng = np.random.default_rng([self.cfg.seed, self.state.step, micro, dist.rank()])
        rows = rng.choice(len(self.train_rows), size=self.cfg.per_device_batch_size, replace=False)
        return self.train_rows.iloc[rows]

    def _recpo_update(self, batches: list[pd.DataFrame]) -> dict[str, float]:
        """Roll out every micro-batch, then `num_iterations` clipped updates on them."""
        rbs = [self.recpo.rollout(rows) for rows in batches]
        parts: list[dict] = []
        for _ in range(self.cfg.num_iterations):
            for rb in rbs:
                loss, stats = self.recpo.policy_loss(rb)
                (loss / len(rbs)).backward()
                parts.append(stats)
            parts.append({"grad_norm": self.opt.step()})
        return {
            **mean_stats([rb.stats for rb in rbs]),
            **mean_stats(parts),
            "trajectories": float(sum(rb.stats["trajectories"] for rb in rbs)),
        }

    def _loss_update(self, batches: list[pd.DataFrame], loss_fn: LossFn) -> dict[str, float]:
        """One step of a stage without rollouts: accumulate `loss_fn` over the micro-batches."""
        parts = []
        for rows in batches:
            loss, stats = loss_fn(rows)
            (loss / len(batches)).backward()
            parts.append(stats)
        return {**mean_stats(parts), "grad_norm": self.opt.step()}

    # -- the contrastive warm-up ---------------------------------------------------------------
    def contrastive_loss(self, rows: pd.DataFrame) -> tuple[torch.Tensor, dict[str, float]]:
        """The "w/o reasoning" objective: h_T straight after the prompt, softmax over the batch's
        targets plus `sampled_negatives` uniform catalog items (negatives "in_batch": encoded with
        gradient, gathered across processes, logQ corrected) or over the whole detached item
        table (negatives "table")."""
        cfg, model, table = self.cfg, self.model, self.table
        model.lm.train()
        targets = [str(t) for t in rows["target_item_id"]]
        prompt_ids = self.prompt_ids(rows)
        seqs = model.user_sequences(prompt_ids, [[] for _ in prompt_ids])
        users = F.normalize(self._user_hidden(list(rows.index), seqs)[:, -1].float(), dim=-1)  # (B, H)
        if cfg.negatives == "table":
            own = torch.tensor([table.row[t] for t in targets], device=users.device)
            drop = table.history_mask(list(rows["history_item_ids"])) if cfg.mask_history else None
            logits = losses.catalog_logits(users, table.vectors, model.tau, own, drop)  # table detached
            return losses.contrastive_loss(logits, own)
        columns = self._in_batch_columns(targets)
        loss, stats = self._in_batch_loss(users, targets, columns)
        return self._with_distillation(loss, stats, users, rows, columns)

    def _in_batch_columns(self, targets: list[str]) -> tuple[torch.Tensor, list[str]]:
        """The batch's targets plus `sampled_negatives` uniform items, encoded live with gradient
        and gathered across processes: (C, H) vectors and their ids."""
        cols = targets + self.table.sample_uniform(self.cfg.sampled_negatives)
        col_vecs = self.table.encode(self.model, cols)
        self.table.update(cols, col_vecs)  # out of place and detached: the graph keeps col_vecs
        return dist.gather_with_grad(col_vecs), dist.gather_objects(cols)

    def _in_batch_loss(
        self,
        users: torch.Tensor,
        targets: list[str],
        columns: tuple[torch.Tensor, list[str]],
        batch: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Softmax of each user (B, H) over the columns, logQ corrected; gradient both sides.
        `batch`: how many targets the columns were drawn from (default: len(targets)), which the
        correction's expected counts need when `users` is a subset of the batch."""
        cfg, table = self.cfg, self.table
        logits, own = losses.in_batch_logits(users, *columns, self.model.tau, targets)  # (B, C)
        if cfg.logq_correction and table.log_q is not None:
            log_q = table.log_q_of(columns[1])  # (C,)
            drawn = len(targets) if batch is None else batch
            count = losses.log_expected_count(log_q, drawn, cfg.sampled_negatives, len(table.item_ids))
            logits = logits - count.to(logits.device)
        return losses.contrastive_loss(logits, own)

    def _with_distillation(
        self,
        loss: torch.Tensor,
        stats: dict[str, float],
        users: torch.Tensor,
        rows: pd.DataFrame,
        columns: tuple[torch.Tensor, list[str]],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """`loss` (the target's cross-entropy) mixed with the co-watch distillation at weight
        `cowatch_distill`: (1 - w) * loss + w * distillation."""
        w = self.cfg.cowatch_distill
        if not w:
            return loss, stats
        distill = self._distillation_loss(users, rows, columns)
        total = (1 - w) * loss + w * distill
        stats.update({"loss/distill": float(distill.detach()), "loss/total": float(total.detach())})
        return total, stats

    def _distillation_loss(
        self, users: torch.Tensor, rows: pd.DataFrame, columns: tuple[torch.Tensor, list[str]]
    ) -> torch.Tensor:
        """Co-watch distillation: each user's softmax over the step's columns plus its own
        hinted items (encoded live, with gradient), scored by soft cross-entropy against the
        hints' co-watch counts normalised to sum to 1 (the teacher, model/cowatch.py). The
        target alone is one item, hinted for ~1 sample in 5; this tells rec_head for every
        sample how the counts rank what the prompt names. Columns that hold one of the user's
        own hints are dropped from its softmax (the hint's column stands for the item)."""
        hints = self.prompt_ids.hints(rows)  # (B,) {item: count}
        ids = list(dict.fromkeys(j for h in hints for j in h))
        if not ids:
            return users.sum() * 0.0
        vecs = self.table.encode(self.model, ids)  # (K, H), with gradient
        self.table.update(ids, vecs)
        pos = {j: c for c, j in enumerate(ids)}
        own = torch.zeros(len(hints), len(ids), dtype=torch.bool)
        teacher = torch.zeros(len(hints), len(ids))
        for u, h in enumerate(hints):
            total = sum(h.values())
            for j, count in h.items():
                own[u, pos[j]], teacher[u, pos[j]] = True, count / total
        col_vecs, col_ids = columns
        dup = torch.tensor([[c in h for c in col_ids] for h in hints], dtype=torch.bool)
        base = (users @ col_vecs.T / self.model.tau).float().masked_fill(dup.to(users.device), float("-inf"))
        mine = (users @ vecs.T / self.model.tau).float().masked_fill(~own.to(users.device), float("-inf"))
        logp = torch.log_softmax(torch.cat([base, mine], dim=1), dim=1)[:, base.shape[1] :]  # (B, K)
        per_user = -(teacher.to(logp.device) * logp.masked_fill(~own.to(logp.device), 0.0)).sum(1)
        has = own.any(1).to(per_user.device)
        return per_user[has].mean()

    def _user_hidden(self, keys: list, seqs: list[list[int]]) -> torch.Tensor:
        """Final hidden states (B, L, H) of fixed training sequences: through the lower-layer
        cache when there is one (model/lower_cache.py), else one full forward."""
        if self.user_cache is None:
            return self.model.decoder_hidden(left_pad(seqs, self.model.pad_id, self.model.device))
        return self.user_cache.hidden(self.model, keys, seqs)

    # -- the rationale stage -------------------------------------------------------------------
    def rationale_labels(self, rows: pd.DataFrame) -> list[tuple[str, str]]:
        """Each row's data-built rationale (model/rationale.py), cut where the hindsight begins;
        with `rationale_hint_picks`, "Picks: ..." naming the prompt's strongest co-watch hints
        ends it."""
        cfg = self.cfg
        window, category = self.model.prompts.max_history, self.dataset.category
        parts = [
            rationale_parts(
                r.history_item_ids,
                r.history_ratings,
                r.target_item_id,
                self.facts,
                category,
                window,
                hindsight=cfg.rationale_hindsight,
            )
            for r in rows.itertuples(index=False)
        ]
        if not cfg.rationale_hint_picks:
            return parts
        picks = [  # the hints the row's prompt names, strongest first (its own user left out)
            picks_line([self.titles[j] for j in list(h)[: cfg.rationale_hint_picks]])
            for h in self.prompt_ids.hints(rows)
        ]
        return [(h, f"{t} {p}" if p else t) for (h, t), p in zip(parts, picks, strict=True)]

    def rationale_loss(self, rows: pd.DataFrame) -> tuple[torch.Tensor, dict[str, float]]:
        """The reasoning cold start (model/rationale.py): LM loss on a data-built rationale and,
        in the same forward, the in-batch softmax of h_T after [prompt; rationale; marker];
        plus the softmax of h_T after a rationale whose hindsight sentence the model wrote itself
        (greedy) for the first `rationale_self_users` users, so rec_head learns to read what
        lm_head really writes."""
        cfg, model = self.cfg, self.model
        targets = [str(t) for t in rows["target_item_id"]]
        prompt_ids = self.prompt_ids(rows)
        parts = self.rationale_labels(rows)
        gold_ids = model.completion_ids([head + tail for head, tail in parts])
        n_self = min(cfg.rationale_self_users, len(targets))
        own_ids: list[list[int]] = []
        gen_seconds = 0.0
        if n_self:
            # The model writes the hindsight sentence itself after the (teacher-forced) part
            # that follows from the history alone: the guess it will have to make at inference.
            heads = model.encode_text([head for head, _ in parts[:n_self]])
            model.lm.eval()
            start = time.perf_counter()
            greedy = GenerationSettings(max_new_tokens=cfg.rationale_self_tokens)
            rollout = model.reason_from_ids([p + h for p, h in zip(prompt_ids, heads, strict=False)], greedy)
            own_ids = [h + c for h, c in zip(heads, rollout.completion_ids, strict=True)]
            gen_seconds = time.perf_counter() - start
        model.lm.train()
        batch = model.user_batch(prompt_ids, gold_ids)  # (B, L): the masks; the states come cached
        hidden = self._user_hidden(list(rows.index), model.user_sequences(prompt_ids, gold_ids))  # (B, L, H)
        logp = losses.completion_log_probs(model.lm.get_output_embeddings(), hidden, batch, 1.0)
        mask = batch.completion_mask.float()
        lm_loss = -(logp * mask).sum() / mask.sum()
        users = F.normalize(hidden[:, -1].float(), dim=-1)  # (B, H)
        if n_self:  # self-written texts differ every time: the whole model, no cache
            own = model.decoder_hidden(model.user_batch(prompt_ids[:n_self], own_ids))[:, -1]
            users = torch.cat([users, F.normalize(own.float(), dim=-1)])  # (B + n_self, H)
        B = len(targets)
        columns = self._in_batch_columns(targets)
        gold_loss, stats = self._in_batch_loss(users[:B], targets, columns)
        gold_loss, stats = self._with_distillation(gold_loss, stats, users[:B], rows, columns)
        loss = cfg.rationale_lm_weight * lm_loss
        if n_self:
            self_loss, self_stats = self._in_batch_loss(users[B:], targets[:n_self], columns, batch=B)
            w = cfg.rationale_self_weight
            loss = loss + (1 - w) * gold_loss + w * self_loss
            stats["loss/contrastive_self"] = self_stats["loss/contrastive"]
            stats["rank/self/median"] = self_stats["rank/median"]
            stats["hindsight/tokens/mean"] = float(np.mean([len(c) for c in rollout.completion_ids]))
        else:
            loss = loss + gold_loss
        stats.update(
            {
                "loss/total": float(loss.detach()),
                "loss/lm": float(lm_loss.detach()),
                "rationale/tokens/mean": float(np.mean([len(c) for c in gold_ids])),
                "seconds/generate": gen_seconds,
            }
        )
        return loss, stats

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

    def save(
        self, path: Path, write_extra: Callable[[Path], None] | None = None, fresh_table: bool = True
    ) -> None:
        """A self-describing checkpoint of the model and the current item table at `path`; with
        `fresh_table` False (the table was not refreshed since the weights last changed: rows
        not encoded live since hold older weights' vectors) without it, so that loading
        encodes the catalog with these weights."""
        ds = self.dataset
        save_checkpoint(
            path,
            self.model,
            base=self.base_ref,
            weights=weights_kind(self.model),
            items=ds.items,
            item_vectors=self.table.vectors.numpy() if fresh_table else None,
            dataset=self.dataset_info,
            metrics={"valid": self.state.best_metrics},
            extra={"train": {"step": self.state.step, "config": self.cfg.to_dict()}},
            write_extra=write_extra,
        )

    def save_last(self, fresh_table: bool = True) -> None:
        """OUT/last: the checkpoint plus what --resume needs (optimizer, state, table, RNGs).
        Between validations the table is partly stale, so the checkpoint goes without it
        (`save`); the resume state keeps it as training left it."""
        rng = dist.gather_rng_states()
        if self.is_main:
            blob = {
                **self.opt.state_dict(),
                "state": self.state.__dict__,
                "item_table": self.table.vectors,
                "rng": rng,
            }
            write = lambda tmp: torch.save(blob, tmp / STATE_FILE)  # noqa: E731
            self.save(self.out / "last", write_extra=write, fresh_table=fresh_table)
        dist.barrier()
        self.saved_step = self.state.step

    def _load(self, resume_dir: Path) -> None:
        blob = load_resume_state(resume_dir / STATE_FILE, resume_dir)
        try:
            self.opt.load_state_dict(blob)
            self.state = TrainState(**blob["state"])
        except (ValueError, KeyError, TypeError) as exc:  # an intact file of another run's shape
            raise ValueError(
                f"--resume: {resume_dir} does not fit this run's config ({exc}): resume with the "
                f"config it started with (its r2ec.json, train.config)"
            ) from exc
        self.table.vectors = blob["item_table"]
        dist.restore_rng_state(blob["rng"])
        log.info("resumed from %s at step %d", resume_dir, self.state.step)

    def _plot(self) -> None:
        """OUT/curves.png from the log so far; a failure to draw is a warning, not the run's end."""
        try:
            plot_curves(self.out / LOG_FILE, self.out / CURVES_FILE)
        except Exception as exc:  # noqa: BLE001 (matplotlib's errors are many; the run matters more)
            log.warning("%s not drawn: %s", self.out / CURVES_FILE, exc)

    def _cut_log(self) -> None:
        """On resume: keep only log.jsonl's lines up to the step resumed from. The steps an
        interrupted run logged after its last save run again, and a line that the interruption
        cut short is not JSON; the log is replaced whole (`atomic_write`)."""
        path, step = self.out / LOG_FILE, self.state.step
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if (r := log_record(line)) is not None and r["step"] <= step]
        if len(kept) < len(lines):
            text = "".join(f"{line}\n" for line in kept)
            atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            log.info("%s: dropped %d lines logged after step %d", path, len(lines) - len(kept), step)

    def _log(self, record: dict) -> None:
        try:
            with open(self.out / LOG_FILE, "a") as fh:
                fh.write(json.dumps(record, default=str) + "\n")
        except OSError as exc:  # a full disk names no file
            raise write_error(exc, self.out / LOG_FILE) from exc
