"""Catalog title search: normalisation, the ranking tiers, limits; GET /items over the app, with
item edits, and the index built once per catalog."""

from __future__ import annotations

import pytest

from service import catalog as catalog_module
from service.search import TitleIndex, normalize, spoken_title
from tests.service.conftest import ADMIN, app_for, serve

CATALOG = {
    "1": "Star",
    "2": "Star Wars",
    "3": "Starship Troopers",
    "4": "Lone Star",
    "5": "Mustard Seeds",
    "6": "Dark Star",
    "7": "Misérables, Les",
    "8": "Godfather, The",
    "9": "Schindler's List",
    "10": "Kløvedal",
    "11": "",  # no title: never found
    "12": "Hamlet",
    "13": "Hamlet",
    "14": "E.T. the Extra-Terrestrial",
}


@pytest.fixture(scope="module")
def index() -> TitleIndex:
    return TitleIndex(CATALOG)


def found(index: TitleIndex, q: str, limit: int = 20) -> list[tuple[str, str]]:
    return [(CATALOG[m.item_id], m.kind) for m in index.search(q, limit)]


def test_normalize_folds_case_accents_apostrophes_and_punctuation():
    assert normalize("Misérables, Les") == "miserables les"
    assert normalize("  ÉTÉ  d'Amélie!! ") == "ete damelie"
    assert normalize("Schindler’s List") == normalize("schindler's list") == "schindlers list"
    assert normalize("Kløvedal Æble Straße") == "klovedal aeble strasse"
    assert normalize("E.T. the Extra-Terrestrial") == "e t the extra terrestrial"
    assert normalize("?!") == ""


def test_spoken_title_moves_a_trailing_article_to_the_front():
    assert spoken_title("Godfather, The") == "The Godfather"
    assert spoken_title("Misérables, Les") == "Les Misérables"
    assert spoken_title("Appartement, L'") == "L'Appartement"
    assert spoken_title("Horseman on the Roof, The (Hussard sur le toit, Le)") == (
        "The Horseman on the Roof (Hussard sur le toit, Le)"
    )
    assert spoken_title("Star Wars") is None
    assert spoken_title("Crumb, Robert") is None


def test_exact_then_prefix_then_word_then_substring_then_title(index):
    assert found(index, "star") == [
        ("Star", "exact"),
        ("Star Wars", "prefix"),  # "star wars" < "starship troopers": title order within a tier
        ("Starship Troopers", "prefix"),
        ("Dark Star", "word"),
        ("Lone Star", "word"),
        ("Mustard Seeds", "substring"),
    ]
    assert found(index, "wars") == [("Star Wars", "word")]
    assert found(index, "ars") == [("Star Wars", "substring"), ("Starship Troopers", "substring")]


def test_case_and_accents_are_ignored(index):
    for q in ("miserables", "MISÉRABLES", "misérables", "Miserables, les", "MISER"):
        assert found(index, q)[0][0] == "Misérables, Les", q
    assert found(index, "KLOVE") == [("Kløvedal", "prefix")]
    assert found(index, "schindlers") == found(index, "Schindler's") == [("Schindler's List", "prefix")]
    assert found(index, "e.t.") == found(index, "E T") == [("E.T. the Extra-Terrestrial", "prefix")]


def test_a_trailing_article_is_found_in_either_order(index):
    assert found(index, "the godfather") == [("Godfather, The", "exact")]
    assert found(index, "godfather") == [("Godfather, The", "prefix")]
    assert found(index, "les mis") == [("Misérables, Les", "prefix")]


def test_equal_titles_order_by_id_and_each_item_appears_once(index):
    assert [m.item_id for m in index.search("hamlet", 10)] == ["12", "13"]
    ids = [m.item_id for m in index.search("s", 50)]
    assert len(ids) == len(set(ids))  # an item matching in several tiers or names: once, at its best


def test_limit_bounds_and_cuts_across_tiers(index):
    assert found(index, "star", limit=1) == [("Star", "exact")]
    assert found(index, "star", limit=4) == found(index, "star")[:4]
    assert found(index, "star", limit=0) == []
    assert found(index, "   ") == [] and found(index, "!!") == []
    assert found(index, "nothing like this") == []
    assert len(index) == len(CATALOG) - 1  # the item without a title is not indexed


def test_skip_leaves_out_ids_and_the_next_ones_move_up(index):
    got = [m.item_id for m in index.search("star", 3, skip={"1", "2"})]
    assert got == ["3", "6", "4"]


def test_substring_tier_stops_at_the_limit_in_title_order():
    many = {str(i): f"Film {i:04d} xyz" for i in range(3000)}
    index = TitleIndex(many)
    got = index.search("yz", 5)
    assert [m.item_id for m in got] == ["0", "1", "2", "3", "4"]
    assert {m.kind for m in got} == {"substring"}


SYMBOLS = {
    "1": "🎬 Movie Night",
    "2": "Love ❤️ Actually",
    "3": "Rock🎸Star, The",
    "4": "🎬",
    "5": "Movie",
    "6": "Romeo + Juliet",
    "7": "E.T. the Extra-Terrestrial",
    "8": "Schindler's List",
    "9": "👨‍👩‍👧 Family",
}


def test_pictographs_are_words_so_an_emoji_query_finds_its_titles():
    """A query of an emoji used to normalise to "" and find nothing, though a title held it."""
    index = TitleIndex(SYMBOLS)
    assert normalize("🎬 Movie Night", symbols=True) == "🎬 movie night"
    assert normalize("Rock🎸Star ❤️", symbols=True) == "rock 🎸 star ❤"  # a variation selector is dropped
    assert normalize("🎬 Movie Night") == "movie night"  # the plain form is unchanged
    assert normalize("Romeo + Juliet", symbols=True) == "romeo juliet"  # ASCII symbols stay separators

    def hits(q: str) -> list[tuple[str, str]]:
        return [(SYMBOLS[m.item_id], m.kind) for m in index.search(q, 20)]

    assert hits("🎬") == [("🎬", "exact"), ("🎬 Movie Night", "prefix")]
    assert hits("🎬 mov") == [("Movie", "prefix"), ("🎬 Movie Night", "prefix")]  # and as its words
    assert hits("movie night") == [("🎬 Movie Night", "exact")]  # as before
    assert hits("❤") == hits("❤️") == [("Love ❤️ Actually", "word")]
    assert hits("🎸") == [("Rock🎸Star, The", "word")]
    assert hits("the rock🎸") == [("Rock🎸Star, The", "prefix")]
    assert hits("👨‍👩‍👧") == [("👨‍👩‍👧 Family", "prefix")]
    assert hits("romeo juliet") == [("Romeo + Juliet", "exact")]


def test_every_substring_of_a_title_that_holds_a_word_or_a_pictograph_finds_it():
    index = TitleIndex(SYMBOLS)
    for item_id, title in SYMBOLS.items():
        for i in range(len(title)):
            for j in range(i + 1, len(title) + 1):
                q = title[i:j]
                if normalize(q, symbols=True):  # not punctuation or spaces alone
                    assert item_id in {m.item_id for m in index.search(q, 20)}, (title, q)


# ---------------------------------------------------------------------------- GET /items
@pytest.mark.asyncio
async def test_get_items_searches_the_catalog_and_says_how_it_matched(ckpt):
    async with serve(app_for(ckpt)) as client:
        r = await client.get("/items", params={"q": "TOY"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["query"] == "TOY"
        assert body["items"][0] == {
            "item_id": "i1",
            "title": "Toy Story",
            "year": "1995",
            "genres": body["items"][0]["genres"],
            "match": "prefix",
        }
        assert "Animation" in body["items"][0]["genres"]
        r = await client.get("/items", params={"q": "monkeys"})
        assert [(i["title"], i["match"]) for i in r.json()["items"]] == [("Twelve Monkeys", "word")]
        assert (await client.get("/items", params={"q": "zzzz"})).json()["items"] == []
        assert len((await client.get("/items", params={"q": "e", "limit": 2})).json()["items"]) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"q": "toy", "limit": 0}, "limit"),
        ({"q": "toy", "limit": 51}, "limit"),
        ({"q": "toy", "limit": "many"}, "limit"),
        ({"q": ""}, "q"),
        ({}, "q"),
        ({"q": "x" * 201}, "q"),
    ],
)
async def test_get_items_refuses_bad_parameters_with_422_naming_the_field(ckpt, params, field):
    async with serve(app_for(ckpt)) as client:
        r = await client.get("/items", params=params)
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]["message"]


@pytest.mark.asyncio
async def test_get_items_finds_an_emoji_title_and_refuses_a_blank_query(ckpt):
    async with serve(app_for(ckpt)) as client:
        put = await client.put("/items/e1", json={"title": "🎬 Movie Night"}, headers=ADMIN)
        assert put.status_code == 201, put.text
        r = await client.get("/items", params={"q": "🎬"})
        assert r.status_code == 200, r.text
        assert [(i["item_id"], i["match"]) for i in r.json()["items"]] == [("e1", "prefix")]
        # whitespace only is refused as "" is (it used to be 200 with no items)
        for q in ("", "   ", "\t \n"):
            r = await client.get("/items", params={"q": q})
            assert r.status_code == 422, (q, r.text)
            assert [f["field"] for f in r.json()["error"]["fields"]] == ["q"], q
        assert r.json()["error"]["message"] == "q: must not be blank"
        # over 200 characters: said in characters (it said "at most 200 items")
        r = await client.get("/items", params={"q": "x" * 201})
        assert r.status_code == 422
        assert r.json()["error"]["message"] == "q: String should have at most 200 characters", r.text
        assert (await client.get("/items", params={"q": "千" * 200})).status_code == 200
        # control characters, as in any text: a NUL was searched for and echoed back
        r = await client.get("/items", params={"q": "star\x00"})
        assert r.status_code == 422 and "control characters" in r.json()["error"]["message"], r.text


@pytest.mark.asyncio
async def test_get_items_is_in_openapi_with_its_response_model(ckpt):
    async with serve(app_for(ckpt)) as client:
        spec = (await client.get("/openapi.json")).json()
    op = spec["paths"]["/items"]["get"]
    assert {p["name"] for p in op["parameters"]} == {"q", "limit"}
    limit = next(p for p in op["parameters"] if p["name"] == "limit")["schema"]
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (1, 50, 10)
    ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ItemSearchResponse")
    assert "match" in spec["components"]["schemas"]["ItemMatch"]["properties"]
    assert "/" not in spec["paths"] and not any(p.startswith("/static") for p in spec["paths"])


@pytest.mark.asyncio
async def test_search_follows_item_edits_and_builds_the_index_when_the_catalog_opens(ckpt, monkeypatch):
    monkeypatch.setattr(catalog_module, "TITLE_REBUILD_EDITS", 2)
    app = app_for(ckpt)

    def titles(r):
        return [i["title"] for i in r.json()["items"]]

    def built():
        return app.state.r2ec.engine.catalog._titles

    async with serve(app) as client:
        first = built()
        assert first is not None  # at startup, before the first search
        for _ in range(3):
            assert titles(await client.get("/items", params={"q": "toy"})) == ["Toy Story"]
        assert built() is first  # then reused

        put = await client.put("/items/new", json={"title": "Toy Soldiers", "year": "1991"}, headers=ADMIN)
        assert put.status_code == 201, put.text
        r = await client.get("/items", params={"q": "toy"})
        assert titles(r) == ["Toy Soldiers", "Toy Story"] and r.json()["items"][0]["year"] == "1991"
        assert (await client.delete("/items/i1", headers=ADMIN)).status_code == 200
        assert titles(await client.get("/items", params={"q": "toy"})) == ["Toy Soldiers"]
        assert built() is first  # two edits: searched beside the index
        put = await client.put("/items/i7", json={"title": "Toy Monkeys"}, headers=ADMIN)
        assert titles(await client.get("/items", params={"q": "toy"})) == ["Toy Monkeys", "Toy Soldiers"]
        # the third passed TITLE_REBUILD_EDITS: that search started a rebuild on its own thread
        app.state.r2ec.engine.catalog.wait_titles()
        rebuilt = built()
        assert rebuilt is not first and not app.state.r2ec.engine.catalog._title_edits
        assert titles(await client.get("/items", params={"q": "twelve"})) == []
        assert titles(await client.get("/items", params={"q": "monkeys"})) == ["Toy Monkeys"]
        assert built() is rebuilt

        # a reload is a new catalog (carrying the edits): its own index, built as it opens
        assert (await client.post("/admin/reload", headers=ADMIN)).status_code == 200
        assert built() is not None and built() is not rebuilt
        assert titles(await client.get("/items", params={"q": "toy"})) == ["Toy Monkeys", "Toy Soldiers"]


@pytest.mark.asyncio
async def test_the_page_and_its_files_are_served(ckpt):
    async with serve(app_for(ckpt)) as client:
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script src="/static/app.js"' in page.text
        js = await client.get("/static/app.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert "/recommend/stream" in js.text
        css = await client.get("/static/app.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        for text in (page.text, js.text, css.text):
            assert "://" not in text  # nothing is fetched from anywhere but this service
        for name in ("index.html", "..%2Fui.py", "nope.js"):
            r = await client.get(f"/static/{name}")
            assert r.status_code == 404 and r.json()["error"]["message"], name


def test_japanese_voicing_marks_are_part_of_the_word():
    """NFKD then dropping combining marks made パン (bread), バン (van) and ハン one word: "バン屋"
    listed "パン屋の物語" first. Half-width katakana still finds full-width."""
    index = TitleIndex({"jp4": "パン屋の物語", "jp5": "バン屋の物語", "g1": "ｶﾞﾝﾀﾞﾑ", "g2": "ガンダム"})
    assert [m.item_id for m in index.search("バン屋", 5)] == ["jp5"]
    assert [m.item_id for m in index.search("パン", 5)] == ["jp4"]
    assert index.search("ハン", 5) == []
    assert {m.item_id for m in index.search("ガンダム", 5)} == {"g1", "g2"}


def test_a_title_met_as_typed_ranks_before_its_folded_twins():
    """ "Heat" listed "HEAT" first and "ABC" listed "ＡＢＣ" first: both forms were one name, ordered
    by id. Within a tier the title the query meets as typed comes first; folding still finds the
    others."""
    index = TitleIndex({"h1": "HEAT", "h2": "Heat", "a1": "ＡＢＣ", "a2": "ABC", "x": "Heat Wave"})
    assert [(m.item_id, m.typed) for m in index.search("Heat", 5)] == [
        ("h2", True), ("h1", False), ("x", True),
    ]  # fmt: skip
    assert [m.item_id for m in index.search("HEAT", 5)][:2] == ["h1", "h2"]
    assert [m.item_id for m in index.search("ABC", 5)] == ["a2", "a1"]
    assert [m.item_id for m in index.search("ＡＢＣ", 5)] == ["a1", "a2"]
    assert [m.item_id for m in index.search("heat", 5)] == ["h1", "h2", "x"]  # none as typed: by title, id


@pytest.mark.asyncio
async def test_get_items_lists_the_title_typed_first_among_edited_items_too(ckpt):
    async with serve(app_for(ckpt)) as client:
        for item_id, title in (("z1", "ZEBRA DAYS"), ("z2", "Zebra Days")):
            assert (
                await client.put(f"/items/{item_id}", json={"title": title}, headers=ADMIN)
            ).status_code == 201
        r = await client.get("/items", params={"q": "Zebra Days"})
        assert [i["item_id"] for i in r.json()["items"]] == ["z2", "z1"]
        r = await client.get("/items", params={"q": "ZEBRA"})
        assert [i["item_id"] for i in r.json()["items"]] == ["z1", "z2"]
