"""Backbones other than SmolLM2: chat templates without a system turn, turns that end with a
token other than EOS, stop tokens from the model's generation_config, tokenizers without an
EOS or a chat template (model/prompts.py `render`, model/r2ec.py `stop_token_ids`,
model/backbone.py `prepare_tokenizer`)."""

from __future__ import annotations

import logging

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from model.backbone import PLAIN_TEMPLATE, TINY_CORPUS, prepare_tokenizer, tiny_model, tiny_tokenizer
from model.prompts import HistoryEntry, PromptConfig, render
from model.r2ec import GenerationSettings, R2ec, stop_token_ids

# Gemma's template (raises on a system turn), Mistral's [INST] one (roles must alternate) and
# Llama 3's, reduced to what matters here
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
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
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


def base_tokenizer(eos: str | None = "</s>") -> PreTrainedTokenizerFast:
    """A base model's: <s> and </s> only (no ChatML tokens), no chat template; `eos` None: none."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([TINY_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token=eos)


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


@pytest.mark.parametrize(
    ("template", "specials", "bos", "eos", "turn_end"),
    [
        (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>"),
        (
            LLAMA3,
            [
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ],
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|eot_id|>",
        ),
        # ChatML with a base-style EOS (Qwen's base tokenizers)
        (tiny_tokenizer().chat_template, ["<|endoftext|>"], "<|im_start|>", "<|endoftext|>", "<|im_end|>"),
        (MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>"),
    ],
    ids=["gemma", "llama3", "chatml-base-eos", "mistral"],
)
def test_a_taught_text_ends_with_the_token_the_template_ends_a_turn_with(
    template, specials, bos, eos, turn_end
):
    """The rationale stage ended texts with the tokenizer's EOS: Gemma-2 would be taught to end
    its turn with <eos>, never <end_of_turn>. Both still stop a reasoning."""
    tok = family_tokenizer(template, specials, bos, eos)
    model = R2ec(tiny_model(tok), tok)
    end, eos_id = tok.convert_tokens_to_ids([turn_end, eos])
    assert model.stop_ids[0] == end and eos_id in model.stop_ids
    assert model.completion_ids(["Likes Drama."])[0][-1] == end


def test_the_tiny_chatml_model_keeps_its_stop_tokens(tiny_model):
    """ChatML whose EOS is <|im_end|> (SmolLM2, the tiny model): the same single stop token."""
    assert tiny_model.stop_ids == [tiny_model.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_the_models_own_stop_tokens_from_its_generation_config():
    """generation_config.eos_token_id (an id or a list, e.g. Llama 3.1's <|eom_id|>) stops a
    reasoning, on both backends (they read `stop_ids`)."""
    tok = family_tokenizer(None, ["<|eom_id|>", "<|user|>"], "<|im_start|>", "<|im_end|>")
    tok.chat_template = tiny_tokenizer().chat_template
    lm = tiny_model(tok)
    eom, user, eos = tok.convert_tokens_to_ids(["<|eom_id|>", "<|user|>", "<|im_end|>"])
    lm.generation_config.eos_token_id = [eos, eom]
    assert stop_token_ids(tok, lm) == [eos, eom]
    lm.generation_config.eos_token_id = user
    assert stop_token_ids(tok, lm) == [eos, user]


def test_a_tokenizer_without_eos_stops_at_the_models_eos():
    """It crashed with a TypeError in int(None)."""
    tok = base_tokenizer(eos=None)
    prepare_tokenizer(tok)
    lm = tiny_model(tok)
    lm.config.eos_token_id = lm.generation_config.eos_token_id = 1
    model = R2ec(lm, tok)
    assert model.stop_ids == [1] and model.pad_id == 1
    rollout = model.reason([[HistoryEntry("Heat", 4.0)]], GenerationSettings(max_new_tokens=3))
    assert len(rollout.completion_ids[0]) <= 3


def test_no_stop_token_at_all_is_one_line():
    tok = base_tokenizer(eos=None)
    prepare_tokenizer(tok)
    lm = tiny_model(tok)
    lm.config.eos_token_id = lm.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match="no stop token .* set eos_token in tokenizer_config.json"):
        R2ec(lm, tok)


def test_a_tokenizer_without_chat_template_or_chatml_tokens_gets_a_plain_one(caplog):
    """ChatML's <|im_start|> was tokenised as plain characters, silently, with no BOS."""
    tok = base_tokenizer()
    with caplog.at_level(logging.WARNING, logger="model.backbone"):
        prepare_tokenizer(tok)
    assert "no chat template" in caplog.text
    text = render(tok, "hello", system="S")
    assert text == "<s>S\n\nhello\n\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    model = R2ec(tiny_model(tok), tok, PromptConfig(system_prompt="S"))
    assert model.stop_ids == [tok.eos_token_id] and model.completion_ids(["x"])[0][-1] == tok.eos_token_id


def test_a_template_less_backbone_is_warned_about_where_its_tokenizer_is_kept(tiny_dataset, tmp_path, caplog):
    """A checkpoint made from it saves the template it was given: loading that checkpoint
    (every service start, eval and warm start) reads the backbone's weights only, and says
    nothing about a tokenizer it throws away."""
    from model.checkpoint import create_base_checkpoint, load_checkpoint_model

    tok = base_tokenizer()
    tiny_model(tok).save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    plain, items = str(tmp_path / "plain"), tiny_dataset.items
    with caplog.at_level(logging.WARNING, logger="model.backbone"):
        create_base_checkpoint(tmp_path / "ckpt", plain, items, dtype="float32", progress=False)
    assert "no chat template and no ChatML tokens" in caplog.text  # the template it is given is kept
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="model.backbone"):
        model = load_checkpoint_model(tmp_path / "ckpt", dtype="float32")
    assert not caplog.records
    assert model.tokenizer.chat_template == PLAIN_TEMPLATE


def test_a_tokenizer_with_chatml_tokens_and_no_template_gets_chatml(caplog):
    tok = tiny_tokenizer()
    tok.chat_template = None
    with caplog.at_level(logging.WARNING, logger="model.backbone"):
        prepare_tokenizer(tok)
    assert "no chat template: using ChatML" in caplog.text
    assert render(tok, "hello") == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
