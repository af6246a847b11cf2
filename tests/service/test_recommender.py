"""Recommender.prepare + recommend_batch: one generate call per batch, answers equal to one-by-one
(fp32), cache hits skip generation (and, carrying h_T, the model), per-query errors stay per query."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import numpy as np
import pytest

from model.constrained import PhraseChoice, TitleLists
from model.rationale import (
    LATELY,
    LIKES,
    MOSTLY,
    RATED,
    decade_phrases,
    drifting_genres,
    liked_genres,
    likes_phrases,
)
from service.store import Event
from service.types import CachedReasoning, EmptyHistoryError, Query, UnknownItemsError
from tests.service.conftest import count_forward, count_generate

H1 = (Event("i1", 5.0, 100), Event("i2", 4.0, 200), Event("i3", 3.0, 300))
H2 = (Event("i6", 2.0), Event("i7", 5.0))
H3 = (Event("i8"),)
H4 = (Event("i9", 4.0, 700), Event("i5", None, 500))


def key(engine, query: Query) -> str | None:
    return engine.prepare(query).cache_key


def queries() -> list[Query]:
    return [
        Query(H1, k=5, max_reasoning_tokens=12),
        Query(H2, k=3, max_reasoning_tokens=4),  # shorter budget: truncated from the batch's 12
        Query(H3, k=8, reasoning=False),
        Query(H4, k=10, exclude_history=False, max_reasoning_tokens=12),
        Query(H1, k=2, max_reasoning_tokens=6),  # same prompt as #0: one generation row
    ]


def assert_same(a, b):
    assert [i.item_id for i in a.items] == [i.item_id for i in b.items]
    assert [i.title for i in a.items] == [i.title for i in b.items]
    np.testing.assert_allclose([i.score for i in a.items], [i.score for i in b.items], atol=1e-3)
    assert a.reasoning == b.reasoning
    assert a.reasoning_tokens == b.reasoning_tokens


def test_one_generate_call_and_answers_equal_one_by_one(engine):
    calls = count_generate(engine)
    batched = engine.recommend_batch(queries())
    assert calls == [3]  # one call; 3 distinct prompts need reasoning (H1, H2, H4)
    assert engine.generate_calls == 1
    singles = [engine.recommend_batch([q])[0] for q in queries()]
    assert calls[1:] == [1, 1, 1, 1]  # the no-reasoning query never generates
    for b, s in zip(batched, singles, strict=True):
        assert_same(b, s)
    r0, r1, r2, r3, r4 = batched
    assert [len(r.items) for r in batched] == [5, 3, 8, 10, 2]
    assert r0.reasoning_tokens <= 12 and r1.reasoning_tokens <= 4 and r4.reasoning_tokens <= 6
    assert r0.reasoning and r0.cache == "miss" and r0.generated is not None
    assert r2.reasoning is None and r2.cache == "off" and r2.reasoning_tokens == 0
    assert r4.reasoning_tokens == min(6, r0.reasoning_tokens)


def test_no_reasoning_queries_prefilled_together_score_as_one_at_a_time(ckpt, make_engine):
    """R2EC_PREFILL_BATCH_TOKENS: a batch's no-reasoning queries (and a cached reasoning without
    its h_T) share prefill forwards; the same top-k, and scores within float tolerance, as
    each prefilled alone (0: the path before batching)."""
    alone, together = make_engine(ckpt), make_engine(ckpt, prefill_batch_tokens=512)
    assert alone.prefill_batch_tokens == 0 and together.prefill_batch_tokens > 0
    forwards: list[int] = []
    many = together.backend.engine.prefill_many
    together.backend.engine.prefill_many = lambda ps, **kw: forwards.append(len(ps)) or many(ps, **kw)
    histories = [H1, H2, H3, H4, H1 + H3, (Event("i4", 1.0), Event("i10", 5.0))]
    asked = [Query(h, k=8, reasoning=False) for h in histories]
    reasoned = together.recommend_batch([Query(H2, k=8, max_reasoning_tokens=6)])[0]
    hit = replace(
        together.prepare(Query(H2, k=8, max_reasoning_tokens=6)),
        cached=CachedReasoning(reasoned.generated.completion_ids, reasoned.generated.text),
    )  # a cached reasoning without h_T: one prefill of [prompt; reasoning; marker]
    forwards.clear()
    batched = together.recommend_batch([*asked, hit])
    assert forwards == [len(asked) + 1]  # one forward for all of them
    singles = [alone.recommend_batch([q])[0] for q in asked]
    singles.append(alone.recommend_batch([hit])[0])  # the same model: the hit is read as it is
    assert singles[-1].cache == "hit"
    for b, s in zip(batched, singles, strict=True):
        assert [i.item_id for i in b.items] == [i.item_id for i in s.items]  # the same top-k
        np.testing.assert_allclose([i.score for i in b.items], [i.score for i in s.items], atol=1e-4)
    assert batched[-1].cache == "hit" and batched[-1].reasoning == reasoned.reasoning
    # counted for the continuous batcher: positions computed, none where it decodes
    costs = [together.prefill_tokens(together.prepare(q)) for q in asked]
    assert all(0 < c < len(together.prepare(q).prompt_ids) for c, q in zip(costs, asked, strict=True))
    assert together.prefill_tokens(together.prepare(Query(H1, max_reasoning_tokens=4))) is None
    assert alone.prefill_tokens(alone.prepare(asked[0])) is None


def test_items_ranked_by_cosine_over_tau_without_history(engine):
    r = engine.recommend_batch([Query(H1, k=20, max_reasoning_tokens=4)])[0]
    ids = [i.item_id for i in r.items]
    assert not set(ids) & {"i1", "i2", "i3"}
    assert len(ids) == len(engine.catalog) - 3  # the whole rest of the catalog, exclusion kept k
    scores = [i.score for i in r.items]
    assert scores == sorted(scores, reverse=True)
    assert [i.rank for i in r.items] == list(range(1, len(ids) + 1))
    assert all(abs(s) <= 1 / engine.model.tau + 1e-3 for s in scores)
    assert r.items[0].title == engine.catalog.item(ids[0])["title"]
    kept = engine.recommend_batch([Query(H1, k=20, exclude_history=False, reasoning=False)])[0]
    assert {"i1", "i2", "i3"} <= {i.item_id for i in kept.items}


def test_cached_reasoning_skips_generation_and_gives_the_same_answer(engine):
    q = Query(H2, k=4, max_reasoning_tokens=8)
    first = engine.recommend_batch([q])[0]
    calls = count_generate(engine)
    prepared = engine.prepare(q)
    assert prepared.cache_key == first.cache_key
    hit = engine.recommend_batch([replace(prepared, cached=first.generated)])[0]
    assert calls == [] and hit.cache == "hit" and hit.generated is None
    assert_same(hit, first)
    # a reasoning cached for another model version (a reload landed before the batch) is ignored
    stale = engine.recommend_batch(
        [replace(prepared, model_version="old", cached=CachedReasoning((1, 2), "stale"))]
    )[0]
    assert calls == [1] and stale.cache == "miss" and stale.reasoning == first.reasoning


def test_cache_key_depends_on_version_history_and_budget(engine):
    k = key(engine, Query(H1, max_reasoning_tokens=8))
    assert k == key(engine, Query(H1, k=3, max_reasoning_tokens=8))  # k is not reasoning
    assert k != key(engine, Query(H1, max_reasoning_tokens=9))
    assert k != key(engine, Query(H1[:2], max_reasoning_tokens=8))
    assert k != key(engine, Query((Event("i1", 4.0, 100),) + H1[1:], max_reasoning_tokens=8))
    assert key(engine, Query(H1, reasoning=False)) is None
    assert key(engine, Query(H1, max_reasoning_tokens=0)) is None
    engine.version = "another"
    assert k != key(engine, Query(H1, max_reasoning_tokens=8))


def test_no_reasoning_a_release_before_0_2_0_cached_is_read(engine):
    """Its keys lacked the cache format: the same prompt, budget and grammar had the same key
    (from held-claims-6 on), so an entry no erasure can find (not indexed by user) was served
    (journey 39, F2)."""
    import hashlib

    prepared = engine.prepare(Query(H1, max_reasoning_tokens=8))
    before = json.dumps([engine.version, prepared.prompt, 8, "greedy", prepared.grammar])
    assert prepared.cache_key != hashlib.sha256(before.encode()).hexdigest()


def _rated(grammar):
    """The "Rated highest:" list of a query's grammar (after the "Likes" sentence's, if any)."""
    return (
        next(g for g in grammar.lists if g.trigger == RATED) if isinstance(grammar, TitleLists) else grammar
    )


def test_reasoning_queries_carry_the_title_grammar_of_their_window(engine, ckpt, make_engine):
    titles, _ = engine.catalog.lookup(e.item_id for e in H1 + H2 + H4)
    prepared = engine.prepare(Query(H1, max_reasoning_tokens=8))
    assert prepared.constraint is not None
    # rated 5, 4 and 3: the 3 is the third highest but below the mean
    assert _rated(prepared.constraint).titles == [titles[e.item_id] for e in H1[:2]]
    # the "Likes" sentence over the genres that hold, read from the served catalog
    likes = prepared.constraint.lists[0]
    genres = [tuple(engine.catalog.item(e.item_id)["genres"].split(", ")) for e in H1]
    assert isinstance(likes, PhraseChoice) and likes.trigger == LIKES
    assert likes.phrases == sorted(
        likes_phrases(liked_genres(list(zip(genres, [5.0, 4.0, 3.0], strict=True))))
    )
    # a history rated in part: only its rated titles can be listed as rated highest
    assert _rated(engine.prepare(Query(H4, max_reasoning_tokens=8)).constraint).titles == [titles["i9"]]
    assert engine.prepare(Query(H1, reasoning=False)).constraint is None
    # the decades after "mostly", read from the same catalog
    decades = next(g for g in prepared.constraint.lists if g.trigger == MOSTLY)
    years = [engine.catalog.item(e.item_id)["year"] for e in H1]
    rated_decades = [(f"{y[:3]}0s", r) for y, r in zip(years, [5.0, 4.0, 3.0], strict=True)]
    assert decades.phrases == sorted(decade_phrases(rated_decades))
    # every rating 0 (the lowest a request may give): each decade then counts by its items
    zero = engine.prepare(Query(tuple(replace(e, rating=0.0) for e in H1), max_reasoning_tokens=8))
    decades = next(g for g in zero.constraint.lists if g.trigger == MOSTLY)
    assert decades.phrases == sorted(decade_phrases([(d, 1.0) for d, _ in rated_decades]))
    # three items are too few for a drift: "Lately more" may not be written, only a stop after the list
    lately = next(g for g in prepared.constraint.lists if g.trigger == LATELY)
    assert isinstance(lately, PhraseChoice) and lately.phrases == []
    assert _rated(prepared.constraint).follow == ("",)
    # a history whose latest five lean to Drama (4 of 5, against 4 of 7 overall): "Lately more"
    # over the genres that drift in the window, read from the served catalog, after the list
    drifting = tuple(Event(i, 4.0) for i in ("i2", "i3", "i1", "i6", "i7", "i8", "i11"))
    window = [tuple(engine.catalog.item(e.item_id)["genres"].split(", ")) for e in drifting]
    window = window[-engine.model.prompts.max_history :]
    assert drifting_genres(window) == ["Drama"]
    grammar = engine.prepare(Query(drifting, max_reasoning_tokens=8)).constraint
    lately = next(g for g in grammar.lists if g.trigger == LATELY)
    assert isinstance(lately, PhraseChoice) and lately.phrases == [" Drama."]
    assert _rated(grammar).follow == (" " + LATELY,)
    # a genre or year edit changes the grammar, not the prompt: the cache key and the grammar
    # tag follow it
    item = engine.catalog.item("i1")
    for edit in ({"genres": "War"}, {"year": "1942"}):
        engine.catalog.upsert("i1", {**{k: v for k, v in item.items() if k != "item_id"}, **edit})
        edited = engine.prepare(Query(H1, max_reasoning_tokens=8))
        assert edited.prompt == prepared.prompt
        assert (edited.cache_key, edited.grammar) != (prepared.cache_key, prepared.grammar)
    engine.catalog.upsert("i1", {k: v for k, v in item.items() if k != "item_id"})
    assert engine.prepare(Query(H1, max_reasoning_tokens=8)).cache_key == prepared.cache_key
    seen = []
    original = engine.backend.generate

    def spy(prompt_ids, settings, constraints=None):
        seen.append(constraints)
        return original(prompt_ids, settings, constraints)

    engine.backend.generate = spy
    engine.recommend_batch([Query(H1, max_reasoning_tokens=4), Query(H2, max_reasoning_tokens=4)])
    rated = [_rated(c).titles for c in seen[0]]
    assert rated == [_rated(prepared.constraint).titles, [titles["i7"]]]  # H2: 2 and 5
    runner = engine.runner()  # continuous batching decodes under the same grammar
    running = runner.add(Query(H1, max_reasoning_tokens=4))
    assert _rated(running.handle.constraint).titles == _rated(prepared.constraint).titles
    runner.decoder.cancel(running.handle)
    free = make_engine(ckpt, constrain_titles=False)
    free.version = engine.version
    assert free.prepare(Query(H1, max_reasoning_tokens=8)).constraint is None
    # the texts differ between the two settings, so their cached reasoning must not mix
    assert key(free, Query(H1, max_reasoning_tokens=8)) != prepared.cache_key


def test_a_bad_query_fails_alone(engine):
    out = engine.recommend_batch(
        [
            Query(H1, k=3, max_reasoning_tokens=4),
            Query((Event("nope"), Event("i1"), Event("nada")), k=3),
            Query((), k=3),
        ]
    )
    assert len(out[0].items) == 3
    assert isinstance(out[1], UnknownItemsError) and out[1].item_ids == ["nope", "nada"]
    assert "'nope', 'nada'" in str(out[1])
    assert isinstance(out[2], EmptyHistoryError) and "history is empty" in str(out[2])


def test_prepare_checks_ids_renders_and_hashes_once_for_the_batch(engine):
    rendered = []
    original = engine.model.render_message

    def counted(*args, **kwargs):
        rendered.append(1)
        return original(*args, **kwargs)

    engine.model.render_message = counted
    prepared = [engine.prepare(q) for q in queries()]
    assert len(rendered) == len(prepared)
    out = engine.recommend_batch(prepared)
    assert len(rendered) == len(prepared), "a prepared query is not rendered again by its batch"
    assert [r.cache_key for r in out] == [p.cache_key for p in prepared]


def test_a_stored_history_drops_deleted_items_a_sent_one_is_refused(engine):
    history = (Event("gone"), Event("i1", 5.0), Event("gone"))
    stored = engine.prepare(Query(history, stored_user="u1"))
    assert stored.query.history == (Event("i1", 5.0),)
    assert stored.prompt == engine.prepare(Query((Event("i1", 5.0),))).prompt
    out = engine.recommend_batch([Query(history), Query((Event("gone"),), stored_user="u1")])
    assert isinstance(out[0], UnknownItemsError) and out[0].item_ids == ["gone"]
    assert isinstance(out[1], EmptyHistoryError) and out[1].user_id == "u1"
    assert str(out[1]) == "history is empty: every item stored for user 'u1' left the catalog"


# ---------------------------------------------------------------------------- issue 12: h_T in the cache
def test_a_cached_vector_round_trips_and_an_old_entry_still_reads():
    v = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    v /= np.linalg.norm(v)
    entry = CachedReasoning((5, 6, 7), "because", v)
    back = CachedReasoning.from_json(entry.to_json(), dim=16)
    assert back == entry and back.vector.dtype == np.float32
    assert back.vector.tobytes() == v.tobytes()  # bit for bit: the hit ranks exactly as the miss
    old = CachedReasoning.from_json(json.dumps({"ids": [5, 6], "text": "older"}), dim=16)
    assert old == CachedReasoning((5, 6), "older") and old.vector is None
    assert "vector" not in json.loads(CachedReasoning((1,), "x").to_json())


def corrupt_entries(dim: int) -> dict[str, str]:
    """Cache entries whose vector must not be used, by what is wrong with them."""
    good = np.zeros(dim, np.float32)
    good[0] = 1.0
    entry = json.loads(CachedReasoning((1, 2), "text", good).to_json())

    def with_vector(**changes) -> str:
        return json.dumps({**entry, "vector": {**entry["vector"], **changes}})

    def b64(a: np.ndarray) -> str:
        return base64.b64encode(a.tobytes()).decode()

    nan = good.copy()
    nan[1] = np.nan
    return {
        "wrong dim": with_vector(dim=dim + 1, b64=b64(np.ones(dim + 1, np.float32) / np.sqrt(dim + 1))),
        "dim disagrees with the bytes": with_vector(dim=dim - 1),
        "float64 bytes": with_vector(b64=b64(good.astype(np.float64))),
        "float64 dtype": with_vector(dtype="float64"),
        "not finite": with_vector(b64=b64(nan)),
        "not unit length": with_vector(b64=b64(good * 3)),
        "not base64": with_vector(b64="%%%"),
        "not an object": json.dumps({**entry, "vector": [1.0] * dim}),
    }


def test_a_corrupt_cached_vector_is_refused_on_read():
    for what, raw in corrupt_entries(16).items():
        try:
            CachedReasoning.from_json(raw, dim=16)
        except (ValueError, KeyError, TypeError):  # what the service's cache read treats as a miss
            continue
        pytest.fail(f"accepted a cached vector: {what}")


def test_a_cached_vector_answers_without_the_model_and_exactly_as_the_batch(engine):
    q = Query(H2, k=4, max_reasoning_tokens=8, seen_items=frozenset({"i1", "i4"}))
    first = engine.recommend_batch([q])[0]
    assert first.generated is not None and first.generated.vector.shape == (engine.model.hidden_size,)
    assert not {"i6", "i7", "i1", "i4"} & {i.item_id for i in first.items}
    generated, forward = count_generate(engine), count_forward(engine)
    hit = engine.answer_cached(replace(engine.prepare(q), cached=first.generated))
    assert generated == [] and forward == []
    assert hit.items == first.items  # same vector, same search: the same scores to the bit
    assert hit.cache == "hit" and hit.generated is None and hit.reasoning == first.reasoning
    assert hit.reasoning_tokens == first.reasoning_tokens and hit.cache_key == first.cache_key
    assert hit.timings.queue_ms == 0 and hit.timings.generate_ms == 0
    # the batch, sent the same hit, skips the forward pass for it as well
    assert (
        engine.recommend_batch([replace(engine.prepare(q), cached=first.generated)])[0].items == first.items
    )
    assert forward == []
    with pytest.raises(ValueError, match="cache hit with its vector"):
        engine.answer_cached(engine.prepare(q))


def test_a_hit_from_an_entry_without_a_vector_is_rebuilt_and_offered_to_the_cache(engine):
    q = Query(H1, k=5, max_reasoning_tokens=8)
    first = engine.recommend_batch([q])[0]
    old = CachedReasoning(first.generated.completion_ids, first.generated.text)  # as written before
    generated, forward = count_generate(engine), count_forward(engine)
    hit = engine.recommend_batch([replace(engine.prepare(q), cached=old)])[0]
    assert generated == [] and forward == [1] and hit.cache == "hit"
    assert_same(hit, first)
    assert hit.generated == old and hit.generated.vector is not None  # the entry, now with h_T
    np.testing.assert_allclose(hit.generated.vector, first.generated.vector, atol=1e-5)


def test_on_text_gets_each_reasoning_once_before_scoring_and_cannot_fail_the_batch(engine):
    """The static path's streaming hook: one call per query with its whole reasoning, generated
    or cached, none without reasoning; a callback that raises costs the batch nothing."""
    pieces: dict[str, list[str]] = {"a": [], "b": [], "off": []}
    searched = []
    search = engine.catalog.search

    def spy(*args, **kwargs):
        searched.append({k: list(v) for k, v in pieces.items()})  # what was known at scoring time
        return search(*args, **kwargs)

    engine.catalog.search = spy

    def broken(text: str) -> None:
        raise RuntimeError("the client went away (simulated)")

    qs = [
        replace(engine.prepare(Query(H1, k=3, max_reasoning_tokens=6)), on_text=pieces["a"].append),
        replace(engine.prepare(Query(H1, k=3, max_reasoning_tokens=6)), on_text=broken),
        replace(engine.prepare(Query(H2, k=3, max_reasoning_tokens=4)), on_text=pieces["b"].append),
        replace(engine.prepare(Query(H3, k=3, reasoning=False)), on_text=pieces["off"].append),
    ]
    a, broke, b, off = engine.recommend_batch(qs)
    assert pieces == {"a": [a.reasoning], "b": [b.reasoning], "off": []}
    assert searched == [pieces]  # every piece was handed out before the index search
    assert broke.reasoning == a.reasoning and len(broke.items) == 3
    assert off.reasoning is None and len(off.items) == 3

    hit: list[str] = []
    cached = replace(qs[0], cached=a.generated, on_text=hit.append)
    (again,) = engine.recommend_batch([cached])
    assert again.cache == "hit" and hit == [a.reasoning]


def test_on_text_is_not_part_of_a_prepared_query_s_identity_and_survives_a_reload(engine):
    p = engine.prepare(Query(H1, max_reasoning_tokens=4))
    with_hook = replace(p, on_text=print)
    assert with_hook == p and hash(with_hook) == hash(p) and "on_text" not in repr(with_hook)
    got: list[str] = []
    stale = replace(p, model_version="an-older-model", on_text=got.append)  # prepared again
    (r,) = engine.recommend_batch([stale])
    assert r.model_version == engine.version and got == [r.reasoning]


def test_a_warm_up_leaves_texts_to_draft_from_and_no_trace(ckpt, make_engine, caplog):
    cold = make_engine(ckpt)
    assert len(cold.backend.drafter) == 0  # the default of Recommender.load: no warm-up
    with caplog.at_level("INFO", logger="service.recommender"):
        warm = make_engine(ckpt, warmup_requests=2)
    # two made-up queries answered: their texts are in the drafter (model/speculative.py), and
    # nothing counts them as served
    assert len(warm.backend.drafter) == 2 and warm.generate_calls == 0
    assert "warmed up model" in caplog.text and "failed" not in caplog.text
    # and it answers as the cold model does: the warm-up changed no state that ranks
    q = Query(H1, k=5, max_reasoning_tokens=12)
    assert_same(warm.recommend_batch([q])[0], cold.recommend_batch([q])[0])


def test_the_prompt_and_its_picks_grammar_name_the_same_hints(engine, monkeypatch):
    # a model trained to end with "Picks:": the service looks the co-watch titles up once per
    # request, so a catalog edit between the prompt and the grammar cannot make them differ
    from model.cowatch import CoWatch

    model = engine.model
    titles = dict(engine.catalog.titles)
    monkeypatch.setattr(model, "cowatch", CoWatch.from_sequences([["i1", "i4", "i5"]], titles, window=2))
    monkeypatch.setattr(model, "prompts", replace(model.prompts, cowatch_hints=2, hint_picks=2))
    looked_up = []
    answers = iter([[titles["i4"]], [titles["i5"]]])  # what a lookup after an edit would name

    def hint_titles(*args, **kw):
        looked_up.append(args)
        return next(answers)

    monkeypatch.setattr(model, "hint_titles", hint_titles)
    prepared = engine.prepare(Query(H1, max_reasoning_tokens=8))
    assert len(looked_up) == 1
    assert titles["i4"] in prepared.prompt and titles["i5"] not in prepared.prompt
    assert prepared.constraint.lists[-1].titles == [titles["i4"]]
