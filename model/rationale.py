"""Short rationales built from the data alone: the cold start that teaches lm_head to reason.

A 135M chat model does not discover useful reasoning about a catalog by RL from its chat
prior in a CPU budget (its untrained texts are small talk). The `rationale` training stage
teacher-forces texts like

    Likes Drama, Comedy and Thriller, mostly 1990s. Rated highest: Fargo; Heat; Casablanca.
    Lately more Thriller. Next: a 1990s Crime, Thriller movie.

built from the user's history (genres and eras weighted by rating, the highest-rated titles,
recent drift) and, as the hindsight part, the attributes of the item that actually came
next. At inference the model writes its own version, so the last sentence is its guess; the
training stage also scores h_T after the model's own text so rec_head does not learn to trust
a hindsight it cannot have (see model/train.py, `rationale` stage). With
`rationale_hindsight: false` the label is the history part alone: measured on ml-100k, a
teacher-forced hindsight made rec_head rank by the leaked genres (in-batch median rank 2 of 80)
while its own guesses ranked at chance (31 of 80), see BENCHMARKS.md §1.

Only catalog titles and genres appear: everything is read from the item table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import permutations

from model.special_text import nfc
from model.text_quality import normalize_title

# How many of the latest items count as "lately", and how much a genre's share there must
# exceed its share over the whole history to be called a drift.
RECENT = 5
DRIFT = 0.2
# The format's sentences, each decoded at inference under a grammar of what holds for the
# prompt's window (model/constrained.py):
LIKES = "Likes"  # the genres the history leans to
MOSTLY = ", mostly"  # where that sentence goes on to the decades ("Likes Drama, mostly 1990s.")
# the highest-rated titles, and how many the data-built rationale lists
RATED = "Rated highest:"
TOP_RATED = 3
# The drift sentence that may follow the list ("Lately more Thriller."): the list's grammar lets
# only its opening (or a stop) come right after the list, so a text cannot run on into free text
# that reads like more titles ("Clockwork Orange, A. Lately, 2000; E.T. ..."); what follows it is
# one of the genres that drift (`drifting_genres`), and where none does, only a stop (or, for a
# model trained with the hindsight sentence, its "Next:" guess) and the sentence may not be begun
# anywhere (as "Likes" where no genre holds)
LATELY = "Lately more"


@dataclass(frozen=True)
class ItemFacts:
    """What a rationale may say about one item."""

    title: str
    genres: tuple[str, ...] = ()
    decade: str | None = None  # "1990s"

    @classmethod
    def from_row(cls, row: Mapping[str, object]) -> ItemFacts:
        # NFC: "Comédie" as one code point and as "e" + U+0301 is one genre (an older catalog)
        genres = tuple(
            dict.fromkeys(nfc(g.strip()) for g in str(row.get("genres") or "").split(",") if g.strip())
        )
        year = str(row.get("year") or "").strip()
        decade = f"{year[:3]}0s" if len(year) == 4 and year.isdigit() else None
        return cls(str(row.get("title") or "").strip(), genres, decade)


def catalog_facts(items: Sequence[Mapping[str, object]]) -> dict[str, ItemFacts]:
    """item_id -> ItemFacts for a prepared item table's records."""
    return {str(r["item_id"]): ItemFacts.from_row(r) for r in items}


def history_facts(histories: Sequence[Sequence], facts: Mapping[str, ItemFacts]) -> list[list[ItemFacts]]:
    """Each entry's facts (model/prompts.py `HistoryEntry`s, by item_id; an item `facts` lacks
    says nothing but its title): what `R2ec.title_lists` builds the claims' grammars from."""
    return [[facts.get(str(e.item_id), ItemFacts(e.title)) for e in h] for h in histories]


def _weight(rating: float | None) -> float:
    # Unknown ratings count as neutral; a 1-star film says less about taste than a 5-star one.
    return 3.0 if rating is None or rating != rating else float(rating)


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _weights(history: Sequence[tuple[Sequence[str], float | None]]) -> Counter[str]:
    """Each genre's (or decade's) summed rating weight over (genres, rating) pairs, first seen
    first for ties; where every item that has one is rated 0 (a request may rate 0), each counts
    once instead, so the history leans to its most frequent and a share of the weight is defined."""
    weights: Counter[str] = Counter()
    for names, rating in history:
        weights.update({n: _weight(rating) for n in names})
    if weights and not sum(weights.values()):
        weights = Counter(n for names, _ in history for n in dict.fromkeys(names))
    return weights


def _liked_weights(history: Sequence[tuple[Sequence[str], float | None]]) -> Counter[str]:
    """`_weights` of the genres the history likes: those whose mean rating (`_weight`: an
    unrated item counts as neutral) reaches the mean over the items that have genres, so a genre
    seen mostly in films rated low is not called liked however often it is seen (the sum alone
    made "Likes Thriller" of a 5-star drama beside two 1-star thrillers); first seen first.
    Where no genre reaches it (low-rated items that carry many genres: 5 {X}, 5 {Y}, 0 {X, Y}),
    the mean over the items' (item, genre) pairs, which the best genre always reaches, so a
    history with genres always has one it likes."""
    rated = [(dict.fromkeys(names), _weight(r)) for names, r in history if names]
    if not rated:
        return Counter()
    seen = Counter(n for names, _ in rated for n in names)
    summed: Counter[str] = Counter()
    for names, w in rated:
        summed.update({n: w for n in names})
    weights = _weights(history)
    for mean in (
        sum(w for _, w in rated) / len(rated),
        sum(w * len(names) for names, w in rated) / sum(len(names) for names, _ in rated),
    ):
        liked = Counter({g: w for g, w in weights.items() if summed[g] / seen[g] >= mean - 1e-9})
        if liked:
            return liked
    return Counter()  # not reached: the pairs' mean is a weighted mean of the genres' means


def _decade_weights(history: Sequence[tuple[str | None, float | None]]) -> Counter[str]:
    """`_weights` over (decade, rating) pairs; an item without a year counts for none."""
    return _weights([((decade,) if decade else (), rating) for decade, rating in history])


def drifting_genres(genres: Sequence[Sequence[str]]) -> list[str]:
    """The genres a true "Lately more X." may name, strongest drift first (what `taste_lines`
    names): those in at least 2 of the latest `RECENT` items whose share there exceeds their
    share over the whole history (each item's genres, oldest first) by `DRIFT` or more."""
    if len(genres) <= RECENT:
        return []
    recent = Counter(g for gs in genres[-RECENT:] for g in gs)  # first seen first
    overall = Counter(g for gs in genres for g in gs)
    lift = {g: recent[g] / RECENT - overall[g] / len(genres) for g in recent if recent[g] >= 2}
    order = {g: i for i, g in enumerate(recent)}  # ties: the genre listed first
    # (a lift of exactly DRIFT can come out of the subtraction a hair below it: 0.6 - 0.4)
    return sorted((g for g in lift if lift[g] >= DRIFT - 1e-9), key=lambda g: (-lift[g], order[g]))


def taste_lines(history: Sequence[tuple[ItemFacts, float | None]]) -> list[str]:
    """Sentences about the history alone (no hindsight), oldest item first."""
    genre_w = _liked_weights([(f.genres, r) for f, r in history])
    decade_w = _decade_weights([(f.decade, r) for f, r in history])
    lines = []
    if genre_w:
        top = [g for g, _ in genre_w.most_common(3)]
        line = f"{LIKES} {_join(top)}"
        if decade_w:
            (d1, w1), *rest = decade_w.most_common(2)
            share = w1 / sum(decade_w.values())
            line += f"{MOSTLY} {d1}" if share >= 0.5 or not rest else f"{MOSTLY} {d1} and {rest[0][0]}"
        lines.append(line + ".")
    rated = [(i, f, r) for i, (f, r) in enumerate(history) if r is not None and r == r]
    if rated:
        ranked = sorted(rated, key=lambda x: (-x[2], -x[0]))  # highest first, recent on ties
        # each title once, as the grammar lists it (a catalog may hold two items of one title),
        # and only those the grammar may list (`rated_highest`: none below the history's mean)
        # (canonically equivalent titles, NFC and NFD "Amélie", are one, spelled as the grammar has it)
        allowed = {nfc(t): t for t in rated_highest([(f.title, r) for f, r in history])}
        best = list(dict.fromkeys(allowed[k] for _, f, _ in ranked if (k := nfc(f.title)) in allowed))
        best = best[:TOP_RATED]
        if best:
            lines.append(f"{RATED} " + "; ".join(best) + ".")
    if drift := drifting_genres([f.genres for f, _ in history]):
        lines.append(f"{LATELY} {drift[0]}.")
    return lines


def next_line(target: ItemFacts, category: str) -> str:
    """The hindsight sentence: attributes of the item that came next (never its title)."""
    parts = [p for p in (target.decade, ", ".join(target.genres[:3])) if p]
    return f"Next: a {' '.join(parts)} {category}." if parts else f"Next: another {category} like these."


NEXT = "Next:"  # where the hindsight sentence starts
PICKS = "Picks:"  # the sentence that copies the strongest co-watch hints (`picks_line`)


def picks_line(titles: Sequence[str]) -> str:
    """ "Picks: A; B; C." naming `titles` (co-watch hints, strongest first, model/cowatch.py):
    the `rationale_hint_picks` experiment, a sentence the model copies from its own prompt so
    the hinted titles sit right before the closing marker, where h_T is read, as an item's own
    title sits before it in its item vector ("" without titles)."""
    return f"{PICKS} " + "; ".join(titles) + "." if titles else ""


def rationale_parts(
    history_ids: Sequence[str],
    ratings: Sequence[float | None] | None,
    target_id: str,
    facts: Mapping[str, ItemFacts],
    category: str = "movie",
    max_history: int = 20,
    hindsight: bool = True,
) -> tuple[str, str]:
    """The teacher-forced rationale for one sample (the prompt's window of the history), cut
    where the hindsight begins: (what the history says, ending with "Next:"; the rest).
    `hindsight=False`: the history part alone, a text that is a function of the prompt, so
    what the model learns to write equals what it was trained on; the rest is ""."""
    ids = list(history_ids)[-max_history:]
    rs = [None] * len(ids) if ratings is None else list(ratings)[-max_history:]
    history = [(facts[i], r) for i, r in zip(ids, rs, strict=True)]
    if not hindsight:
        return " ".join(taste_lines(history)), ""
    hindsight = next_line(facts[target_id], category)
    assert hindsight.startswith(NEXT)
    return " ".join([*taste_lines(history), NEXT]), hindsight[len(NEXT) :]


def build_rationale(*args, **kwargs) -> str:
    """The whole rationale (`rationale_parts` joined)."""
    head, tail = rationale_parts(*args, **kwargs)
    return head + tail


# The claims of a rationale a reader can check against the history: "Likes A, B and C" (the
# genres that carry the most rating weight), ", mostly 1990s" (the decades that do), "Rated
# highest: X; Y; Z." (the titles with the highest ratings) and "Lately more D." (a genre the
# latest items lean to more than the history does).


@dataclass(frozen=True)
class Claims:
    """Whether a text's checkable claims hold for the history it was written about: None
    where the text makes no such claim (or one that cannot be checked: a sentence the token
    budget cut before its "."), else True only when every named item holds.

    A genre holds when the history likes it and its rating weight reaches the third-highest
    of those (`liked_genres`: what `taste_lines` would list, ties either way); the decades when
    they are what `decade_phrases` allows; a title when it is in the history with a rating that
    reaches the `TOP_RATED`-th highest one and the mean (`rated_highest`: what the data-built
    rationale could list, ties either way; no title of a history without ratings); the drift
    when its genre is one of `drifting_genres`."""

    genres: bool | None
    rated: bool | None
    decades: bool | None = None
    lately: bool | None = None
    wrong: tuple[str, ...] = ()  # what is named and does not hold ("Horror", "mostly 1980s")


def _entries(
    rest: str, known: Sequence[str], separators: Sequence[str], ends: Sequence[str]
) -> tuple[list[str], str | None]:
    """The entries of the list `rest` starts with, and the text from the one of `ends` that
    closed it (None: not closed). An entry that is one of `known` is read whole (the longest
    that fits; names may hold a separator or a ".": "L.A. Confidential", "Health and
    Household"), any other up to the next separator or end."""
    entries: list[str] = []
    while True:
        fits = [k for k in known if k and rest.startswith(k)]
        fits = [k for k in fits if not rest[len(k) :] or rest[len(k) :].startswith((*separators, *ends))]
        if fits:
            name = max(fits, key=len)
        else:
            stops = [i for i in (rest.find(x) for x in (*separators, *ends)) if i >= 0]
            name = rest[: min(stops, default=len(rest))]
        entries.append(name.strip())
        rest = rest[len(name) :]
        if rest.startswith(tuple(ends)):
            return entries, rest
        sep = next((x for x in separators if rest.startswith(x)), None)
        if sep is None:
            return entries, None
        rest = rest[len(sep) :]


def check_claims(text: str, history: Sequence[tuple[ItemFacts, float | None]]) -> Claims:
    """Check `text`'s "Likes ..., mostly ...", "Rated highest: ..." and "Lately more ..." claims
    against `history` (the prompt's window, as `taste_lines` reads it)."""
    text = text.strip()
    wrong: list[str] = []
    genres = rated = decades = lately = None
    known_genres = list(dict.fromkeys(g for f, _ in history for g in f.genres))
    # each sentence is looked for after the one before it, so a title or genre that holds the
    # next sentence's opening ("Rated highest: Lately More Rain") is not read as that sentence
    at = 0
    if text.startswith(LIKES + " "):
        named, end = _entries(text[len(LIKES) + 1 :], known_genres, (", ", " and "), (MOSTLY, "."))
        if end is not None:
            at = len(text) - len(end)
            liked = liked_genres([(f.genres, r) for f, r in history])
            held = set(liked)
            bad = [g for g in named if g not in held]
            # a genre named like two that hold ("Action and Adventure" beside Action and
            # Adventure): the sentence the grammar allows reads as the two
            if bad and text[len(LIKES) :].startswith(tuple(likes_phrases(liked[:MAX_LIKED]))):
                bad = []
            genres, wrong = not bad, wrong + bad
            said = end[len(MOSTLY) :] if end.startswith(MOSTLY) else ""
            if (stop := said.find(".")) >= 0:
                decades = said[: stop + 1] in decade_phrases([(f.decade, r) for f, r in history])
                wrong += [] if decades else [MOSTLY.lstrip(", ") + said[:stop]]
    rated_titles = [(f.title, r) for f, r in history]
    if (start := text.find(RATED + " ", at)) >= 0:
        known = [t for t, _ in rated_titles]
        named, end = _entries(text[start + len(RATED) + 1 :], known, ("; ",), (".",))
        at = len(text) - len(end) if end is not None else len(text)  # unclosed: nothing follows
        if end is not None:  # (about a history without ratings, every title is false)
            ok = {nfc(t) for t in rated_highest(rated_titles)}
            bad = [t for t in named if _listed_as(t, known) not in ok]
            rated, wrong = not bad, wrong + bad
    if (start := text.find(LATELY + " ", at)) >= 0:
        (named,), end = _entries(text[start + len(LATELY) + 1 :], known_genres, (), (".",))
        if end is not None:
            lately = named in drifting_genres([f.genres for f, _ in history])
            wrong += [] if lately else [f"{LATELY} {named}"]
    return Claims(genres=genres, rated=rated, decades=decades, lately=lately, wrong=tuple(wrong))


def _listed_as(name: str, titles: Sequence[str]) -> str | None:
    """Which of the history's `titles` a listed `name` is, in NFC: the one it spells exactly
    (in NFC), else the one title it matches with case, accents and width folded
    (`normalize_title`, a free-titles text writing "fargo"); None where it is none, or where
    folding leaves it several. So "Heat" (rated 1) beside "HEAT" (rated 5) is the 1-star film,
    not whichever the fold found first."""
    exact = {nfc(t) for t in titles}
    if (key := nfc(name)) in exact:
        return key
    folded = {t for t in exact if normalize_title(t) == normalize_title(name)}
    return folded.pop() if len(folded) == 1 else None


def _rated(history: Sequence[tuple[str, float | None]]) -> dict[str, float]:
    """title (in NFC: canonically equivalent spellings are one title) -> its best rating, over
    the rated entries."""
    best: dict[str, float] = {}
    for title, r in history:
        if r is not None and r == r:
            key = nfc(title)
            best[key] = max(best.get(key, r), r)
    return best


def liked_genres(history: Sequence[tuple[Sequence[str], float | None]]) -> list[str]:
    """The genres a true "Likes A, B and C" may name, heaviest first: of the genres the history
    likes (`_liked_weights`: rated on average at least as high as its items), those whose rating
    weight (as `taste_lines` sums it) reaches the third-highest of theirs, ties either way; []
    for a history without genres or where none is liked. Inference decodes the sentence under
    this set (`R2ec.title_lists`, model/constrained.py `PhraseChoice`)."""
    weights = _liked_weights(history)
    if not weights:
        return []
    bar = sorted(weights.values(), reverse=True)[:3][-1]
    return [g for g, w in weights.most_common() if w >= bar]


# At most this many of the genres that hold are offered to the "Likes" grammar (`R2ec.title_lists`):
# P(6,1..3) x 2 = 312 phrases, where 13 tied genres (an unrated ml-100k request) would give 3,770,
# each scanned on the decode thread for the first token. `liked_genres` is heaviest first with
# `taste_lines`' tie order, so the trained choice stays in.
MAX_LIKED = 6


def likes_phrases(genres: Sequence[str], most: int = 3, ends: Sequence[str] = (MOSTLY, ".")) -> list[str]:
    """Every way the "Likes" sentence can name up to `most` of `genres` (in any order, each once)
    as `taste_lines` joins them, each closed by one of `ends` as the format closes it (", mostly"
    before the decades, or "."): the strings its grammar allows after "Likes"."""
    out = []
    for n in range(1, min(most, len(genres)) + 1):
        for chosen in permutations(genres, n):
            out += [f" {_join(list(chosen))}{end}" for end in ends]
    return out


def decade_phrases(history: Sequence[tuple[str | None, float | None]]) -> list[str]:
    """What a true ", mostly ..." may go on with, each closed by ".", over (decade, rating)
    pairs: " D." for a decade with the highest rating weight (ties either way) that carries at
    least half of it or is the only one; " D1 and D2." for the two heaviest, in either order: two
    tied for the highest, else the heaviest and one at the second-highest weight ([] for a
    history without years). `taste_lines` writes one of these (a pair only when no decade carries
    half; a pair of the two heaviest holds whatever share they carry); inference decodes the
    decades under them (`R2ec.title_lists`)."""
    weights = _decade_weights(history)
    if not weights:
        return []
    total, levels = sum(weights.values()), sorted(set(weights.values()), reverse=True)
    tops = [d for d, w in weights.items() if w == levels[0]]
    named = [d for d in tops if weights[d] / total >= 0.5 or len(weights) == 1]
    if len(tops) > 1:
        pairs = list(permutations(tops, 2))
    else:
        seconds = [d for d, w in weights.items() if len(levels) > 1 and w == levels[1]]
        pairs = [p for s in seconds for p in ((tops[0], s), (s, tops[0]))]
    return [f" {d}." for d in named] + [f" {a} and {b}." for a, b in pairs]


def rated_highest(history: Sequence[tuple[str, float | None]]) -> list[str]:
    """The titles a true "Rated highest:" list may name, in history order: those whose rating
    reaches the `TOP_RATED`-th highest (ties either way, as `taste_lines` breaks them by recency)
    and the mean rating of the rated titles, so a film rated 1 beside one rated 5 is never listed
    as a favourite, on any rating scale; none when none is rated (the service takes histories
    without ratings: then the sentence is not written). Inference decodes the list under this
    set (`R2ec.title_lists`, model/constrained.py)."""
    history = [(t, r) for t, r in history if t and t.strip()]  # a blank title cannot be listed
    best = _rated(history)
    if not best:
        return []
    bar = max(sorted(best.values(), reverse=True)[:TOP_RATED][-1], _mean_rating(best))
    # each title once, spelled as its first entry is: NFC and NFD "Amélie" are listed once
    first = {}
    for t, _ in history:
        first.setdefault(nfc(t), t)
    return [t for k, t in first.items() if best.get(k, float("-inf")) >= bar]


def _mean_rating(best: Mapping[str, float]) -> float:
    """The mean of the titles' ratings (`_rated`), a hair low, so a title rated exactly at it
    (every rating equal) reaches it whatever the float sum's rounding."""
    return sum(best.values()) / len(best) - 1e-9
