"""RecPO's advantages, rewards and config against hand-computed values (docs/architecture.md §3)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re

import pytest
import torch

from model.recpo import RecPOConfig, best_trajectories, field_docs, group_advantages
from model.rewards import fused_reward, ndcg_at_k, similarity_reward, target_rank


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_equal_rewards_give_zero_advantage(kind):
    rewards = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(group_advantages(rewards, 4, kind), torch.zeros(8))


def test_rloo_on_one_winner():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, "rloo")
    torch.testing.assert_close(adv, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))


def test_grpo_on_one_winner():
    # mean 0.25, population std sqrt(0.1875)
    std = math.sqrt(0.1875)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, "grpo")
    torch.testing.assert_close(adv, torch.tensor([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std]))


def test_advantages_are_per_group():
    adv = group_advantages(torch.tensor([1.0, 0.0, 5.0, 5.0]), 2, "rloo")
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_unknown_advantage_is_an_error():
    with pytest.raises(ValueError, match="unknown advantage"):
        group_advantages(torch.zeros(4), 2, "ppo")


def test_ndcg_of_known_ranks():
    r = ndcg_at_k(torch.tensor([1, 3, 7, 20]), k=10)
    torch.testing.assert_close(r, torch.tensor([1.0, 1 / math.log2(4), 1 / math.log2(8), 0.0]))


def test_target_rank_counts_higher_items_and_respects_mask():
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.1], [0.9, 0.5, 0.7, 0.1]])
    targets = torch.tensor([1, 1])
    assert target_rank(scores, targets).tolist() == [3, 3]
    mask = torch.tensor([[True, False, False, False], [False, True, True, False]])
    # row 0: item 0 dropped -> rank 2; row 1: the target itself is never masked, item 2 is.
    assert target_rank(scores, targets, mask).tolist() == [2, 2]


def test_target_rank_puts_the_target_after_items_tied_with_it():
    scores = torch.tensor([[0.7, 0.5, 0.7, 0.7, 0.1], [0.3, 0.3, 0.3, 0.3, 0.3]])
    targets = torch.tensor([2, 0])
    # row 0: items 0 and 3 score as the target does -> it ranks after both
    assert target_rank(scores, targets).tolist() == [3, 5]  # a constant score ranks last
    mask = torch.tensor([[True, False, False, False, False], [False, True, True, False, False]])
    assert target_rank(scores, targets, mask).tolist() == [2, 3]  # masked ties no longer count
    nan = torch.tensor([[0.1, float("nan"), 0.3]])
    assert target_rank(nan, torch.tensor([1])).tolist() == [3]  # a NaN target ranks last, not 0


def test_similarity_reward_is_the_targets_softmax_probability():
    scores = torch.tensor([[math.log(1.0), math.log(3.0), math.log(4.0)]])
    torch.testing.assert_close(similarity_reward(scores, torch.tensor([1])), torch.tensor([3 / 8]))
    mask = torch.tensor([[False, False, True]])
    torch.testing.assert_close(similarity_reward(scores, torch.tensor([1]), mask), torch.tensor([3 / 4]))


def test_fused_reward():
    out = fused_reward(torch.tensor([0.4]), torch.tensor([0.5]), weight=0.05)
    torch.testing.assert_close(out, torch.tensor([0.05 * 0.4 + 0.95 * 0.5]))


def test_best_trajectories_picks_each_groups_top():
    adv = torch.tensor([0.1, 0.9, -1.0, 0.0, 2.0, 1.0, -1.0, 0.5])
    assert best_trajectories(adv, 4, 1).tolist() == [1, 4]
    assert best_trajectories(adv, 4, 2).tolist() == [1, 0, 4, 5]


def test_config_validation_and_yaml(tmp_path):
    with pytest.raises(ValueError, match="advantage"):
        RecPOConfig(advantage="ppo")
    with pytest.raises(ValueError, match="num_generations"):
        RecPOConfig(num_generations=1)
    with pytest.raises(ValueError, match="best_n"):
        RecPOConfig(best_n=5)
    path = tmp_path / "c.yaml"
    path.write_text("num_generations: 8\nadvantage: rloo\n")
    cfg = RecPOConfig.from_yaml(path, max_steps=3)
    assert (cfg.num_generations, cfg.advantage, cfg.max_steps) == (8, "rloo", 3)
    path.write_text("num_generation: 8\n")
    with pytest.raises(ValueError, match="unknown config keys"):
        RecPOConfig.from_yaml(path)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (dict(negatives="all"), "negatives must be one of"),
        (dict(stage="recpo", max_completion_length=0), "use stage: contrastive"),
        (dict(stage="contrastive", negatives="table", sampled_negatives=8), "set sampled_negatives: 0"),
        (dict(lora=False, lora_layers=8), "set lora: true, or lora_layers: null"),
        (dict(epsilon=1.0), "epsilon must be in"),
        (dict(epsilon_high=0.0), "epsilon_high must be > 0"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(learning_rate=0.0), "learning_rate must be > 0"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(time_budget_minutes=0), "time_budget_minutes must be > 0 or null"),
        (dict(eval_limit=0), "eval_limit must be >= 1 or null"),
        (dict(eval_reasoning_tokens=-1), "eval_reasoning_tokens"),
        (dict(stage="contrastive", per_device_batch_size=1), "or negatives: table"),
        (dict(best_n=5), "lower best_n or raise num_generations"),
    ],
)
def test_config_rejects_bad_values_and_says_how_to_fix_them(bad, message):
    with pytest.raises(ValueError, match=message):
        RecPOConfig(**bad)


def test_the_good_combinations_next_to_them_are_accepted():
    RecPOConfig(stage="contrastive", max_completion_length=0, num_generations=1)  # no rollouts
    RecPOConfig(stage="contrastive", negatives="table", per_device_batch_size=1)
    RecPOConfig(lora=False)
    RecPOConfig(eval_limit=None, eval_reasoning_tokens=0, top_k=0)


def _documented_defaults(cls) -> dict[str, str]:
    doc = inspect.getdoc(cls).partition("Parameters:")[2]
    return dict(re.findall(r"^    (\w+) \(.*, defaults to (.*)\):$", doc, flags=re.M))


def test_every_config_field_is_documented_once_with_its_default():
    docs = field_docs(RecPOConfig)
    assert list(docs) == [f.name for f in dataclasses.fields(RecPOConfig)]
    assert all(docs.values())
    defaults = _documented_defaults(RecPOConfig)
    for f in dataclasses.fields(RecPOConfig):
        actual = f.default_factory() if f.default is dataclasses.MISSING else f.default
        text = defaults[f.name]
        if text.startswith("`"):
            assert ast.literal_eval(text.strip("`")) == actual, f.name
        else:
            assert f.name == "lora_target_modules" and str(actual).replace("'", '"') in docs[f.name]
