"""Catalog text that reaches a prompt as text, never as a tokenizer's control tokens.

Prompts are rendered as text (model/prompts.py), then tokenized, and a tokenizer turns every
special-token string inside that text into the control token itself: a title holding
"<|im_end|>" would end the user turn of SmolLM2's chat template, and "<|im_start|>assistant"
after it would open a turn of its own, whose words the title grammar (model/constrained.py)
then copies into the reasoning as if they were facts of the history. So:

- `r2ec data prepare` (model/data/build.py `complete_items`) makes each run of control white
  space (newlines, tabs, the other C0 / C1 separators, U+2028, U+2029; `one_line`) in an
  item's text one space, and refuses text holding a special token of the default backbone,
  SmolLM2 (`DEFAULT_SPECIAL_TOKENS`), or any ChatML / Llama 3 style marker "<|...|>"
  (`SpecialText.default`), naming the item and the string;
- `r2ec checkpoint init` refuses a catalog holding a special token of the backbone's own
  tokenizer (`SpecialText.of`; model/checkpoint.py `check_catalog_text`), which covers data
  prepared before that check, and other backbones;
- the service's item edits (PUT /items) refuse, with a 422 naming the field, a title, year or
  genre that is not one line (service/schemas.py `ItemUpsert`) and any field holding a special
  token of the served tokenizer (service/catalog.py `Catalog.check_text`);
- at prompt time (model/r2ec.py `R2ec.catalog_text`) any such string that still arrives (a
  catalog in a checkpoint written before these checks) is broken by a space after its first
  character (`SpecialText.plain`: "<|im_end|>" -> "< |im_end|>"), so it tokenizes as plain
  text, and control white space is made one space. The claims' grammars (model/constrained.py)
  take the titles as the prompt shows them, so a title is still copied as the prompt spells it;
  the reasoning texts the `rationale` stage teaches are broken up the same way.

Two more rules for catalog text, shared by the same places:

- **Bidirectional controls** (U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069; `BIDI_CONTROLS`)
  reorder what is shown around them: a title "\u202eRLO title" displays as "eltit OLR", and
  copied into the reasoning it mirrors the rest of the paragraph. Ids refuse them
  (service/schemas.py `check_id`), and so, by the same check (`check_no_bidi`), do an item's
  title, year and genres: `PUT /items` with a 422 naming the field, `r2ec data prepare` naming
  the item and the field (retrain's rebuild of a seed an older release prepared removes them,
  with a warning). At prompt time (`R2ec.catalog_text`) any still in a title, year or genre (a
  catalog in a checkpoint written before) is removed (`strip_bidi`), so the reasoning never
  copies one. Descriptions may hold them (right-to-left text uses U+200F): no reader sees one.
- **Unicode NFC** (`nfc`): "Amélie" as one code point or as "e" + U+0301 are one title to a
  reader. `r2ec data prepare`, a prepared dataset read by `load_prepared` and `PUT /items`
  store NFC; the comparisons that decide "the same title" (the rated list's grammar and claim
  check, model/rationale.py; twins, service/catalog.py) compare NFC forms. Ids are not
  normalised: they are compared exactly, as sent.

A tokenizer's special tokens here are `all_special_tokens` and its added tokens that are
special, or that are not plain words (Qwen's "<think>" is added but not special; a word some
tokenizer added to its vocabulary is not refused). White space alone is never one.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping

# The added tokens of SmolLM2-135M-Instruct's tokenizer, the default backbone (ids 0-16).
DEFAULT_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<repo_name>",
    "<reponame>",
    "<file_sep>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
)
# ChatML's and Llama 3's markers ("<|im_end|>", "<|eot_id|>", "<|start_header_id|>"): refused by
# `r2ec data prepare` whichever backbone the data is later served with.
MARKER_PATTERN = r"<\|[^\s<>|]{1,64}\|>"

# Control white space: the C0 / C1 separators Python counts as white space, and the Unicode line
# and paragraph separators; a run of them, with the spaces around it, becomes one space.
_CONTROL_SPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f\x85\u2028\u2029"
_CONTROL_RUN = re.compile(f"[ {_CONTROL_SPACE}]*[{_CONTROL_SPACE}][ {_CONTROL_SPACE}]*")
_PLAIN_WORD = re.compile(r"[\w\- ]+")


# Bidirectional controls, as a character class: ids and an item's one-line fields refuse them.
# They reorder what is shown ("\u202eadmin" reads "nimda"); the other format characters (the
# zero-width joiner of emoji sequences) are fine.
BIDI_CONTROLS = r"\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
BIDI_RE = re.compile(f"[{BIDI_CONTROLS}]")
BIDI_NAMES = "U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069"


def check_no_bidi(text: str, why: str) -> str:
    """`text`, or ValueError where it holds a bidirectional control (`BIDI_CONTROLS`), saying
    which and `why` that matters where it is refused; the one check ids and item text share."""
    if (m := BIDI_RE.search(text)) is not None:
        raise ValueError(
            f"must not contain bidirectional control characters ({BIDI_NAMES}; found "
            f"U+{ord(m.group(0)):04X} at character {m.start() + 1}): {why}"
        )
    return text


SHOWN_FIELDS = ("title", "year", "genres")  # an item's text a reader sees: refused bidi controls


def check_shown_text(text: str) -> str:
    """`check_no_bidi` for an item's title, year or genres (`SHOWN_FIELDS`)."""
    why = "they reorder the text shown around them (a title in the reasoning mirrors the rest of it)"
    return check_no_bidi(text, why)


def strip_bidi(text: str) -> str:
    """`text` without its bidirectional controls (itself where it has none)."""
    return BIDI_RE.sub("", text) if BIDI_RE.search(text) else text


def nfc(text: str) -> str:
    """`text` in Unicode NFC (canonical composition: "e" + U+0301 -> "é"); itself where it is."""
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def one_line(text: str) -> str:
    """`text` with each run of control white space (and the spaces beside it) made one space;
    runs of plain spaces are kept (the official Amazon recipe's titles keep theirs)."""
    return _CONTROL_RUN.sub(" ", text)


def has_control_space(text: str) -> bool:
    return _CONTROL_RUN.search(text) is not None


def tokenizer_special_strings(tokenizer) -> list[str]:  # noqa: ANN001 (any HF tokenizer)
    """The strings `tokenizer` turns into special tokens (module docstring), sorted; white
    space alone is none."""
    strings = set(getattr(tokenizer, "all_special_tokens", None) or [])
    decoder: Mapping = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for token in decoder.values():
        content = str(getattr(token, "content", token))
        if getattr(token, "special", True) or not _PLAIN_WORD.fullmatch(content):
            strings.add(content)
    return sorted(s for s in strings if s.strip())


class SpecialText:
    """Finds and neutralises special-token strings in text (module docstring)."""

    def __init__(self, strings: Iterable[str], *, markers: bool = False) -> None:
        self.strings = tuple(sorted({s for s in strings if s and s.strip()}, key=lambda s: (-len(s), s)))
        parts = [re.escape(s) for s in self.strings] + ([MARKER_PATTERN] if markers else [])
        self._re = re.compile("|".join(parts)) if parts else None

    @classmethod
    def default(cls) -> SpecialText:
        """The default backbone's special tokens and every "<|...|>" marker: what `r2ec data
        prepare` refuses, with no tokenizer at hand."""
        return cls(DEFAULT_SPECIAL_TOKENS, markers=True)

    @classmethod
    def of(cls, tokenizer) -> SpecialText:  # noqa: ANN001 (any HF tokenizer)
        """The special tokens of `tokenizer`."""
        return cls(tokenizer_special_strings(tokenizer))

    def find(self, text: str) -> str | None:
        """The first special-token string in `text`, or None."""
        if self._re is None or not text:
            return None
        m = self._re.search(text)
        return None if m is None else m.group(0)

    def plain(self, text: str) -> str:
        """`text` with every special-token string broken by a space after its first character
        ("<|im_end|>" -> "< |im_end|>"), so that it tokenizes as plain text; text without one
        is returned as it is, and the result holds none (a one-character special token becomes
        a space)."""
        if self._re is None or not text:
            return text
        for _ in range(len(text) + 1):  # each round breaks every match; none is made anew
            if self._re.search(text) is None:
                return text
            text = self._re.sub(lambda m: _broken(m.group(0)), text)
        return text


def _broken(token: str) -> str:
    if len(token) == 1:
        return " "
    lead = len(token) - len(token.lstrip())  # break after the first visible character
    return token[: lead + 1] + " " + token[lead + 1 :]
