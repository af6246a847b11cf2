"""SASRec learns a sequence rule it can see in the train samples."""

import pandas as pd
import pytest

from model.sasrec import SASRecConfig, sasrec_scores, train_sasrec


def _samples(n_items: int, users: int) -> pd.DataFrame:
    # Each user walks the catalog in a cycle from a different start: next = last + 1.
    rows = []
    for u in range(users):
        seq = [(u + j) % n_items for j in range(8)]
        for t in range(3, len(seq)):
            rows.append(
                {
                    "user_id": str(u),
                    "history_item_ids": [str(i) for i in seq[:t]],
                    "target_item_id": str(seq[t]),
                }
            )
    return pd.DataFrame(rows)


def test_sasrec_learns_next_item():
    items = pd.DataFrame({"item_id": [str(i) for i in range(12)]})
    train = _samples(12, 24)
    cfg = SASRecConfig(
        hidden_size=16,
        inner_size=32,
        num_heads=2,
        dropout=0.0,
        max_len=8,
        epochs=60,
        batch_size=32,
        learning_rate=5e-3,
    )
    model, stats = train_sasrec(train, items, cfg, progress=False)
    assert stats["loss"][-1] < stats["loss"][0] / 4
    test = pd.DataFrame(
        {"history_item_ids": [["3", "4", "5"], ["9", "10", "11"]], "target_item_id": ["6", "0"]}
    )
    scores = sasrec_scores(model, test, items)
    assert scores.shape == (2, 12)
    assert scores.argmax(1).tolist() == [6, 0]


def test_config_rejects_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="num_heads"):
        SASRecConfig(hidden_size=10, num_heads=3)


def test_dropout_sits_where_recboles_sasrec_has_it():
    import torch

    from model.sasrec import SASRec

    model = SASRec(10, SASRecConfig(hidden_size=8, inner_size=16, num_heads=2, dropout=0.5)).train()
    block, x = model.encoder.layers[0], torch.randn(1, 4, 8)
    # the feed-forward block drops out once, after its second layer (RecBole's FeedForward):
    # the same random draw as one dropout over the undropped output
    torch.manual_seed(0)
    ours = block._ff_block(x)
    torch.manual_seed(0)
    once = block.dropout2(block.linear2(block.activation(block.linear1(x))))
    assert torch.equal(ours, once) and (ours == 0).any()
