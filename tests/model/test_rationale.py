"""Rationales from the data alone, checked against hand-written texts."""

from model.rationale import (
    ItemFacts,
    build_rationale,
    catalog_facts,
    next_line,
    rationale_parts,
    taste_lines,
)

ITEMS = [
    {"item_id": "1", "title": "Heat", "year": "1995", "genres": "Action, Crime, Thriller"},
    {"item_id": "2", "title": "Fargo", "year": "1996", "genres": "Crime, Drama, Thriller"},
    {"item_id": "3", "title": "Casablanca", "year": "1942", "genres": "Drama, Romance, War"},
    {"item_id": "4", "title": "Toy Story", "year": "1995", "genres": "Animation, Children's, Comedy"},
    {"item_id": "5", "title": "Nameless", "year": "", "genres": ""},
]
FACTS = catalog_facts(ITEMS)


def test_facts_read_genres_and_decade():
    assert FACTS["1"] == ItemFacts("Heat", ("Action", "Crime", "Thriller"), "1990s")
    assert FACTS["5"] == ItemFacts("Nameless", (), None)


def test_taste_weights_genres_and_eras_by_rating():
    # Crime 5+4=9, Thriller 9, Drama 4+2=6, Action 5; 1990s 9 of 11 -> "mostly 1990s"
    lines = taste_lines([(FACTS["1"], 5.0), (FACTS["2"], 4.0), (FACTS["3"], 2.0)])
    assert lines[0] == "Likes Crime, Thriller and Drama, mostly 1990s."
    assert lines[1] == "Rated highest: Heat; Fargo; Casablanca."


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
