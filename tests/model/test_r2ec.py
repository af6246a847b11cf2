import torch

from model.prompts import HistoryEntry
from model.r2ec import GenerationSettings, left_pad

HISTORIES = [
    [HistoryEntry("Toy Story", 5.0), HistoryEntry("Fargo", 4.0), HistoryEntry("Heat", 3.0)],
    [HistoryEntry("Star Wars", 5.0)],
    [HistoryEntry("Babe", 2.0), HistoryEntry("Casino", 4.5)],
]
ITEMS = [
    {"item_id": "1", "title": "Heat", "year": "1995", "genres": "Action"},
    {"item_id": "2", "title": "Babe"},
    {"item_id": "3", "title": "Toy Story", "description": "a toy story " * 50},
]


def test_left_pad_positions_count_real_tokens():
    batch = left_pad([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_batched_reasoning_equals_one_by_one(tiny_model):
    settings = GenerationSettings(max_new_tokens=12)
    batched = tiny_model.reason(HISTORIES, settings)
    assert any(batched.completion_ids), "the tiny model should write some tokens"
    for i, history in enumerate(HISTORIES):
        single = tiny_model.reason([history], settings)
        assert single.completion_ids[0] == batched.completion_ids[i]
        assert single.texts[0] == batched.texts[i]


def test_batched_user_vectors_equal_one_by_one(tiny_model):
    rollout = tiny_model.reason(HISTORIES, GenerationSettings(max_new_tokens=8))
    batched = tiny_model.user_vectors(HISTORIES, rollout)
    assert batched.shape == (3, tiny_model.hidden_size)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(3), atol=1e-5)
    for i, history in enumerate(HISTORIES):
        single = tiny_model.user_vectors(
            [history], tiny_model.reason([history], GenerationSettings(max_new_tokens=8))
        )
        assert torch.allclose(single[0], batched[i], atol=1e-5)


def test_reasoning_changes_user_vector(tiny_model):
    rollout = tiny_model.reason(HISTORIES[:1], GenerationSettings(max_new_tokens=8))
    assert rollout.completion_ids[0]
    with_reasoning = tiny_model.user_vectors(HISTORIES[:1], rollout)
    without = tiny_model.user_vectors(HISTORIES[:1], None)
    assert not torch.allclose(with_reasoning, without)


def test_sampled_generations_repeat_each_prompt(tiny_model):
    torch.manual_seed(0)
    rollout = tiny_model.reason(
        HISTORIES[:2],
        GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.5),
        num_generations=3,
    )
    assert len(rollout.completion_ids) == 6
    assert rollout.prompt_ids[0] == rollout.prompt_ids[2] != rollout.prompt_ids[3]


def test_completion_mask_marks_reasoning_tokens(tiny_model):
    prompts = tiny_model.user_prompt_ids(HISTORIES[:2])
    batch = tiny_model.user_batch(prompts, [[11, 12, 13], [14]])
    assert batch.completion_mask.sum(dim=1).tolist() == [3, 1]
    marker = len(tiny_model._marker_ids)
    assert batch.input_ids[0, -marker - 3 : -marker].tolist() == [11, 12, 13]
    assert batch.input_ids[1, -marker - 1 : -marker].tolist() == [14]


def test_item_vectors_order_independent_of_batching(tiny_model):
    all_at_once = tiny_model.item_vectors(ITEMS, batch_size=8)
    one_by_one = tiny_model.item_vectors(ITEMS, batch_size=1)
    assert all_at_once.shape == (3, tiny_model.hidden_size)
    assert torch.allclose(all_at_once, one_by_one, atol=1e-5)


def test_score_is_cosine_over_tau(tiny_model):
    items = tiny_model.item_vectors(ITEMS)
    scores = tiny_model.score(items, items)
    assert torch.allclose(torch.diagonal(scores), torch.full((3,), 1 / tiny_model.tau), atol=1e-3)
