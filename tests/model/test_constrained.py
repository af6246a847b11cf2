"""The title list's grammar (model/constrained.py): whatever the logits say, the text after the
trigger is a list of the prompt's titles, and the two backends decode it alike."""

import copy
import random
import re
from pathlib import Path

import pytest
import torch

from model.constrained import Banned, PhraseChoice, TitleList, TitleLists, TokenStrings, constrain_logits
from model.generation import EngineBackend, HFBackend
from model.prompts import HistoryEntry
from model.r2ec import GenerationSettings
from model.rationale import (
    LATELY,
    LIKES,
    MOSTLY,
    PICKS,
    RATED,
    ItemFacts,
    check_claims,
    liked_genres,
    likes_phrases,
)

TITLES = ["Heat", "Fargo", "Mr. Holland's Opus", "Sex, Lies, and Videotape", "Heat Wave"]


@pytest.fixture(scope="module")
def strings(tiny_model):
    return TokenStrings(tiny_model.tokenizer)


@pytest.fixture(scope="module")
def smol():
    """SmolLM2's tokenizer, as the shipped model carries it."""
    from transformers import AutoTokenizer

    path = Path(__file__).resolve().parents[2] / "artifacts" / "ml100k" / "tokenizer"
    return TokenStrings(AutoTokenizer.from_pretrained(path, local_files_only=True))


def _list_after(text: str, trigger: str, titles: list[str]) -> list[str]:
    """The entries of the closed list `" T(; T)*."` after `trigger`, each one of `titles`
    (which may hold "." themselves); fails the test when the text is no such list."""
    rest = text[text.index(trigger) + len(trigger) :] if trigger else text
    entries = []
    while True:
        assert rest.startswith(" "), f"no entry at {rest!r} in {text!r}"
        ends = [t for t in titles if rest[1:].startswith(t) and rest[1 + len(t) : 2 + len(t)] in (";", ".")]
        assert ends, f"no title at {rest!r} in {text!r}"
        title = max(ends, key=len)
        entries.append(title)
        sep, rest = rest[1 + len(title)], rest[2 + len(title) :]
        if sep == ".":
            return entries


def _decode_under(constraint: TitleList, strings: TokenStrings, start: list[int], seed: int) -> list[int]:
    """Random logits, masked by the grammar, until it lets go (the list is closed) or a stop
    token ends the text."""
    gen = torch.Generator().manual_seed(seed)
    ids = list(start)
    vocab = len(strings.tokenizer)
    for _ in range(200):
        allowed = constraint.allowed(ids)
        if allowed is None:
            return ids
        logits = constrain_logits(torch.randn(1, vocab, generator=gen), [allowed])
        ids.append(int(logits.argmax()))
        if ids[-1] in strings.stops:
            return ids[:-1]
    raise AssertionError("the grammar never closed the list")


@pytest.mark.parametrize("seed", range(12))
def test_any_logits_write_a_list_of_distinct_prompt_titles(tiny_model, strings, seed):
    constraint = TitleList(TITLES, strings)
    start = tiny_model.encode_text([f"Likes Drama. {RATED}"])[0]
    text = strings.decode(_decode_under(constraint, strings, start, seed))
    entries = _list_after(text, RATED, TITLES)
    assert 1 <= len(entries) <= 3
    assert len(set(entries)) == len(entries)


def test_the_grammar_is_free_before_the_trigger_and_after_the_list(tiny_model, strings):
    constraint = TitleList(TITLES, strings)
    assert constraint.allowed(tiny_model.encode_text(["Likes Drama, mostly 1990s."])[0]) is None
    closed = tiny_model.encode_text([f"{RATED} Fargo; Heat. Lately more"])[0]
    assert constraint.allowed(closed) is None
    assert TitleList([], strings).allowed(tiny_model.encode_text([RATED])[0]) is None


def test_allowed_tokens_continue_a_title_and_cross_into_the_next(tiny_model, strings):
    constraint = TitleList(["Heat", "Heat Wave", "Fargo"], strings)
    after_title = tiny_model.encode_text([f"{RATED} Heat"])[0]
    texts = {strings.decode([i]) for i in constraint.allowed(after_title)}
    assert {";", "."} <= texts  # next title, or the end
    assert any(t.startswith(" ") and " Wave".startswith(t) for t in texts)  # or the longer title
    assert all(t[0] in ";. " for t in texts)
    third = tiny_model.encode_text([f"{RATED} Heat; Fargo; Heat Wave"])[0]
    texts = {strings.decode([i]) for i in constraint.allowed(third)}
    assert not any(t.startswith(";") for t in texts)  # three listed: only the end is left


def test_right_after_the_list_only_the_next_sentence_or_a_stop_may_come(tiny_model, strings):
    # "Streetcar Named Desire, A. J. Clarke": a name run on from a title ending in "A."
    constraint = TitleList(["Streetcar Named Desire, A", "Heat"], strings)
    closed = tiny_model.encode_text([f"{RATED} Heat; Streetcar Named Desire, A."])[0]
    special = set(tiny_model.tokenizer.all_special_ids)
    for written in (closed, closed + tiny_model.encode_text([" L"])[0]):
        allowed = constraint.allowed(written)
        after = strings.decode(written).rsplit(".", 1)[1]
        # a stop right after the list; once the next sentence has begun, no stop until it is written
        assert allowed and (tiny_model.tokenizer.eos_token_id in allowed) == (after == "")
        rest = " Lately more"[len(after) :]
        assert all(i in special or rest.startswith(strings.decode([i])) for i in allowed)
    # with the model's own stop tokens, no other special token may end the list
    model_strings = tiny_model.token_strings()
    assert set(model_strings.stops) == set(tiny_model.stop_ids) and len(special) > len(model_strings.stops)
    allowed = TitleList(["Streetcar Named Desire, A", "Heat"], model_strings).allowed(closed)
    assert not (set(allowed) & special) - set(tiny_model.stop_ids)
    # "Lately" alone is not the sentence yet: a text that ran on from it read like more titles
    # ("Clockwork Orange, A. Lately, 2000; E.T. the Extra-Terrestrial; ...", stop 25's eval)
    lately = constraint.allowed(closed + tiny_model.encode_text([" Lately"])[0])
    assert lately and all(" more".startswith(strings.decode([i])) for i in lately)  # no stop: finish it
    assert not any(strings.decode([i]).startswith(",") for i in lately)
    # once the next sentence has begun, decoding is free again
    assert constraint.allowed(closed + tiny_model.encode_text([" Lately more"])[0]) is None


def test_only_a_full_stop_closes_the_list(tiny_model, strings):
    constraint = TitleList(["Heat"], strings)
    texts = {strings.decode([i]) for i in constraint.allowed(tiny_model.encode_text([f"{RATED} Heat"])[0])}
    assert "." in texts and not any(t.startswith(".") and t[1:].strip() for t in texts)


@pytest.mark.parametrize(
    "title",
    [
        "Á köldum klaka (Cold Fever)",  # SmolLM2 has " Á" but no "Á" alone: only its bytes
        "千と千尋の神隠し",  # "千" is two tokens, "åį" + "ĥ", each part of the character
        "🎬 Night at the Movies",
        "Ω",
    ],
)
def test_a_title_in_any_script_is_copied_token_piece_by_piece(smol, title):
    assert title in _lists_under_random_logits(smol, [title, "Heat"], seeds=6)  # not only "Heat"


def _lists_under_random_logits(strings: TokenStrings, titles: list[str], seeds: int) -> set[str]:
    """Every title listed by `seeds` random-logit decodings after "Rated highest:" under the
    grammar of `titles`; fails the test when one is not a closed list of them."""
    constraint = TitleList(titles, strings)
    start = strings.tokenizer(f"Likes Drama. {RATED}", add_special_tokens=False)["input_ids"]
    assert constraint.allowed(start) is not None
    listed = set()
    for seed in range(seeds):
        text = strings.decode(_decode_under(constraint, strings, start, seed))
        entries = _list_after(text, RATED, titles)
        assert entries and set(entries) <= set(titles), text
        listed.update(entries)
    return listed


def test_a_written_list_that_left_the_grammar_is_not_forced(tiny_model, strings):
    constraint = TitleList(["Heat", "Fargo"], strings)
    assert constraint.allowed(tiny_model.encode_text([f"{RATED} Casino"])[0]) is None


def test_engine_and_hf_decode_the_constrained_list_alike(tiny_model, strings):
    histories = [
        [HistoryEntry("Toy Story", 5.0), HistoryEntry("Fargo", 4.0), HistoryEntry("Heat", 3.0)],
        [HistoryEntry("Star Wars", 5.0), HistoryEntry("Casino", 2.0)],
    ]
    # trigger "": the random tiny model never writes "Rated highest:", so the list comes first
    lists = [TitleList([e.title for e in h], strings, trigger="") for h in histories]
    prompts = tiny_model.user_prompt_ids(histories)
    settings = GenerationSettings(max_new_tokens=24)
    ref, ref_vecs = HFBackend(tiny_model).generate(prompts, settings, lists)
    got, vecs = EngineBackend(tiny_model, slots=2).generate(prompts, settings, lists)
    assert got.completion_ids == ref.completion_ids
    assert torch.nn.functional.cosine_similarity(vecs, ref_vecs).min() > 0.9999
    for text, h in zip(got.texts, histories, strict=True):
        assert _list_after(" " + text, "", [e.title for e in h])
    free, _ = EngineBackend(tiny_model, slots=2).generate(prompts, settings)
    assert free.texts != got.texts  # the random model left alone writes no such list


def test_title_lists_take_the_prompt_window(tiny_model):
    window = tiny_model.prompts.max_history
    history = [HistoryEntry(f"Film {i}", 4.0) for i in range(window + 3)]
    (constraint,) = tiny_model.title_lists([history])
    assert constraint.titles == [f"Film {i}" for i in range(3, window + 3)]


def test_the_rated_list_may_name_only_the_windows_highest_rated_titles(tiny_model):
    ratings = [5.0, 1.0, 4.0, 3.0, 5.0, None]
    history = [HistoryEntry(f"Film {i}", r) for i, r in enumerate(ratings)]
    (constraint,) = tiny_model.title_lists([history])
    assert constraint.titles == ["Film 0", "Film 2", "Film 4"]  # 5, 4 and 5; not the 1, 3 or unrated
    unrated = [HistoryEntry(f"Film {i}") for i in range(4)]  # a request without ratings
    assert tiny_model.title_lists([unrated])[0].titles == []  # nothing is rated highest


def test_a_list_may_be_followed_by_either_of_its_next_sentences(tiny_model, strings):
    follow = (" Lately", " Picks:")
    constraint = TitleList(["Heat", "Fargo"], strings, follow=follow)
    closed = tiny_model.encode_text([f"{RATED} Heat."])[0]
    for sentence in follow:  # each can be written token by token, and nothing else can
        ids = list(closed)
        for _ in range(len(sentence) + 1):
            if (allowed := constraint.allowed(ids)) is None:
                break
            written = strings.decode(ids).rsplit(".", 1)[1]
            texts = {strings.decode([i]) for i in allowed if i not in strings.stops}
            assert all(any(f.startswith(written + t) for f in follow) for t in texts)
            words = [i for i in allowed if i not in strings.stops]
            ids.append(next(i for i in words if sentence.startswith(written + strings.decode([i]))))
        assert strings.decode(ids).endswith(sentence) and constraint.allowed(ids) is None


@pytest.mark.parametrize("seed", range(6))
def test_the_picks_list_copies_hints_after_the_rated_list_of_history_titles(tiny_model, strings, seed):
    hints = ["Casablanca", "Heat Wave", "Vertigo"]
    grammar = TitleLists(
        [
            TitleList(TITLES, strings, follow=(" Lately", " " + PICKS)),
            TitleList(hints, strings, max_entries=2, trigger=PICKS, follow=""),  # as R2ec.title_lists
        ]
    )
    start = tiny_model.encode_text([f"Likes Drama. {RATED}"])[0]
    rated = _decode_under(grammar, strings, start, seed)  # the rated list, then its next sentence
    assert _list_after(strings.decode(rated), RATED, TITLES)
    picks = _decode_under(grammar, strings, rated + tiny_model.encode_text([f" {PICKS}"])[0], seed)
    entries = _list_after(strings.decode(picks), PICKS, hints)
    assert 1 <= len(entries) <= 2 and len(set(entries)) == len(entries)
    # the list ends the text: right after it only a stop may come
    closed = tiny_model.encode_text([f"{RATED} Heat. {PICKS} Vertigo."])[0]
    assert grammar.allowed(closed) == strings.stops


def test_a_trigger_inside_a_rated_title_does_not_switch_lists(tiny_model, strings):
    titles = ["Heat", "Picks: A Story", "Fargo"]
    rated = TitleList(titles, strings, follow=(" Lately", " " + PICKS))
    grammar = TitleLists([rated, TitleList(["Vertigo"], strings, trigger=PICKS, follow="")])
    # in the middle of the rated title that contains "Picks:": its own rest may follow
    inside = tiny_model.encode_text([f"{RATED} Picks: A"])[0]
    assert grammar.allowed(inside) == rated.allowed(inside)
    assert any(
        strings.decode([i]).startswith(" Story") or strings.decode([i]) == " " for i in rated.allowed(inside)
    )
    # that title closed the rated list: the format's next sentence or a stop
    closed = tiny_model.encode_text([f"{RATED} Picks: A Story."])[0]
    assert grammar.allowed(closed) == rated.allowed(closed) != strings.stops
    # the real trigger, after the rated list, starts the hints' list
    real = tiny_model.encode_text([f"{RATED} Picks: A Story. {PICKS}"])[0]
    assert grammar.allowed(real) == grammar.lists[1].allowed(real)
    starts = grammar.allowed(real)
    assert starts and all(" Vertigo.".startswith(strings.decode([i])) for i in starts)


def test_title_lists_add_the_picks_grammar_only_for_a_model_trained_to_write_it(tiny_model):
    import dataclasses

    from model.cowatch import CoWatch

    history = [HistoryEntry(f"Film {i}", 4.0, item_id=str(i)) for i in range(3)]
    titles = {str(i): f"Film {i}" for i in range(6)}
    table = CoWatch.from_sequences([["2", "4", "5"], ["2", "5"], ["1", "3"]], titles, window=2)
    prompts, cowatch = tiny_model.prompts, tiny_model.cowatch
    try:
        tiny_model.cowatch = table
        tiny_model.prompts = dataclasses.replace(prompts, cowatch_hints=3)
        (plain,) = tiny_model.title_lists([history])
        assert isinstance(plain, TitleList) and plain.follow == (" Lately more",)
        tiny_model.prompts = dataclasses.replace(prompts, cowatch_hints=3, hint_picks=2)
        (grammar,) = tiny_model.title_lists([history])
        rated, picks = grammar.lists
        assert rated.titles == ["Film 0", "Film 1", "Film 2"] and " Picks:" in rated.follow
        hinted = tiny_model.hint_titles(history)
        assert hinted and picks.titles == hinted and picks.max_entries == 2 and picks.trigger == PICKS
        assert picks.follow == ("",)  # the list ends the text
        # a history with no hints gets no "Picks:" (its label has none): the plain list
        (alone,) = tiny_model.title_lists([[HistoryEntry("Film 5", 4.0, item_id="5")]])
        assert isinstance(alone, TitleList) and alone.follow == (" Lately more",)
        assert ", ".join(hinted) in tiny_model.user_prompt(history).replace("; ", ", ")  # the prompt's own
        # hints looked up once by the caller (the service) go into both as given
        other = "Film Not Hinted"
        (given,) = tiny_model.title_lists([history], hints=[[other]])
        assert given.lists[1].titles == [other]
        prompt = tiny_model.user_prompt(history, hints=[other])
        assert other in prompt and not any(t in prompt for t in hinted)
        (none,) = tiny_model.title_lists([history], hints=[[]])
        assert isinstance(none, TitleList)
        (blank,) = tiny_model.title_lists([history], hints=[["", "  "]])  # nothing listable: as none
        assert isinstance(blank, TitleList) and " Picks:" not in blank.follow
        with pytest.raises(ValueError, match="1 hint lists for 2 histories"):
            tiny_model.title_lists([history, history], hints=[hinted])
        with pytest.raises(ValueError, match="hint_picks"):
            dataclasses.replace(prompts, cowatch_hints=1, hint_picks=2)
    finally:
        tiny_model.prompts, tiny_model.cowatch = prompts, cowatch


def test_a_model_trained_with_hindsight_may_write_its_guess_after_the_rated_list(tiny_model):
    import dataclasses

    history = [HistoryEntry(f"Film {i}", 4.0, item_id=str(i)) for i in range(3)]
    facts = [[ItemFacts(f"Film {i}", ("Drama",), "1990s") for i in range(3)]]  # nothing drifts
    prompts = tiny_model.prompts
    try:
        for hindsight, plain, still in (
            (False, (" Lately more",), ("",)),
            (True, (" Lately more", " Next:"), (" Next:",)),
        ):
            tiny_model.prompts = dataclasses.replace(prompts, hindsight=hindsight)
            (grammar,) = tiny_model.title_lists([history])
            assert grammar.follow == plain
            (held,) = tiny_model.title_lists([history], facts=facts)
            *_, rated, lately = held.lists
            assert rated.follow == still  # without a drift, only a stop or the guess
            assert (lately.trigger, lately.phrases) == (LATELY, [])  # and no "Lately more" anywhere
    finally:
        tiny_model.prompts = prompts


@pytest.mark.parametrize("seed", range(6))
def test_the_likes_sentence_names_only_genres_that_hold_then_a_rated_list(tiny_model, strings, seed):
    liked = liked_genres([(("Drama", "Sci-Fi"), 5.0), (("Action", "Crime"), 1.0), (("Comedy", "Crime"), 5.0)])
    # 5 each; Crime (6 in all) is rated 3 on average and Action 1, below the items' mean 3.67
    assert liked == ["Drama", "Sci-Fi", "Comedy"]
    grammar = TitleLists([PhraseChoice(likes_phrases(liked), strings, LIKES), TitleList(TITLES, strings)])
    written = _decode_under(grammar, strings, tiny_model.encode_text([LIKES])[0], seed)
    text = strings.decode(written)
    m = re.match(r"Likes (.+?)(?:, mostly|\.)$", text)
    assert m, text
    named = [g for part in m.group(1).split(", ") for g in part.split(" and ")]
    assert set(named) <= set(liked) and len(named) == len(set(named)) <= 3
    # what was written is a prefix the grammar kept; past its end nothing more is cached
    likes_grammar = grammar.lists[0]
    assert all(any(p.startswith(w) for p in likes_grammar.phrases) for w in likes_grammar._allowed)
    assert likes_grammar.allowed_after(f"{LIKES} Horror and Crime. Then more text") is None
    # the rated list after it is under its own grammar, whatever the Likes sentence was
    rated = _decode_under(grammar, strings, written + tiny_model.encode_text([f" 1990s. {RATED}"])[0], seed)
    assert _list_after(strings.decode(rated), RATED, TITLES)


def test_title_lists_take_the_genres_that_hold_when_given(tiny_model):
    history = [HistoryEntry(f"Film {i}", r) for i, r in enumerate([5.0, 1.0, 4.0, 2.0])]
    # Drama 9, Comedy 4, War 2, Horror 1; rated 4.5, 4, 2 and 1 on average against the items' 3
    genres = [("Drama",), ("Horror",), ("Comedy", "Drama"), ("War",)]
    facts = [ItemFacts(e.title, g, "1990s") for e, g in zip(history, genres, strict=True)]
    (grammar,) = tiny_model.title_lists([history], facts=[facts])
    likes, decades, rated, lately = grammar.lists
    assert (lately.trigger, lately.phrases) == (LATELY, [])  # four items: too few for a drift sentence
    assert isinstance(likes, PhraseChoice) and likes.trigger == LIKES
    assert " Drama and Comedy." in likes.phrases and " Comedy and Drama, mostly" in likes.phrases
    assert not any("Horror" in p or "War" in p for p in likes.phrases)  # not liked
    assert (decades.trigger, decades.phrases) == (MOSTLY, [" 1990s."])
    assert isinstance(rated, TitleList) and rated.titles == ["Film 0", "Film 2"]  # the 2 is below the mean
    assert rated.follow == ("",)  # nothing drifts: the text stops after the list
    # a cap of one: "Likes" may name only the heaviest genre that holds
    (capped,) = tiny_model.title_lists([history], facts=[facts], max_liked=1)
    assert capped.lists[0].phrases == [" Drama, mostly", " Drama."]
    with pytest.raises(ValueError, match="max_liked must be >= 1, got 0"):
        tiny_model.title_lists([history], facts=[facts], max_liked=0)
    # no years: the "Likes" sentence must close without ", mostly"
    (grammar,) = tiny_model.title_lists([history], facts=[[ItemFacts(f.title, f.genres) for f in facts]])
    assert all(p.endswith(".") for p in grammar.lists[0].phrases)
    # no genres in the window: neither "Likes" nor "Lately more" can hold, the list is as plain
    (bare,) = tiny_model.title_lists([history], facts=[[ItemFacts(e.title) for e in history]])
    likes, rated, lately = bare.lists
    assert (likes.trigger, likes.phrases, lately.trigger, lately.phrases) == (LIKES, [], LATELY, [])
    assert rated.titles == ["Film 0", "Film 2"] and rated.follow == ("",)
    # facts that do not line up: refused
    with pytest.raises(ValueError, match="one ItemFacts per history entry"):
        tiny_model.title_lists([history], facts=[facts[:2]])


def test_any_logits_write_a_text_whose_every_claim_holds(tiny_model, strings):
    # Drama and War early, Comedy lately (3 of the latest 5): "Lately more Comedy" may be said
    kinds = [("Drama", "War")] * 5 + [("Comedy",), ("Animation", "Comedy"), ("Drama",), ("Comedy",)]
    decades = ["1990s", "1940s", "1990s", "1970s", "1990s", "1990s", "1980s", "1990s", "1940s"]
    made = []
    for seed in range(8):
        rng = random.Random(seed)
        ratings = [rng.choice([1.0, 2.0, 3.0, 4.0, 5.0]) for _ in kinds]
        history = [HistoryEntry(f"Film {i}", r) for i, r in enumerate(ratings)]
        facts = [ItemFacts(e.title, g, d) for e, g, d in zip(history, kinds, decades, strict=True)]
        (grammar,) = tiny_model.title_lists([history], facts=[facts])
        # once "Likes" is written the grammars hold the text to its end: each sentence is
        # followed by one of the format's later ones that can hold, or a stop ("Likes ...,
        # mostly 1990s." is one stretch: the decades take over from ", mostly")
        text = strings.decode(_decode_under(grammar, strings, tiny_model.encode_text([LIKES])[0], seed))
        sentences = re.findall(r"(?:Likes|Rated highest:|Lately more) .*?\.(?= |$)", text)
        assert " ".join(sentences) == text, text  # nothing between or after them
        claims = check_claims(text, list(zip(facts, ratings, strict=True)))
        assert claims.wrong == () and claims.genres and claims.rated in (True, None), text
        assert claims.decades in (True, None) and claims.lately in (True, None), text
        made.append(claims)
    # the random logits took each way the grammars offer in some text: the decades, the list
    # and the drift, each said and left out
    for said in ("decades", "rated", "lately"):
        assert {getattr(c, said) for c in made} == {True, None}, said


def test_a_model_taught_the_format_writes_it_from_its_first_token(tiny_model, strings):
    """`taste_format`: before any sentence only the openings of those that can hold, or a stop;
    a window with nothing to say (no genres, no ratings, nothing drifts) stops at once. A model
    never taught the format (the untrained backbone) starts freely."""
    import dataclasses

    kinds = [("Drama", "War")] * 5 + [("Comedy",), ("Animation", "Comedy"), ("Drama",), ("Comedy",)]
    history = [HistoryEntry(f"Film {i}", float(1 + i % 5)) for i in range(len(kinds))]
    facts = [ItemFacts(e.title, g, "1990s") for e, g in zip(history, kinds, strict=True)]
    bare = [HistoryEntry(f"Film {i}") for i in range(4)]
    bare_facts = [ItemFacts(e.title) for e in bare]
    prompts = tiny_model.prompts
    try:
        (free,) = tiny_model.title_lists([history], facts=[facts])
        assert free.allowed([]) is None  # not taught: the start is the model's
        tiny_model.prompts = dataclasses.replace(prompts, taste_format=True)
        (grammar,) = tiny_model.title_lists([history], facts=[facts])
        for seed in range(6):
            text = strings.decode(_decode_under(grammar, strings, [], seed))
            sentences = re.findall(r"(?:Likes|Rated highest:|Lately more) .*?\.(?= |$)", text)
            assert " ".join(sentences) == text, text
            assert check_claims(text, list(zip(facts, [e.rating for e in history], strict=True))).wrong == ()
        for text in ("Latelymore Drama.", "I think Likes Drama.", " Likes Drama."):
            assert not _admits(grammar, strings, tiny_model.encode_text([text])[0]), text
        (silent,) = tiny_model.title_lists([bare], facts=[bare_facts])
        assert sorted(silent.allowed([])) == sorted(tiny_model.token_strings().stops)  # nothing holds: stop
    finally:
        tiny_model.prompts = prompts


def test_a_trigger_inside_a_listed_title_stays_part_of_the_title(tiny_model, strings):
    # ", mostly" is the decades' trigger, and here part of a title the rated list is writing
    title = "Sometimes, mostly Harmless"
    grammar = TitleLists(
        [
            PhraseChoice(likes_phrases(["Drama"]), strings, LIKES),
            PhraseChoice([" 1990s."], strings, MOSTLY),
            TitleList(["Heat", title], strings),
        ]
    )
    written = tiny_model.encode_text([f"{LIKES} Drama. {RATED} Sometimes, mostly"])[0]
    allowed = grammar.allowed(written)
    assert allowed and all(" Harmless.; ".startswith(strings.decode([i])) for i in allowed)


def test_the_list_closes_on_a_bare_full_stop_where_its_follow_is_checked(strings):
    # a vocabulary with ".\n" as one token (SmolLM2 has none; many sentencepiece ones do): closing
    # on it would put the text past the check of what may follow the list ("\nLately more ...")
    fake = copy.copy(strings)
    fake.closing = [*strings.period, 10**6]
    for follow in ("", " Lately more"):
        allowed = TitleList(["Heat"], fake, follow=follow).allowed_after(f"{RATED} Heat")
        assert set(strings.period) <= set(allowed) and 10**6 not in allowed
    assert 10**6 in TitleList(["Heat"], fake, follow=()).allowed_after(f"{RATED} Heat")  # anything may follow


def test_where_nothing_may_come_after_the_list_decoding_is_left_free(tiny_model):
    # no stop token and no next sentence: an empty allowed set would mask every token of the row
    strings = TokenStrings(tiny_model.tokenizer, stop_ids=[])
    assert TitleList(["Heat"], strings, follow="").allowed_after(f"{RATED} Heat.") is None
    assert TitleList(["Heat"], tiny_model.token_strings(), follow="").allowed_after(f"{RATED} Heat.")


def _admits(grammar, strings: TokenStrings, ids: list[int]) -> bool:
    """Whether scripted logits that want `ids`, one token after another, get them all under
    `grammar` (whatever form its `allowed` takes)."""
    vocab = len(strings.tokenizer)
    for k, token in enumerate(ids):
        logits = torch.zeros(1, vocab)
        logits[0, token] = 1.0
        if int(constrain_logits(logits, [grammar.allowed(ids[:k])]).argmax()) != token:
            return False
    return True


def _spellings(tiny_model, strings: TokenStrings, text: str) -> list[list[int]]:
    """`text` as the tokenizer writes it, and one character a token (where the vocabulary has
    each): the claim may not be reachable by either path."""
    single = [strings.by_text.get(ch, [None])[0] for ch in text]
    return [tiny_model.encode_text([text])[0], *([single] if None not in single else [])]


def test_where_nothing_drifts_no_lately_more_can_be_written_anywhere(tiny_model, strings):
    # seven Drama items: nothing drifts. Before, only the rated list's grammar kept the sentence
    # out, so a text that skipped the list (or wrote the hindsight guess) could still say it
    import dataclasses

    history = [HistoryEntry(f"Film {i}", r) for i, r in enumerate([5.0, 4.0, 3.0, 5.0, 2.0, 4.0, 3.0])]
    facts = [ItemFacts(e.title, ("Drama",), "1990s") for e in history]
    unrated = [HistoryEntry(e.title) for e in history]
    prompts = tiny_model.prompts
    try:
        tiny_model.prompts = dataclasses.replace(prompts, hindsight=True)
        for h in (history, unrated):  # a window without ratings too
            (grammar,) = tiny_model.title_lists([h], facts=[facts])
            for text in (
                "Likes Drama. Lately more Horror.",  # the rated list skipped
                "Lately more Drama.",
                f"Likes Drama. {RATED} Film 0. Next: a 1990s Drama movie. Lately more Horror.",
            ):
                claims = check_claims(text, list(zip(facts, [e.rating for e in h], strict=True)))
                assert claims.lately is False  # what the grammar must keep from being written
                for ids in _spellings(tiny_model, strings, text):
                    assert not _admits(grammar, strings, ids), text
            # text that only looks like the trigger is free where nothing was said yet; after a
            # sentence, only the format's next ones (here the list, where rated) may come
            for text in ("Lately, more Drama.", "Lately moving on."):
                assert _admits(grammar, strings, tiny_model.encode_text([text])[0]), text
            for text in ("Likes Drama. Lately, more Drama.", "Likes Drama. Lately moving on."):
                assert not _admits(grammar, strings, tiny_model.encode_text([text])[0]), text
            listed = tiny_model.encode_text([f"Likes Drama. {RATED} Film 0."])[0]
            assert _admits(grammar, strings, listed) == (h is history)  # unrated: no rated list
    finally:
        tiny_model.prompts = prompts
    # where a genre drifts, its sentence is written as before
    kinds = [("Drama",)] * 5 + [("Comedy",)] * 3
    drifting = [ItemFacts(f"Film {i}", g, "1990s") for i, g in enumerate(kinds)]
    (grammar,) = tiny_model.title_lists([[HistoryEntry(f.title, 4.0) for f in drifting]], facts=[drifting])
    assert _admits(grammar, strings, tiny_model.encode_text(["Likes Drama. Lately more Comedy."])[0])
    assert not _admits(grammar, strings, tiny_model.encode_text(["Likes Drama. Lately more Drama."])[0])


def test_a_window_without_genres_cannot_start_the_likes_sentence(tiny_model, strings):
    # items without genres: no "Likes" phrase holds. Before, no grammar was built for the
    # sentence and "Likes Horror" was free (with years, ", mostly" still took over after it)
    history = [HistoryEntry(f"Film {i}", r) for i, r in enumerate([5.0, 4.0, 3.0])]
    for decade in ("1990s", None):
        facts = [ItemFacts(e.title, (), decade) for e in history]
        (grammar,) = tiny_model.title_lists([history], facts=[facts])
        text = "Likes Horror, mostly 1990s." if decade else "Likes Horror."
        assert check_claims(text, list(zip(facts, [e.rating for e in history], strict=True))).genres is False
        for ids in _spellings(tiny_model, strings, text):
            assert not _admits(grammar, strings, ids), text
        assert _admits(grammar, strings, tiny_model.encode_text([f"Liked it. {RATED} Film 0."])[0])


def test_an_empty_claim_bans_exactly_the_tokens_that_would_write_its_trigger(tiny_model, smol):
    # a claim nothing holds for: its grammar has no phrase, so the trigger itself is banned
    # where the text is free, and no other token: a token is banned iff the text with it holds
    # the trigger (none of these tails does)
    for strings in (TokenStrings(tiny_model.tokenizer), smol):
        texts = {i: strings.decode([i]) for ids in strings.by_text.values() for i in ids}
        for trigger in (LATELY, LIKES):
            grammar = PhraseChoice([], strings, trigger)
            for tail in ("", "Heat; Fargo. ", "Drama. L", "Drama. Lately", "Drama. Lately mo", "Drama. Like"):
                allowed = grammar.allowed_after(tail)
                banned = set(allowed.ids) if allowed is not None else set()
                assert banned == {i for i, t in texts.items() if trigger in tail + t}, (trigger, tail)
            assert grammar.empty and TitleLists([grammar]).allowed([]) == grammar.allowed([])
    # only the banned tokens are masked
    logits = torch.zeros(2, 5)
    out = constrain_logits(logits, [Banned((1, 3)), None])
    assert out[0].tolist() == [0.0, float("-inf"), 0.0, float("-inf"), 0.0] and out[1].tolist() == [0.0] * 5


def test_a_window_of_blank_titles_cannot_start_the_rated_list(tiny_model, strings):
    # nothing can be listed: before, the list after "Rated highest:" was free
    history = [HistoryEntry(" ", 5.0), HistoryEntry("", 4.0)]
    (grammar,) = tiny_model.title_lists([history])
    for ids in _spellings(tiny_model, strings, f"Liked these. {RATED} Heat."):
        assert not _admits(grammar, strings, ids)
    assert _admits(grammar, strings, tiny_model.encode_text(["Liked these. Rated them."])[0])
    assert isinstance(grammar, TitleList) and grammar.empty
    assert not TitleList([], strings, trigger="").empty  # a list with no trigger is left free
    assert TitleList([], strings, trigger="").allowed_after("Heat") is None


def test_engine_and_hf_decode_a_banned_trigger_alike(tiny_model):
    # a ban ("e" may not be written) goes through both backends' masking
    strings = tiny_model.token_strings()
    histories = [[HistoryEntry("Toy Story", 5.0)], [HistoryEntry("Star Wars", 5.0), HistoryEntry("Heat")]]
    grammars = [TitleLists([PhraseChoice([], strings, "e")])] * 2
    prompts = tiny_model.user_prompt_ids(histories)
    settings = GenerationSettings(max_new_tokens=16)
    ref, _ = HFBackend(tiny_model).generate(prompts, settings, grammars)
    got, _ = EngineBackend(tiny_model, slots=2).generate(prompts, settings, grammars)
    assert got.completion_ids == ref.completion_ids
    assert not any("e" in text for text in got.texts)
    free, _ = EngineBackend(tiny_model, slots=2).generate(prompts, settings)
    assert any("e" in text for text in free.texts)  # the random model left alone writes one


def test_a_title_holding_the_trigger_is_listed_once_not_restarted(smol):
    trap = f"{RATED} A Trap"  # a title that holds the list's own trigger
    constraint = TitleList([trap, "Heat"], smol)
    inside = smol.tokenizer(f"Likes Drama. {RATED} {RATED}", add_special_tokens=False)["input_ids"]
    # the trigger inside the title is part of it: what may follow is the rest of the title
    assert all(" A Trap".startswith(smol.decode([i])) for i in constraint.allowed(inside))
    assert trap in _lists_under_random_logits(smol, [trap, "Heat"], seeds=8)
