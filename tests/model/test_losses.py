"""The losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from model.losses import (
    catalog_logits,
    clipped_surrogate,
    completion_log_probs,
    contrastive_loss,
    in_batch_log_probs,
    item_loss,
    log_expected_count,
    token_loss,
)
from model.r2ec import PaddedBatch


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


def test_completion_log_probs_scores_only_the_reasoning_tokens():
    # vocabulary 3, identity head: hidden state j is the logits predicting token j+1
    hidden = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]])
    ids = torch.tensor([[2, 0, 1, 2]])
    batch = PaddedBatch(ids, torch.ones_like(ids), torch.arange(4).view(1, 4), torch.tensor([[0, 0, 1, 1]]))
    head = torch.nn.Linear(3, 3, bias=False)
    torch.nn.init.eye_(head.weight)
    logp = completion_log_probs(head, hidden, batch, temperature=2.0)
    # token 2 is predicted from [1, 0, 0] / 2 (target 1); token 3 from [0, 2, 0] / 2 (target 2)
    z1 = math.log(2 + math.exp(0.5))
    z2 = math.log(2 + math.e)
    torch.testing.assert_close(logp, torch.tensor([[0.0, 0.0, -z1, -z2]]))


def test_log_expected_count_adds_the_uniform_draws_to_the_popular_ones():
    log_q = torch.log(torch.tensor([0.5, 0.1]))
    # 4 targets drawn by popularity + 10 uniform draws out of 20 items: 4 q + 10 / 20
    expected = torch.log(torch.tensor([4 * 0.5 + 0.5, 4 * 0.1 + 0.5]))
    torch.testing.assert_close(log_expected_count(log_q, 4, 10, 20), expected)
    # without sampled negatives it is log q plus a constant: the plain logQ correction
    torch.testing.assert_close(log_expected_count(log_q, 4, 0, 20) - log_q, torch.full((2,), math.log(4)))


def test_contrastive_loss_is_the_own_columns_cross_entropy():
    logits = torch.log(torch.tensor([[1.0, 3.0, 4.0], [6.0, 1.0, 1.0]]))
    loss, stats = contrastive_loss(logits, torch.tensor([1, 0]))
    assert loss.item() == pytest.approx(-(math.log(3 / 8) + math.log(6 / 8)) / 2)
    assert stats["loss/total"] == stats["loss/contrastive"] == pytest.approx(loss.item())
    assert stats["rank/median"] == 1.0  # ranks 2 and 1; torch's median takes the lower middle
    _, tied = contrastive_loss(torch.zeros(3, 4), torch.tensor([0, 1, 2]))
    assert tied["rank/median"] == 4.0  # a tie is counted against the own column, as in evaluation


def test_catalog_logits_mask_the_history_but_never_the_users_own_item():
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    vectors = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    own = torch.tensor([1, 2])
    torch.testing.assert_close(
        catalog_logits(users, vectors, 0.5, own, None), torch.tensor([[2.0, 1.2, 0.0], [0.0, 1.6, 2.0]])
    )
    drop = torch.tensor([[True, True, False], [False, False, True]])
    logits = catalog_logits(users, vectors, 0.5, own, drop)
    inf = float("-inf")
    torch.testing.assert_close(logits, torch.tensor([[inf, 1.2, 0.0], [0.0, 1.6, 2.0]]))
    assert drop.tolist() == [[True, True, False], [False, False, True]]  # the caller's mask is kept
