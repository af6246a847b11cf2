"""Text-quality numbers on texts whose answers are counted by hand."""

import pytest

from model.rationale import Claims
from model.text_quality import (
    distinct_n,
    has_loop,
    named_titles,
    normalize_title,
    text_quality,
    unknown_titles,
)

CATALOG = ["Star Wars", "Godfather, The", "Heat", "Amélie"]


def test_distinct_2_counts_unique_bigrams_over_all_texts():
    # bigrams: (a b) (b c) | (a b) (b d) -> 3 distinct of 4
    assert distinct_n(["a b c", "a b d"], 2) == 0.75
    assert distinct_n([], 2) == 0.0


def test_loop_needs_a_4gram_three_times():
    assert has_loop("to the three to the three to the three to the three")
    assert not has_loop("to the three to the three and something else")  # 4-grams at most twice


def test_a_catalog_title_with_repeated_words_is_no_loop():
    """A real title "The Very Very ... Long Title" made every text listing it a loop (7.5% of
    one catalog's texts, none of which looped)."""
    long = "The " + "Very " * 12 + "Long Title"
    text = f"Likes Drama. Rated highest: {long}; Heat."
    catalog = {normalize_title(t) for t in [long, "Heat"]}
    assert has_loop(text) and not has_loop(text, catalog=catalog)
    assert text_quality([text], [long, "Heat"]).loop_share == 0.0
    # an entry the catalog lacks still counts, and so does a loop outside the lists
    assert has_loop("Rated highest: " + "Very " * 12 + "Title; Heat.", catalog=catalog)
    assert has_loop("to the three " * 4 + f"Rated highest: {long}.", catalog=catalog)


def test_titles_are_normalised_like_movielens():
    assert normalize_title("Godfather, The (1972)") == "the godfather"
    assert normalize_title("AMÉLIE") == "amelie"


def test_titles_in_other_scripts_keep_the_marks_that_are_part_of_their_letters():
    """Every combining mark was dropped: "हिन्दी फ़िल्म" became "ह नद फ लम", and パン屋 (bakery) and
    バン屋 (van shop) were one title, so an invented one beside a real one counted as known. Latin,
    Greek and Cyrillic accents, case and width are still folded."""
    assert normalize_title("हिन्दी फ़िल्म").split() == ["हिन्दी", normalize_title("फ़िल्म")]
    assert normalize_title("ฉลาดเกมส์โกง") == "ฉลาดเกมส์โกง"
    assert normalize_title("パン屋の物語") != normalize_title("バン屋の物語")
    assert normalize_title("ｶﾞﾝﾀﾞﾑ") == normalize_title("ガンダム")
    assert (normalize_title("ＡＢＣ"), normalize_title("Ελληνικά")) == ("abc", "ελληνικα")
    assert unknown_titles("Rated highest: バン屋の物語.", {normalize_title("パン屋の物語")}) == [
        "バン屋の物語"
    ]


def test_named_titles_quoted_and_with_year():
    assert named_titles('You liked "Heat" and Star Wars (1977).') == ["Heat", "Star Wars"]


def test_rationale_lists_are_read_title_by_title():
    text = "Likes Drama. Rated highest: Mr. Holland's Opus; Godfather, The; Cats and Dogs. Next: a movie."
    assert named_titles(text) == ["Mr. Holland's Opus", "Godfather, The", "Cats and Dogs"]
    q = text_quality([text], [*CATALOG, "Mr. Holland's Opus"])
    assert q.unknown_title_share == 1.0  # "Cats and Dogs" is not in the catalog
    # the list that ends a model trained with `rationale_hint_picks`, right after the first
    picks = "Rated highest: Godfather, The; Mr. Holland's Opus. Picks: Heat; Cats and Dogs."
    assert named_titles(picks) == ["Godfather, The", "Mr. Holland's Opus", "Heat", "Cats and Dogs"]
    assert text_quality([picks], [*CATALOG, "Mr. Holland's Opus"]).unknown_title_examples[0]["unknown"] == [
        "Cats and Dogs"
    ]


def test_a_listed_title_holding_the_separator_is_one_title():
    catalog = {normalize_title(t) for t in ["Love; Death", "Heat", "Love"]}
    text = "Rated highest: Love; Death; Heat. Lately more Drama."
    assert named_titles(text, catalog) == ["Love; Death", "Heat"]
    assert unknown_titles(text, catalog) == []
    # a piece the catalog has alone stays alone where the join is not a title
    assert named_titles("Rated highest: Love; Heat.", catalog) == ["Love", "Heat"]
    assert unknown_titles("Rated highest: Death; Heat.", catalog) == ["Death"]
    # quotes or a year inside a listed title are part of it, not a title of their own
    best = 'The "Best" Film Ever'
    with_best = catalog | {normalize_title(best)}
    assert named_titles(f"Rated highest: {best}; Heat (1995).", with_best) == [best, "Heat (1995)"]
    assert named_titles(f'You liked "Heat". Rated highest: {best}.', with_best) == ["Heat", best]
    # in an entry that is no catalog title they name titles of their own, which are checked
    for text in ["Rated highest: Fake Film (1999) and Heat.", 'Rated highest: "Fake Film" and Heat.']:
        assert unknown_titles(text, catalog) == ["Fake Film"], text
    assert unknown_titles("Rated highest: Fake Film (1999); Heat.", catalog) == ["Fake Film"]  # once


def test_quality_flags_unknown_titles_and_loops():
    texts = [
        'You liked "The Godfather" and Heat (1995).',  # both in the catalog
        'Try "Blade Runner 9".',  # not in the catalog
        "drama drama drama drama drama drama",  # a loop
        "Then Star Wars (1977) fits.",  # "Then" is sentence text before the title
    ]
    q = text_quality(texts, CATALOG)
    assert q.texts == 4
    assert q.unknown_title_share == 0.25
    assert q.loop_share == 0.25


def test_titles_of_any_script_are_compared_not_folded_away():
    assert normalize_title("Amélie") == normalize_title("Amelie") == "amelie"
    assert normalize_title("七人の侍") == "七人の侍" != normalize_title("千と千尋の神隠し")
    assert unknown_titles(
        "Rated highest: 完全に架空の映画; Heat.", {normalize_title(t) for t in ["七人の侍", "Heat"]}
    ) == ["完全に架空の映画"]


def test_cut_share_counts_the_texts_that_ran_into_the_token_budget():
    texts = ["Likes Drama.", "Likes Drama, Comedy and", "Likes War."]
    assert text_quality(texts, CATALOG).cut_share is None  # not known
    assert text_quality(texts, CATALOG, cut=[False, True, False]).cut_share == pytest.approx(1 / 3, abs=1e-4)
    with pytest.raises(ValueError, match="one per text"):
        text_quality(texts, CATALOG, cut=[True])


def test_a_text_without_a_word_is_empty():
    texts = ["", "  ", "!!!! ...", "Likes Drama.", "Heat"]
    assert text_quality(texts, CATALOG).empty_share == 0.6
    assert text_quality(["Likes Drama."], CATALOG).empty_share == 0.0


def test_flagged_texts_are_kept_with_the_titles_that_flagged_them():
    texts = ['You liked "Heat".', 'You liked "Heatt".', "Rated highest: Star Warz; Heat.", "No titles."]
    q = text_quality(texts, CATALOG, examples=1)
    assert q.unknown_title_share == 0.5
    assert q.unknown_title_examples == [{"text": 'You liked "Heatt".', "unknown": ["Heatt"]}]
    assert len(text_quality(texts, CATALOG).unknown_title_examples) == 2


def test_claim_shares_count_only_the_texts_that_make_each_claim():
    texts = ["a", "b", "c", "d"]
    claims = [
        Claims(genres=True, rated=False, wrong=("Heat",)),
        Claims(genres=False, rated=None, wrong=("Horror",)),
        Claims(genres=True, rated=True),
        Claims(genres=None, rated=None),
    ]
    q = text_quality(texts, CATALOG, claims=claims, examples=1)
    assert (q.genres_hold_share, q.genres_claims) == (round(2 / 3, 4), 3)
    assert (q.rated_hold_share, q.rated_claims) == (0.5, 2)
    assert q.wrong_claim_examples == [{"text": "a", "wrong": ["Heat"]}]
    # all kinds together: 5 claims made (3 genres, 2 rated), 3 of them hold
    assert (q.claims_hold_share, q.claims) == (0.6, 5)
    plain = text_quality(texts, CATALOG)
    assert plain.genres_hold_share is None and plain.rated_claims is None
    assert plain.claims_hold_share is None and plain.claims is None
    made_none = text_quality(texts[3:], CATALOG, claims=claims[3:])
    assert (made_none.claims_hold_share, made_none.claims) == (None, 0)
    with pytest.raises(ValueError, match="one per text"):
        text_quality(texts, CATALOG, claims=claims[:2])
