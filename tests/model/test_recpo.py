"""RecPO's pure math against hand-computed values (DESIGN §3)."""

from __future__ import annotations

import math

import pytest
import torch

from model.recpo import (
    RecPOConfig,
    best_trajectories,
    clipped_surrogate,
    group_advantages,
    in_batch_log_probs,
    item_loss,
    token_loss,
)
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


def test_clipped_surrogate_clips_both_sides():
    ratio = torch.tensor([1.5, 0.5, 1.0, 1.5])
    adv = torch.tensor([1.0, -1.0, 2.0, -1.0])
    loss, low, high = clipped_surrogate(ratio, adv, epsilon=0.2, epsilon_high=0.28)
    # 1.5*1 clipped to 1.28; 0.5*-1 -> min(-0.5, -0.8) = -0.8; unclipped; 1.5*-1 is the min itself.
    torch.testing.assert_close(loss, torch.tensor([-1.28, 0.8, -2.0, 1.5]))
    assert high.tolist() == [True, False, False, False]
    assert low.tolist() == [False, True, False, False]


def test_token_loss_ignores_padding():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    old = torch.tensor([[-1.1, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, -1.0])
    loss, _ = token_loss(logp, old, adv, mask, 0.2, 0.28)
    # Garbage in the padded positions changes nothing.
    noisy_logp = logp.clone()
    noisy_logp[0, 2], noisy_logp[1, 1:] = 5.0, -7.0
    noisy_loss, _ = token_loss(noisy_logp, old, adv, mask, 0.2, 0.28)
    assert noisy_loss.item() == pytest.approx(loss.item())
    expected = -(math.exp(0.1) * 1 + 1 * 1 + 1 * -1) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_token_loss_of_no_tokens_is_zero():
    loss, _ = token_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3), 0.2, 0.28)
    assert loss.item() == 0.0


def test_best_trajectories_picks_each_groups_top():
    adv = torch.tensor([0.1, 0.9, -1.0, 0.0, 2.0, 1.0, -1.0, 0.5])
    assert best_trajectories(adv, 4, 1).tolist() == [1, 4]
    assert best_trajectories(adv, 4, 2).tolist() == [1, 0, 4, 5]


def test_in_batch_log_probs_never_uses_the_target_as_its_own_negative():
    users = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    targets = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), dim=-1)
    ids = ["a", "b", "a"]  # item a appears twice in the batch
    logp = in_batch_log_probs(users, targets, ids, tau=1.0, user_targets=["a", "b"])
    # user 0: columns a, b (the duplicate a is masked): softmax over [1, 0]
    assert logp[0].item() == pytest.approx(math.log(math.e / (math.e + 1)))
    # user 1: target b; both copies of a are negatives here
    assert logp[1].item() == pytest.approx(math.log(math.e / (math.e + 2)))


def test_item_loss_is_the_clipped_ratio():
    loss, stats = item_loss(
        torch.log(torch.tensor([0.6])), torch.log(torch.tensor([0.3])), torch.tensor([1.0]), 0.2, 0.28
    )
    assert loss.item() == pytest.approx(-1.28)
    assert stats["item/clip_ratio"] == 1.0


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
