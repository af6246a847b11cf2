"""POST /items:batch: many item edits in one call, all or nothing, one index pass, one save."""

from __future__ import annotations

import asyncio
import threading
import unicodedata

import numpy as np
import pytest

from service.catalog import INDEX_DIR
from tests.service.conftest import ADMIN, app_for, serve
from tests.service.test_admin import copy_as_new_version, recommend, refuse_writes, wait_edits_saved
from tests.service.test_app import metric

pytestmark = pytest.mark.asyncio


def vector(app, item_id: str) -> np.ndarray:
    return app.state.r2ec.engine.catalog.index.vector(item_id)


async def test_a_batch_creates_replaces_and_deletes_with_the_vectors_a_put_gives(app, client):
    before = {i["item_id"]: i["score"] for i in (await recommend(client))["items"]}
    i7 = {k: v for k, v in (await client.get("/items/i7")).json().items() if k != "item_id"}
    body = {
        "upsert": [
            {"item_id": "new", **i7},  # i7's text: i7's vector
            {"item_id": "i8", "title": "A Completely Different Film", "year": "2024"},
            {"item_id": 42, "title": "An Integer Id", "genres": "Drama", "description": "Long\ttext."},
        ],
        "delete": ["i5", "never-there"],
    }
    r = await client.post("/items:batch", json=body, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "created": 2,
        "replaced": 1,
        "deleted": 1,
        "not_found": ["never-there"],
        "index_size": 12,  # 11 + new + 42 - i5
        "results": [
            {"item_id": "new", "result": "created"},
            {"item_id": "i8", "result": "replaced"},
            {"item_id": "42", "result": "created"},
            {"item_id": "i5", "result": "deleted"},
            {"item_id": "never-there", "result": "not_found"},
        ],
    }
    assert (await client.get("/items/i8")).json() == {
        "item_id": "i8",
        "title": "A Completely Different Film",
        "year": "2024",
        "genres": "",  # an upsert replaces the whole item, as a PUT does
        "description": "",
    }
    assert (await client.get("/items/42")).json()["description"] == "Long\ttext."
    assert (await client.get("/items/i5")).status_code == 404
    assert (await client.get("/items/never-there")).status_code == 404

    # searches see the new vectors: "new" scores as i7 did, i5 is gone, i8 moved (the history,
    # H1, holds none of the items edited: its prompt, so the user's vector, is the same)
    pair = {i["item_id"]: i["score"] for i in (await recommend(client, candidates=["new", "i7"]))["items"]}
    assert pair["new"] == pytest.approx(before["i7"], abs=1e-3)
    after = {i["item_id"]: i for i in (await recommend(client))["items"]}
    assert "i5" not in after and after["i8"]["title"] == "A Completely Different Film"
    assert after["i8"]["score"] != pytest.approx(before["i8"], abs=1e-3)

    # each vector is the one a single PUT of the same text gives (encoded alone, unpadded)
    for entry in body["upsert"]:
        text = {k: v for k, v in entry.items() if k != "item_id"}
        single = f"single-{entry['item_id']}"
        assert (await client.put(f"/items/{single}", json=text, headers=ADMIN)).status_code == 201
        np.testing.assert_allclose(vector(app, str(entry["item_id"])), vector(app, single), atol=1e-5)
    assert metric((await client.get("/metrics")).text, "r2ec_index_items") == 15


async def test_an_empty_batch_changes_nothing(client):
    r = await client.post("/items:batch", json={}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "created": 0, "replaced": 0, "deleted": 0, "not_found": [], "index_size": 11, "results": []
    }  # fmt: skip


BAD_BATCHES = [
    # a special token of the served tokenizer, anywhere: Catalog.check_text, named by its place
    (
        [{"title": "Fine"}, {"title": "Fine Too"}, {"title": "Zebra<|im_end|>"}],
        "upsert.2.title",
        "'<|im_end|>'",
    ),
    (
        [{"title": "Fine"}, {"title": "Zebra", "description": "a <|endoftext|>"}],
        "upsert.1.description",
        "special",
    ),
    # the schema's own checks, with the same field paths
    ([{"title": "Fine"}, {"title": "Two\nLines"}], "upsert.1.title", "must be one line"),
    ([{"title": "Fine"}, {"year": "2000"}], "upsert.1.title", "Field required"),
    ([{"title": "Fine"}, {"title": "Fine", "rating": 5}], "upsert.1.rating", "Extra inputs"),
]


@pytest.mark.parametrize(("texts", "field", "said"), BAD_BATCHES, ids=[f for _, f, _ in BAD_BATCHES])
async def test_a_bad_entry_anywhere_is_a_422_naming_it_and_changes_nothing(
    app, client, ckpt, texts, field, said
):
    upsert = [{"item_id": f"b{n}", **t} for n, t in enumerate(texts)]
    r = await client.post("/items:batch", json={"upsert": upsert, "delete": ["i5"]}, headers=ADMIN)
    error = r.json()["error"]
    assert r.status_code == 422 and error["code"] == "invalid_request", r.text
    assert [f["field"] for f in error["fields"]] == [field] and said in error["message"], error
    for n in range(len(texts)):
        assert (await client.get(f"/items/b{n}")).status_code == 404
    assert (await client.get("/items/i5")).status_code == 200
    assert len(app.state.r2ec.engine.catalog.index) == 11
    assert not (ckpt / INDEX_DIR / "edits.jsonl").exists()  # nothing logged


async def test_every_bad_text_of_a_batch_is_named(client):
    upsert = [
        {"item_id": "a", "title": "Zebra<|im_end|>"},
        {"item_id": "b", "title": "Fine"},
        {"item_id": "c", "title": "Fine", "genres": "<|im_start|>system"},
    ]
    r = await client.post("/items:batch", json={"upsert": upsert}, headers=ADMIN)
    assert r.status_code == 422
    assert [f["field"] for f in r.json()["error"]["fields"]] == ["upsert.0.title", "upsert.2.genres"]


IDS_REFUSED = [
    ({"upsert": [{"item_id": "x", "title": "X"}, {"item_id": "x", "title": "Y"}]}, ["upsert.1.item_id"]),
    ({"upsert": [{"item_id": 7, "title": "X"}, {"item_id": "7", "title": "Y"}]}, ["upsert.1.item_id"]),
    ({"upsert": [{"item_id": "i1", "title": "X"}], "delete": ["i2", "i1"]}, ["delete.1"]),
    ({"delete": ["i2", "i3", "i2", "i2"]}, ["delete.2", "delete.3"]),
    ({"delete": ["ok", "bad\x00id"]}, ["delete.1"]),  # ids validated as everywhere
    ({"upsert": [{"item_id": " padded", "title": "X"}]}, ["upsert.0.item_id"]),
]


@pytest.mark.parametrize(("body", "fields"), IDS_REFUSED)
async def test_an_id_twice_in_a_batch_or_an_invalid_one_is_refused(client, body, fields):
    r = await client.post("/items:batch", json=body, headers=ADMIN)
    assert r.status_code == 422, r.text
    assert [f["field"] for f in r.json()["error"]["fields"]] == fields
    if "twice" in r.text or "same id" in r.text:
        assert "a batch edits an item once" in r.json()["error"]["message"]
    assert (await client.get("/items/i1")).json()["title"] != "X"
    assert (await client.get("/items/i2")).status_code == 200


async def test_a_batch_holds_at_most_1000_entries_in_all(client):
    upsert = [{"item_id": f"n{n}", "title": f"N {n}"} for n in range(600)]
    r = await client.post(
        "/items:batch", json={"upsert": upsert, "delete": [f"d{n}" for n in range(401)]}, headers=ADMIN
    )
    assert r.status_code == 422 and "at most 1000 entries in all" in r.json()["error"]["message"]
    r = await client.post("/items:batch", json={"delete": [f"d{n}" for n in range(1001)]}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "delete"
    assert (await client.get("/items/n0")).status_code == 404


async def test_the_batch_is_a_custom_method_and_items_batch_is_the_item_named_batch(client):
    """POST /items:batch is the batch (a path no item id can be); /items/batch is the item whose
    id is "batch" for every method, POST included (405, as for any item)."""
    r = await client.get("/items/batch")
    assert r.status_code == 404 and r.json()["error"]["message"] == "item 'batch' not found"
    r = await client.put("/items/batch", json={"title": "An Item Called Batch"}, headers=ADMIN)
    assert r.status_code == 201 and r.json()["item"]["item_id"] == "batch"
    assert (await client.get("/items/batch")).json()["title"] == "An Item Called Batch"
    r = await client.post("/items:batch", json={"upsert": [{"item_id": "b2", "title": "B2"}]}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["created"] == 1
    r = await client.post("/items:batch", json={"delete": ["batch"]}, headers=ADMIN)  # the item "batch"
    assert r.status_code == 200 and r.json()["deleted"] == 1
    r = await client.put("/items/batch", json={"title": "Back Again"}, headers=ADMIN)
    assert r.status_code == 201
    r = await client.delete("/items/batch", headers=ADMIN)
    assert r.status_code == 200 and r.json()["deleted"] == "batch"
    r = await client.post("/items/batch", json={"upsert": []}, headers=ADMIN)
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, PUT"
    r = await client.get("/items:batch")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


async def test_a_batch_is_one_append_to_the_edit_log_and_a_restart_sees_every_edit(
    ckpt, make_engine, monkeypatch
):
    from index import journal

    appends: list[list[str]] = []
    real_append = journal.append

    def counted(directory, entries):
        appends.append([e["item_id"] for e in entries])
        return real_append(directory, entries)

    monkeypatch.setattr(journal, "append", counted)
    app = app_for(ckpt)
    async with serve(app) as client:
        upsert = [{"item_id": f"sku-{n}", "title": f"Product {n}", "genres": "Shoes"} for n in range(40)]
        r = await client.post("/items:batch", json={"upsert": upsert, "delete": ["i5", "i6"]}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["created"] == 40, r.text
        index = app.state.r2ec.engine.catalog.index
        served = {i: index.vector(i) for i in index.item_ids()}
    assert appends == [sorted([f"sku-{n}" for n in range(40)] + ["i5", "i6"])]
    assert journal.count(ckpt / INDEX_DIR) == 42
    restarted = make_engine(ckpt).catalog  # a new engine on the same checkpoint
    assert restarted.item("sku-39") == {
        "item_id": "sku-39", "title": "Product 39", "year": "", "genres": "Shoes", "description": ""
    }  # fmt: skip
    assert restarted.item("i5") is None and restarted.item("i6") is None
    assert sorted(restarted.index.item_ids()) == sorted(served)
    for item_id, v in served.items():  # the logged vectors, not encoded again
        np.testing.assert_allclose(restarted.index.vector(item_id), v, atol=1e-6)


async def test_recommendations_run_between_the_chunks_of_a_batch(ckpt, monkeypatch):
    """The upserts are encoded EDIT_BATCH_CHUNK at a time, each its own turn of the model
    thread: a recommendation that arrives meanwhile is answered before the batch ends."""
    from service.catalog import Catalog
    from service.recommender import Recommender

    monkeypatch.setattr("service.state.EDIT_BATCH_CHUNK", 2)
    order: list[str] = []
    entered, gate = threading.Event(), threading.Event()
    encode, edit_many, run = Catalog.encode_items, Catalog.edit_many, Recommender.recommend_batch

    def encode_items(self, items):
        order.append(f"encode {len(items)}")
        if not entered.is_set():
            entered.set()
            gate.wait(60)
        return encode(self, items)

    def recorded_edit_many(self, *args):
        order.append("apply")
        return edit_many(self, *args)

    def recommend_batch(self, queries):
        order.append("recommend")
        return run(self, queries)

    monkeypatch.setattr(Catalog, "encode_items", encode_items)
    monkeypatch.setattr(Catalog, "edit_many", recorded_edit_many)
    monkeypatch.setattr(Recommender, "recommend_batch", recommend_batch)
    async with serve(app_for(ckpt)) as client:
        order.clear()
        upsert = [{"item_id": f"n{n}", "title": f"New {n}"} for n in range(5)]
        batch = asyncio.create_task(client.post("/items:batch", json={"upsert": upsert}, headers=ADMIN))
        assert await asyncio.to_thread(entered.wait, 60)
        asked = asyncio.create_task(recommend(client))
        await asyncio.sleep(0.2)  # queued for the model thread behind the first chunk
        gate.set()
        await asked
        assert (await batch).status_code == 200
    assert order == ["encode 2", "recommend", "encode 2", "encode 1", "apply"]


async def test_a_reload_waits_for_a_batch_and_never_mixes_models(ckpt, tmp_path, monkeypatch):
    """A reload loads beside the running model while a batch encodes; its swap waits for the
    edit lock the batch holds, so every chunk and the apply use the old model's catalog, and
    the new one takes the whole batch over (re-encoded with its model)."""
    from service.catalog import Catalog
    from service.recommender import Recommender

    monkeypatch.setattr("service.state.EDIT_BATCH_CHUNK", 1)
    calls: list[tuple[str, int]] = []
    entered, gate, loaded = threading.Event(), threading.Event(), threading.Event()
    encode, edit_many, carry, load = (
        Catalog.encode_items, Catalog.edit_many, Catalog.carry_from, Recommender.load
    )  # fmt: skip

    def encode_items(self, items):
        calls.append(("encode", id(self)))
        if not entered.is_set():
            entered.set()
            gate.wait(60)
        return encode(self, items)

    def recorded_edit_many(self, *args):
        calls.append(("apply", id(self)))
        return edit_many(self, *args)

    def carry_from(self, old):
        calls.append(("carry", id(old)))
        return carry(self, old)

    def recorded_load(*args, **kwargs):
        engine = load(*args, **kwargs)
        loaded.set()
        return engine

    v2 = copy_as_new_version(ckpt, tmp_path / "v2", "v2-batch")
    app = app_for(ckpt)
    async with serve(app) as client:
        monkeypatch.setattr(Catalog, "encode_items", encode_items)
        monkeypatch.setattr(Catalog, "edit_many", recorded_edit_many)
        monkeypatch.setattr(Catalog, "carry_from", carry_from)
        monkeypatch.setattr(Recommender, "load", recorded_load)
        old = app.state.r2ec.engine.catalog
        upsert = [{"item_id": f"n{n}", "title": f"New {n}"} for n in range(3)]
        batch = asyncio.create_task(client.post("/items:batch", json={"upsert": upsert}, headers=ADMIN))
        assert await asyncio.to_thread(entered.wait, 60)
        reload = asyncio.create_task(
            client.post("/admin/reload", json={"checkpoint": str(v2)}, headers=ADMIN)
        )
        assert await asyncio.to_thread(loaded.wait, 60)  # loaded: now it waits for the edit lock
        await asyncio.sleep(0.1)
        assert app.state.r2ec.engine.catalog is old
        gate.set()
        assert (await batch).status_code == 200
        r = await reload
        assert r.status_code == 200 and r.json()["model_version"] == "v2-batch"
        assert (await client.get("/items/n2")).json()["title"] == "New 2"
        assert {f"n{n}" for n in range(3)} <= set(app.state.r2ec.engine.catalog.index.item_ids())
    # the batch's three chunks and its apply on the old catalog, then the swap's carry (which
    # re-encodes the batch's items with the new model, on the new catalog)
    assert calls[:5] == [("encode", id(old))] * 3 + [("apply", id(old)), ("carry", id(old))]
    assert id(old) not in {c[1] for c in calls[5:]}


async def test_a_batch_the_volume_refuses_to_save_is_a_507_and_saved_once_it_takes_it(
    ckpt, tmp_path, monkeypatch
):
    root = tmp_path / "versions"
    copy_as_new_version(ckpt, root / "one", "w1")
    (root / "CURRENT").write_text("one")
    make_room = refuse_writes(monkeypatch)
    async with serve(app_for(root, watch_interval_s=0.02)) as client:
        body = {"upsert": [{"item_id": "a", "title": "A"}, {"item_id": "b", "title": "B"}], "delete": ["i5"]}
        r = await client.post("/items:batch", json=body, headers=ADMIN)
        assert r.status_code == 507, r.text
        error = r.json()["error"]
        assert (
            error["code"] == "not_saved" and "the batch's 3 item edits (the first: 'a')" in error["message"]
        )
        assert "No space left on device" in error["message"]
        assert (await client.get("/items/b")).status_code == 200  # served from memory
        assert metric((await client.get("/metrics")).text, "r2ec_item_edits_unsaved") == 1
        make_room()
        await wait_edits_saved(client)
    async with serve(app_for(root)) as restarted:
        assert (await restarted.get("/items/a")).json()["title"] == "A"
        assert (await restarted.get("/items/i5")).status_code == 404


async def test_catalog_edit_many_matches_upserts_one_by_one(ckpt, make_engine):
    """The Python side: `Catalog.edit_many` (what the route applies) against `Catalog.upsert`
    (what a PUT runs), on two engines over copies of one checkpoint."""
    import shutil

    other = ckpt.parent / "other"
    shutil.copytree(ckpt, other)
    one, many = make_engine(ckpt).catalog, make_engine(other).catalog
    texts = {f"p{n}": {"title": f"Product {n}", "year": str(2000 + n), "genres": "Tools"} for n in range(10)}
    texts["i2"] = {"title": "Retitled", "description": "Now with a description."}
    texts["fr"] = {"title": unicodedata.normalize("NFD", "Amélie")}  # stored in NFC by both
    for item_id, fields in texts.items():
        one.upsert(item_id, fields)
    one.remove("i4")
    done = many.edit_many(texts, ["i4", "nope"])
    assert done.replaced == {**dict.fromkeys(texts, False), "i2": True}
    assert done.deleted == ["i4"] and done.not_found == ["nope"]
    assert sorted(one.index.item_ids()) == sorted(many.index.item_ids())
    assert many.item("fr")["title"] == "Amélie"
    for item_id in texts:
        assert many.item(item_id) == one.item(item_id)
        np.testing.assert_allclose(many.index.vector(item_id), one.index.vector(item_id), atol=1e-5)
    with pytest.raises(ValueError, match="once in a batch"):
        many.edit_many({"x": {"title": "X"}}, ["x"])
    assert many.item("x") is None


async def test_another_replica_takes_a_batch_without_holding_the_model_thread(ckpt, monkeypatch):
    """Review 40, #1: the replica that did not take the batch applies it at its watch tick
    with the vectors logged beside it (no encoding); where it must encode (here: as if the log
    held no vectors), each turn of the model thread encodes at most EDIT_BATCH_CHUNK items, and
    a recommendation that arrives meanwhile runs between two of them."""
    import service.catalog
    from service.catalog import Catalog
    from service.recommender import Recommender

    monkeypatch.setattr("service.state.EDIT_BATCH_CHUNK", 3)
    calls: list[tuple[str, int, str]] = []  # (replica, items, thread)
    encode = Catalog.encode_items

    def encode_items(self, items):
        calls.append((self._who, len(items), threading.current_thread().name))
        return encode(self, items)

    monkeypatch.setattr(Catalog, "encode_items", encode_items)
    a, b = app_for(ckpt, watch_interval_s=0), app_for(ckpt, watch_interval_s=0)
    async with serve(a) as ca, serve(b) as cb:
        a.state.r2ec.engine.catalog._who, b.state.r2ec.engine.catalog._who = "A", "B"
        model_thread = await b.state.r2ec.run_model(lambda: threading.current_thread().name)
        upsert = [{"item_id": f"sku-{n}", "title": f"Product {n}"} for n in range(10)]
        r = await ca.post("/items:batch", json={"upsert": upsert[:5], "delete": ["i5"]}, headers=ADMIN)
        assert r.status_code == 200, r.text
        calls.clear()
        await b.state.r2ec._sync_edits()  # B's watch tick: the logged vectors, nothing encoded
        assert calls == []
        assert (await cb.get("/items/sku-4")).status_code == 200 and (
            await cb.get("/items/i5")
        ).status_code == 404
        np.testing.assert_allclose(vector(b, "sku-4"), vector(a, "sku-4"), atol=1e-6)

        r = await ca.post("/items:batch", json={"upsert": upsert[5:]}, headers=ADMIN)
        assert r.status_code == 200, r.text
        monkeypatch.setattr(service.catalog, "usable_vector", lambda v, dim: False)  # B must encode
        entered, gate = threading.Event(), threading.Event()
        order: list[str] = []

        def first_chunk_waits(self, items):
            order.append(f"encode {len(items)}")
            if not entered.is_set():
                entered.set()
                gate.wait(60)
            return encode_items(self, items)

        run = Recommender.recommend_batch

        def recommend_batch(self, queries):
            order.append("recommend")  # on the model thread, in its turn
            return run(self, queries)

        monkeypatch.setattr(Catalog, "encode_items", first_chunk_waits)
        monkeypatch.setattr(Recommender, "recommend_batch", recommend_batch)
        calls.clear()
        sync = asyncio.create_task(b.state.r2ec._sync_edits())
        assert await asyncio.to_thread(entered.wait, 60)
        asked = asyncio.create_task(recommend(cb))
        await asyncio.sleep(0.2)  # queued for the model thread behind the first chunk
        gate.set()
        await asked
        await sync
        assert (await cb.get("/items/sku-9")).json()["title"] == "Product 9"
    assert [n for _, n, _ in calls] == [3, 2] and {t for _, _, t in calls} == {model_thread}
    assert order == ["encode 3", "recommend", "encode 2"]


async def test_a_batch_that_fills_the_log_costs_the_other_replica_no_encoding(ckpt, monkeypatch):
    """Review 40 (sync), finding 2: a batch that brings the edit log to SNAPSHOT_EVERY entries
    (here 6; 1000 in the service) starts a full save at once, which cuts the log; the other
    replica's watch tick then reads the batch from index.json, and encoded all of it. It takes
    the vectors from the previous log the save kept: none encoded, the writer's vectors served."""
    import service.catalog
    from service.catalog import Catalog

    monkeypatch.setattr(service.catalog, "SNAPSHOT_EVERY", 6)
    encoded: list[int] = []
    encode = Catalog.encode_items
    a, b = app_for(ckpt, watch_interval_s=0), app_for(ckpt, watch_interval_s=0)
    async with serve(a) as ca, serve(b) as cb:
        upsert = [{"item_id": f"sku-{n}", "title": f"Product {n}"} for n in range(5)]
        r = await ca.post("/items:batch", json={"upsert": upsert, "delete": ["i5"]}, headers=ADMIN)
        assert r.status_code == 200, r.text
        await asyncio.to_thread(a.state.r2ec.engine.catalog.wait_saved)
        assert not (ckpt / INDEX_DIR / "edits.jsonl").exists()  # the full save cut the log
        monkeypatch.setattr(
            Catalog, "encode_items", lambda self, items: encoded.append(len(items)) or encode(self, items)
        )
        await b.state.r2ec._sync_edits()  # B's watch tick
        assert encoded == []
        assert (await cb.get("/items/sku-4")).json()["title"] == "Product 4"
        assert (await cb.get("/items/i5")).status_code == 404
        for n in range(5):
            np.testing.assert_allclose(vector(b, f"sku-{n}"), vector(a, f"sku-{n}"), atol=1e-6)


async def test_a_put_during_a_chunked_sync_waits_for_a_chunk_not_the_whole_sync(ckpt, monkeypatch):
    """Review 40 (sync), #3: a sync that must encode encodes outside the edit lock; a PUT sent
    meanwhile is answered before the sync ends (on the old code it waited for every chunk), and
    an item the PUT edited keeps the PUT's text (the later edit still wins at the commit)."""
    import time

    import service.catalog
    from service.catalog import Catalog

    monkeypatch.setattr("service.state.EDIT_BATCH_CHUNK", 1)
    encode = Catalog.encode_items
    entered = threading.Event()

    def slow_encode(self, items):
        entered.set()
        time.sleep(0.25)  # a stand-in for a large model's chunk
        return encode(self, items)

    a, b = app_for(ckpt, watch_interval_s=0), app_for(ckpt, watch_interval_s=0)
    async with serve(a) as ca, serve(b) as cb:
        upsert = [{"item_id": f"sku-{n}", "title": f"Product {n}"} for n in range(12)]
        r = await ca.post("/items:batch", json={"upsert": upsert}, headers=ADMIN)
        assert r.status_code == 200, r.text
        monkeypatch.setattr(service.catalog, "usable_vector", lambda v, dim: False)  # B must encode
        monkeypatch.setattr(Catalog, "encode_items", slow_encode)
        sync = asyncio.create_task(b.state.r2ec._sync_edits())
        assert await asyncio.to_thread(entered.wait, 60)
        r = await cb.put("/items/sku-3", json={"title": "Put on B"}, headers=ADMIN)
        assert r.status_code in (200, 201), r.text
        assert not sync.done()  # 12 chunks of 0.25 s: the PUT did not wait for them
        await sync
        assert (await cb.get("/items/sku-11")).json()["title"] == "Product 11"
        assert (await cb.get("/items/sku-3")).json()["title"] == "Put on B"


async def test_the_watch_sees_a_new_version_while_a_long_sync_encodes(ckpt, tmp_path, monkeypatch):
    """The watch awaited its tick's sync before it polled the version again: a sync encoding a
    batch (minutes with a real model) held back the reload of a version published meanwhile
    until every chunk was encoded. The sync runs beside the watch now: with the sync's first
    chunk held, the watch reloads the new version, and the reload ends the sync's encoding."""
    import service.catalog
    from service.catalog import Catalog

    monkeypatch.setattr("service.state.EDIT_BATCH_CHUNK", 1)
    root = tmp_path / "versions"
    copy_as_new_version(ckpt, root / "one", "w1")
    copy_as_new_version(ckpt, root / "two", "w2")
    (root / "CURRENT").write_text("one")
    encode = Catalog.encode_items
    entered, gate = threading.Event(), threading.Event()
    held: list[int] = []  # B's old catalog's encodes (the new model's load may encode too)

    a, b = app_for(root, watch_interval_s=0), app_for(root, watch_interval_s=0.02)
    async with serve(a) as ca, serve(b) as cb:
        old = b.state.r2ec.engine.catalog

        def gated(self, items):
            if self is old:
                held.append(len(items))
                entered.set()
                gate.wait(60)  # the first chunk is held until the reload is seen
            return encode(self, items)

        monkeypatch.setattr(service.catalog, "usable_vector", lambda v, dim: False)  # B must encode
        monkeypatch.setattr(Catalog, "encode_items", gated)
        upsert = [{"item_id": f"sku-{n}", "title": f"Product {n}"} for n in range(6)]
        r = await ca.post("/items:batch", json={"upsert": upsert}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert await asyncio.to_thread(entered.wait, 60)  # B's watch tick: the sync encodes
        (root / "CURRENT").write_text("two")  # a retrain published w2 meanwhile

        async def reloaded() -> None:
            while b.state.r2ec.engine.version != "w2":
                await asyncio.sleep(0.02)

        try:
            await asyncio.wait_for(reloaded(), 60)  # on the old watch: never, the gate is shut
            assert held == [1]  # the sync is still in its first chunk
        finally:
            gate.set()
        assert b.state.r2ec.engine.catalog is not old
        r = await cb.get("/items/sku-5")  # the new catalog carried the edits B had not applied
        assert r.status_code == 200 and r.json()["title"] == "Product 5"
        assert held == [1]  # the reload ended the old catalog's encoding after its first chunk


async def test_a_reload_ends_a_syncs_encoding_and_carries_its_edits(ckpt, tmp_path, monkeypatch):
    """A reload under way ends the sync's encoding between two chunks (the new model would
    encode those items again); the new catalog carries the other replica's edits."""
    import service.catalog
    from service.catalog import Catalog

    monkeypatch.setattr("service.state.EDIT_BATCH_CHUNK", 1)
    encode = Catalog.encode_items
    entered, gate = threading.Event(), threading.Event()
    calls = []

    def gated(self, items):
        calls.append(id(self))  # the new model's load may encode too: counted per catalog
        if not entered.is_set():
            entered.set()
            gate.wait(60)
        return encode(self, items)

    a, b = app_for(ckpt, watch_interval_s=0), app_for(ckpt, watch_interval_s=0)
    async with serve(a) as ca, serve(b) as cb:
        upsert = [{"item_id": f"sku-{n}", "title": f"Product {n}"} for n in range(6)]
        r = await ca.post("/items:batch", json={"upsert": upsert}, headers=ADMIN)
        assert r.status_code == 200, r.text
        monkeypatch.setattr(service.catalog, "usable_vector", lambda v, dim: False)
        monkeypatch.setattr(Catalog, "encode_items", gated)
        old = id(b.state.r2ec.engine.catalog)
        sync = asyncio.create_task(b.state.r2ec._sync_edits())
        assert await asyncio.to_thread(entered.wait, 60)
        reload = asyncio.create_task(cb.post("/admin/reload", headers=ADMIN))
        while not b.state.r2ec._reload_lock.locked():
            await asyncio.sleep(0.01)
        gate.set()
        await sync
        assert calls.count(old) == 1  # given up after the chunk under way, not 6 chunks
        assert (await reload).status_code == 200
        assert (await cb.get("/items/sku-5")).json()["title"] == "Product 5"


async def test_a_reload_that_fails_lets_the_syncs_encoding_go_on(ckpt, monkeypatch):
    """The sync runs beside the watch, so the watch's own reloads now come while it encodes:
    one of a version that fails to load (retried a tick apart, then every 5 minutes) ended
    the sync's encoding too, and the next tick's sync started over. A sync longer than the
    retries' spacing never ended while CURRENT named that version: the other replica's edits
    never reached this one. A reload under way pauses the encoding; where it fails, the sync
    goes on with the same catalog and applies the edits, each item encoded once."""
    import service.catalog
    import service.state
    from service.catalog import Catalog

    monkeypatch.setattr("service.state.EDIT_BATCH_CHUNK", 1)
    encode = Catalog.encode_items
    entered, gate, loading, looked, fail = (threading.Event() for _ in range(5))
    calls = []
    loop_thread = threading.current_thread()

    def gated(self, items):
        calls.append(len(items))
        if not entered.is_set():
            entered.set()
            gate.wait(60)
        return encode(self, items)

    def broken_load(*args, **kwargs):  # a version that fails to load, after a while
        loading.set()
        fail.wait(60)
        raise service.state.CheckpointError("adapter/adapter_model.safetensors is damaged")

    class Watched(asyncio.Lock):
        """The reload lock: says when the sync's thread looked at it during the load."""

        def locked(self) -> bool:
            if loading.is_set() and threading.current_thread() is not loop_thread:
                looked.set()
            return super().locked()

    a, b = app_for(ckpt, watch_interval_s=0), app_for(ckpt, watch_interval_s=0)
    async with serve(a) as ca, serve(b) as cb:
        upsert = [{"item_id": f"sku-{n}", "title": f"Product {n}"} for n in range(6)]
        r = await ca.post("/items:batch", json={"upsert": upsert}, headers=ADMIN)
        assert r.status_code == 200, r.text
        state = b.state.r2ec
        state._reload_lock = Watched()
        old = state.engine.catalog
        monkeypatch.setattr(service.catalog, "usable_vector", lambda v, dim: False)  # B must encode
        monkeypatch.setattr(Catalog, "encode_items", gated)
        monkeypatch.setattr(service.state.Recommender, "load", broken_load)
        sync = asyncio.create_task(state._sync_edits())
        assert await asyncio.to_thread(entered.wait, 60)  # the sync's first chunk
        reload = asyncio.create_task(state.reload(log_failure=False))
        assert await asyncio.to_thread(loading.wait, 60)  # the reload is loading
        gate.set()  # the chunk ends while the reload is under way...
        assert await asyncio.to_thread(looked.wait, 60)  # ...and the sync sees it
        fail.set()
        with pytest.raises(service.state.ReloadError):
            await reload
        await sync
        assert state.engine.catalog is old  # the failed reload swapped nothing
        assert calls == [1] * 6  # every item encoded once
        r = await cb.get("/items/sku-5")
        assert r.status_code == 200 and r.json()["title"] == "Product 5"
