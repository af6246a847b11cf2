import pytest

from model.prompts import HistoryEntry, PromptConfig, item_message, render, user_message


def test_user_message_keeps_latest_items_oldest_first():
    cfg = PromptConfig(max_history=2)
    history = [HistoryEntry("A", 5.0), HistoryEntry("B", 3.5), HistoryEntry("C", None)]
    msg = user_message(history, cfg)
    assert msg.startswith("Analyze in depth and finally recommend the next movie I might like.")
    assert msg.splitlines()[-2:] == ["B (3.5)", "C"]
    assert "A (5)" not in msg


def test_user_message_relative_time():
    cfg = PromptConfig(include_time=True)
    msg = user_message([HistoryEntry("A", 4.0, 0), HistoryEntry("B", 5.0, 3 * 86400)], cfg)
    assert "A (4) [3 days before the latest]" in msg
    assert "B (5) [0 days before the latest]" in msg


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


def test_item_without_title_rejected():
    with pytest.raises(ValueError, match="no title"):
        item_message({"item_id": "x", "title": ""}, PromptConfig())


def test_render_uses_chat_template(tiny_model):
    text = render(tiny_model.tokenizer, "hello")
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_config_validation():
    with pytest.raises(ValueError, match="max_history"):
        PromptConfig(max_history=0)
    with pytest.raises(ValueError, match="closing_marker"):
        PromptConfig(closing_marker="  ")
