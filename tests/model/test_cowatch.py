"""Co-watch hints: the counts, the ranking of a history's candidates, leaving a user's own pairs
out, the prompt line, and the table travelling with training's checkpoints into the service."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from model.checkpoint import export_checkpoint, load_checkpoint, save_checkpoint
from model.cowatch import FILE, HINTS_PREFIX, CoWatch, pair_counts, user_sequences
from model.prompts import HistoryEntry
from model.recpo import RecPOConfig
from model.samples import TrainingPrompts, history_entries
from model.train import train
from tests.model.helpers import stats_over_steps

TITLES = {i: f"Film {i.upper()}" for i in "abcdefgh"}
# contrastive training of the tiny model with 3 hints per prompt
TINY_HINTS = dict(
    stage="contrastive",
    cowatch_hints=3,
    per_device_batch_size=4,
    dtype="float32",
    warmup_steps=0,
    eval_limit=4,
    lora_r=4,
    lora_alpha=8,
)


def test_pair_counts_weigh_each_later_item_by_one_over_its_distance_within_the_window():
    counts = pair_counts(["a", "b", "c", "a", "d"], window=2)
    assert counts == {
        ("a", "b"): 1.0,
        ("a", "c"): 0.5,
        ("b", "c"): 1.0,
        ("b", "a"): 0.5,
        ("c", "a"): 1.0,
        ("c", "d"): 0.5,
        ("a", "d"): 1.0,
    }
    assert pair_counts(["a", "a", "b"], window=1) == {("a", "b"): 1.0}  # never an item's own successor


def test_hints_rank_candidates_by_counts_from_the_latest_items_and_skip_the_history():
    # (pairs only: a window of 2 counts the same pairs and draws on the 2 latest items)
    table = CoWatch.from_sequences(
        [["a", "b"], ["a", "b"], ["a", "c"], ["d", "e"], ["d", "e"]], TITLES, window=2
    )
    assert table.successors["a"] == [("b", 2.0), ("c", 1.0)]
    assert table.hints(["a"], k=5) == ["b", "c"]
    assert table.hints(["a", "b"], k=5) == ["c"]  # b is in the history
    # the latest item weighs 1, the one before it 1/2: e (2.0) beats b (2.0 / 2)
    assert table.hints(["a", "d"], k=2) == ["e", "b"]
    assert table.hints(["a", "d"], k=1) == ["e"]
    assert table.hints(["a", "d", "zzz"], k=3) == ["e"]  # the window: a is 3rd latest, left out
    assert table.hints(["zzz"], k=3) == []  # an item nobody watched anything after


def test_leaving_a_users_own_pairs_out_hints_only_what_others_watched():
    mine, others = ["a", "c"], [["a", "b"]]
    table = CoWatch.from_sequences([mine, *others], TITLES, window=1)
    assert table.hints(["a"], k=2) == ["b", "c"]
    assert table.hints(["a"], k=2, without=pair_counts(mine, 1)) == ["b"]


def test_leaving_a_user_out_is_exact_where_keep_cuts_the_lists():
    # keep=2: after a, the others watched b (3), c (1.5), d (1), g (1); my own pair lifts d to
    # 2, over c, so the kept list is b, d. Without me the table keeps b and c: my hints must be
    # b and c, not b and a d that only I put there.
    me = ["a", "d", "e"]
    others = [["a", "b"], ["a", "b"], ["a", "b"], ["a", "c"], ["a", "g", "c"], ["a", "d"], ["e", "c"]]
    table = CoWatch.from_sequences([me, *others], TITLES, window=2, keep=2)
    assert [j for j, _ in table.successors["a"]] == ["b", "d"]
    rebuilt = CoWatch.from_sequences(others, TITLES, window=2, keep=2)
    for history in (["a"], ["e", "a"], ["a", "e"]):
        mine = table.scores(history, without=pair_counts(me, 2))
        assert mine == pytest.approx(rebuilt.scores(history)), history
    assert table.hints(["a"], k=2, without=pair_counts(me, 2)) == ["b", "c"]


def test_keep_bounds_each_items_successors_and_the_table_round_trips(tmp_path):
    seqs = [["a", x] for x in "bcdefg"] + [["a", "b"]]
    table = CoWatch.from_sequences(seqs, TITLES, window=1, keep=2)
    assert [j for j, _ in table.successors["a"]] == ["b", "c"]  # b twice, then ties by id
    table.save(tmp_path)
    back = CoWatch.load(tmp_path, window=1)
    assert back.successors == table.successors and back.deeper is None  # what serving needs
    assert back.titles == {j: TITLES[j] for j in "bc"}
    assert back.hints(["a"], 3) == table.hints(["a"], 3)
    with pytest.raises(ValueError, match="window"):
        CoWatch.from_sequences(seqs, TITLES, window=0)
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):  # a table scoring from none
        dataclasses.replace(table, window=0)


def test_user_sequences_rebuild_each_users_order_from_the_samples():
    samples = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2"],
            "history_item_ids": [["a"], ["a", "b"], ["d"]],
            "target_item_id": ["b", "c", "e"],
        }
    )
    assert user_sequences(samples) == {"u1": ["a", "b", "c"], "u2": ["d", "e"]}


def test_the_prompt_names_the_hints_after_the_history(tiny_model):
    history = history_entries(["a", "b"], [5.0, 4.0], None, TITLES)
    plain = tiny_model.user_prompt(history)
    assert HINTS_PREFIX not in plain
    original = tiny_model.prompts  # a session fixture: put its prompts back afterwards
    try:
        tiny_model.prompts = dataclasses.replace(original, cowatch_hints=2)
        with pytest.raises(ValueError, match="no co-watch table"):
            tiny_model.user_prompt(history)
        tiny_model.cowatch = CoWatch.from_sequences([["b", "c"], ["b", "d"], ["b", "d"]], TITLES, window=1)
        text = tiny_model.user_prompt(history)
        assert f"{HINTS_PREFIX} Film D; Film C." in text
        assert text.index("Film B (4)") < text.index(HINTS_PREFIX)
        with pytest.raises(ValueError, match="item_id"):
            tiny_model.user_prompt([HistoryEntry("Film A")])
        # user_prompt_head (the prefix cache) stays the shared head, without any hint
        assert HINTS_PREFIX not in tiny_model.tokenizer.decode(tiny_model.user_prompt_head())
    finally:
        tiny_model.prompts, tiny_model.cowatch = original, None


def test_training_prompts_leave_each_rows_own_user_out(tiny_model):
    train = pd.DataFrame(
        {
            "user_id": ["me", "other"],
            "history_item_ids": [["a"], ["a"]],
            "history_ratings": [[5.0], [5.0]],
            "history_timestamps": [[1], [1]],
            "target_item_id": ["c", "b"],
            "target_timestamp": [2, 2],
        }
    )
    original = tiny_model.prompts
    try:
        tiny_model.prompts = dataclasses.replace(original, cowatch_hints=3, cowatch_window=1)
        tiny_model.cowatch = CoWatch.from_samples(train, TITLES, window=1)
        texts = [
            tiny_model.tokenizer.decode(ids) for ids in TrainingPrompts(tiny_model, TITLES, train)(train)
        ]
        assert f"{HINTS_PREFIX} Film B." in texts[0]  # "me" went a -> c: only b is someone else's
        assert f"{HINTS_PREFIX} Film C." in texts[1]
    finally:
        tiny_model.prompts, tiny_model.cowatch = original, None


def test_training_with_hints_ships_the_table_in_its_checkpoint_and_the_service_renders_them(
    tiny_dataset, tmp_path
):
    from service.recommender import Recommender
    from service.store import Event
    from service.types import Query

    cfg = RecPOConfig(max_steps=1, eval_every=1, **TINY_HINTS)
    best = train(cfg, tiny_dataset, "tiny", tmp_path / "run")
    assert (best / FILE).exists()
    ckpt = load_checkpoint(best, dtype="float32")
    assert ckpt.model.prompts.cowatch_hints == 3 and ckpt.model.cowatch is not None
    expected = CoWatch.from_samples(tiny_dataset.split("train"), tiny_dataset.item_titles(), 10)
    assert ckpt.model.cowatch.successors == expected.successors

    engine = Recommender.load(best, dtype="float32")
    source = max(expected.successors, key=lambda s: len(expected.successors[s]))
    query = Query((Event(source, 5.0),), max_reasoning_tokens=4)
    first, second, *_ = expected.hints([source], 3)
    assert len(expected.successors[source]) >= 2
    prompt = engine.prepare(query).prompt
    assert f"{HINTS_PREFIX} {expected.titles[first]}; {expected.titles[second]}" in prompt
    # hints follow the served catalog's edits: a deleted item is not hinted, a renamed one
    # goes by its new title
    engine.catalog.remove(first)
    engine.catalog.upsert(second, {"title": "Renamed Film"})
    assert f"{HINTS_PREFIX} Renamed Film" in engine.prepare(query).prompt
    assert expected.titles[first] not in engine.prepare(query).prompt

    # the small copy to ship keeps the table
    export_checkpoint(best, tmp_path / "shipped", {"command": "test"})
    shipped = load_checkpoint(tmp_path / "shipped", dtype="float32")
    assert shipped.model.cowatch.successors == expected.successors

    # a checkpoint whose prompts name hints cannot be written or read without its table
    ckpt.model.cowatch = None
    with pytest.raises(Exception, match="co-watch table"):
        save_checkpoint(
            tmp_path / "broken",
            ckpt.model,
            base="tiny",
            weights="base",
            items=ckpt.items,
            item_vectors=ckpt.item_vectors,
        )
    (best / FILE).unlink()
    with pytest.raises(Exception, match=FILE):
        load_checkpoint(best, dtype="float32")


def test_cowatch_distillation_teaches_the_ranking_of_the_hints(tiny_dataset, tmp_path):
    from model.train import Trainer

    cfg = RecPOConfig(cowatch_distill=0.5, learning_rate=1e-2, **TINY_HINTS)
    trainer = Trainer(cfg, tiny_dataset, "tiny", tmp_path / "run")
    rows = tiny_dataset.split("train").iloc[:4]
    hints = trainer.prompt_ids.hints(rows)
    assert any(hints) and all(len(h) <= 3 for h in hints)
    stats = stats_over_steps(trainer, lambda: trainer.contrastive_loss(rows))
    distill = [s["loss/distill"] for s in stats]
    assert distill[-1] < distill[0]
    # the logged total is the loss the step minimised, the mix of the two
    mix = 0.5 * stats[0]["loss/contrastive"] + 0.5 * stats[0]["loss/distill"]
    assert stats[0]["loss/total"] == pytest.approx(mix, rel=1e-5)
    # the rationale stage distils too, self-written rows or not
    for self_users in (0, 2):
        rationale = dataclasses.replace(cfg, stage="rationale", rationale_self_users=self_users)
        _, got = Trainer(rationale, tiny_dataset, "tiny", tmp_path / f"r{self_users}").rationale_loss(rows)
        assert got["loss/distill"] > 0, self_users
    with pytest.raises(ValueError, match="cowatch_distill needs"):
        RecPOConfig(cowatch_hints=0, cowatch_distill=0.5)
    with pytest.raises(ValueError, match="cowatch_distill needs"):
        Trainer(dataclasses.replace(cfg, cowatch_hints=None), tiny_dataset, "tiny", tmp_path / "other")


def test_lr_decays_by_cosine_to_the_floor_after_warmup():
    from model.optim import lr_factor

    cfg = RecPOConfig(warmup_steps=2, lr_decay_steps=12, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(15)]
    assert factors[0] == 0.5 and factors[1] == 1.0
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
    assert factors[11] == pytest.approx(0.1) and factors[14] == pytest.approx(0.1)
    assert lr_factor(100, RecPOConfig(warmup_steps=2)) == 1.0
    with pytest.raises(ValueError, match="lr_decay_steps"):
        RecPOConfig(warmup_steps=5, lr_decay_steps=5)


def test_rationale_hint_picks_end_the_label_with_the_prompts_strongest_hints(tiny_dataset, tmp_path):
    from model.cowatch import HINTS_PREFIX
    from model.train import Trainer

    common = dict(TINY_HINTS, stage="rationale", rationale_hindsight=False, rationale_self_users=0)
    cfg = RecPOConfig(**common)
    rows = tiny_dataset.split("train").iloc[:4]
    plain = Trainer(cfg, tiny_dataset, "tiny", tmp_path / "plain")
    trainer = Trainer(
        dataclasses.replace(cfg, rationale_hint_picks=1), tiny_dataset, "tiny", tmp_path / "picks"
    )
    # the checkpoint will say so, and inference decodes the list under the hints' grammar
    assert (trainer.model.prompts.hint_picks, plain.model.prompts.hint_picks) == (1, 0)
    prompts = trainer.model.tokenizer.batch_decode(trainer.prompt_ids(rows))
    hinted = 0
    for (head, tail), (plain_head, plain_tail), prompt in zip(
        trainer.rationale_labels(rows), plain.rationale_labels(rows), prompts, strict=True
    ):
        assert head == plain_head  # what the history says is unchanged
        line = prompt[prompt.index(HINTS_PREFIX) + len(HINTS_PREFIX) :] if HINTS_PREFIX in prompt else ""
        if not line:
            assert tail == plain_tail
            continue
        strongest = line.strip().split("; ")[0].split(".")[0]  # the prompt lists the hints strongest first
        assert tail == f"{plain_tail} Picks: {strongest}."
        hinted += len(line.split("; ")) > 1  # a row with more hints than picks
    assert hinted  # the count was exercised: a row names more hints than the one picked
    # RecPO's rollouts decode the list under the grammar of the hints each prompt names
    for grammar, prompt in zip(trainer.prompt_ids.title_lists(rows), prompts, strict=True):
        if HINTS_PREFIX in prompt:
            line = prompt[prompt.index(HINTS_PREFIX) + len(HINTS_PREFIX) :].split(".<")[0].split("\n")[0]
            picks = next(g for g in grammar.lists if g.trigger == "Picks:")
            assert picks.titles == [t.strip() for t in line.rstrip(".").split("; ")]
    # the loss trains on the longer text
    tokens = [t.rationale_loss(rows)[1]["rationale/tokens/mean"] for t in (plain, trainer)]
    assert tokens[1] > tokens[0]
    with pytest.raises(ValueError, match="rationale_hint_picks needs"):
        RecPOConfig(cowatch_hints=0, rationale_hint_picks=2)
    with pytest.raises(ValueError, match="names more hints"):
        RecPOConfig(cowatch_hints=2, rationale_hint_picks=3)
    with pytest.raises(ValueError, match="rationale_hint_picks ends"):
        RecPOConfig(stage="rationale", cowatch_hints=3, rationale_hint_picks=2, rationale_self_users=2)
    with pytest.raises(ValueError, match="rationale_hint_picks needs"):
        Trainer(
            dataclasses.replace(cfg, cowatch_hints=None, rationale_hint_picks=2),
            tiny_dataset,
            "tiny",
            tmp_path / "x",
        )
