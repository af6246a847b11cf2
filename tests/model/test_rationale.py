"""Rationales from the data alone, checked against hand-written texts."""

import random

from model.rationale import (
    LIKES,
    RATED,
    Claims,
    ItemFacts,
    build_rationale,
    catalog_facts,
    check_claims,
    decade_phrases,
    drifting_genres,
    liked_genres,
    likes_phrases,
    next_line,
    rated_highest,
    rationale_parts,
    taste_lines,
)

ITEMS = [
    {"item_id": "1", "title": "Heat", "year": "1995", "genres": "Action, Crime, Thriller"},
    {"item_id": "2", "title": "Fargo", "year": "1996", "genres": "Crime, Drama, Thriller"},
    {"item_id": "3", "title": "Casablanca", "year": "1942", "genres": "Drama, Romance, War"},
    {"item_id": "4", "title": "Toy Story", "year": "1995", "genres": "Animation, Children's, Comedy"},
    {"item_id": "5", "title": "Nameless", "year": "", "genres": ""},
    {"item_id": "6", "title": "Alien", "year": "1979", "genres": "Horror, Sci-Fi"},
]
FACTS = catalog_facts(ITEMS)


def test_facts_read_genres_and_decade():
    assert FACTS["1"] == ItemFacts("Heat", ("Action", "Crime", "Thriller"), "1990s")
    assert FACTS["5"] == ItemFacts("Nameless", (), None)


def test_taste_weights_genres_and_eras_by_rating():
    # Crime 5+4=9, Thriller 9, Drama 4+2=6, Action 5; 1990s 9 of 11 -> "mostly 1990s". The
    # items' mean rating is 3.67: Drama (3 on average), Romance and War (2) are not liked, and
    # Casablanca (2) is not among the highest rated, though it is the third of three
    lines = taste_lines([(FACTS["1"], 5.0), (FACTS["2"], 4.0), (FACTS["3"], 2.0)])
    assert lines[0] == "Likes Crime, Thriller and Action, mostly 1990s."
    assert lines[1] == "Rated highest: Heat; Fargo."
    # a 5-star drama beside two 1-star thrillers: Thriller and Crime (1 on average, the items
    # 2.33) are not liked, and neither thriller is rated highest
    fargo, heat = (FACTS["2"], 1.0), (FACTS["1"], 1.0)
    lines = taste_lines([(FACTS["3"], 5.0), fargo, heat])
    assert lines[0].startswith("Likes Drama, Romance and War,") and lines[1] == "Rated highest: Casablanca."
    three = [(FACTS["3"].genres, 5.0), (fargo[0].genres, 1.0), (heat[0].genres, 1.0)]
    assert liked_genres(three) == ["Drama", "Romance", "War"]


def test_drift_names_a_genre_the_latest_items_lean_to():
    old = [(FACTS["3"], 4.0)] * 5  # Drama/Romance/War
    new = [(FACTS["4"], 4.0)] * 3  # Animation: 3/5 lately vs 3/8 overall -> lift 0.225
    assert "Lately more Animation." in taste_lines(old + new)
    assert not any(line.startswith("Lately") for line in taste_lines(old))


def test_next_line_is_hindsight_without_the_title():
    assert next_line(FACTS["2"], "movie") == "Next: a 1990s Crime, Drama, Thriller movie."
    assert next_line(FACTS["5"], "movie") == "Next: another movie like these."


def test_rationale_names_only_catalog_titles_and_genres():
    text = build_rationale(["1", "2", "3"], [5.0, 4.0, None], "4", FACTS)
    assert text.endswith("Next: a 1990s Animation, Children's, Comedy movie.")
    assert "Toy Story" not in text  # the target's title never leaks
    catalog_words = {w for it in ITEMS for f in ("title", "genres") for w in it[f].replace(",", " ").split()}
    named = text.split("Rated highest: ")[1].split(".")[0].split("; ")
    assert set(named) <= {it["title"] for it in ITEMS}
    assert {"Crime", "Thriller"} <= catalog_words


def test_rationale_without_hindsight_is_a_function_of_the_history_alone():
    head, tail = rationale_parts(["1", "2", "3"], [5.0, 4.0, None], "4", FACTS, hindsight=False)
    assert tail == ""
    assert "Next:" not in head and head.startswith("Likes ")
    # another target, the same text: nothing about the next item leaks into the label
    assert rationale_parts(["1", "2", "3"], [5.0, 4.0, None], "2", FACTS, hindsight=False)[0] == head


def test_claims_of_a_data_built_rationale_always_hold():
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.choice("123456") for _ in range(rng.randint(1, 10))]
        ratings = [rng.choice([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, None]) for _ in ids]
        history = [(FACTS[i], r) for i, r in zip(ids, ratings, strict=True)]
        text = " ".join(taste_lines(history))
        claims = check_claims(text, history)
        assert claims.wrong == ()
        # and the grammars inference decodes the sentences under allow them as written
        if text.startswith(LIKES):
            phrases = likes_phrases(liked_genres([(f.genres, r) for f, r in history]))
            assert any(text[len(LIKES) :].startswith(p) for p in phrases)
        if ", mostly" in text:
            said = text.split(", mostly", 1)[1].split(".")[0] + "."
            assert said in decade_phrases([(f.decade, r) for f, r in history])
        if "Lately more" in text:
            drift = drifting_genres([f.genres for f, _ in history])
            assert text.split("Lately more ")[1].rstrip(".") == drift[0]
        assert all(c in (True, None) for c in (claims.genres, claims.decades, claims.rated, claims.lately))


def test_claims_that_do_not_hold_are_named():
    # Crime 9, Thriller 9, Drama 6 lead; Heat 5, Fargo 4, Casablanca 2 and Toy Story 1 rated
    history = [(FACTS["1"], 5.0), (FACTS["2"], 4.0), (FACTS["3"], 2.0), (FACTS["4"], 1.0)]
    text = "Likes Crime, Comedy and Horror, mostly 1990s. Rated highest: Heat; Toy Story. Lately more Drama."
    claims = check_claims(text, history)
    assert (claims.genres, claims.decades, claims.rated, claims.lately) == (False, True, False, False)
    # four items are too few for a drift (the latest 5 against the whole history)
    assert claims.wrong == ("Comedy", "Horror", "Toy Story", "Lately more Drama")
    # the third-rated title does not: its 2 is below the history's mean (3); case is folded
    assert check_claims("Rated highest: fargo; Heat.", history).rated is True
    assert check_claims("Rated highest: casablanca; Heat.", history).wrong == ("casablanca",)
    assert check_claims("Rated highest: Alien.", history).wrong == ("Alien",)
    # a title with a full stop inside is read whole up to the next sentence
    mr = ItemFacts("Mr. Holland's Opus", ("Drama",), "1990s")
    assert check_claims("Rated highest: Mr. Holland's Opus. Lately more Drama.", [(mr, 5.0)]).rated is True


def test_a_text_without_the_claims_checks_nothing():
    claims = check_claims("I'm sorry, as a chatbot I cannot browse your history.", [(FACTS["1"], 5.0)])
    assert claims == Claims(genres=None, rated=None, decades=None, lately=None, wrong=())


def test_rated_highest_keeps_every_title_tied_at_the_bar():
    history = [("A", 3.0), ("B", 5.0), ("C", 4.0), ("D", 4.0), ("E", 2.0), ("B", 1.0)]
    assert rated_highest(history) == ["B", "C", "D"]  # 5, then 4 and 4 tie for the third place
    assert rated_highest([*history, ("F", 4.0)]) == ["B", "C", "D", "F"]
    # 5, 1, 1: the two 1s tie for the third place but are below the mean (2.33)
    assert rated_highest([("A", 5.0), ("B", 1.0), ("C", 1.0)]) == ["A"]
    assert rated_highest([("A", 2.0), ("B", 2.0)]) == ["A", "B"]  # every rating equal: all
    # no ratings, nothing rated highest: the grammar forbids the sentence, and one written
    # anyway (decoded freely) is false; a blank title is never a candidate
    assert rated_highest([("A", None), ("B", float("nan"))]) == []
    assert check_claims("Rated highest: Heat.", [(FACTS["1"], None)]).wrong == ("Heat",)
    assert rated_highest([("", 5.0), ("A", 3.0)]) == ["A"]


def test_claims_are_read_by_the_names_the_history_has():
    la = ItemFacts("L.A. Confidential", ("Crime", "Film-Noir"), "1990s")
    home = ItemFacts("Home", ("Health and Household",), None)
    history = [(la, 5.0), (FACTS["1"], 4.0), (FACTS["2"], 3.0), (home, 1.0), (FACTS["4"], 1.0)]
    # a title with a ". " inside, a list followed by a sentence of another kind
    assert check_claims("Rated highest: L.A. Confidential; Heat. Also Drama.", history).rated is True
    # a genre whose name holds " and " is one genre (here below the bar: named whole)
    claims = check_claims("Likes Crime and Health and Household, mostly 1990s.", history)
    assert (claims.genres, claims.wrong) == (False, ("Health and Household",))
    # a list the token budget cut before its "." is not counted either way
    assert check_claims("Likes Crime. Rated highest: L.A. Confidential; He", history).rated is None
    assert check_claims("Likes Crime, Thri", history).genres is None


def test_a_genre_named_like_two_that_hold_reads_as_the_two_the_grammar_allows():
    action = ItemFacts("A", ("Action", "Adventure"), "1990s")
    both = ItemFacts("B", ("Action and Adventure",), "1990s")
    history = [(action, 5.0), (action, 5.0), (both, 1.0), (FACTS["4"], 1.0)]
    # liked: Action and Adventure (10 each), then the ties at 1; the grammar's phrase "Action and
    # Adventure." names the two, though the longest known name is the third genre
    assert check_claims("Likes Action and Adventure.", history).genres is True


def test_the_decades_hold_when_they_carry_the_rating_weight():
    # 1990s 5 + 4 = 9 of 11, 1940s 2: "mostly 1990s", or the two in either order
    history = [("1990s", 5.0), ("1990s", 4.0), ("1940s", 2.0), (None, 5.0)]
    assert decade_phrases(history) == [" 1990s.", " 1990s and 1940s.", " 1940s and 1990s."]
    # no decade has half: only the pairs of the two heaviest (1970s ties 1940s for second)
    spread = [("1990s", 4.0), ("1940s", 3.0), ("1970s", 3.0), ("1950s", 1.0)]
    assert " 1990s." not in decade_phrases(spread) and " 1970s and 1990s." in decade_phrases(spread)
    assert " 1950s and 1990s." not in decade_phrases(spread)
    assert " 1940s and 1970s." not in decade_phrases(spread)  # a pair leaving out the heaviest
    # two tied for the heaviest: the pair of them; every rating 0: each item counts once
    assert decade_phrases([("1990s", 4.0), ("1940s", 4.0), ("1970s", 3.0)]) == [
        " 1990s and 1940s.",
        " 1940s and 1990s.",
    ]
    assert decade_phrases([("1990s", 0.0), ("1990s", 0.0), ("1940s", 0.0)]) == [
        " 1990s.",
        " 1990s and 1940s.",
        " 1940s and 1990s.",
    ]
    assert taste_lines([(FACTS["1"], 0.0), (FACTS["3"], 0.0)])[0].endswith("mostly 1990s.")
    # the genres too: rated 0 throughout, the most frequent hold (Crime and Thriller twice, Drama
    # twice, Action once: not every genre tied at 0)
    zero = [(FACTS["1"], 0.0), (FACTS["2"], 0.0), (FACTS["3"], 0.0)]
    assert liked_genres([(f.genres, r) for f, r in zero]) == ["Crime", "Thriller", "Drama"]
    assert decade_phrases([("1980s", 1.0)]) == [" 1980s."] and decade_phrases([(None, 5.0)]) == []
    facts = [(FACTS["1"], 5.0), (FACTS["2"], 4.0), (FACTS["3"], 2.0)]  # 1990s 9, 1940s 2
    claims = check_claims("Likes Crime, mostly 1940s. Rated highest: Heat.", facts)
    assert (claims.genres, claims.decades, claims.wrong) == (True, False, ("mostly 1940s",))
    assert check_claims("Likes Crime, mostly 1940s and 1990s.", facts).decades is True
    assert check_claims("Likes Crime, mostly 19", facts).decades is None  # cut by the budget


def test_a_title_listed_under_two_ids_is_rated_highest_once():
    # ml-100k lists some films twice under two ids; the grammar writes each title once
    facts = {
        str(i): ItemFacts(t, ("Drama",), "1990s")
        for i, t in enumerate(["Casablanca", "I.Q.", "Casablanca", "Heat", "Toy Story"])
    }
    rated = (("0", 5.0), ("1", 4.0), ("2", 4.5), ("3", 3.5), ("4", 1.0))  # mean of the titles' 3.375
    lines = taste_lines([(facts[i], r) for i, r in rated])
    assert f"{RATED} Casablanca; I.Q.; Heat." in lines


def test_a_drift_of_exactly_the_threshold_counts():
    # 3 of the latest 5 against 4 of 10: a lift of 0.6 - 0.4, which float subtraction puts a
    # hair under 0.2
    genres = [("X",) if i in (0, 6, 7, 8) else ("Y",) for i in range(10)]
    assert 0.6 - 0.4 < 0.2 and drifting_genres(genres) == ["X"]


def test_the_drift_holds_for_a_genre_the_latest_items_lean_to():
    genres = [("Drama", "War")] * 5 + [("Animation", "Comedy")] * 2 + [("Drama",), ("Comedy",)]
    # lately (last 5): Drama 2, Comedy 3, Animation 2, War 1; Comedy 3/5 - 3/9 = 0.27, Animation
    # 2/5 - 2/9 = 0.18 (< 0.2), Drama 2/5 - 6/9 < 0
    assert drifting_genres(genres) == ["Comedy"]
    assert drifting_genres(genres[:5]) == []  # no more items than the window of "lately"
    history = [(ItemFacts(f"T{i}", g, "1990s"), 4.0) for i, g in enumerate(genres)]
    assert check_claims("Lately more Comedy.", history).lately is True
    claims = check_claims("Rated highest: T8. Lately more Drama.", history)
    assert (claims.rated, claims.lately, claims.wrong) == (True, False, ("Lately more Drama",))


def test_each_sentence_is_read_after_the_one_before_it():
    # a title holding the next sentence's opening is a title, not a drift claim
    rain = ItemFacts("Lately more Rain", ("Drama",), "1990s")
    history = [(rain, 5.0), (FACTS["1"], 5.0), (FACTS["2"], 5.0)]
    claims = check_claims("Rated highest: Lately more Rain; Heat; Fargo.", history)
    assert (claims.rated, claims.lately, claims.wrong) == (True, None, ())
    # nor is one in a list the token budget cut
    assert check_claims("Rated highest: Heat; Lately more Rain", history).lately is None
    # a genre that starts like the rated list's opening, written before it
    odd = ItemFacts("Odd", ("Rated highest: picks",), None)
    claims = check_claims("Likes Rated highest: picks. Rated highest: Odd.", [(odd, 5.0)])
    assert (claims.genres, claims.rated) == (True, True)


def test_a_history_with_genres_always_likes_one():
    # 5 {X}, 5 {Y}, 0 {X, Y}: both genres average 2.5, below the items' 3.33; the (item, genre)
    # pairs' mean (2.5) is the fallback, which the best genre always reaches
    history = [(("X",), 5.0), (("Y",), 5.0), (("X", "Y"), 0.0)]
    assert liked_genres(history) == ["X", "Y"]
    facts = [(ItemFacts(f"T{i}", g, "1990s"), r) for i, (g, r) in enumerate(history)]
    assert taste_lines(facts)[0] == "Likes X and Y, mostly 1990s."


def test_every_data_built_label_holds_under_the_checker():
    """What training teaches is what inference allows: random histories (ties, fractional and
    missing ratings, blank titles, titles twice, items without genres or years) give labels
    whose every claim the checker finds true."""
    rng = random.Random(0)
    genres = ["Drama", "Comedy", "Horror", "War", "Sci-Fi"]
    for _ in range(400):
        history = []
        for _ in range(rng.randint(1, 10)):
            title = rng.choice(["", "A", "B", "C", "D", "E", "F", "G"])
            item = ItemFacts(
                title, tuple(rng.sample(genres, rng.randint(0, 3))), rng.choice([None, "1990s", "1970s"])
            )
            history.append((item, rng.choice([None, float("nan"), 0.0, 1.0, 2.5, 3.0, 4.0, 5.0, 10.0])))
        text = " ".join(taste_lines(history))
        claims = check_claims(text, history)
        assert claims.wrong == (), (text, history)


def test_canonically_equivalent_titles_and_genres_are_one():
    """NFC and NFD "Amélie" (e + U+0301) are one title to a reader: a catalog that held both
    read "Rated highest: Amélie; Amélie." and "Likes Comédie and Comédie"."""
    import unicodedata

    nfd = unicodedata.normalize("NFD", "Amélie")
    a = ItemFacts("Amélie", ("Comédie",), "2000s")
    b = ItemFacts.from_row({"title": nfd, "genres": unicodedata.normalize("NFD", "Comédie"), "year": "2001"})
    assert b.genres == ("Comédie",)
    history = [(a, 5.0), (b, 5.0), (FACTS["1"], 2.0)]
    assert rated_highest([(f.title, r) for f, r in history]) == ["Amélie"]
    lines = taste_lines(history)
    assert "Rated highest: Amélie." in lines and lines[0].startswith("Likes Comédie, ")
    assert liked_genres([(f.genres, r) for f, r in history]) == ["Comédie"]
    assert check_claims(f"Rated highest: {nfd}.", history).rated is True


def test_a_listed_title_is_the_one_it_spells_before_one_it_folds_to():
    """A title "Heat" rated 1 beside "HEAT" rated 5 held as "Rated highest": the checker folded
    case (and width: "ABC" beside "ＡＢＣ"); a title spelled exactly is that title. A fold still
    finds a title no other folds to ("fargo")."""
    heat, loud = ItemFacts("Heat"), ItemFacts("HEAT")
    abc, wide = ItemFacts("ABC"), ItemFacts("ＡＢＣ")
    history = [(loud, 5.0), (heat, 1.0), (FACTS["2"], 4.0), (wide, 5.0), (abc, 1.0)]
    assert check_claims("Rated highest: HEAT.", history).rated is True
    assert check_claims("Rated highest: Heat.", history).wrong == ("Heat",)
    assert check_claims("Rated highest: ABC.", history).wrong == ("ABC",)
    assert check_claims("Rated highest: fargo; ＡＢＣ.", history).rated is True
    assert check_claims("Rated highest: heat.", history).rated is False  # folds to two titles
