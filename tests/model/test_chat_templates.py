"""Backbones other than SmolLM2: chat templates without a system turn, turns that end with a
token other than EOS, stop tokens from the model's generation_config, tokenizers without an
EOS or a chat template (model/prompts.py `render`, model/r2ec.py `stop_token_ids`,
model/backbone.py `prepare_tokenizer`)."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from model.backbone import tiny_model, tiny_tokenizer
from model.prompts import HistoryEntry, PromptConfig, render
from model.r2ec import R2ec

# Gemma's template (raises on a system turn) and Mistral's [INST] one (roles must alternate),
# reduced to what matters here
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def family_tokenizer(
    template: str | None, specials: list[str], bos: str, eos: str
) -> PreTrainedTokenizerFast:
    """The tiny tokenizer with a family's special tokens and chat template."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.bos_token, tok.eos_token, tok.pad_token = bos, eos, eos
    tok.chat_template = template
    return tok


def gemma() -> PreTrainedTokenizerFast:
    return family_tokenizer(GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>")


def test_a_template_without_a_system_turn_gets_the_system_text_in_the_user_turn():
    """Gemma's and Mistral's templates raise on a system turn: every shipped config sets
    system_prompt, so training died in jinja2. The system text now opens the user turn."""
    assert render(gemma(), "hello", system="You recommend movies.") == (
        "<bos><start_of_turn>user\nYou recommend movies.\n\nhello<end_of_turn>\n<start_of_turn>model\n"
    )
    mistral = family_tokenizer(MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>")
    assert render(mistral, "hello", system="S") == "<s>[INST] S\n\nhello [/INST]"
    # one that drops a system turn silently folds it too
    drops = family_tokenizer(
        "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] }}{% endif %}{% endfor %}",
        [],
        "<|im_start|>",
        "<|im_end|>",
    )
    assert render(drops, "hello", system="S") == "S\n\nhello"
    # a template with a system turn keeps it; without a system prompt nothing is folded
    tiny = tiny_tokenizer()
    assert render(tiny, "hello", system="S").startswith(
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhello"
    )
    assert render(gemma(), "hello") == "<bos><start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n"


def test_the_model_renders_both_prompts_with_the_folded_system_text():
    tok = gemma()
    model = R2ec(tiny_model(tok), tok, PromptConfig(system_prompt="You recommend movies."))
    user = model.tokenizer.decode(model.user_prompt_ids([[HistoryEntry("Heat", 4.0)]])[0])
    item = model.tokenizer.decode(model.item_prompt_ids([{"item_id": "1", "title": "Heat"}])[0])
    for text in (user, item):
        assert text.startswith("<bos><start_of_turn>user\nYou recommend movies.\n\n")


def test_the_system_turn_is_decided_again_when_the_template_changes():
    tok = gemma()
    assert "S\n\nhello" in render(tok, "hello", system="S")
    tok.chat_template = tiny_tokenizer().chat_template
    assert render(tok, "hello", system="S").startswith("<|im_start|>system\nS<|im_end|>")


def test_a_template_error_not_about_the_system_turn_is_one_line_naming_the_template():
    tok = family_tokenizer("{{ raise_exception('needs a tools list') }}", [], "<|im_start|>", "<|im_end|>")
    tok.name_or_path = "/models/odd"
    with pytest.raises(ValueError, match="chat template of the backbone's tokenizer '/models/odd'") as err:
        render(tok, "hello", system="S")
    assert "needs a tools list" in str(err.value) and "\n" not in str(err.value)
