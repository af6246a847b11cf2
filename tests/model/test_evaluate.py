import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from model.evaluate import (
    MASKS,
    EvalConfig,
    evaluate_cowatch,
    evaluate_model,
    evaluate_popularity,
    evaluate_sasrec,
    evaluate_scores,
    exclusions,
    mean_stderr,
    paired_cells,
    paired_difference,
    paired_ranks,
    paired_with_saved,
    popularity_scores,
    ranking_metrics,
    read_ranks,
    seen_items,
    standard_errors,
    target_ranks,
    ties_broken,
    validation_eval_config,
    write_ranks,
)
from model.recpo import RecPOConfig, field_docs
from model.rewards import ndcg_at_k


def test_target_ranked_first_gives_ndcg_one():
    ranks = target_ranks(torch.tensor([[0.9, 0.1, 0.2]]), torch.tensor([0]))
    assert ranks.tolist() == [1]
    m = ranking_metrics(ranks.tolist())
    assert m["ndcg@5"] == 1.0 and m["hit@5"] == 1.0


def test_rank_three_ndcg():
    ranks = target_ranks(torch.tensor([[0.9, 0.8, 0.7, 0.1]]), torch.tensor([2]))
    assert ranks.tolist() == [3]
    assert ranking_metrics([3])["ndcg@5"] == pytest.approx(1 / math.log2(4))
    assert ranking_metrics([3], ks=(2,))["ndcg@2"] == 0.0  # outside the cut-off
    assert ndcg_at_k(torch.tensor([3]), 2).tolist() == [0.0]


def test_a_nan_score_is_refused_not_ranked_first():
    scores = torch.tensor([[0.9, 0.1, 0.2], [float("nan"), 0.5, 0.1]])
    with pytest.raises(ValueError, match="NaN in 1 of 2 rows"):
        target_ranks(scores, torch.tensor([0, 0]))


def test_masking_history_moves_target_up():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    assert target_ranks(scores, torch.tensor([2]), [[0, 1]]).tolist() == [1]
    assert target_ranks(scores, torch.tensor([2]), [[0]]).tolist() == [2]
    # the target itself is never masked, even when it is in the history
    assert target_ranks(scores, torch.tensor([2]), [[2]]).tolist() == [3]


def test_metrics_average_and_cutoff():
    m = ranking_metrics([1, 6, 30], ks=(5, 10))
    assert m["hit@5"] == pytest.approx(1 / 3)
    assert m["hit@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(7)) / 3)


def test_popularity_scores_are_exact_positions_by_count_then_a_fixed_order():
    train = pd.DataFrame({"target_item_id": ["b"] * 3 + ["c"] * 3 + ["a"] + ["zz"] * 9})
    items = pd.DataFrame({"item_id": ["a", "b", "c", "d", "e"]})
    pos = popularity_scores(train, items)
    assert pos.dtype == np.float32 and sorted(pos.tolist()) == [0, 1, 2, 3, 4]
    # b and c (3 each) above a (1) above d and e (0); an id outside the catalog is ignored
    assert min(pos[1], pos[2]) > pos[0] > max(pos[3], pos[4])
    assert (popularity_scores(train, items) == pos).all()  # the tie order is fixed


def test_popularity_baseline_ranks_by_train_counts(tiny_dataset):
    test = tiny_dataset.split("test")
    results = {m: evaluate_popularity(tiny_dataset, EvalConfig(split="test", mask=m)) for m in MASKS}
    assert results["seen"].count == len(test)
    assert 0.0 <= results["seen"].metrics["ndcg@20"] <= 1.0
    # each mask removes a superset of the next one's items: the target can only rise
    for looser, stricter in (("none", "prompt"), ("prompt", "seen")):
        pairs = zip(results[looser].ranks, results[stricter].ranks, strict=True)
        assert all(lo >= st for lo, st in pairs)
    assert results["seen"].stderr["ndcg@10"] > 0
    # every run also reports the other masks' metrics, equal to running under them
    assert results["seen"].by_mask["none"] == results["none"].metrics


@pytest.mark.parametrize(("window", "score_window"), [(1, None), (10, None), (10, 1)])
def test_cowatch_baseline_ranks_by_the_counts_popularity_breaking_ties(tiny_dataset, window, score_window):
    from model.cowatch import CoWatch

    train, test = tiny_dataset.split("train"), tiny_dataset.split("test")
    table = CoWatch.from_samples(train, tiny_dataset.item_titles(), window)
    if score_window is not None:
        table = dataclasses.replace(table, window=score_window)
    ids = tiny_dataset.items["item_id"].astype(str)
    pop = dict(zip(ids, popularity_scores(train, tiny_dataset.items), strict=True))
    result = evaluate_cowatch(tiny_dataset, EvalConfig(split="test", mask="none"), window, score_window)
    assert result.count == len(test)
    for row, rank in zip(test.itertuples(), result.ranks, strict=True):
        counts = table.scores([str(i) for i in row.history_item_ids])
        key = {str(i): (counts.get(str(i), 0.0), pop[str(i)]) for i in tiny_dataset.items["item_id"]}
        target = key[str(row.target_item_id)]
        assert rank == 1 + sum(k > target for k in key.values())


def test_paired_cells_print_both_pairings_as_table_cells():
    a, b = [1, 3, 20, 5], [2, 3, 10, 50]
    d, p = paired_difference(a, b), paired_ranks(a, b)
    cells = paired_cells(a, b).split(" | ")
    assert cells[0] == f"{d['diff']:+.4f} ± {d['stderr']:.4f}"
    assert cells[1] == "2 / 1"  # ranks 1 < 2 and 5 < 50 better, 20 > 10 worse, 3 = 3 a tie
    assert cells[2] == f"{p['log_rank_diff']:+.3f} ± {p['stderr']:.3f}"


def test_ties_are_broken_exactly_where_a_float32_score_would_lose_them():
    # a tie at a score of 1000 (float32 steps by 6e-5 there), broken by a difference of 1e-4 in
    # `by`; scores equal up to float noise count as tied
    # distinct scores keep their order; a second row, ordered otherwise, keeps its own
    scores = torch.tensor(
        [[1000.0, 1000.0, 999.0, 0.1 + 0.2, 0.3, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]], dtype=torch.float64
    )
    by = np.array([0.0002, 0.0003, 9.0, 1.0, 2.0, 5.0], dtype=np.float32)
    out = ties_broken(scores, by)
    assert out.dtype == torch.float32
    assert out.argsort(descending=True).tolist() == [[1, 0, 2, 4, 3, 5], [5, 4, 3, 2, 1, 0]]
    assert target_ranks(out, torch.tensor([0, 0])).tolist() == [2, 6]
    assert target_ranks(out[:1], torch.tensor([1])).tolist() == [1]  # the tie goes to `by`
    # the same scores plus a small popularity term still tie in float32, so the tie is not
    # broken by `by` at all: item 1 ranks after item 0 as the target, as item 0 after item 1
    naive = scores[:1] + torch.from_numpy(by / (by.max() + 1) * 1e-8)
    assert target_ranks(naive, torch.tensor([0])).tolist() == [2]
    assert target_ranks(naive, torch.tensor([1])).tolist() == [2]
    with pytest.raises(ValueError, match="one value per column"):
        ties_broken(scores, by[:5])


def test_seen_mask_holds_every_earlier_item_of_the_user(tiny_dataset):
    seen = seen_items(tiny_dataset, "test")
    train, valid, test = (tiny_dataset.split(s) for s in ("train", "valid", "test"))
    r = int(np.flatnonzero(test["user_id"] == valid.iloc[0]["user_id"])[0])
    user = str(valid.iloc[0]["user_id"])
    expected = {str(valid.iloc[0]["target_item_id"]), *map(str, valid.iloc[0]["history_item_ids"])}
    expected |= set(map(str, test.iloc[r]["history_item_ids"]))
    for row in train[train["user_id"] == user].itertuples():
        expected |= {str(row.target_item_id), *map(str, row.history_item_ids)}
    assert set(seen[r]) == expected
    # train sees only each sample's history, in the same order
    train_seen = seen_items(tiny_dataset, "train")
    first = train.groupby("user_id", sort=False).head(1).index  # a user's first sample
    assert all(set(train_seen[i]) == set(map(str, train.iloc[i]["history_item_ids"])) for i in first)
    # a hand-made row: the seen items leave (the history among them), unknown ids are skipped
    rows = pd.DataFrame({"user_id": ["u"], "history_item_ids": [["a"]]})
    col = {"a": 0, "b": 1, "c": 2}
    assert sorted(exclusions(rows, col, "seen", [["a", "b", "zz"]])[0]) == [0, 1]
    assert exclusions(rows, col, "prompt", [["b"]]) == [[0]]
    assert exclusions(rows, col, "none", None) is None
    with pytest.raises(ValueError, match="one seen set per row"):
        exclusions(rows, col, "seen", None)


def _temporal(tmp_path, max_history=2):
    """Interactions split `temporal` with a 2-item history window: users 'b' and 'c' early,
    'a' late, so all of the test split's samples are a's and each sees a's earlier test
    targets, which neither the earlier splits nor its history hold."""
    from model.data import PreparedDataset
    from model.data.splits import make_splits

    rng = np.random.default_rng(0)
    rows = []
    for user, n, start in (("b", 20, 0), ("c", 20, 5), ("a", 8, 1000)):
        items = rng.choice(30, size=n, replace=False)
        rows += [(user, f"i{i}", 4.0, start + 10 * k) for k, i in enumerate(items)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    splits = make_splits(inter, "temporal", max_history=max_history)
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(30)], "title": [f"T{i}" for i in range(30)]})
    return inter, PreparedDataset(tmp_path, "synthetic", "temporal", "movie", items, splits)


def test_seen_mask_under_temporal_holds_what_came_before_the_history_window(tmp_path):
    inter, ds = _temporal(tmp_path)
    test = ds.split("test")
    assert set(test["user_id"]) == {"a"} and len(test) == 5
    seen = seen_items(ds, "test")
    assert len(seen) == len(test)
    earlier = set()  # what the earlier splits and the history alone hold (the mask before)
    for name in ("train", "valid"):
        df = ds.split(name)
        for row in df[df["user_id"] == "a"].itertuples():
            earlier |= {row.target_item_id, *row.history_item_ids}
    # every item the user interacted with before the target, read from the interactions
    missed = 0
    for r, row in enumerate(test.itertuples()):
        mine = inter[inter["user_id"] == row.user_id]
        before = set(mine.loc[mine["timestamp"] < row.target_timestamp, "item_id"])
        assert set(seen[r]) == before
        missed += len(before - earlier - set(row.history_item_ids))
    assert missed > 0  # the case the mask used to get wrong
    # through the harness: scores that put every item seen before the target above it and
    # the rest below rank each target first under `seen`, below its unmasked items otherwise
    col = {str(i): k for k, i in enumerate(ds.items["item_id"])}

    def scores(chunk):
        out = torch.zeros(len(chunk), len(col))
        for b, row in enumerate(chunk.itertuples()):
            mine = inter[(inter["user_id"] == row.user_id) & (inter["timestamp"] < row.target_timestamp)]
            out[b, [col[i] for i in mine["item_id"]]] = 2.0
            out[b, col[row.target_item_id]] = 1.0
        return out

    cfg = EvalConfig(split="test", mask="seen", batch_size=3)
    result = evaluate_scores(ds, cfg, scores)
    assert result.ranks == [1] * len(test)
    assert result.users == ["a"] * 5 and math.isnan(result.stderr["ndcg@10"])  # one user: no spread
    prompt = evaluate_scores(ds, dataclasses.replace(cfg, mask="prompt"), scores).ranks
    assert max(prompt) > 1  # the 2-item window leaves earlier items in the ranking
    # a split that lists a user's samples out of time order cannot be read this way
    ds.splits["test"] = test.iloc[::-1].reset_index(drop=True)
    with pytest.raises(ValueError, match="user a's samples out of time order"):
        seen_items(ds, "test")


def test_standard_errors_and_paired_difference_by_hand():
    # ndcg@1 per user: a = [1, 0, 1, 0], b = [0, 0, 1, 0]
    se = standard_errors([1, 2, 1, 3], ks=(1,))
    assert se["hit@1"] == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)
    pair = paired_difference([1, 2, 1, 3], [2, 2, 1, 3], "ndcg@1")
    assert (pair["a"], pair["b"], pair["diff"]) == (0.5, 0.25, 0.25)
    assert pair["stderr"] == pytest.approx(np.std([1, 0, 0, 0], ddof=1) / 2)
    assert pair["ratio"] == 2.0
    with pytest.raises(ValueError, match="same users"):
        paired_difference([1], [1, 2])


def test_standard_errors_cluster_a_users_samples():
    # hit@1 per sample 1, 1, 0, 0: two users of two samples each are two observations, 1 and 0
    ranks, users = [1, 1, 2, 2], ["u", "u", "v", "v"]
    assert standard_errors(ranks, ks=(1,), users=users)["hit@1"] == pytest.approx(0.5)
    assert standard_errors(ranks, ks=(1,))["hit@1"] == pytest.approx(np.std([1, 1, 0, 0], ddof=1) / 2)
    # one sample per user: exactly the unclustered error (every loo number)
    rng = np.random.default_rng(0)
    v = rng.random(50)
    assert mean_stderr(v, [str(i) for i in range(50)]) == pytest.approx(mean_stderr(v), rel=1e-12)
    # paired: the same clustering of the per-sample differences
    pair = paired_difference([1, 1, 2, 2], [2, 2, 2, 2], "ndcg@1", users)
    assert pair["diff"] == 0.5 and pair["stderr"] == pytest.approx(0.5)
    assert (
        paired_ranks([1, 1, 2, 2], [2, 2, 2, 2], users)["stderr"]
        > paired_ranks([1, 1, 2, 2], [2, 2, 2, 2])["stderr"]
    )
    assert math.isnan(mean_stderr(np.array([1.0, 0.0]), ["u", "u"]))  # one user: no spread to read
    with pytest.raises(ValueError, match="one user per sample"):
        mean_stderr(np.array([1.0, 0.0]), ["u"])


def test_paired_ranks_reads_moves_below_the_cutoff_by_hand():
    # the first three targets sit below 10th in both runs: NDCG@10 cannot tell them apart, ranks can
    a, b = [20, 50, 300, 7], [40, 50, 150, 7]
    assert paired_difference(a[:3], b[:3], "ndcg@10")["diff"] == 0.0
    pr = paired_ranks(a, b)
    assert (pr["a_better"], pr["b_better"], pr["ties"], pr["users"]) == (1, 1, 2, 4)
    d = np.log([0.5, 1.0, 2.0, 1.0])
    assert pr["log_rank_diff"] == pytest.approx(d.mean())
    assert pr["stderr"] == pytest.approx(d.std(ddof=1) / 2)
    assert pr["rank_ratio"] == pytest.approx(np.exp(d.mean()))
    assert (pr["median_a"], pr["median_b"]) == (35.0, 45.0)
    with pytest.raises(ValueError, match="same users"):
        paired_ranks([1], [1, 2])
    with pytest.raises(ValueError, match="1-based"):
        paired_ranks([0, 2], [1, 2])


def test_model_eval_checks_each_texts_claims_against_its_own_history(tiny_model, tiny_dataset, monkeypatch):
    """The texts here are written to order (a random tiny model writes no claims): each names the
    prompt window's highest-rated title, which holds, and a genre no item has, which does not."""
    from model.r2ec import Rollout

    def reason(histories, settings, num_generations=1, constraints=None):
        window = [list(h)[-tiny_model.prompts.max_history :] for h in histories]
        best = [max(w, key=lambda e: e.rating).title for w in window]
        texts = [f"Likes Nonesuch, mostly 1990s. Rated highest: {t}." for t in best]
        prompt_ids = tiny_model.user_prompt_ids(histories)
        return Rollout(prompt_ids, tiny_model.completion_ids(texts), texts)

    monkeypatch.setattr(tiny_model, "reason", reason)
    vectors = tiny_model.item_vectors(tiny_dataset.items.to_dict("records"))
    result = evaluate_model(tiny_model, tiny_dataset, vectors, EvalConfig(batch_size=3), progress=False)
    q, n = result.text_quality, len(tiny_dataset.split("test"))
    assert (q["rated_hold_share"], q["rated_claims"]) == (1.0, n)
    assert (q["genres_hold_share"], q["genres_claims"]) == (0.0, n)
    assert q["wrong_claim_examples"][0]["wrong"] == ["Nonesuch"]


def test_model_eval_with_and_without_reasoning(tiny_model, tiny_dataset):
    items = tiny_dataset.items
    vectors = tiny_model.item_vectors(items.to_dict("records"))
    test = tiny_dataset.split("test")
    for reasoning in (True, False):
        cfg = EvalConfig(reasoning=reasoning, max_reasoning_tokens=4, batch_size=2)
        result = evaluate_model(tiny_model, tiny_dataset, vectors, cfg, progress=False)
        assert result.count == len(test)
        assert all(1 <= r <= len(items) for r in result.ranks)
        assert bool(result.examples) == reasoning
        assert (result.text_quality is not None) == reasoning
        if reasoning:
            assert result.text_quality["texts"] == len(test)
            # a random model rarely picks a stop token within 4: its texts run into the budget
            assert result.text_quality["cut_share"] > 0.5
            assert [e["rank"] for e in result.examples] == result.ranks[: len(result.examples)]
    # ranks agree with a direct computation for the first sample, under the prompt mask
    cfg = EvalConfig(reasoning=False, limit=1, mask="prompt")
    result = evaluate_model(tiny_model, tiny_dataset, vectors, cfg, progress=False)
    from model.samples import sample_histories

    h = sample_histories(test.head(1), tiny_dataset.item_titles())
    scores = tiny_model.score(tiny_model.user_vectors(h, None), torch.as_tensor(np.asarray(vectors)))[0]
    ids = list(items["item_id"])
    target = ids.index(test.iloc[0]["target_item_id"])
    masked = [ids.index(i) for i in test.iloc[0]["history_item_ids"] if i != test.iloc[0]["target_item_id"]]
    scores[masked] = -float("inf")
    assert result.ranks[0] == int((scores > scores[target]).sum()) + 1


@pytest.mark.parametrize("reasoning", [True, False])
def test_the_engine_backend_gives_the_reference_ranks_and_texts(tiny_model, tiny_dataset, reasoning):
    from model.generation import EngineBackend

    vectors = tiny_model.item_vectors(tiny_dataset.items.to_dict("records"))
    cfg = EvalConfig(reasoning=reasoning, max_reasoning_tokens=6, batch_size=3)
    ref = evaluate_model(tiny_model, tiny_dataset, vectors, cfg, progress=False)
    got = evaluate_model(
        tiny_model, tiny_dataset, vectors, cfg, progress=False, backend=EngineBackend(tiny_model, 3)
    )
    assert got.ranks == ref.ranks and got.metrics == ref.metrics
    assert got.examples == ref.examples and got.text_quality == ref.text_quality


def test_sasrec_baseline_under_the_same_harness(tiny_dataset):
    from model.sasrec import SASRecConfig

    cfg = EvalConfig(split="test", batch_size=4)
    result, stats = evaluate_sasrec(tiny_dataset, cfg, SASRecConfig(epochs=2), progress=False)
    assert result.count == len(tiny_dataset.split("test")) and len(stats["loss"]) == 2
    assert all(1 <= r <= len(tiny_dataset.items) for r in result.ranks)


def test_sasrec_from_python_trains_the_epochs_the_cli_and_the_docs_use(tiny_dataset):
    """evaluate_sasrec without a config trained 30 epochs where `r2ec eval --baseline sasrec`
    and every documented number train 10 (journey 40, F8): one default, SASRecConfig's."""
    from typer.main import get_command

    from cli import app
    from model.sasrec import SASRecConfig

    assert SASRecConfig().epochs == 10
    cfg = EvalConfig(split="test", batch_size=4)
    _, stats = evaluate_sasrec(tiny_dataset, cfg, progress=False)
    assert stats["epochs"] == len(stats["loss"]) == SASRecConfig().epochs
    (option,) = [p for p in get_command(app).commands["eval"].params if p.name == "sasrec_epochs"]
    assert f"default {SASRecConfig().epochs}," in option.help


def test_validation_eval_config_follows_the_training_config():
    ecfg = validation_eval_config(RecPOConfig(max_completion_length=32, eval_limit=50))
    assert (ecfg.split, ecfg.reasoning, ecfg.max_reasoning_tokens, ecfg.limit) == ("valid", True, 32, 50)
    # the warm-up trains without reasoning and is validated without it
    warm = validation_eval_config(RecPOConfig(stage="contrastive", eval_reasoning_tokens=8, eval_limit=None))
    assert (warm.split, warm.reasoning, warm.max_reasoning_tokens, warm.limit) == ("valid", False, 8, None)


def test_eval_config_fields_are_documented_and_checked():
    assert list(field_docs(EvalConfig)) == [f.name for f in dataclasses.fields(EvalConfig)]
    with pytest.raises(ValueError, match="split must be one of"):
        EvalConfig(split="dev")
    with pytest.raises(ValueError, match="ks must be"):
        EvalConfig(ks=())
    with pytest.raises(ValueError, match="max_reasoning_tokens"):
        EvalConfig(max_reasoning_tokens=-1)
    with pytest.raises(ValueError, match="mask must be one of"):
        EvalConfig(mask="history")


def test_a_ranks_file_pairs_only_with_the_same_samples_in_the_same_order(tmp_path):
    samples = pd.DataFrame({"user_id": ["1", "2", "3"], "target_item_id": ["a", "b", "c"]})
    now = samples.assign(split="test", mask="seen", model="new", rank=[1, 20, 3])
    path = tmp_path / "old.parquet"
    write_ranks(path, now.assign(model="old", rank=[2, 5, 3]))
    saved = read_ranks(path, samples, "test", "seen")
    pw = paired_with_saved(now, saved, path)
    assert (pw["a"], pw["b"]) == ("new", "old")
    # by hand: NDCG@10 per user 1 vs 1/log2(3), 0 vs 1/log2(6), equal for the third
    assert pw["ndcg@10"]["diff"] == pytest.approx((1 - 1 / math.log2(3) - 1 / math.log2(6)) / 3)
    assert (pw["rank"]["a_better"], pw["rank"]["b_better"], pw["rank"]["ties"]) == (1, 1, 1)
    with pytest.raises(ValueError, match="its target_item_ids are not this run's"):
        read_ranks(path, samples.assign(target_item_id=["a", "c", "b"]), "test", "seen")
    with pytest.raises(ValueError, match="its user_ids are not this run's"):
        read_ranks(path, samples.iloc[::-1], "test", "seen")
    with pytest.raises(ValueError, match=r"its user_ids are not this run's \(3 samples against 2\)"):
        read_ranks(path, samples.head(2), "test", "seen")
    write_ranks(path, now.assign(rank=[1.0, None, 3.0]))
    with pytest.raises(ValueError, match="its rank values must be whole numbers >= 1"):
        read_ranks(path, samples, "test", "seen")
    write_ranks(path, now.assign(mask=["seen", None, "seen"]))
    with pytest.raises(ValueError, match="its mask is <none>, seen"):
        read_ranks(path, samples, "test", "seen")


def test_a_pairing_with_a_compare_run_reads_its_run_block_as_the_columns_mode(tmp_path):
    """A --compare-reasoning run's block says reasoning "both": its rank_without_reasoning is a
    pass with reasoning off, to which its reasoning-only settings do not apply, and its rank
    (this run's too) the reasoning pass; only what really differs is named."""
    samples = pd.DataFrame({"user_id": ["1", "2"], "target_item_id": ["a", "b"]})
    both = {"reasoning": "both", "max_reasoning_tokens": 8, "constrain_titles": True, "dtype": "float32"}
    both |= {"backend": "engine", "quantize": "none", "speculative_tokens": 4}
    frame = samples.assign(split="test", mask="seen", model="m", rank=[1, 2], rank_without_reasoning=[3, 4])
    frame.attrs["run"] = both
    path = tmp_path / "both.parquet"
    write_ranks(path, frame)
    off = read_ranks(path, samples, "test", "seen", "rank_without_reasoning")
    now = samples.assign(model="m without reasoning", rank=[3, 4])
    now.attrs["run"] = {"reasoning": False, "dtype": "float32", "backend": "engine", "quantize": "none"}
    assert paired_with_saved(now, off, path)["differs"] == {}
    now.attrs["run"] = now.attrs["run"] | {"dtype": "bfloat16"}
    assert paired_with_saved(now, off, path)["differs"] == {"dtype": ["bfloat16", "float32"]}
    on = read_ranks(path, samples, "test", "seen")
    assert on.attrs["run"] == both | {"reasoning": True}
    now = samples.assign(model="m", rank=[1, 2])
    now.attrs["run"] = both  # a compare run's headline against another's: both reasoning passes
    assert paired_with_saved(now, on, path)["differs"] == {}
    assert paired_with_saved(now, off, path)["differs"] == {
        "constrain_titles": [True, None],
        "max_reasoning_tokens": [8, None],
        "reasoning": [True, False],
        "speculative_tokens": [4, None],
    }


def test_a_ranks_file_pairs_with_the_mode_its_column_names(tmp_path):
    samples = pd.DataFrame({"user_id": ["1", "2"], "target_item_id": ["a", "b"]})
    saved = samples.assign(split="test", mask="seen", model="old", rank=[1, 2])
    path = tmp_path / "old.parquet"
    write_ranks(path, saved.assign(rank_without_reasoning=[7, 3]))
    off = read_ranks(path, samples, "test", "seen", "rank_without_reasoning")
    assert list(off["rank"]) == [7, 3] and set(off["model"]) == {"old without reasoning"}
    assert list(read_ranks(path, samples, "test", "seen")["rank"]) == [1, 2]  # the headline by default
    with pytest.raises(ValueError, match="paired column must be one of rank, rank_without_reasoning"):
        read_ranks(path, samples, "test", "seen", "model")
    write_ranks(path, saved)  # a run without --compare-reasoning
    with pytest.raises(ValueError, match="no column rank_without_reasoning .*--compare-reasoning"):
        read_ranks(path, samples, "test", "seen", "rank_without_reasoning")
    write_ranks(path, saved.assign(rank_without_reasoning=[0, 3]))
    with pytest.raises(ValueError, match="its rank_without_reasoning values must be whole numbers >= 1"):
        read_ranks(path, samples, "test", "seen", "rank_without_reasoning")
