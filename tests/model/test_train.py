"""The RecPO trainer with the tiny model: one step learns, runs resume exactly, 2 processes agree."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import losses
from model.checkpoint import load_checkpoint, read_meta
from model.distributed import resolve_device
from model.item_table import ItemTable
from model.rationale import (
    LATELY,
    LIKES,
    MAX_LIKED,
    MOSTLY,
    RATED,
    catalog_facts,
    decade_phrases,
    drifting_genres,
    liked_genres,
    likes_phrases,
    rated_highest,
)
from model.recpo import RecPOConfig
from model.train import Trainer, train
from tests.conftest import child_env
from tests.model.helpers import stats_over_steps

TINY = dict(dtype="float32", max_completion_length=8, warmup_steps=0, eval_limit=4, lora_r=4, lora_alpha=8)


def test_recpo_step_changes_the_weights_and_lowers_the_loss_on_a_fixed_rollout(tiny_dataset, tmp_path):
    cfg = RecPOConfig(per_device_batch_size=2, num_generations=4, learning_rate=1e-2, **TINY)
    trainer = Trainer(cfg, tiny_dataset, "tiny", tmp_path / "run")
    rows = tiny_dataset.split("train").iloc[:2]
    rb = trainer.recpo.rollout(rows)
    assert rb.advantages.shape == (8,) and rb.old_token_logp.shape[0] == 8
    assert rb.advantages.abs().sum() > 0, "the toy rollout must carry a learning signal"
    params = trainer.params
    before = [p.detach().clone() for p in params]
    losses = [s["loss/total"] for s in stats_over_steps(trainer, lambda: trainer.recpo.policy_loss(rb), 3)]
    changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True))
    assert changed > 0
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("constrain", [True, False])
def test_recpo_rollouts_decode_the_title_list_under_the_prompts_grammar(tiny_dataset, tmp_path, constrain):
    cfg = RecPOConfig(per_device_batch_size=2, num_generations=2, constrain_titles=constrain, **TINY)
    trainer = Trainer(cfg, tiny_dataset, "tiny", tmp_path / "run")
    rows = tiny_dataset.split("train").iloc[:2]
    seen = []
    reason = trainer.model.reason_from_ids

    def spy(prompt_ids, settings, num_generations=1, constraints=None):
        seen.append(constraints)
        return reason(prompt_ids, settings, num_generations, constraints)

    trainer.model.reason_from_ids = spy
    rb = trainer.recpo.rollout(rows)
    assert len(rb.rollout.completion_ids) == 4 and len(seen) == 1
    if not constrain:
        assert seen[0] is None
        return
    # one grammar per user (its G rows share it), as inference builds it: the genres and the
    # decades that hold for that user's prompt window, its highest-rated titles, its drift
    titles, facts = tiny_dataset.item_titles(), catalog_facts(tiny_dataset.items.to_dict("records"))
    window = trainer.model.prompts.max_history
    assert len(seen[0]) == 2
    for grammar, row in zip(seen[0], rows.itertuples(index=False), strict=True):
        ids, ratings = list(row.history_item_ids)[-window:], list(row.history_ratings)[-window:]
        lists = {g.trigger: g for g in grammar.lists}
        window_facts = [(facts[str(i)], r) for i, r in zip(ids, ratings, strict=True)]
        decades = decade_phrases([(f.decade, r) for f, r in window_facts])
        liked = liked_genres([(f.genres, r) for f, r in window_facts])[:MAX_LIKED]
        assert decades and lists[MOSTLY].phrases == sorted(decades)
        assert lists[LIKES].phrases == sorted(likes_phrases(liked))
        window_titles = [(titles[str(i)], r) for i, r in zip(ids, ratings, strict=True)]
        assert lists[RATED].titles == rated_highest(window_titles)
        drift = drifting_genres([f.genres for f, _ in window_facts])
        assert sorted(lists[LATELY].phrases if LATELY in lists else []) == sorted(f" {g}." for g in drift)


@pytest.mark.parametrize(("negatives", "sampled"), [("in_batch", 0), ("in_batch", 6), ("table", 0)])
def test_contrastive_step_lowers_the_loss_on_a_fixed_batch(tiny_dataset, tmp_path, negatives, sampled):
    cfg = RecPOConfig(
        stage="contrastive",
        negatives=negatives,
        sampled_negatives=sampled,
        per_device_batch_size=4,
        learning_rate=1e-2,
        **TINY,
    )
    trainer = Trainer(cfg, tiny_dataset, "tiny", tmp_path / "run")
    assert not trainer.model.prompts.taste_format  # "w/o reasoning" from the backbone: never taught
    rows = tiny_dataset.split("train").iloc[:4]
    before = trainer.table.vectors.clone()
    losses = [s["loss/total"] for s in stats_over_steps(trainer, lambda: trainer.contrastive_loss(rows))]
    assert losses[-1] < losses[0]
    # in_batch writes the batch's freshly encoded targets into the table; against the whole
    # (detached) table, the table only changes at a refresh.
    assert torch.equal(trainer.table.vectors, before) == (negatives == "table")


@pytest.mark.parametrize(("self_users", "hindsight"), [(0, True), (2, True), (0, False)])
def test_rationale_step_learns_the_text_and_the_ranking(tiny_dataset, tmp_path, self_users, hindsight):
    cfg = RecPOConfig(
        stage="rationale",
        per_device_batch_size=4,
        rationale_self_users=self_users,
        rationale_hindsight=hindsight,
        learning_rate=1e-2,
        **TINY,
    )
    trainer = Trainer(cfg, tiny_dataset, "tiny", tmp_path / "run")
    assert trainer.model.prompts.taste_format  # the stage teaches the format: inference holds it
    rows = tiny_dataset.split("train").iloc[:4]
    stats = stats_over_steps(trainer, lambda: trainer.rationale_loss(rows))
    first, last = stats[0], stats[-1]
    assert last["loss/lm"] < first["loss/lm"]  # it learns to write the rationale
    assert last["loss/contrastive"] < first["loss/contrastive"]  # and to rank after reading it
    assert first["rationale/tokens/mean"] > 5
    assert ("loss/contrastive_self" in first) == (self_users > 0)
    if self_users:
        assert 1 <= first["hindsight/tokens/mean"] <= cfg.rationale_self_tokens


def test_self_written_rows_are_logq_corrected_for_the_whole_batch(tiny_dataset, tmp_path, monkeypatch):
    # the columns are the batch's 4 targets plus uniform items, for the 2 self-written rows too
    cfg = RecPOConfig(stage="rationale", per_device_batch_size=4, rationale_self_users=2, **TINY)
    trainer = Trainer(cfg, tiny_dataset, "tiny", tmp_path / "run")
    trainer.table.set_target_counts(list(tiny_dataset.split("train")["target_item_id"]))
    drawn = []
    real = losses.log_expected_count
    monkeypatch.setattr(losses, "log_expected_count", lambda q, b, *a: drawn.append(b) or real(q, b, *a))
    trainer.rationale_loss(tiny_dataset.split("train").iloc[:4])
    assert drawn == [4, 4]


@pytest.mark.parametrize("stage", ["contrastive", "rationale"])
def test_user_layer_cache_gives_the_same_loss_and_serves_revisits(tiny_dataset, tmp_path, stage):
    common = dict(stage=stage, per_device_batch_size=4, rationale_self_users=0, lora_layers=1, **TINY)
    rows = tiny_dataset.split("train").iloc[:4]
    results = {}
    for gb in (0.0, 1.0):
        cfg = RecPOConfig(user_layer_cache_gb=gb, **common)
        trainer = Trainer(cfg, tiny_dataset, "tiny", tmp_path / f"run{gb}")
        loss_fn = trainer.contrastive_loss if stage == "contrastive" else trainer.rationale_loss
        torch.manual_seed(0)
        first = loss_fn(rows)[0]
        torch.manual_seed(0)
        again = loss_fn(rows)[0]  # the second visit of the same samples
        again.backward()
        grads = [p.grad.clone() for p in trainer.params if p.grad is not None]
        results[gb] = (first.item(), again.item(), grads, trainer.user_cache)
    (plain, plain2, plain_grads, none), (cached, cached2, cached_grads, cache) = results[0.0], results[1.0]
    assert none is None and cache is not None
    assert cache.hits == 4 and cache.misses == 4 and len(cache.store) == 4
    assert cached == pytest.approx(plain, abs=1e-4) and cached2 == pytest.approx(plain2, abs=1e-4)
    assert len(cached_grads) == len(plain_grads) > 0
    for a, b in zip(cached_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_train_samples_per_user_keeps_each_users_latest(tiny_dataset, tmp_path):
    cfg = RecPOConfig(stage="contrastive", per_device_batch_size=2, train_samples_per_user=1, **TINY)
    trainer = Trainer(cfg, tiny_dataset, "tiny", tmp_path / "run")
    train = tiny_dataset.split("train")
    latest = train.groupby("user_id")["target_timestamp"].max()
    assert len(trainer.train_rows) == train["user_id"].nunique()
    assert all(latest[r.user_id] == r.target_timestamp for r in trainer.train_rows.itertuples())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(per_device_batch_size=5), "per_device_batch_size=5 is more than the 4 training samples"),
        (
            dict(per_device_batch_size=4, train_samples_per_user=1),
            r"more than the 3 training samples \(the train split's 4, each user's latest "
            r"train_samples_per_user=1\)",
        ),
    ],
)
def test_a_batch_larger_than_the_training_samples_is_refused_before_training(
    tiny_dataset, tmp_path, monkeypatch, settings, message
):
    """The recipe's batch of 16 on a pilot dataset of 5 samples stopped at its first step with
    numpy's "Cannot take a larger sample than population when replace is False"."""
    monkeypatch.setattr("model.train.build_model", lambda *a: pytest.fail("built the model first"))
    cfg = RecPOConfig(stage="contrastive", **{**TINY, **settings})
    with pytest.raises(ValueError, match=message) as info:
        train(cfg, tiny_dataset, "tiny", tmp_path / "run")
    assert "--set per_device_batch_size=" in str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("max_steps", "warns"), [(3, True), (10, False), (40, False)])
def test_a_run_shorter_than_its_lr_decay_warns_that_the_rate_will_not_decay(
    tiny_dataset, tmp_path, caplog, max_steps, warns
):
    """`--max-steps 12` on the recipe (lr_decay_steps: 330) trained at the peak rate throughout."""
    cfg = RecPOConfig(
        stage="contrastive",
        per_device_batch_size=2,
        max_steps=max_steps,
        **{**TINY, "warmup_steps": 1, "lr_decay_steps": 10},
    )
    with caplog.at_level("WARNING", logger="model.train"):
        Trainer(cfg, tiny_dataset, "tiny", tmp_path / "run")
    found = [r.getMessage() for r in caplog.records if "lr_decay_steps" in r.getMessage()]
    if not warns:
        assert not found
        return
    (message,) = found
    assert "max_steps=3 ends the run before lr_decay_steps=10" in message
    assert "--set lr_decay_steps=3" in message
    assert "only to 89% of its peak" in message  # the last (third) step's rate, lr_factor(2, cfg)


def test_a_run_that_ends_within_its_warmup_is_not_told_its_rate_decays():
    from model.optim import decay_warning

    message = decay_warning(RecPOConfig(max_steps=1, warmup_steps=5, lr_decay_steps=330))
    assert "within its warmup_steps=5: the learning rate only rises (to 20% of its peak" in message
    assert "never decays" in message and "decays only to" not in message


def test_rationale_stage_validates_with_reasoning_and_checks_its_fields():
    from model.evaluate import validation_eval_config

    assert validation_eval_config(RecPOConfig(stage="rationale")).reasoning
    with pytest.raises(ValueError, match="negatives: in_batch"):
        RecPOConfig(stage="rationale", negatives="table")
    with pytest.raises(ValueError, match="rationale_self_weight"):
        RecPOConfig(stage="rationale", rationale_self_weight=1.5)
    with pytest.raises(ValueError, match="rationale_hindsight: false"):
        RecPOConfig(stage="rationale", rationale_hindsight=False, rationale_self_users=2)


def test_logq_correction_subtracts_each_columns_log_target_share(tiny_dataset, tmp_path):
    cfg = RecPOConfig(stage="contrastive", per_device_batch_size=4, **TINY)
    trainer = Trainer(cfg, tiny_dataset, "tiny", tmp_path / "run")
    table = trainer.table
    ids = table.item_ids
    table.set_target_counts([ids[0], ids[0], ids[1], "not-in-catalog"])
    counts = torch.ones(len(ids))
    counts[0], counts[1] = 3, 2  # add-one smoothing
    assert torch.allclose(table.log_q, (counts / counts.sum()).log())

    rows = tiny_dataset.split("train").iloc[:4]

    def loss(c: RecPOConfig) -> float:
        trainer.cfg = c
        torch.manual_seed(0)  # same dropout masks
        return float(trainer.contrastive_loss(rows)[0])

    corrected, plain = loss(cfg), loss(dataclasses.replace(cfg, logq_correction=False))
    table.log_q = torch.zeros(len(ids))  # a uniform q shifts every column equally: no change
    uniform = loss(cfg)
    assert corrected != pytest.approx(plain, abs=1e-4)
    assert uniform == pytest.approx(plain, abs=1e-5)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _steps(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _log(run) if not r.get("eval")}


def test_train_writes_a_loadable_checkpoint_log_and_curves(tiny_dataset, tmp_path):
    tiny = {**TINY, "warmup_steps": 2}
    cfg = RecPOConfig(per_device_batch_size=2, num_generations=2, max_steps=2, eval_every=1, **tiny)
    best = train(cfg, tiny_dataset, "tiny", tmp_path / "run")
    run = tmp_path / "run"
    assert best == run / "best"
    assert (run / "curves.png").stat().st_size > 0
    records = _log(run)
    steps = [r for r in records if not r.get("eval")]
    evals = [r for r in records if r.get("eval")]
    assert [r["step"] for r in steps] == [1, 2] and len(evals) == 2
    for key in (
        "reward/mean",
        "advantage/std",
        "loss/token",
        "loss/item",
        "clip_ratio/high",
        "reasoning/tokens/mean",
        "grad_norm",
        "trajectories/s",
    ):
        assert key in steps[0], key
    assert "valid/ndcg@10" in evals[0]
    # each step logs the rate its own update used: half the peak, then the peak
    assert [r["lr"] for r in steps] == pytest.approx([cfg.learning_rate / 2, cfg.learning_rate])
    meta = read_meta(best)
    assert meta["weights"] == "lora" and meta["base"] == "tiny"
    assert meta["metrics"]["valid"]["ndcg@10"] == max(e["valid/ndcg@10"] for e in evals)
    ckpt = load_checkpoint(best, dtype="float32")
    assert ckpt.item_vectors.shape == (len(tiny_dataset.items), ckpt.model.hidden_size)


def test_resume_reproduces_the_next_step(tiny_dataset, tmp_path):
    common = dict(per_device_batch_size=2, num_generations=2, eval_every=1, save_every=1, **TINY)
    train(RecPOConfig(max_steps=3, **common), tiny_dataset, "tiny", tmp_path / "straight")
    train(RecPOConfig(max_steps=2, **common), tiny_dataset, "tiny", tmp_path / "killed")
    train(RecPOConfig(max_steps=3, **common), tiny_dataset, "tiny", tmp_path / "killed", resume=True)
    straight, resumed = _steps(tmp_path / "straight"), _steps(tmp_path / "killed")
    assert sorted(resumed) == [1, 2, 3]
    for key in ("loss/total", "loss/token", "reward/mean", "grad_norm"):
        assert resumed[3][key] == pytest.approx(straight[3][key], rel=1e-4, abs=1e-6), key


def test_a_new_run_into_a_directory_holding_one_is_refused_or_replaced_whole(tiny_dataset, tmp_path):
    """Without --resume, a second run into OUT started over: its first validation replaced
    best/ (a 100-minute model) and log.jsonl held both runs' steps."""
    cfg = RecPOConfig(
        stage="contrastive", per_device_batch_size=2, max_steps=2, eval_every=1, save_every=1, **TINY
    )
    run = tmp_path / "run"
    train(cfg, tiny_dataset, "tiny", run)
    kept = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = dataclasses.replace(cfg, max_steps=1)
    with pytest.raises(ValueError, match="already holds a run") as info:
        train(again, tiny_dataset, "tiny", run)
    message = str(info.value)
    assert message.startswith(f"{run} already holds a run (best/, last/, log.jsonl)")
    assert "--resume" in message and "a new --out" in message and "--overwrite" in message
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == kept
    with pytest.raises(ValueError, match="--resume and --overwrite"):
        train(again, tiny_dataset, "tiny", run, resume=True, overwrite=True)
    # a check that refuses the new run after the model loaded leaves the old one whole
    picks = dataclasses.replace(
        again, stage="rationale", rationale_hint_picks=1, cowatch_hints=None, rationale_self_users=0
    )
    with pytest.raises(ValueError, match="needs co-watch hints"):
        train(picks, tiny_dataset, "tiny", run, overwrite=True)
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == kept
    with pytest.raises(ValueError, match="inside --out .* copy it out of OUT first"):
        train(again, tiny_dataset, str(run / "best"), run, overwrite=True)  # the warm start
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == kept
    # --overwrite starts clean: none of the old run's steps, validations or checkpoints remain
    (run / "notes.txt").write_text("mine")  # what the run did not write stays
    train(again, tiny_dataset, "tiny", run, overwrite=True)
    assert [(r["step"], bool(r.get("eval"))) for r in _log(run)] == [(1, False), (1, True)]
    assert read_meta(run / "best")["train"]["step"] == read_meta(run / "last")["train"]["step"] == 1
    assert (run / "curves.png").is_file() and (run / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(("held", "refused"), [("log.jsonl", True), ("best", True), ("notes.txt", False)])
def test_any_part_of_a_run_counts_as_one(tiny_dataset, tmp_path, monkeypatch, held, refused):
    class Built(Exception):
        pass

    def build_model(*args):
        raise Built

    monkeypatch.setattr("model.train.build_model", build_model)
    run = tmp_path / "run"
    run.mkdir()
    (run / held).mkdir() if "." not in held else (run / held).write_text("{}\n")
    cfg = RecPOConfig(stage="contrastive", per_device_batch_size=2, max_steps=1, **TINY)
    with pytest.raises(ValueError if refused else Built, match=f"holds a run \\({held}" if refused else None):
        train(cfg, tiny_dataset, "tiny", run)
    with pytest.raises(Built):  # --overwrite goes on to build the run
        train(cfg, tiny_dataset, "tiny", run, overwrite=True)


def _interrupt_before_step(monkeypatch, step: int) -> None:
    """Ctrl-C as the run starts `step` (after steps 1..step-1 were logged)."""
    real = Trainer.step

    def step_or_interrupt(self):
        if self.state.step == step - 1:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "step", step_or_interrupt)


def test_resume_drops_the_log_lines_of_steps_after_the_saved_one(tiny_dataset, tmp_path, monkeypatch):
    """Steps 3-4 of a run cut at step 5 ran again after --resume from step 2's save: log.jsonl
    held them twice and curves.png drew a line back from step 4 to step 3."""
    cfg = RecPOConfig(
        stage="contrastive", per_device_batch_size=2, max_steps=5, eval_every=100, save_every=2, **TINY
    )
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_before_step(m, 4)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tiny_dataset, "tiny", run)
    assert [r["step"] for r in _log(run)] == [1, 2, 3]
    assert read_meta(run / "last")["train"]["step"] == 2
    with open(run / "log.jsonl", "a") as fh:
        fh.write('{"step": 4, "loss/to')  # a line the Ctrl-C cut in half
    from model.data.dataset import atomic_write

    written = []
    monkeypatch.setattr(
        "model.train.atomic_write", lambda p, w: written.append(p) or atomic_write(p, w), raising=False
    )
    train(cfg, tiny_dataset, "tiny", run, resume=True)
    assert [r["step"] for r in _log(run) if not r.get("eval")] == [1, 2, 3, 4, 5]
    assert run / "log.jsonl" in written  # replaced whole, never cut in place


def _plotted_steps(monkeypatch) -> list[int]:
    """The step of each curves.png the run draws (drawn for real)."""
    import model.train
    from model.curves import plot_curves

    steps: list[int] = []

    def spy(log_path, png_path):
        plot_curves(log_path, png_path)
        steps.append(max(json.loads(line)["step"] for line in Path(log_path).read_text().splitlines()))

    monkeypatch.setattr(model.train, "plot_curves", spy)
    return steps


def test_curves_are_drawn_at_each_save_not_only_after_a_validation(tiny_dataset, tmp_path, monkeypatch):
    """The recipe validates only at the end (eval_every: 1000): its 100 minutes had no curves."""
    plotted = _plotted_steps(monkeypatch)
    cfg = RecPOConfig(
        stage="contrastive", per_device_batch_size=2, max_steps=4, eval_every=100, save_every=2, **TINY
    )
    train(cfg, tiny_dataset, "tiny", tmp_path / "run")
    assert plotted == [2, 4]  # step 2's save; step 4's validation and save, drawn once


def test_ctrl_c_draws_the_curves_and_says_what_was_saved(tiny_dataset, tmp_path, monkeypatch):
    from model.train import TrainingInterrupted

    plotted = _plotted_steps(monkeypatch)
    cfg = RecPOConfig(
        stage="contrastive", per_device_batch_size=2, max_steps=5, eval_every=100, save_every=2, **TINY
    )
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_before_step(m, 4)
        with pytest.raises(TrainingInterrupted) as info:
            train(cfg, tiny_dataset, "tiny", run)
    assert isinstance(info.value, KeyboardInterrupt)  # still a Ctrl-C to whoever does not ask
    assert (info.value.step, info.value.saved_step, info.value.out) == (3, 2, run)
    assert plotted == [2, 3] and (run / "curves.png").stat().st_size > 0
    with monkeypatch.context() as m:  # cut before its first save: nothing to resume
        _interrupt_before_step(m, 2)
        with pytest.raises(TrainingInterrupted) as info:
            train(cfg, tiny_dataset, "tiny", run, overwrite=True)
    assert (info.value.step, info.value.saved_step) == (1, None) and plotted[-1] == 1
    with monkeypatch.context() as m:  # a resumed run has saved what it resumed from
        train(cfg, tiny_dataset, "tiny", tmp_path / "r2", resume=False)
        _interrupt_before_step(m, 6)
        with pytest.raises(TrainingInterrupted) as info:
            train(dataclasses.replace(cfg, max_steps=7), tiny_dataset, "tiny", tmp_path / "r2", resume=True)
    assert (info.value.step, info.value.saved_step) == (5, 5)


def test_curves_skip_a_line_cut_in_half_and_replace_the_png_whole(tmp_path, monkeypatch):
    from model.curves import plot_curves

    log_path = tmp_path / "log.jsonl"
    log_path.write_text('{"step": 1, "loss/total": 2.0}\n{"step": 2, "loss/to')
    from model.data.dataset import atomic_write

    written = []
    monkeypatch.setattr(
        "model.curves.atomic_write", lambda p, w: written.append(p) or atomic_write(p, w), raising=False
    )
    plot_curves(log_path, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written == [tmp_path / "curves.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "log.jsonl"]


def test_last_between_validations_goes_without_its_stale_item_table(tiny_dataset, tmp_path, monkeypatch):
    cfg = RecPOConfig(stage="contrastive", per_device_batch_size=2, learning_rate=1e-2, **TINY)
    trainer = Trainer(cfg, tiny_dataset, "tiny", tmp_path / "run")
    trainer.step()  # the weights moved; only the step's own columns were re-encoded
    trainer.save_last(fresh_table=False)
    last = tmp_path / "run" / "last"
    assert read_meta(last)["item_vectors"] == "absent" and not (last / "item_vectors.npy").exists()
    ckpt = load_checkpoint(last, dtype="float32")  # encodes the catalog with the saved weights
    trainer.model.lm.eval()
    own = trainer.model.item_vectors(tiny_dataset.items.to_dict("records")).numpy()
    assert ckpt.item_vectors == pytest.approx(own, abs=1e-4)
    assert not torch.allclose(trainer.table.vectors, torch.from_numpy(own), atol=1e-4)  # what it left out
    # a resume builds its own table: the warm start from last/ encodes no catalog
    from model.lora import build_model
    from model.r2ec import R2ec

    with monkeypatch.context() as m:
        m.setattr(R2ec, "item_vectors", lambda *a, **k: pytest.fail("the warm start encoded the catalog"))
        build_model(cfg, str(last), tiny_dataset.category)
    # a run saves last/ with its table only where it has just validated (and refreshed it)
    fresh = []
    monkeypatch.setattr(Trainer, "save_last", lambda self, fresh_table=True: fresh.append(fresh_table))
    train(
        dataclasses.replace(cfg, max_steps=3, eval_every=2, save_every=1),
        tiny_dataset,
        "tiny",
        tmp_path / "r",
    )
    assert fresh == [False, True, True]


def test_resume_without_a_saved_state_is_a_clear_error(tiny_dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was saved to resume from yet.*--overwrite"):
        train(RecPOConfig(max_steps=1, **TINY), tiny_dataset, "tiny", tmp_path / "empty", resume=True)
    # killed between the first best/ save and the first last/ save: best/ alone resumes nothing
    (tmp_path / "run" / "best").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"holds no last/ checkpoint: nothing was saved.*--overwrite"):
        train(RecPOConfig(max_steps=1, **TINY), tiny_dataset, "tiny", tmp_path / "run", resume=True)
    (tmp_path / "run" / "last").mkdir()
    with pytest.raises(FileNotFoundError, match=r"last/trainer_state.pt to resume from; start the run over"):
        train(RecPOConfig(max_steps=1, **TINY), tiny_dataset, "tiny", tmp_path / "run", resume=True)


def test_a_full_disk_while_logging_names_the_log(tmp_path, monkeypatch):
    import io
    import types

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(28, "No space left on device")  # a write, not the open: no file named

    monkeypatch.setattr("model.train.open", lambda *a, **k: Full(), raising=False)
    with pytest.raises(OSError) as raised:
        Trainer._log(types.SimpleNamespace(out=tmp_path), {"step": 1})
    assert str(raised.value) == f"[Errno 28] No space left on device: '{tmp_path / 'log.jsonl'}'"


@pytest.fixture(scope="module")
def _saved_run(tiny_dataset, tmp_path_factory) -> Path:
    """A 2-step contrastive run whose last/ holds step 2."""
    cfg = RecPOConfig(stage="contrastive", per_device_batch_size=2, max_steps=2, save_every=2, **TINY)
    out = tmp_path_factory.mktemp("saved") / "run"
    train(cfg, tiny_dataset, "tiny", out)
    return out


@pytest.mark.parametrize(
    ("name", "kept"),
    [("trainer_state.pt", 0), ("trainer_state.pt", 5000), ("trainer_state.pt", 0.5),
     ("adapter/adapter_model.safetensors", 0.5)],
)  # fmt: skip
def test_resume_from_a_damaged_last_names_the_file_and_says_start_over(
    _saved_run, tiny_dataset, tmp_path, name, kept
):
    """torch.load of a cut file raised EOFError (shown as a bare "Aborted."), OSError EINVAL,
    or a RuntimeError traceback; a cut adapter a SafetensorError traceback."""
    from model.checkpoint import CheckpointError

    run = tmp_path / "run"
    shutil.copytree(_saved_run, run)
    file = run / "last" / name
    os.truncate(file, int(file.stat().st_size * kept) if isinstance(kept, float) else kept)
    cfg = RecPOConfig(stage="contrastive", per_device_batch_size=2, max_steps=3, save_every=2, **TINY)
    with pytest.raises(CheckpointError) as raised:
        train(cfg, tiny_dataset, "tiny", run, resume=True)
    message = str(raised.value)
    assert message.startswith(f"{file} is damaged or unreadable (") and "\n" not in message, message
    assert message.endswith("the run cannot resume from it: start it over with --overwrite")


class _Planted:
    """What a file planted in a run directory could hold: unpickling it calls open(path, "w")."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_the_resume_state_holds_only_what_loads_without_unpickling_code(_saved_run):
    """torch.load(weights_only=False) ran whatever a trainer_state.pt pickled; the state is now
    tensors and plain values only (numpy's RNG key saved as a tensor), read with weights_only."""
    state = _saved_run / "last" / "trainer_state.pt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(state) == []
    blob = torch.load(state, weights_only=True)
    assert isinstance(blob["rng"][0]["numpy"][1], torch.Tensor)


def test_resume_refuses_a_state_that_would_run_code_and_runs_none(_saved_run, tiny_dataset, tmp_path):
    from model.checkpoint import CheckpointError

    run = tmp_path / "run"
    shutil.copytree(_saved_run, run)
    state, marker = run / "last" / "trainer_state.pt", tmp_path / "ran"
    torch.save({**torch.load(state, weights_only=True), "extra": _Planted(marker)}, state)
    cfg = RecPOConfig(stage="contrastive", per_device_batch_size=2, max_steps=3, save_every=2, **TINY)
    with pytest.raises(CheckpointError) as raised:
        train(cfg, tiny_dataset, "tiny", run, resume=True)
    assert not marker.exists()  # the pickled call never ran
    message = str(raised.value)
    assert message.startswith(f"{state} holds objects other than tensors") and "(io.open)" in message
    assert message.endswith("start the run over with --overwrite")


def test_a_resume_state_written_before_weights_only_loading_still_resumes(_saved_run, tiny_dataset, tmp_path):
    """Earlier versions saved numpy's RNG state as np.random.get_state() gives it (a uint32
    array): such a run resumes, with that state restored."""
    import numpy as np

    from model.distributed import restore_rng_state
    from model.train import load_resume_state

    run = tmp_path / "run"
    shutil.copytree(_saved_run, run)
    state = run / "last" / "trainer_state.pt"
    blob = torch.load(state, weights_only=True)
    np.random.seed(7)
    legacy = np.random.get_state()
    blob["rng"] = [{**blob["rng"][0], "numpy": legacy}]
    torch.save(blob, state)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(state)  # numpy's, as they held
    np.random.seed(0)
    restore_rng_state(load_resume_state(state, run / "last")["rng"])
    assert np.array_equal(np.random.get_state()[1], legacy[1]) and np.random.get_state()[2] == legacy[2]
    train(RecPOConfig(stage="contrastive", per_device_batch_size=2, max_steps=3, save_every=2, **TINY),
          tiny_dataset, "tiny", run, resume=True)  # fmt: skip
    assert sorted(_steps(run)) == [1, 2, 3]


def test_resume_restores_a_last_left_aside_by_a_save_cut_between_its_renames(
    tiny_dataset, tmp_path, monkeypatch
):
    """A run killed between `_swap_into_place`'s two renames (model/checkpoint.py) left no last/
    but its previous copy aside: --resume puts it back and resumes from it."""
    aside = tmp_path / "run" / f".last.old-{0:020d}-000000"
    aside.mkdir(parents=True)
    (aside / "r2ec.json").write_text("{}")
    (aside / "trainer_state.pt").write_bytes(b"")

    class Built(Exception):
        pass

    def build_model(cfg, base, category):
        raise Built(base)

    monkeypatch.setattr("model.train.build_model", build_model)
    with pytest.raises(Built, match="run/last"):
        Trainer(RecPOConfig(max_steps=1, **TINY), tiny_dataset, "tiny", tmp_path / "run", resume=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["last"]
    assert (tmp_path / "run" / "last" / "trainer_state.pt").is_file()


WORKER = """
import sys, torch
from model.data import load_prepared
from model.recpo import RecPOConfig
from model.train import Trainer
import model.distributed as dist

cfg = RecPOConfig(dtype="float32", max_completion_length=8, warmup_steps=0, eval_limit=4, lora_r=4,
                  lora_alpha=8, per_device_batch_size=2, num_generations=2, max_steps=2,
                  learning_rate=1e-2)
trainer = Trainer(cfg, load_prepared(sys.argv[1]), "tiny", sys.argv[2])
trainer.fit()
flat = torch.cat([p.detach().flatten() for p in trainer.params])
torch.save(flat, f"{sys.argv[2]}/weights-rank{dist.rank()}.pt")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_agree_on_the_weights(tiny_dataset, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = child_env(OMP_NUM_THREADS="1")
    if torch.cuda.device_count() < 2:
        env["CUDA_VISIBLE_DEVICES"] = ""  # one process per GPU (nccl) needs two; else gloo on CPU
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            str(script),
            str(tiny_dataset.path),
            str(tmp_path / "run"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0 = torch.load(tmp_path / "run" / "weights-rank0.pt")
    w1 = torch.load(tmp_path / "run" / "weights-rank1.pt")
    assert torch.equal(w0, w1)
    steps = _steps(tmp_path / "run")
    assert sorted(steps) == [1, 2]
    assert steps[1]["trajectories"] == 4  # each process's own rollouts, 2 users x 2 generations
    assert (tmp_path / "run" / "best" / "r2ec.json").is_file()


def test_device_setting_is_checked():
    with pytest.raises(ValueError, match="device must be"):
        RecPOConfig(device="tpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_training_on_the_gpu_writes_a_checkpoint_the_cpu_loads(tiny_dataset, tmp_path):
    for stage in ("contrastive", "recpo"):
        cfg = RecPOConfig(
            stage=stage, device="cuda", per_device_batch_size=2, num_generations=2, max_steps=2, **TINY
        )
        best = train(cfg, tiny_dataset, "tiny", tmp_path / stage)
        steps = _steps(tmp_path / stage)
        assert sorted(steps) == [1, 2]
        assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in steps.values())
        ckpt = load_checkpoint(best, dtype="float32")
        assert ckpt.model.device.type == "cpu"
        fresh = ckpt.model.item_vectors(tiny_dataset.items.to_dict("records"))
        assert torch.allclose(fresh, torch.from_numpy(ckpt.item_vectors), atol=1e-3)


@pytest.mark.parametrize(("negatives", "refreshes"), [("in_batch", 2), ("table", 4)])
def test_contrastive_training_refreshes_the_table_only_when_it_reads_it(
    tiny_dataset, tmp_path, monkeypatch, negatives, refreshes
):
    calls = []
    real_refresh = ItemTable.refresh

    def counting_refresh(self, *args, **kwargs):
        calls.append(self.lower is not None)
        return real_refresh(self, *args, **kwargs)

    monkeypatch.setattr(ItemTable, "refresh", counting_refresh)
    cfg = RecPOConfig(
        stage="contrastive",
        negatives=negatives,
        per_device_batch_size=2,
        lora_layers=1,
        max_steps=3,
        refresh_every=1,
        eval_every=10,
        save_every=10,
        **TINY,
    )
    best = train(cfg, tiny_dataset, "tiny", tmp_path / "run")
    # once at the start and once for the final eval; "table" also before steps 2 and 3
    assert len(calls) == refreshes
    assert all(calls), "the item table was encoded without the frozen-layer cache"
    # what the cache produced is what the saved model computes from scratch
    ckpt = load_checkpoint(best, dtype="float32")
    fresh = ckpt.model.item_vectors(tiny_dataset.items.to_dict("records"))
    assert torch.allclose(torch.as_tensor(ckpt.item_vectors), fresh, atol=1e-4)


def test_curves_show_what_the_stage_logs():
    from model.curves import choose_panels

    recpo = {"reward/mean", "valid/ndcg@10", "reasoning/tokens/mean", "loss/total", "loss/contrastive"}
    assert [k for k, _ in choose_panels(recpo)] == [
        "reward/mean",
        "valid/ndcg@10",
        "reasoning/tokens/mean",
        "loss/total",
    ]
    rationale = {"valid/ndcg@10", "loss/total", "loss/contrastive", "loss/lm", "rank/median"}
    assert [k for k, _ in choose_panels(rationale)] == [
        "loss/contrastive",
        "valid/ndcg@10",
        "loss/lm",
        "loss/total",
    ]


def test_a_warm_start_from_a_lora_checkpoint_trains_its_adapter_on(tiny_dataset, tmp_path, caplog):
    from model.lora import build_model, trainable_parameters

    cfg = RecPOConfig(stage="contrastive", per_device_batch_size=2, max_steps=1, **TINY)  # r=4 on all layers
    best = train(cfg, tiny_dataset, "tiny", tmp_path / "first")
    saved = load_checkpoint(best, dtype="float32", merge_lora=False)
    other = dataclasses.replace(cfg, lora_r=8, lora_layers=1)  # settings the warm start cannot apply
    with caplog.at_level("INFO", logger="model.lora"):
        model, base_ref = build_model(other, str(best), "movie")
    assert base_ref == "tiny" and model.lm.peft_config["default"].r == 4
    assert "its adapter (r=4, alpha=8, layers all)" in caplog.text and "do not apply" in caplog.text
    trained = {n: p for n, p in model.lm.named_parameters() if p.requires_grad}
    assert trained and len(trained) == len(trainable_parameters(model))
    assert all(p.dtype == torch.float32 for p in trained.values())  # adapters train in fp32
    before = dict(saved.model.lm.named_parameters())
    assert all(
        torch.equal(p, before[n].float()) for n, p in trained.items()
    )  # the saved adapter, not a new one


def test_lora_targets_that_match_no_layer_are_named(caplog):
    """Another family's projections (Phi-3's fused qkv_proj) are not Llama's: the targets that
    match nothing are said, with the linear layers of the backbone as it is before peft wraps
    them (the adapted ones in, peft's base_layer/default out). A target peft matches by suffix
    is matched, and a str target (peft's "all-linear", a regex) is peft's to resolve."""
    from model.lora import build_model

    cfg = RecPOConfig(lora_target_modules=["self_attn.q_proj", "qkv_proj", "gate_up_proj"], **TINY)
    with caplog.at_level("WARNING", logger="model.lora"):
        model, _ = build_model(cfg, "tiny", "movie")
    assert any(n.endswith("self_attn.q_proj") for n in model.lm.targeted_module_names)
    (said,) = [r.getMessage() for r in caplog.records if r.name == "model.lora"]
    linear = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert said == (
        "lora_target_modules ['qkv_proj', 'gate_up_proj'] match no layer of this backbone, so only "
        f"['self_attn.q_proj'] get adapters; its linear layers are {linear}: set lora_target_modules "
        "(--set 'lora_target_modules=[...]') to adapt them"
    )
    for targets in (RecPOConfig().lora_target_modules, ["self_attn.q_proj", "mlp.down_proj"], "all-linear"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="model.lora"):
            model, _ = build_model(RecPOConfig(**{**TINY, "lora_target_modules": targets}), "tiny", "movie")
        assert model.lm.targeted_module_names  # peft adapted something
        assert not [r for r in caplog.records if r.name == "model.lora"], targets


def test_a_second_run_into_the_same_out_is_refused_before_it_touches_it(tiny_dataset, tmp_path):
    """A second `r2ec train --out OUT` while one runs swept the live run's save in progress
    (its .best.tmp-* directory), and the live run died at its next write."""
    import fcntl

    from model.data.dataset import Busy

    out = tmp_path / "run"
    out.mkdir()
    live_save = out / ".best.tmp-0123456789ab"
    live_save.mkdir()
    with open(tmp_path / ".run.lock", "a") as held:  # the live run
        fcntl.flock(held, fcntl.LOCK_EX)
        cfg = RecPOConfig(stage="contrastive", per_device_batch_size=4, max_steps=1, **TINY)
        with pytest.raises(Busy, match=f"another training run writes into {out}"):
            train(cfg, tiny_dataset, "tiny", out)
    assert live_save.is_dir()


def test_resuming_with_another_config_says_so_and_does_not_call_the_state_damaged(tiny_dataset, tmp_path):
    """An intact last/ of a full fine-tune resumed without `--set lora=false` (a fresh adapter):
    the optimizer's groups differ. It was reported as a damaged file, with advice (--overwrite)
    that deletes a good run."""
    cfg = RecPOConfig(
        stage="contrastive", per_device_batch_size=4, max_steps=1, save_every=1, lora=False, **TINY
    )
    train(cfg, tiny_dataset, "tiny", tmp_path / "run")
    other = dataclasses.replace(cfg, lora=True, max_steps=2)
    with pytest.raises(ValueError, match="does not fit this run's config") as info:
        train(other, tiny_dataset, "tiny", tmp_path / "run", resume=True)
    assert "damaged" not in str(info.value) and "--overwrite" not in str(info.value)
