"""Title search over a catalog: case- and accent-insensitive, ranked, built once per catalog.

A title and a query are compared after the same normalisation (`normalize`): Unicode NFKD with
the combining marks dropped, a few letters that do not decompose spelled out (ø, æ, ß, ...),
case folded, apostrophes removed ("Children's" -> "childrens") and every other run of
non-alphanumeric characters one space. A catalog title written with its article moved to the
end ("Godfather, The", "Misérables, Les", as MovieLens writes them) is also indexed under the
spoken order ("the godfather").

Pictographs (Unicode "other symbols": emoji, ♥, ©, flags) are not punctuation: a title that holds
one is also indexed under `normalize(title, symbols=True)`, where each is a word of its own
("🎬 Movie Night" -> "🎬 movie night"; emoji joiners and variation selectors dropped). A query
that holds one is matched both that way and as its plain words, each tier taking both's matches,
so "🎬" finds "🎬 Movie Night" (until then it normalised to "" and found nothing), and "movie
night" or "🎬 movie" still find what they found before.

Japanese voicing marks (dakuten ゛ U+3099, handakuten ゜ U+309A) are not dropped with the other
combining marks: they change the word (パン "bread", バン "van", ハン), so "バン屋" does not find
"パン屋の物語". Half-width katakana still finds full-width ("ｶﾞﾝﾀﾞﾑ" is "ガンダム" under NFKD).

A match ranks by how the query meets the title, then by whether it meets the title as typed
(the query's text, in NFC, found in the title without folding case, width or accents: "Heat"
lists "Heat" before "HEAT", "ABC" lists "ABC" before "ＡＢＣ"), then by title, then by id:

    0 exact        the whole title
    1 prefix       the start of the title
    2 word         the start of a later word ("wars" in "Star Wars")
    3 substring    anywhere else

`TitleIndex` is immutable. The exact tier is a dict lookup; prefix and word tiers are a
binary search in sorted arrays (of titles, and of the suffixes that start at each later word),
then a sort of that tier's m candidates by title; the substring tier scans one joined string
with `str.find`, rows in title order, and stops once `limit` results are in. A query costs
O(log N + m log m), plus at most one C-speed pass when it reaches the substring tier. A tier is
read up to max(50 x limit, 5000) candidates, so a one-letter query over a million titles stays
cheap (its order within that tier is then approximately, not exactly, by title).
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from model.special_text import nfc

TIERS = ("exact", "prefix", "word", "substring")

# Letters NFKD leaves alone; spelled the way people type them on an English keyboard.
_SPELLED = str.maketrans(
    {"ø": "o", "Ø": "o", "æ": "ae", "Æ": "ae", "œ": "oe", "Œ": "oe", "ł": "l", "Ł": "l", "đ": "d",
     "Đ": "d", "ð": "d", "Ð": "d", "þ": "th", "Þ": "th", "ı": "i"}
)  # fmt: skip
_VOICING = "\u3099\u309a"  # Japanese (han)dakuten, as NFKD spells them: kept (module docstring)
_VOICED = re.compile(f".[{_VOICING}]")
_APOSTROPHES = re.compile(r"['’ʼ`´]")
_NON_ALNUM = re.compile(r"[\W_]+")
# "Godfather, The" / "Horseman on the Roof, The (Hussard sur le toit, Le)" / "Appartement, L'"
_TRAILING_ARTICLE = re.compile(
    r"^(?P<main>.+?),\s+(?P<article>the|a|an|les|la|le|l'|il|lo|gli|i|das|der|die|el|los|las)"
    r"(?P<rest>\s*\(.*\))?\s*$",
    re.IGNORECASE,
)


def _is_symbol(c: str) -> bool:
    """A pictograph kept as a word by `normalize(..., symbols=True)`: Unicode "So" (emoji, ♥, ©,
    regional indicators), and the emoji skin-tone modifiers (category "Sk"). ASCII symbols
    (+, $, ^, ...) stay separators, so "Romeo + Juliet" is still found as "romeo juliet"."""
    return unicodedata.category(c) == "So" or "\U0001f3fb" <= c <= "\U0001f3ff"


def normalize(text: str, symbols: bool = False) -> str:
    """Lowercase ASCII-ish words separated by single spaces; '' when nothing is left. With
    `symbols`, each pictograph (`_is_symbol`) is kept as a word of its own."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_SPELLED))
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c) or c in _VOICING)
    if _VOICED.search(stripped):  # composed again (ハ + U+3099 -> バ), or the mark would be a separator
        stripped = _VOICED.sub(lambda m: unicodedata.normalize("NFC", m.group(0)), stripped)
    folded = _APOSTROPHES.sub("", stripped.casefold())
    if not symbols or folded.isascii():  # no ASCII character is a pictograph
        return _NON_ALNUM.sub(" ", folded).strip()
    # the same words as below (a run of str.isalnum characters is what [\W_]+ leaves), and
    # each pictograph one more
    words: list[str] = []
    start = 0
    for at, c in enumerate(folded):
        if c.isalnum():
            continue
        if start < at:
            words.append(folded[start:at])
        if _is_symbol(c):
            words.append(c)
        start = at + 1
    if start < len(folded):
        words.append(folded[start:])
    return " ".join(words)


def _forms(text: str) -> tuple[str, str]:
    """`text` normalised, and normalised with its pictographs kept (the same when it has none)."""
    plain = normalize(text)
    return plain, plain if text.isascii() else normalize(text, symbols=True)  # ASCII: no pictograph


def sort_name(title: str) -> str:
    """What titles are ordered by within a tier: the plain form; a title of pictographs only
    ("🎬") by its pictographs."""
    plain, symbolic = _forms(title)
    return plain or symbolic


def spoken_title(title: str) -> str | None:
    """'Godfather, The' -> 'The Godfather'; None when the title has no trailing article."""
    m = _TRAILING_ARTICLE.match(title)
    if m is None:
        return None
    article = m["article"]
    joiner = "" if article.endswith("'") else " "
    return f"{article}{joiner}{m['main']}{m['rest'] or ''}"


@dataclass(frozen=True)
class Match:
    item_id: str
    tier: int  # index into TIERS
    typed: bool = False  # the query meets the title as typed (module docstring): listed first in its tier

    @property
    def kind(self) -> str:
        return TIERS[self.tier]


def typed_match(title: str, query: str, tier: int) -> bool:
    """Whether `query` (in NFC, stripped) meets `title` (in NFC) as typed, the way its `tier`
    says: the whole title, its start, or anywhere (a later word's start, a substring)."""
    if tier == 0:
        return title == query
    return title.startswith(query) if tier == 1 else query in title


class TitleIndex:
    """Ranked title search over {item_id: title}; build once, query from any thread.

    `title_of`: an item's current title (the catalog's records), for the as-typed ranking of the
    module docstring; by default the index keeps the titles it was built from."""

    def __init__(
        self,
        titles: Mapping[str, str] | Iterable[tuple[str, str]],
        title_of: Callable[[str], str] | None = None,
    ) -> None:
        pairs = titles.items() if isinstance(titles, Mapping) else titles
        own: dict[str, str] = {}
        names: list[tuple[str, str, str]] = []  # (normalised name, sort key, item id)
        self._sort_key: dict[str, tuple[str, str]] = {}
        for item_id, title in pairs:
            item_id, title = str(item_id), str(title or "")
            if title_of is None:
                own[item_id] = title
            plain, symbolic = _forms(title)
            if not symbolic:
                continue  # an item without a searchable title
            key = (plain or symbolic, item_id)  # as `sort_name`
            self._sort_key[item_id] = key
            spoken = spoken_title(title)
            for name in {plain, symbolic, *(_forms(spoken) if spoken else ())} - {""}:
                names.append((name, *key))
        self._title_of = title_of or (lambda item_id: own.get(item_id, ""))
        names.sort()
        self._exact: dict[str, list[str]] = {}
        for name, _, item_id in names:
            self._exact.setdefault(name, []).append(item_id)
        # prefix tier: bisect into the sorted names
        self._names = [n for n, _, _ in names]
        self._name_ids = [i for _, _, i in names]
        # word tier: every suffix that starts at a later word, sorted
        words = sorted(
            (name[at + 1 :], item_id) for name, _, item_id in names for at, c in enumerate(name) if c == " "
        )
        self._words = [w for w, _ in words]
        self._word_ids = [i for _, i in words]
        # substring tier: one string, rows in (title, id) order, each row's start offset
        rows = sorted(set(names), key=lambda r: (r[1], r[2], r[0]))
        self._row_ids = [i for _, _, i in rows]
        self._row_starts: list[int] = []
        offset = 0
        for name, _, _ in rows:
            self._row_starts.append(offset)
            offset += len(name) + 1
        self._blob = "\n".join(name for name, _, _ in rows)

    def __len__(self) -> int:
        return len(self._sort_key)

    def search(self, query: str, limit: int, skip: Iterable[str] = ()) -> list[Match]:
        """Up to `limit` matches, best first; ids in `skip` are left out (stale or deleted rows).
        A query that holds a pictograph is matched with it and as its words alone, each tier
        taking both's matches (so results stay in tier, then title, order)."""
        queries = [q for q in dict.fromkeys((normalize(query, symbols=True), normalize(query))) if q]
        if not queries or limit <= 0:
            return []
        taken: set[str] = set(skip)
        out: list[Match] = []
        typed = nfc(query.strip())

        def take(ids: Iterable[str], tier: int) -> bool:
            """Add this tier's ids, those met as typed first, then in title order; True once
            `limit` is reached."""
            met = {i: typed_match(nfc(self._title_of(i)), typed, tier) for i in ids if i not in taken}
            found = sorted(met, key=lambda i: (not met[i], self._sort_key[i]))
            for item_id in found:
                out.append(Match(item_id, tier, met[item_id]))
                taken.add(item_id)
                if len(out) == limit:
                    return True
            return False

        if take((i for q in queries for i in self._exact.get(q, ())), 0):
            return out
        want = limit + len(taken)
        if take((i for q in queries for i in self._prefixed(self._names, self._name_ids, q, want)), 1):
            return out
        # a later word starting with the query: "wars" in "star wars"
        want = limit + len(taken)
        if take((i for q in queries for i in self._prefixed(self._words, self._word_ids, q, want)), 2):
            return out
        want = limit - len(out)
        take((i for q in queries for i in self._substrings(q, want, taken)), 3)
        return out

    def _prefixed(self, keys: list[str], ids: list[str], q: str, want: int) -> list[str]:
        """Ids whose key starts with q, all of them up to a cap (the caller sorts by title: key
        order is not title order, and one id may have several keys)."""
        found: dict[str, None] = {}
        at = bisect.bisect_left(keys, q)
        end = bisect.bisect_left(keys, q + "\U0010ffff", lo=at)
        cap = max(want * 50, 5000)  # a one-letter query over a huge catalog: no full pass
        for row in range(at, min(end, at + cap)):
            found[ids[row]] = None
        return list(found)

    def _substrings(self, q: str, want: int, taken: set[str]) -> list[str]:
        """The first `want` rows (in title order) that contain q and are not taken yet."""
        found: dict[str, None] = {}
        pos = self._blob.find(q)
        while pos >= 0 and len(found) < want:
            row = bisect.bisect_right(self._row_starts, pos) - 1
            item_id = self._row_ids[row]
            if item_id not in taken:
                found[item_id] = None
            nxt = row + 1
            if nxt == len(self._row_starts):
                break
            pos = self._blob.find(q, self._row_starts[nxt])
        return list(found)
