"""How readable the reasoning texts are: diversity, loops, and titles that do not exist.

Three numbers over a set of texts, reported by `r2ec eval` beside the ranking metrics:

- distinct-2 (Li et al., NAACL 2016): distinct word bigrams / all word bigrams, over the
  whole set. Boilerplate repeated for every user drives it towards 0.
- loop share: texts in which one word 4-gram occurs `loop_repeats` (3) or more times, the
  signature of a degenerate decode ("To The (3) To The (3) To The (3) ..."), counted without
  the catalog titles the format's lists name (a real title may repeat a word).
- unknown-title share: texts that name a title the catalog does not have. A "named title"
  is text the model marks as one: a span in double quotes or asterisks, a capitalised
  phrase followed by a year in parentheses ("Heat (1995)"), or an entry of one of the
  rationale format's lists, "Rated highest: A; B; C." and "Picks: D; E." (model/rationale.py).
  A free-form sentence cannot be parsed for titles exactly; this catches the forms the models
  here write.

The empty share: texts with no word at all (nothing, or only punctuation and symbols), what a
model that stops at once, or writes "!!!!", gives its reader.

Given whether each text ended on its own, one more: the cut share, texts that used the whole
token budget without reaching the stop token (read after a text cut short, h_T is not where
training read it; a share above 0 says the budget is too small for the format).

With the claims of each text checked against its user's history (model/rationale.py
`check_claims`), four more: of the texts that make each claim, the share in which it holds:
the genres the user likes, the decades they watch mostly, the titles they rated highest, the
genre they lately watch more; and over all four, the share of the claims made that hold. A text
can name only real titles and still say the user rated highest a film they gave one star;
these count that.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.rationale import Claims

# the claims `check_claims` reads (model/rationale.py), by the name of their field, with what
# each says of the history
CLAIM_KINDS = {
    "genres": "liked genres",
    "decades": "decades watched mostly",
    "rated": "highest-rated titles",
    "lately": "genre watched lately",
}


def _mark_ranges() -> str:
    """The combining marks (Unicode M*) of planes 0-1 and the variation selectors supplement, as
    a regex character class body: Python's \\w has no marks, and split "हिन्दी" at its vowel
    signs into "ह" "न" "द"."""
    ranges: list[tuple[int, int]] = []
    for code in [*range(0x300, 0x20000), *range(0xE0100, 0xE01F0)]:
        if unicodedata.category(chr(code))[0] == "M":
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1] = (ranges[-1][0], code)
            else:
                ranges.append((code, code))
    return "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


_MARKS = _mark_ranges()
# a word: letters and digits with the marks that follow them (Devanagari's vowel signs, virama
# and nukta, Thai's vowels and tones, Japanese voicing marks), an apostrophe inside it kept
_WORD = re.compile(rf"\w[\w{_MARKS}]*(?:'\w[\w{_MARKS}]*)?")
_QUOTED = re.compile(r'"([^"\n]{2,80})"|\*\*?([^*\n]{2,80})\*\*?')
_WITH_YEAR = re.compile(r"((?:[A-Z0-9][\w'.:&!?,-]*\s+){0,7}[A-Z0-9][\w'.:&!?-]*)\s*\((?:19|20)\d\d\)")
_ARTICLE_SUFFIX = re.compile(r"^(.*), (the|a|an)$")
# the rationale format's lists (model/rationale.py): "Rated highest: A; B." and "Picks: C; D.",
# each closed by "." before the format's next sentence or the text's end
_LISTS = re.compile(r"(?:Rated highest|Picks): (.+?)\.(?: (?=Lately more|Next:|Picks:)|$)")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _folds_accents(base: str) -> bool:
    """Whether a mark on `base` is an accent to fold away: Latin, Greek and Cyrillic letters
    ("é" is "e" to a reader typing it). Elsewhere a mark is part of the letter (Devanagari's
    virama, Thai's vowels, Japanese voicing: パン "bread" is not バン "van")."""
    code = ord(base)
    return code < 0x530 or 0x1D00 <= code < 0x2000


def normalize_title(title: str) -> str:
    """Case, width, Latin/Greek/Cyrillic accents, punctuation and a trailing ", The"
    (MovieLens's form) folded away; letters of any script kept with their own marks (an ASCII
    fold would make every Japanese title "", and dropping every mark made "हिन्दी" "ह नद")."""
    kept: list[str] = []
    base = ""
    for c in unicodedata.normalize("NFKD", title):
        if not unicodedata.combining(c):
            base = c
        elif base and _folds_accents(base):
            continue
        kept.append(c)
    t = unicodedata.normalize("NFC", "".join(kept)).strip().lower()
    t = re.sub(r"\s*\((?:19|20)\d\d\)\s*$", "", t)
    if m := _ARTICLE_SUFFIX.match(t):
        t = f"{m.group(2)} {m.group(1)}"
    return " ".join(words(t))


def distinct_n(texts: Iterable[str], n: int = 2) -> float:
    grams = [tuple(w[i : i + n]) for w in map(words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def has_loop(text: str, n: int = 4, repeats: int = 3, catalog: set[str] | None = None) -> bool:
    """Whether one word `n`-gram occurs `repeats` or more times. `catalog` (normalised titles):
    the entries of the format's lists that are catalog titles are left out first, so a real
    title with repeated words ("The Very Very Very ... Long Title") is no loop; a list entry
    that is not one still counts."""
    if catalog:
        text = _LISTS.sub(lambda m: " " + _unlisted(m.group(1), catalog) + " ", text)
    w = words(text)
    counts = Counter(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
    return bool(counts) and max(counts.values()) >= repeats


def _unlisted(listed: str, catalog: set[str]) -> str:
    """A list's entries that are not catalog titles, each on its own (`has_loop`)."""
    entries = _list_entries(listed.split("; "), catalog)
    return " ; ".join(e for e in entries if normalize_title(e) not in catalog)


def named_titles(text: str, catalog: set[str] | None = None) -> list[str]:
    """Spans the text presents as titles (see the module docstring). A list's entries are split
    at "; ", except where pieces joined by it make a title of `catalog` (normalised titles):
    "Rated highest: Love; Death; Heat." names two titles where the catalog has "Love; Death"."""
    catalog = catalog or set()
    entries = [t for listed in _LISTS.findall(text) for t in _list_entries(listed.split("; "), catalog)]
    out = _marked(_LISTS.sub(" ", text))
    for entry in entries:
        # a listed catalog title keeps its quotes ('The "Best" Film Ever'); in an invented entry
        # they, or a year, mark the title it names ('Fake Film (1999) and Heat'), else it is one
        marked = [] if normalize_title(entry) in catalog else _marked(entry)
        out += marked or [entry]
    return [t.strip() for t in out if t.strip()]


def _marked(text: str) -> list[str]:
    """The spans `text` marks as titles: quoted, or before a year."""
    return [a or b for a, b in _QUOTED.findall(text)] + _WITH_YEAR.findall(text)


def _list_entries(pieces: list[str], catalog: set[str]) -> list[str]:
    """`pieces` (a list split at "; ") joined back, longest first, where they make a catalog
    title."""
    out, i = [], 0
    while i < len(pieces):
        ends = range(len(pieces), i + 1, -1)
        j = next((j for j in ends if normalize_title("; ".join(pieces[i:j])) in catalog), i + 1)
        out.append("; ".join(pieces[i:j]))
        i = j
    return out


def unknown_titles(text: str, catalog: set[str]) -> list[str]:
    """Named titles whose normalised form is not a catalog title (normalised) nor ends with
    one (a capitalised phrase before a year may start with words of the sentence)."""
    out = []
    for title in named_titles(text, catalog):
        norm = normalize_title(title)
        if not norm or norm in catalog:
            continue
        tail = norm.split()
        if any(" ".join(tail[i:]) in catalog for i in range(1, len(tail))):
            continue
        out.append(title)
    return out


@dataclass(frozen=True)
class TextQuality:
    texts: int
    distinct_2: float
    loop_share: float
    unknown_title_share: float
    mean_words: float
    empty_share: float = 0.0  # texts with no word (blank, or punctuation and symbols only)
    cut_share: float | None = None  # texts stopped by the token budget (None: not known)
    # the first few flagged texts, each with the titles it names that the catalog lacks, so a
    # share above 0 can be read, not only counted
    unknown_title_examples: list[dict] = field(default_factory=list)
    # with the texts' claims checked (None without): the shares of the texts making each claim
    # in which it holds, how many made it, and the first few texts with a claim that does not
    genres_hold_share: float | None = None
    genres_claims: int | None = None
    decades_hold_share: float | None = None
    decades_claims: int | None = None
    rated_hold_share: float | None = None
    rated_claims: int | None = None
    lately_hold_share: float | None = None
    lately_claims: int | None = None
    # the four kinds together: of every claim the texts make, the share that holds, and how many
    claims_hold_share: float | None = None
    claims: int | None = None
    wrong_claim_examples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _hold_share(held: Sequence[bool | None]) -> tuple[float | None, int]:
    made = [h for h in held if h is not None]
    return (round(sum(made) / len(made), 4) if made else None), len(made)


def text_quality(
    texts: Sequence[str],
    catalog_titles: Iterable[str],
    examples: int = 5,
    claims: Sequence[Claims] | None = None,
    cut: Sequence[bool] | None = None,
) -> TextQuality:
    """The numbers of the module docstring over `texts`; `claims`, one per text (model/rationale.py
    `check_claims` against that text's history), adds the shares of claims that hold, each kind's
    and all of them together; `cut`, one per text (True: it stopped at the token budget), the cut
    share."""
    catalog = {normalize_title(t) for t in catalog_titles}
    n = max(1, len(texts))
    if cut is not None and len(cut) != len(texts):
        raise ValueError(f"cut must be one per text: {len(cut)} for {len(texts)} texts")
    flagged = [(t, unknown_titles(t, catalog)) for t in texts]
    checked: dict = {}
    if claims is not None:
        if len(claims) != len(texts):
            raise ValueError(f"claims must be one per text: {len(claims)} for {len(texts)} texts")
        for kind in CLAIM_KINDS:
            share, made = _hold_share([getattr(c, kind) for c in claims])
            checked |= {f"{kind}_hold_share": share, f"{kind}_claims": made}
        share, made = _hold_share([getattr(c, kind) for c in claims for kind in CLAIM_KINDS])
        checked |= {"claims_hold_share": share, "claims": made}
        checked |= {
            "wrong_claim_examples": [
                {"text": t, "wrong": list(c.wrong)} for t, c in zip(texts, claims, strict=True) if c.wrong
            ][:examples],
        }
    return TextQuality(
        texts=len(texts),
        distinct_2=round(distinct_n(texts, 2), 4),
        loop_share=round(sum(has_loop(t, catalog=catalog) for t in texts) / n, 4),
        unknown_title_share=round(sum(bool(u) for _, u in flagged) / n, 4),
        mean_words=round(sum(len(words(t)) for t in texts) / n, 1),
        empty_share=round(sum(not words(t) for t in texts) / n, 4),
        cut_share=None if cut is None else round(sum(cut) / n, 4),
        unknown_title_examples=[{"text": t, "unknown": u} for t, u in flagged if u][:examples],
        **checked,
    )
