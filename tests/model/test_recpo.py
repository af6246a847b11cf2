"""RecPO's advantages, rewards and config against hand-computed values (DESIGN §3)."""

from __future__ import annotations

import math

import pytest
import torch

from model.recpo import RecPOConfig, best_trajectories, group_advantages
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


def test_target_rank_counts_strictly_higher_and_respects_mask():
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.1], [0.9, 0.5, 0.7, 0.1]])
    targets = torch.tensor([1, 1])
    assert target_rank(scores, targets).tolist() == [3, 3]
    mask = torch.tensor([[True, False, False, False], [False, True, True, False]])
    # row 0: item 0 dropped -> rank 2; row 1: the target itself is never masked, item 2 is.
    assert target_rank(scores, targets, mask).tolist() == [2, 2]


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
