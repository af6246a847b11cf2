import pytest

from model.prompts import HistoryEntry, PromptConfig, item_message, render, user_message


def test_user_message_keeps_latest_items_oldest_first():
    cfg = PromptConfig(max_history=2)
    history = [HistoryEntry("A", 5.0), HistoryEntry("B", 3.5), HistoryEntry("C", None)]
    msg = user_message(history, cfg)
    assert msg.startswith("Analyze in depth and finally recommend the next movie I might like.")
    assert msg.splitlines()[-2:] == ["B (3.5)", "C"]
    assert "A (5)" not in msg


def test_user_message_time_before_the_latest_for_older_checkpoints():
    cfg = PromptConfig.from_dict({"include_time": True})  # written before time_style existed
    assert cfg.time_style == "before_latest"
    msg = user_message([HistoryEntry("A", 4.0, 0), HistoryEntry("B", 5.0, 3 * 86400)], cfg)
    assert "A (4) [3 days before the latest]" in msg
    assert "B (5) [0 days before the latest]" in msg


def test_user_message_time_as_the_paper_renders_it():
    cfg = PromptConfig(include_time=True)
    history = [
        HistoryEntry("Fargo", 5.0, 0, age_s=2 * 86400 + 3 * 3600 + 30 * 60),
        HistoryEntry("Heat", None, 1, age_s=2 * 3600 + 600),
        HistoryEntry("Babe", 3.5, 2, age_s=450),
    ]
    assert user_message(history, cfg).splitlines()[-3:] == [
        "2d 3.5h ago: [Fargo] (5)",
        "2h 10.0min ago: [Heat]",
        "7.5min ago: [Babe] (3.5)",
    ]
    # no age known: counted from the latest item; no timestamp at all: the plain line
    msg = user_message([HistoryEntry("A", 4.0, 0), HistoryEntry("B", 5.0, 90), HistoryEntry("C")], cfg)
    assert msg.splitlines()[-3:] == ["1.5min ago: [A] (4)", "0.0min ago: [B] (5)", "C"]
    with pytest.raises(ValueError, match="time_style"):
        PromptConfig(time_style="weeks")


def test_sample_histories_are_aged_to_the_target_time():
    import pandas as pd

    from model.samples import sample_histories

    rows = pd.DataFrame(
        {
            "history_item_ids": [["1", "2"]],
            "history_ratings": [[4.0, 5.0]],
            "history_timestamps": [[100, 1000]],
            "target_timestamp": [4600],
        }
    )
    (history,) = sample_histories(rows, {"1": "Heat", "2": "Fargo"})
    assert [e.age_s for e in history] == [4500, 3600]
    last = user_message(history, PromptConfig(include_time=True)).splitlines()[-1]
    assert last == "1h 0.0min ago: [Fargo] (5)"


def test_empty_history_rejected():
    with pytest.raises(ValueError, match="at least one item"):
        user_message([], PromptConfig())


def test_item_message_fields_and_description_cut():
    cfg = PromptConfig(category="product", description_words=3)
    msg = item_message(
        {"item_id": "x", "title": "Lamp", "year": "", "genres": "Home", "description": "a b c d e"},
        cfg,
    )
    assert (
        msg
        == "Summarize key attributes of the following product:\nTitle: Lamp\nGenres: Home\nDescription: a b c"
    )


def _tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_a_long_description_without_spaces_is_cut_by_tokens(tiny_model):
    """A CJK or Thai description is one white-space "word": `description_words` kept all of it
    (a 6,000-character one made a 12,000-token item prompt); the token budget cuts it."""
    tok, cfg = tiny_model.tokenizer, PromptConfig()
    for description in ("湯屋で働く少女の物語。" * 500, "ฉลาดเกมส์โกงเป็นภาพยนตร์ไทย" * 200):
        item = {"item_id": "x", "title": "Spirited", "genres": "Drama", "description": description}
        msg = item_message(item, cfg, tok)
        cut = msg.split("Description: ", 1)[1]
        assert description.startswith(cut) and "\ufffd" not in cut
        assert 0.9 * cfg.description_tokens <= _tokens(tok, cut) <= cfg.description_tokens
        assert _tokens(tok, msg) < cfg.item_tokens
    # the whole item text too, whatever field holds it
    msg = item_message({"item_id": "x", "title": "千" * 1000, "genres": "Drama"}, cfg, tok)
    assert _tokens(tok, msg) <= cfg.item_tokens and msg.startswith("Summarize")
    # every item prompt the model encodes goes through it (checkpoint init, PUT, retraining)
    (ids,) = tiny_model.item_prompt_ids([{"item_id": "x", "title": "T", "description": "湯" * 5000}])
    assert len(ids) < cfg.item_tokens + 64


def test_text_under_the_token_budgets_is_kept_byte_for_byte(tiny_model):
    """An older checkpoint (no token keys) loads the defaults, and an item under them renders
    as it did before the budgets existed; a white-space cut still comes first."""
    tok = tiny_model.tokenizer
    old = PromptConfig.from_dict({"category": "movie", "description_words": 100})
    assert (old.description_tokens, old.item_tokens) == (256, 512)
    for item in (
        {"item_id": "1", "title": "Amélie", "year": "2001", "genres": "Comedy, Romance"},
        # 100 words (cut from 150) of 101 tokens: tokenized, under the budget
        {"item_id": "2", "title": "Lamp", "description": " ".join(["movie"] * 150)},
        {"item_id": "3", "title": "卧虎藏龙", "description": "一部武侠电影。" * 3},
    ):
        assert item_message(item, old, tok) == item_message(item, old)
    assert item_message(
        {"item_id": "2", "title": "L", "description": "a b c d"}, PromptConfig(description_words=2), tok
    ).endswith("Description: a b")
    with pytest.raises(ValueError, match="item_tokens"):
        PromptConfig(item_tokens=4)


def test_item_without_title_rejected():
    with pytest.raises(ValueError, match="no title"):
        item_message({"item_id": "x", "title": ""}, PromptConfig())


def test_render_uses_chat_template(tiny_model):
    text = render(tiny_model.tokenizer, "hello")
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    text = render(tiny_model.tokenizer, "hello", system="You recommend.")
    assert text.startswith("<|im_start|>system\nYou recommend.<|im_end|>\n<|im_start|>user\nhello")


def test_system_prompt_reaches_both_prompts_and_survives_a_round_trip(tiny_model):
    from model.r2ec import R2ec

    cfg = PromptConfig(system_prompt="You recommend movies.")
    assert PromptConfig.from_dict(cfg.to_dict()) == cfg
    assert PromptConfig.from_dict({"category": "movie"}).system_prompt is None  # older checkpoints
    model = R2ec(tiny_model.lm, tiny_model.tokenizer, cfg)
    history = [HistoryEntry("Heat", 4.0)]
    item = {"item_id": "1", "title": "Heat"}
    for ids in (model.user_prompt_ids([history])[0], model.item_prompt_ids([item])[0]):
        assert model.tokenizer.decode(ids).startswith("<|im_start|>system\nYou recommend movies.")


def test_prompt_config_validation():
    with pytest.raises(ValueError, match="max_history"):
        PromptConfig(max_history=0)
    with pytest.raises(ValueError, match="closing_marker"):
        PromptConfig(closing_marker="  ")
