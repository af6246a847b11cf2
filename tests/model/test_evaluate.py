import dataclasses
import math

import numpy as np
import pytest
import torch

from model.evaluate import (
    EvalConfig,
    evaluate_model,
    evaluate_popularity,
    ranking_metrics,
    target_ranks,
    validation_eval_config,
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


def test_popularity_baseline_ranks_by_train_counts(tiny_dataset):
    cfg = EvalConfig(split="test")
    train, test = tiny_dataset.split("train"), tiny_dataset.split("test")
    result = evaluate_popularity(train, test, tiny_dataset.items, cfg)
    assert result.count == len(test)
    assert 0.0 <= result.metrics["ndcg@20"] <= 1.0
    # with history masking off, at least as many items can outrank the target
    unmasked = evaluate_popularity(
        train, test, tiny_dataset.items, EvalConfig(split="test", mask_history=False)
    )
    assert all(u >= m for u, m in zip(unmasked.ranks, result.ranks, strict=True))


def test_model_eval_with_and_without_reasoning(tiny_model, tiny_dataset):
    items = tiny_dataset.items
    vectors = tiny_model.item_vectors(items.to_dict("records"))
    test = tiny_dataset.split("test")
    for reasoning in (True, False):
        cfg = EvalConfig(reasoning=reasoning, max_reasoning_tokens=4, batch_size=2)
        result = evaluate_model(tiny_model, test, items, vectors, cfg, progress=False)
        assert result.count == len(test)
        assert all(1 <= r <= len(items) for r in result.ranks)
        assert bool(result.examples) == reasoning
    # ranks agree with a direct computation for the first sample
    cfg = EvalConfig(reasoning=False, limit=1)
    result = evaluate_model(tiny_model, test, items, vectors, cfg, progress=False)
    from model.samples import sample_histories

    h = sample_histories(test.head(1), tiny_dataset.item_titles())
    scores = tiny_model.score(tiny_model.user_vectors(h, None), torch.as_tensor(np.asarray(vectors)))[0]
    ids = list(items["item_id"])
    target = ids.index(test.iloc[0]["target_item_id"])
    masked = [ids.index(i) for i in test.iloc[0]["history_item_ids"] if i != test.iloc[0]["target_item_id"]]
    scores[masked] = -float("inf")
    assert result.ranks[0] == int((scores > scores[target]).sum()) + 1


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
