"""User and item prompt templates (docs/architecture.md §1), rendered with the backbone's chat template."""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from transformers import PreTrainedTokenizerBase

from model.cowatch import hints_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HistoryEntry:
    """One past interaction as the prompt shows it."""

    title: str
    rating: float | None = None
    timestamp: int | None = None  # seconds
    # seconds between this interaction and the recommendation asked for (a training sample's
    # target, a request's arrival); None: unknown, the prompt then counts from the latest item
    age_s: int | None = None
    item_id: str | None = None  # what co-watch hints are looked up by (model/cowatch.py)


@dataclass(frozen=True)
class PromptConfig:
    """Prompt wording; stored in every checkpoint so serving renders what training saw.

    category: the noun used in both prompts ("movie", "product", ...).
    max_history: the user prompt keeps the latest this-many items (paper: 20).
    include_time: show each history item's time, in `time_style`.
    time_style: "ago", the paper's rendering ("2d 3.5h ago: [Fargo] (5)", the time before the
        recommendation; the official code's `format_timedelta`), or "before_latest" ("Fargo (5)
        [2 days before the latest]", what checkpoints written before this option were trained on).
    closing_marker: appended after the reasoning; h_T is read at its last token.
    description_words: item descriptions are cut to this many words (white-space separated).
    description_tokens: then to this many tokens of the backbone's tokenizer (`cut_to_tokens`):
        a description in a script written without spaces (Chinese, Japanese, Thai) is one
        "word", and a 6,000-character one made a 12,000-token item prompt. 256 keeps 100 words
        of English (about 130 tokens) whole. Checkpoints written before this option load with it.
    item_tokens: the whole item message (title, year, genres, description) is cut to this many
        tokens, so no item prompt runs past the backbone's positions or holds the model for
        minutes, whatever its fields hold (a 1,000-character title of CJK script is ~2,000
        tokens). Checkpoints written before this option load with it.
    system_prompt: the system turn of both prompts; None keeps the chat template's default
        (SmolLM2's adds 16 tokens to every prompt, a quarter of an ml-100k item prompt).
    marker_on_items: end item prompts with the closing marker too, so h_v is read at the same
        position as h_T (the paper's official code reads both at one embedding token).
        Checkpoints written before this option existed load with False, as they were trained.
    cowatch_hints: end the user turn with a line naming this many items other users watched
        next after the history's items (model/cowatch.py; the checkpoint carries the table);
        0, the paper's prompt and every checkpoint's before this option, names none.
    cowatch_window: how many items apart a pair still counts as "watched next", and how many of
        the latest history items the hints are drawn from.
    hint_picks: the reasoning the model was trained to write ends with "Picks: A; B; C." naming
        this many of the prompt's hints (`rationale_hint_picks`, model/rationale.py); its list
        is decoded under the grammar of those hints' titles (model/constrained.py). 0: none.
    hindsight: the reasoning the model was trained to write ends with its "Next: ..." guess
        (`rationale_hindsight`), which may then follow the rated list; the guess is free text.
    taste_format: the reasoning the model was trained to write is the rationale stage's taste
        summary (model/rationale.py: "Likes ..., mostly .... Rated highest: .... Lately more
        ...."), so decoding holds a text to that format from its first token, not only once a
        sentence of it began (model/constrained.py `FormatStart`). False for a model never
        taught it (the untrained backbone's chat text is left alone). Checkpoints written
        before this option load with True where their training stage was `rationale` or
        `recpo` (RecPO warm-starts from a rationale model; model/checkpoint.py).
    """

    category: str = "movie"
    max_history: int = 20
    include_time: bool = False
    time_style: str = "ago"
    closing_marker: str = "\nTherefore, my recommendation is:"
    description_words: int = 100
    description_tokens: int = 256
    item_tokens: int = 512
    system_prompt: str | None = None
    marker_on_items: bool = True
    cowatch_hints: int = 0
    cowatch_window: int = 10
    hint_picks: int = 0
    hindsight: bool = False
    taste_format: bool = False

    def __post_init__(self) -> None:
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")
        if self.hint_picks < 0 or self.hint_picks > self.cowatch_hints:
            raise ValueError(f"hint_picks must be in [0, cowatch_hints], got {self.hint_picks}")
        if self.cowatch_hints < 0 or self.cowatch_window < 1:
            raise ValueError(
                "cowatch_hints must be >= 0 and cowatch_window >= 1, "
                f"got {self.cowatch_hints}, {self.cowatch_window}"
            )
        if self.time_style not in TIME_STYLES:
            raise ValueError(f"time_style must be one of {TIME_STYLES}, got {self.time_style!r}")
        if self.description_words < 1 or self.description_tokens < 1:
            raise ValueError(
                "description_words and description_tokens must be >= 1, "
                f"got {self.description_words}, {self.description_tokens}"
            )
        if self.item_tokens < MIN_ITEM_TOKENS:
            raise ValueError(f"item_tokens must be >= {MIN_ITEM_TOKENS}, got {self.item_tokens}")
        if not self.closing_marker.strip():
            raise ValueError("closing_marker must not be blank: h_T is read at its last token")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> PromptConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known.setdefault("marker_on_items", False)  # older checkpoints encoded items without it
        known.setdefault("time_style", "before_latest")  # and rendered time (if any) this way
        return cls(**known)


TIME_STYLES = ("ago", "before_latest")
MIN_ITEM_TOKENS = 16  # room for "Summarize key attributes ...:" and a title's first tokens
# A token is at least one byte of UTF-8 text for byte-level BPE and SentencePiece's byte fallback;
# this much slack covers a tokenizer's leading space token. Text this many bytes under a budget
# fits it without being tokenized (`cut_to_tokens`), and gives what tokenizing it would.
_BYTE_SLACK = 8


def format_age(seconds: float) -> str:
    """The paper's relative time (official code, prompters/rrec_prompter.py `format_timedelta`):
    "3d 4.5h ago", "2h 10.0min ago", "7.5min ago"."""
    days, rest = divmod(max(0, int(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest / 60
    if days:
        return f"{days}d {hours + minutes / 60:.1f}h ago"
    return f"{hours}h {minutes:.1f}min ago" if hours else f"{minutes:.1f}min ago"


def _format_rating(rating: float | None) -> str:
    if rating is None or (isinstance(rating, float) and math.isnan(rating)):
        return ""
    return f" ({rating:g})"


def user_message(history: Sequence[HistoryEntry], cfg: PromptConfig, hints: Sequence[str] = ()) -> str:
    """The user turn: the latest `max_history` items, oldest first, one per line; then, when
    given, the titles of co-watch hints (model/cowatch.py) on a line of their own."""
    if not history:
        raise ValueError("history must contain at least one item")
    window = list(history)[-cfg.max_history :]
    latest = window[-1].timestamp
    newest = max((e.timestamp for e in window if e.timestamp is not None), default=None)
    lines = []
    for entry in window:
        line = f"{entry.title}{_format_rating(entry.rating)}"
        if cfg.include_time and cfg.time_style == "ago":
            age = entry.age_s
            if age is None and entry.timestamp is not None and newest is not None:
                age = newest - entry.timestamp
            if age is not None:
                line = f"{format_age(age)}: [{entry.title}]{_format_rating(entry.rating)}"
        elif cfg.include_time and entry.timestamp is not None and latest is not None:
            days = max(0, round((latest - entry.timestamp) / 86400))
            line += f" [{days} days before the latest]"
        lines.append(line)
    if hints:
        lines.append(hints_line(hints))
    return (
        f"Analyze in depth and finally recommend the next {cfg.category} I might like. "
        "Below is my history with ratings (out of 5):\n" + "\n".join(lines)
    )


def cut_to_tokens(text: str, tokens: int, tokenizer: PreTrainedTokenizerBase) -> str:
    """`text` cut to its first `tokens` tokens of `tokenizer`, at a character boundary (the
    start of the first token past the budget, by the tokenizer's offsets; a character split
    across tokens is left out whole), trailing white space removed; `text` itself where it
    fits. Text of fewer UTF-8 bytes than the budget (less `_BYTE_SLACK`) fits without being
    tokenized. The one cut every item prompt goes through (`item_message`): at checkpoint init,
    at an item edit and at retraining alike, so an item's vector does not depend on where it
    was encoded."""
    if len(text.encode("utf-8")) + _BYTE_SLACK <= tokens:
        return text
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets
        enc = None
    if enc is not None:
        if len(enc["input_ids"]) <= tokens:
            return text
        return text[: enc["offset_mapping"][tokens][0]].rstrip()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= tokens:
        return text
    return whole_characters(tokenizer.decode(ids[:tokens], skip_special_tokens=True)).rstrip()


def whole_characters(text: str) -> str:
    """`text` without the U+FFFD a decode ends with where its last tokens hold only the first
    bytes of a character (a cut inside it: "卧虎藏" + the first bytes of "龙" decodes to
    "卧虎藏\ufffd"). A U+FFFD a text writes as a whole character at its very end goes too."""
    return text.rstrip("\ufffd")


def item_message(
    item: Mapping[str, object], cfg: PromptConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> str:
    """The item turn: title plus whatever metadata the catalog has. The description is cut to
    `description_words` words, then (given the backbone's `tokenizer`) to `description_tokens`
    tokens, and the whole message to `item_tokens` tokens (`cut_to_tokens`); without a
    tokenizer, only by words (as before those options)."""
    title = str(item.get("title") or "").strip()
    if not title:
        raise ValueError(f"item {item.get('item_id')!r} has no title")
    parts = [f"Title: {title}"]
    for key, label in (("year", "Year"), ("genres", "Genres")):
        value = str(item.get(key) or "").strip()
        if value and value.lower() != "nan":
            parts.append(f"{label}: {value}")
    description = str(item.get("description") or "").strip()
    if description and description.lower() != "nan":
        words = description.split()
        description = " ".join(words[: cfg.description_words])
        if tokenizer is not None:
            description = cut_to_tokens(description, cfg.description_tokens, tokenizer)
        parts.append("Description: " + description)
    message = f"Summarize key attributes of the following {cfg.category}:\n" + "\n".join(parts)
    return message if tokenizer is None else cut_to_tokens(message, cfg.item_tokens, tokenizer)


# Per tokenizer, the chat template its system-turn decision was made for and that decision
# (`_system_turn`): made once, then read by every prompt training, eval and serving render.
_SYSTEM_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROBE = "R2EC-PROBE-7f3a"


def _system_turn(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template writes a system turn. Gemma's and Mistral's [INST] templates
    raise on one (and some drop it silently); for them `render` folds the system text into
    the user turn instead. Decided once per tokenizer and template."""
    template = tokenizer.chat_template
    known = _SYSTEM_TURN.get(tokenizer)
    if known is not None and known[0] == template:
        return known[1]
    turns = [{"role": "system", "content": _PROBE}, {"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        accepts = _PROBE in text
    except Exception:  # jinja2's TemplateError from raise_exception, or a template's own bug
        accepts = False
    if not accepts:
        log.info(
            "the chat template of %r has no system turn: a system prompt is written at the start "
            "of the user turn", getattr(tokenizer, "name_or_path", ""),
        )  # fmt: skip
    _SYSTEM_TURN[tokenizer] = (template, accepts)
    return accepts


def render(tokenizer: PreTrainedTokenizerBase, message: str, system: str | None = None) -> str:
    """One user turn (after `system`, if given) through the chat template, ending where the
    assistant starts. A template without a system turn (`_system_turn`) gets the system text,
    a blank line, then the message, as its user turn: the common fallback (the one place
    training, eval and serving render a prompt, so each renders the same one)."""
    if system is not None and not _system_turn(tokenizer):
        message, system = f"{system}\n\n{message}", None
    turns = [] if system is None else [{"role": "system", "content": system}]
    try:
        return tokenizer.apply_chat_template(
            [*turns, {"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # jinja2's TemplateError is no ValueError: the CLI printed pages of it
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"the chat template of the backbone's tokenizer {name!r} failed: {exc}") from exc


def turn_end_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template writes right after an assistant message's content
    (ChatML's <|im_end|>, Gemma's <end_of_turn>, Llama 3's <|eot_id|>, Mistral's </s>): how a
    reasoning text ends its turn. None when the template writes none there, or fails."""
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=False, tokenize=False)
    except Exception:
        return None
    at = text.find(_PROBE)
    if at < 0:
        return None
    after = tokenizer(text[at + len(_PROBE) :], add_special_tokens=False)["input_ids"]
    specials = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return after[0] if after and after[0] in specials else None
