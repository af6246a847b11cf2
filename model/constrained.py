"""Constrained decoding of the rationale's claims: titles are copied, never spelt anew, and
what the text says of the history is true of it.

The reasoning format the `rationale` stage teaches (model/rationale.py) lists the user's
highest-rated titles: "Rated highest: Fargo; Heat; Casablanca." A 135M model copies those
titles from its prompt imperfectly ("When The Cats Away", "Faster Pussycat! Kill!; Faster
Pussycat! Kill!"): on ml-100k 37% of its texts named a title the catalog does not have
(BENCHMARKS.md §1). Copied titles can still be the wrong ones: the model shipped in stop 28
leaned to the window's latest titles and named a film rated 1 or 2 in 19% of its entries, and
only 24% of its lists were true of the history (BENCHMARKS.md §1, stop 29). The text a user
reads must neither invent titles nor misstate their ratings, so at inference the list is
decoded under a grammar:

    LIST := " " T (";" " " T){0,2} "."      T: an unused title of the prompt's history window
                                            whose rating is among its 3 highest and at least
                                            their mean (none when none is rated: the sentence
                                            is not written; model/rationale.py `rated_highest`)

Once the written text contains the trigger ("Rated highest:"), every next token must keep the
text after it a prefix of a string of that grammar; when the list is closed by "." decoding is
free again, once the format's next sentence has begun (" Lately more", model/rationale.py, or
" Picks:" / " Next:" for a model trained to end with that list / its hindsight guess) or the
text stopped: right after the list nothing else may come, so no name or sentence runs on from
the last title ("Streetcar Named Desire, A. J. Clarke"). A "Picks:" list (`TitleLists`) is over
the prompt's co-watch hints and only a stop may follow it.

The sentence before the list, "Likes A, B and C, mostly 1990s.", was as often untrue (26% of the
same model's held): given each history item's genres, `PhraseChoice` decodes what follows
"Likes" as one of the ways to name up to three of the genres that carry the most rating weight
in the window (model/rationale.py `liked_genres`, `likes_phrases`), closed by ", mostly" or
".". The same grammar with other phrases holds the rest of the format's claims: after ", mostly"
one of the decades that carry the most rating weight (`decade_phrases`: " 1990s." or " 1990s and
1980s."), after "Lately more" one of the genres the latest items lean to (`drifting_genres`);
where none does, the text must stop after the rated list. Each sentence's grammar also says
what may come once it closes (`follow`): one of the format's later sentences that can hold, or a
stop, so once the format has begun nothing else runs between or after its sentences. For a
model never taught the format (the untrained backbone) the text before a first trigger is free
(greedy or sampled as asked), but for the claims nothing holds for: where no genre
drifts (or the window has no genres, for "Likes"; no listable title, for "Rated highest:") the
trigger itself may not be written anywhere, since whatever followed it would be false. For a
model taught the format (`PromptConfig.taste_format`) the first sentence is held too
(`FormatStart`): one that can hold, or a stop, so a window whose items have no genres (where
"Likes" is banned) gets "Rated highest: ..." or nothing, not "Lately More Thriller. Lately More
Comedy. ..." as it did. Keying on the
trigger alone left such a claim open wherever the text skipped the grammar that led up to it
("Likes Drama. Lately more Horror.", the rated list never written). `allowed` then returns the
few `Banned` tokens that would complete the trigger after the text so far (" more" after
"... Lately"; `TokenStrings.completing`, a few `endswith` per token and a cached id set).

`TitleList.allowed(ids)` is stateless: it decodes the row's tokens and runs the grammar over the
text after the trigger (a handful of titles, under 100 characters), so it needs no bookkeeping
when rows join, leave or are moved between slots of the continuous decoder. It returns the token
ids that may come next, or None where decoding is free. Token strings are matched against the
grammar's continuations by their bytes (`TokenStrings`, `as_bytes`: a token that is part of a
character, as CJK and emoji are spelt in byte-level BPE, matches that part), so tokens that cross
an entry's boundary (SmolLM2 has ");" and "!;") are allowed too, and a token is allowed only if
the rest of the title can still be started by some token. Known limits: that look-ahead is one
token deep; where no token can write what must come next (a tokenizer without a token for some
byte of a title), the text stops there; where a "." both ends one title and continues a longer
one, the list closes.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from model.rationale import LATELY, RATED, TOP_RATED

SEPARATOR, END = ";", "."


def _byte_level_alphabet() -> dict[str, int]:
    """The character that stands for each byte in a byte-level BPE vocabulary (GPT-2's
    `bytes_to_unicode`, which SmolLM2, Llama 3 and Qwen use): printable Latin-1 bytes stand for
    themselves, the other 68 for U+0100 onwards, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + n): b for n, b in enumerate(shifted)}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens


def as_bytes(text: str) -> str:
    """`text` as the grammars read it: its UTF-8 bytes, one character each (Latin-1), so a token
    that holds only part of a character (CJK, emoji: SmolLM2 spells "千" as "åį" + "ĥ") is matched
    like any other; ASCII text is itself."""
    return text.encode("utf-8").decode("latin-1")


class TokenStrings:
    """Every token's text, and the ids behind each distinct text (one per tokenizer), all as
    `as_bytes` spells them: a token that decodes alone to part of a character (U+FFFD) is kept
    by its bytes, read from its byte-level BPE or SentencePiece byte-fallback form, so titles in
    any script can be copied under the grammar. `stop_ids`: the tokens that end a reasoning text
    (the model's EOS and end of turn); by default every special token."""

    def __init__(self, tokenizer, stop_ids: Sequence[int] | None = None) -> None:
        self.tokenizer = tokenizer
        texts = tokenizer.batch_decode(
            [[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False
        )
        special = set(tokenizer.all_special_ids)
        alphabet = _byte_level_alphabet()
        self.token_bytes: dict[int, str] = {}  # per id, the tokens that are part of a character
        by_text: dict[str, list[int]] = defaultdict(list)
        for i, text in enumerate(texts):
            if i in special or not text:
                continue
            if "\ufffd" in text:
                piece = tokenizer.convert_ids_to_tokens(i)
                if m := _BYTE_FALLBACK.fullmatch(piece):
                    text = chr(int(m.group(1), 16))
                elif piece and all(c in alphabet for c in piece):
                    text = "".join(chr(alphabet[c]) for c in piece)
                else:
                    continue
                self.token_bytes[i] = text
            else:
                text = as_bytes(text)
            by_text[text].append(i)
        self.by_text = dict(by_text)
        self.longest = max(map(len, self.by_text))
        # tokens that close the list: "." alone, or followed by white space (".\n") where anything
        # may follow the list (white space would slip past the check of what comes right after it)
        closing = (ids for text, ids in self.by_text.items() if text[:1] == END and not text[1:].strip())
        self.closing = [i for ids in closing for i in ids]
        self.period = list(self.by_text.get(END, []))
        self.stops = sorted(special if stop_ids is None else set(stop_ids))
        self._sorted: list[str] | None = None  # the texts in order, built on the first `_starting`
        self._containing: dict[str, frozenset[int]] = {}  # per trigger
        self._completing: dict[tuple[str, tuple[int, ...]], Banned | None] = {}

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def written(self, ids: Sequence[int]) -> str:
        """What the grammars read of a completion: its text `as_bytes`, a character cut short
        at the end (its first byte written, the rest to come) included."""
        out, run = [], []  # runs of whole tokens decoded together, the partial ones by their bytes
        for i in ids:
            if i in self.token_bytes:
                out += [as_bytes(self.decode(run)), self.token_bytes[i]]
                run = []
            else:
                run.append(i)
        return "".join([*out, as_bytes(self.decode(run))])

    def prefixes_of(self, text: str) -> list[int]:
        """Ids of the tokens whose text is a non-empty prefix of `text` and after which the rest
        of `text` can still be started by some token (SmolLM2 has " Á" but no "Á": taking " "
        before "Á" would leave nothing to write)."""
        out: list[int] = []
        for k in range(1, min(len(text), self.longest) + 1):
            ids = self.by_text.get(text[:k])
            if ids and self._startable(text[k:]):
                out.extend(ids)
        return out

    def _startable(self, rest: str) -> bool:
        return not rest or any(rest[:j] in self.by_text for j in range(1, min(len(rest), self.longest) + 1))

    def completing(self, trigger: str, text: str) -> Banned | None:
        """The tokens that would write `trigger` right after `text`: those whose text holds it
        whole, and, where `text` ends with its beginning ("... Lately"), those that start with the
        rest of it (" more"); None where no token would. A token that writes only part of the
        rest (" mo") stays allowed: the next call bans what would finish it. Cached per trigger
        and per the beginnings `text` ends with, so a call costs len(trigger) `endswith`s."""
        if not trigger:
            return None
        ends = tuple(k for k in range(1, len(trigger)) if text.endswith(trigger[:k]))
        key = (trigger, ends)
        if key not in self._completing:
            if trigger not in self._containing:  # one scan of the vocabulary per trigger
                held = (i for t, ids in self.by_text.items() if trigger in t for i in ids)
                self._containing[trigger] = frozenset(held)
            ids = set(self._containing[trigger])
            for k in ends:
                ids.update(self._starting(trigger[k:]))
            self._completing[key] = Banned(tuple(sorted(ids))) if ids else None
        return self._completing[key]

    def _starting(self, prefix: str) -> list[int]:
        """Ids of the tokens whose text starts with `prefix`."""
        if self._sorted is None:
            self._sorted = sorted(self.by_text)
        out: list[int] = []
        for text in self._sorted[bisect_left(self._sorted, prefix) :]:
            if not text.startswith(prefix):
                break
            out.extend(self.by_text[text])
        return out


@dataclass(frozen=True)
class Banned:
    """What `allowed` returns where decoding is free but for a few tokens: `ids` may not come
    next (the tokens that would start a claim nothing in the history makes true,
    `TokenStrings.completing`); `constrain_logits` masks them alone."""

    ids: tuple[int, ...]


Allowed = list[int] | Banned | None  # what may come next: only these ids, any but these, anything


@dataclass(frozen=True)
class _State:
    pending: str  # what is left of the title being written ("" once it is complete)
    used: frozenset[int]  # titles listed so far (indices into TitleList.titles)


class _Decoded(ABC):
    """A grammar after its own trigger that reads the text decoded so far: `allowed` decodes the
    completion once and asks `allowed_after`, which `TitleLists` calls with the text it decoded
    for every list, after `trigger_at` and `spans` have told it which list applies."""

    strings: TokenStrings
    trigger: str
    # what may come right after this grammar's text closes: the format's next sentences (their
    # openings), "" for a stop; (): anything
    follow: tuple[str, ...] = ()

    def _next_sentence(self, after: str) -> Allowed:
        """Right after this grammar's text closed (`after`: what was written since), the tokens
        that begin one of `follow` or stop, so no name or sentence runs on from it ("... Desire,
        A. J. Clarke", "... 1990s. Rated highest; highest: ..."); None once a next sentence's
        opening is written (it is finished: "Late" is no ending), or where anything may follow."""
        nexts = [f for f in self.follow if len(after) < len(f) and f.startswith(after)]
        if not nexts and not (after == "" and "" in self.follow):
            return None
        ids = {i for f in nexts for i in self.strings.prefixes_of(f[len(after) :])}
        return (sorted(ids) + (self.strings.stops if after == "" else [])) or None

    def allowed(self, completion_ids: Sequence[int]) -> Allowed:
        """The token ids that may follow `completion_ids`; the `Banned` ones that may not (where
        nothing holds for the claim, its trigger may not be written: `empty`); or None where
        decoding is free."""
        return self.allowed_after(self.strings.written(completion_ids))

    @abstractmethod
    def allowed_after(self, text: str) -> Allowed:
        """`allowed` for a completion already decoded to `text` (`TokenStrings.written`: its
        bytes, `as_bytes`; ASCII text is itself)."""

    @property
    @abstractmethod
    def empty(self) -> bool:
        """Whether nothing may follow the trigger (no phrase or title holds for the history):
        then the trigger itself may not be written, and `allowed_after` bans the tokens that
        would write it (`TokenStrings.completing`)."""

    @abstractmethod
    def trigger_at(self, text: str) -> int:
        """Where the trigger was last written in `text`, or -1."""

    @abstractmethod
    def spans(self, written: str, at: int) -> bool:
        """Whether position `at` of `written` (the text after the trigger) lies inside this
        grammar's text."""


class TitleList(_Decoded):
    """The grammar for one prompt: the titles it may list (for "Rated highest:", the history
    window's highest-rated, `R2ec.title_lists`; see the module docstring)."""

    def __init__(
        self,
        titles: Sequence[str],
        strings: TokenStrings,
        max_entries: int = TOP_RATED,
        trigger: str = RATED,
        follow: str | Sequence[str] = " " + LATELY,
    ) -> None:
        self.titles = list(dict.fromkeys(as_bytes(t.strip()) for t in titles if t and t.strip()))
        self.strings = strings
        self.max_entries = max_entries
        self.trigger = as_bytes(trigger)  # "": the list is the first thing written
        # what may come right after the list (the format's next sentences), else a stop; ("",):
        # only a stop (the list ends the text); (): anything
        self.follow = tuple(map(as_bytes, (follow,) if isinstance(follow, str) else follow))
        # what closes the list: where what follows it is checked, a bare "." (a ".\n" token would
        # put white space past that check); where anything may follow, any closing token
        self._closing = strings.period if self.follow and strings.period else strings.closing
        self._allowed: dict[frozenset[_State], list[int] | None] = {}  # per grammar state

    def _starts(self, used: frozenset[int]) -> list[_State]:
        if len(used) >= self.max_entries:
            return []
        return [_State(" " + t, used | {j}) for j, t in enumerate(self.titles) if j not in used]

    def _states(self, written: str) -> tuple[list[_State] | None, int | None]:
        """The grammar's states after `written` (the text after the trigger), and None; or None
        and the index of the "." that closed the list; or None, None when the text left the
        grammar (written before the constraint)."""
        states = self._starts(frozenset())
        for at, ch in enumerate(written):
            nxt: list[_State] = []
            for s in states:
                if s.pending:
                    if ch == s.pending[0]:
                        nxt.append(_State(s.pending[1:], s.used))
                elif ch == END:
                    return None, at
                elif ch == SEPARATOR:
                    nxt.extend(self._starts(s.used))
            states = list(dict.fromkeys(nxt))
            if not states:
                return None, None
        return states, None

    def spans(self, written: str, at: int) -> bool:
        """Whether position `at` of `written` (the text after the trigger) lies inside this list:
        the list is still open at the end of `written`, or closed at or after `at`."""
        states, closed = self._states(written)
        return states is not None or (closed is not None and closed >= at)

    def trigger_at(self, text: str) -> int:
        """Where the trigger that opened the list now applying was written in `text`: the last
        one not inside an earlier list's titles (a title "Rated highest: A Trap" holds the
        trigger, and reading it as a new list would start the list over and over); -1 when it
        was not written (0 without one: the list is the first thing written)."""
        if not self.trigger:
            return 0
        found, at = -1, text.find(self.trigger)
        if at < 0 or text.find(self.trigger, at + 1) < 0:
            return at  # written once (the usual case) or not at all
        while at >= 0:
            found = at
            after = at + len(self.trigger)
            states, closed = self._states(text[after:])
            if states is not None:  # still open: what follows is its own
                return at
            # closed: the next list may start after it; left the grammar: after this trigger
            at = text.find(self.trigger, after + (closed + 1 if closed is not None else 0))
        return found

    @property
    def empty(self) -> bool:
        """No title may be listed (a window whose titles are all blank): the trigger may not be
        written; a list without a trigger (the first thing written) is left free."""
        return not self.titles and bool(self.trigger)

    def allowed_after(self, text: str) -> Allowed:
        """`allowed` for a completion already decoded to `text`."""
        if not self.titles:
            return self.strings.completing(self.trigger, text)
        at = self.trigger_at(text)
        if at < 0:
            return None
        written = text[at + len(self.trigger) :]
        states, closed = self._states(written)
        if states is None:  # closed: the format's next sentence or a stop; left the grammar: free
            return None if closed is None else self._next_sentence(written[closed + 1 :])
        key = frozenset(states)
        if key not in self._allowed:
            self._allowed[key] = self._tokens(states)
        return self._allowed[key]

    def _tokens(self, states: list[_State]) -> list[int] | None:
        ids: set[int] = set()
        for s in states:
            # the rest of this title, then the list's end or the next title: a token may span both
            ids.update(self.strings.prefixes_of(s.pending + END))
            if len(s.pending) < self.strings.longest:  # no token reaches past a longer rest
                for nxt in self._starts(s.used):
                    ids.update(self.strings.prefixes_of(s.pending + SEPARATOR + nxt.pending))
            if not s.pending:  # the list may close
                ids.update(self._closing)
        # a dead end (no token writes what must come next; with every byte a token, as in
        # byte-level BPE, there is none): end the text rather than let the list run on freely
        return sorted(ids) or list(self.strings.stops) or None


def constrain_logits(logits: torch.Tensor, allowed: Sequence[Sequence[int] | Banned | None]) -> torch.Tensor:
    """`logits` (B, V) with every token outside row i's `allowed[i]` at -inf (None: row free; a
    `Banned`: only its ids at -inf)."""
    if all(a is None for a in allowed):
        return logits
    out = logits.clone()
    for row, ids in enumerate(allowed):
        if isinstance(ids, Banned):
            out[row, list(ids.ids)] = float("-inf")
        elif ids is not None:
            keep = out[row, list(ids)]
            out[row] = float("-inf")
            out[row, list(ids)] = keep
    return out


class PhraseChoice(_Decoded):
    """After `trigger`, the text must go on as one of `phrases`, then (a phrase that ends its
    sentence) as `follow` says, else freely: the
    "Likes A, B and C" sentence over the genres that hold for the history (model/rationale.py
    `liked_genres`, `likes_phrases`: each phrase closes as the format does, with ", mostly" or
    ".", so none is a prefix of another), the decades after ", mostly" (`decade_phrases`), the
    genre after "Lately more" (`drifting_genres`). Without phrases (no genre holds, none
    drifts) the trigger itself may not be written: the claim would be false whatever follows.
    Stateless like `TitleList`, and it takes its place in a `TitleLists`."""

    def __init__(
        self, phrases: Sequence[str], strings: TokenStrings, trigger: str, follow: Sequence[str] = ()
    ) -> None:
        self.phrases = sorted(set(map(as_bytes, phrases)))
        self.strings = strings
        self.trigger = as_bytes(trigger)
        # after a phrase that ends its sentence ("."), what may come (`_Decoded.follow`)
        self.follow = tuple(map(as_bytes, follow))
        self._allowed: dict[str, list[int] | None] = {}

    def trigger_at(self, text: str) -> int:
        return text.rfind(self.trigger)

    @property
    def empty(self) -> bool:
        return not self.phrases

    def _closed(self, written: str) -> int | None:
        """Where the phrase `written` begins with ends (its last character), or None."""
        return next((len(p) - 1 for p in self.phrases if written.startswith(p)), None)

    def spans(self, written: str, at: int) -> bool:
        closed = self._closed(written)
        return closed >= at if closed is not None else any(p.startswith(written) for p in self.phrases)

    def allowed_after(self, text: str) -> Allowed:
        if not self.phrases:  # nothing holds: the trigger may not be written
            return self.strings.completing(self.trigger, text)
        at = self.trigger_at(text)
        if at < 0:
            return None
        written = text[at + len(self.trigger) :]
        if written in self._allowed:  # only prefixes of phrases are kept: one per character at most
            return self._allowed[written]
        if (closed := self._closed(written)) is not None:  # the phrase is written
            ends_sentence = written[closed] == END
            return self._next_sentence(written[closed + 1 :]) if ends_sentence else None
        rests = [p[len(written) :] for p in self.phrases if p.startswith(written)]
        if not rests:
            return None  # the text left the grammar: free from here
        ids = sorted({i for r in rests for i in self.strings.prefixes_of(r)})
        self._allowed[written] = ids or list(self.strings.stops) or None  # a dead end: stop
        return self._allowed[written]


class FormatStart(_Decoded):
    """The first sentence of a text, for a model trained on the taste format
    (`PromptConfig.taste_format`): from the first token the text must begin one of `openings`,
    the format's sentences that can hold for the history ("Likes", "Rated highest:", "Lately
    more", ...), or stop, so nothing comes before the format (a window without genres bans
    "Likes" and, free, wrote "Latelymore Thriller, ..."). Once an opening is written its own
    grammar applies (`TitleLists`: a tie at position 0 goes to the grammar listed first, so
    this one is listed last), and `follow` chains the rest. A hindsight model's "Next:" guess
    has no grammar: after it the text is free, as after the rated list."""

    trigger = ""

    def __init__(self, openings: Sequence[str], strings: TokenStrings) -> None:
        self.strings = strings
        self.follow = tuple(dict.fromkeys([*map(as_bytes, openings), ""]))  # "": a stop

    def trigger_at(self, text: str) -> int:
        return 0

    def spans(self, written: str, at: int) -> bool:
        return False  # a later sentence's trigger is that sentence's, never part of this one

    @property
    def empty(self) -> bool:
        return False

    def allowed_after(self, text: str) -> Allowed:
        return self._next_sentence(text)


class TitleLists:
    """Several grammars in one text, each after its own trigger (the "Likes" sentence over the
    genres that hold, its decades and the drift sentence, each a `PhraseChoice`; "Rated
    highest:" over the history's highest-rated titles;
    "Picks:" over the prompt's co-watch hints when the model was trained to write it,
    `PromptConfig.hint_picks`): the one whose trigger was written last applies, unless that
    trigger lies inside an earlier one's text (part of one of its titles). A grammar that is
    `empty` (nothing holds for its claim: no genre drifts) takes no part in that; wherever the
    text is free, the tokens that would write its trigger are banned."""

    def __init__(self, lists: Sequence[_Decoded]) -> None:
        if not lists:
            raise ValueError("TitleLists needs at least one grammar")
        self.lists = list(lists)
        self.strings = self.lists[0].strings
        self._live = [g for g in self.lists if not g.empty]
        self._banned = [g for g in self.lists if g.empty]

    def allowed(self, completion_ids: Sequence[int]) -> Allowed:
        text = self.strings.written(completion_ids)  # once, for every list
        allowed = self._allowed(text) if self._live else None
        if allowed is not None or not self._banned:
            return allowed
        # free text: none of the claims nothing holds for may be started
        bans = [b for g in self._banned if (b := g.allowed_after(text)) is not None]
        if len(bans) <= 1:
            return bans[0] if bans else None
        return Banned(tuple(sorted({i for b in bans for i in b.ids})))

    def _allowed(self, text: str) -> Allowed:
        """What the grammar whose trigger was written last allows (see the class docstring)."""
        starts = [g.trigger_at(text) for g in self._live]
        latest = max(range(len(starts)), key=starts.__getitem__)  # the first list on a tie
        at = starts[latest]
        if at < 0:
            return None
        # a trigger written inside an earlier list's titles (a history title "Picks: A Story")
        # is part of that title, not the start of the next list; one the earlier grammar ends
        # with (", mostly" closing a "Likes" phrase) hands over to the next
        after = at + len(self._live[latest].trigger)  # the first position after the trigger
        for i, (g, start) in enumerate(zip(self._live, starts, strict=True)):
            if (
                i != latest
                and 0 <= start < at
                and g.spans(text[start + len(g.trigger) :], after - start - len(g.trigger))
            ):
                return g.allowed_after(text)
        return self._live[latest].allowed_after(text)


Grammar = TitleList | TitleLists | PhraseChoice  # what a reasoning text's claims are decoded under


class TitleListProcessor(LogitsProcessor):
    """A transformers LogitsProcessor applying one `Grammar` per prompt to `generate`
    (row r of a batch with `num_generations` G belongs to prompt r // G)."""

    def __init__(
        self, constraints: Sequence[Grammar | None], prompt_width: int, num_generations: int = 1
    ) -> None:
        self.constraints = list(constraints)
        self.prompt_width = prompt_width
        self.group = num_generations

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        written = input_ids[:, self.prompt_width :].tolist()
        allowed = [
            None if (c := self.constraints[r // self.group]) is None else c.allowed(ids)
            for r, ids in enumerate(written)
        ]
        return constrain_logits(scores, allowed)
