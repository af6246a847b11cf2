"""The lean decoder (model/engine.py) and the generation backends (model/generation.py) against
the transformers reference, on the tiny float32 model where both must agree to rounding."""

import pytest
import torch

from model.engine import DecoderEngine, unsupported_reason
from model.generation import ContinuousDecoder, EngineBackend, HFBackend, Sequence_, TextStream, make_backend
from model.prompts import HistoryEntry
from model.r2ec import GenerationSettings

HISTORIES = [
    [HistoryEntry("Toy Story", 5.0), HistoryEntry("Fargo", 4.0), HistoryEntry("Heat", 3.0)],
    [HistoryEntry("Star Wars", 5.0)],
    [HistoryEntry("Babe", 2.0), HistoryEntry("Casino", 4.5), HistoryEntry("Heat", 1.0)],
]


def _reference_hidden(model, ids):
    with torch.no_grad():
        return model.lm.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0]


def test_prefill_and_decode_give_the_reference_hidden_states(tiny_model):
    # rows of different lengths decode together; the cache starts too small and grows
    engine = DecoderEngine(tiny_model.lm, slots=3, max_len=8)
    seqs = [list(range(5, 17)), list(range(30, 37)), list(range(40, 59))]
    got = [[engine.prefill(j, s[:3])] for j, s in enumerate(seqs)]
    for step in range(3, 6):
        hidden = engine.decode([s[step] for s in seqs])
        for j in range(3):
            got[j].append(hidden[j : j + 1])
    for j, s in enumerate(seqs):
        got[j].append(engine.prefill(j, s[6:]))  # a prefill that continues a cached sequence
        torch.testing.assert_close(torch.cat(got[j]), _reference_hidden(tiny_model, s), atol=1e-4, rtol=1e-4)
    assert engine.lens == [12, 7, 19] and engine.max_len >= 19


def test_a_reused_prompt_head_gives_the_hidden_states_of_a_whole_prefill(tiny_model):
    ids = tiny_model.user_prompt_ids(HISTORIES)[0]
    head = tiny_model.user_prompt_head()
    assert 0 < len(head) < len(ids) and ids[: len(head)] == head
    assert all(p[: len(head)] == head for p in tiny_model.user_prompt_ids(HISTORIES))
    engine = DecoderEngine(tiny_model.lm, slots=2, max_len=8)  # the cache grows under the head
    engine.set_prefix(head)
    ref = _reference_hidden(tiny_model, ids + [7])
    rest = engine.prefill(0, ids, reuse_prefix=True)
    assert rest.shape[0] == len(ids) - len(head) and engine.lens == [len(ids), 0]
    torch.testing.assert_close(rest, ref[len(head) : len(ids)], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(engine.decode([7])[0], ref[-1], atol=1e-4, rtol=1e-4)
    assert EngineBackend(tiny_model, slots=1).engine.prefix == head  # what every backend reuses
    assert EngineBackend(tiny_model, slots=1, exact=True).engine.prefix == []  # R2EC_EXACT_DECODE
    other = [5, 6] + ids  # does not start with the head: prefilled whole
    assert engine.prefill(1, other, reuse_prefix=True).shape[0] == len(other)
    engine.reset(0)
    assert engine.prefill(0, ids).shape[0] == len(ids)  # reuse is asked for, never assumed


@pytest.mark.parametrize("exact", [False, True])
def test_a_last_only_prefill_gives_the_last_state_and_the_whole_cache(tiny_model, exact):
    # after the shared head (a masked prefill: grouped query heads unless exact) and from empty
    ids = tiny_model.user_prompt_ids(HISTORIES)[2]
    ref = _reference_hidden(tiny_model, ids + [7, 8])
    for reuse in (True, False):
        engine = DecoderEngine(tiny_model.lm, slots=1, max_len=8, exact=exact)
        engine.set_prefix(tiny_model.user_prompt_head())
        last = engine.prefill(0, ids, reuse_prefix=reuse, last_only=True)
        assert last.shape == (1, tiny_model.hidden_size) and engine.lens == [len(ids)]
        torch.testing.assert_close(last[0], ref[len(ids) - 1], atol=1e-4, rtol=1e-4)
        # every position's keys and values were written: what follows reads them all
        more = engine.prefill(0, [7, 8], last_only=True)
        assert more.shape[0] == 1
        torch.testing.assert_close(more[0], ref[-1], atol=1e-4, rtol=1e-4)
        assert engine.prefill(0, [9], last_only=True).shape[0] == 1  # one token: nothing to trim


def test_prefill_many_gives_each_prompt_its_lone_prefill_state_and_leaves_the_slots(tiny_model):
    # prompts after the shared head and not, of different lengths, one of a single token
    prompts = [*tiny_model.user_prompt_ids(HISTORIES), [5, 6, 7], [9]]
    engine = DecoderEngine(tiny_model.lm, slots=2, max_len=8)  # the RoPE tables grow for it
    engine.set_prefix(tiny_model.user_prompt_head())
    held = list(range(20, 31))
    engine.prefill(1, held[:-1])  # a sequence decoding in slot 1 meanwhile
    for reuse in (True, False):
        alone = []
        for ids in prompts:
            engine.reset(0)
            alone.append(engine.prefill(0, ids, reuse_prefix=reuse, last_only=True)[0])
            torch.testing.assert_close(
                alone[-1], _reference_hidden(tiny_model, ids)[-1], atol=1e-4, rtol=1e-4
            )
        engine.reset(0)
        together = engine.prefill_many(prompts, reuse_prefix=reuse)
        assert together.shape == (len(prompts), tiny_model.hidden_size)
        torch.testing.assert_close(together, torch.stack(alone), atol=1e-5, rtol=1e-5)
        assert engine.prefill_many(prompts[1:2], reuse_prefix=reuse).shape == (1, tiny_model.hidden_size)
    assert engine.lens == [0, len(held) - 1]  # no slot was written: slot 1 decodes on as before
    engine.move(1, 0)
    torch.testing.assert_close(
        engine.decode([held[-1]])[0], _reference_hidden(tiny_model, held)[-1], atol=1e-4, rtol=1e-4
    )
    assert engine.computed_tokens(prompts[0], reuse_prefix=True) == len(prompts[0]) - len(engine.prefix)
    assert (
        engine.computed_tokens(prompts[0]) == len(prompts[0]) == engine.computed_tokens([5] + prompts[0][1:])
    )
    with pytest.raises(ValueError, match="exact"):
        DecoderEngine(tiny_model.lm, slots=1, exact=True).prefill_many(prompts)
    with pytest.raises(ValueError, match="at least one"):
        engine.prefill_many([[5], []])


def test_the_decoder_prefills_what_writes_nothing_together_within_its_token_budget(tiny_model):
    """Budget-0 sequences (no reasoning) take no slot: one step prefills all of them, in
    forwards of at most `prefill_tokens` computed positions, beside a sequence that decodes;
    each gets the h_T it gets prefilled alone (prefill_tokens=0)."""
    prompts = tiny_model.user_prompt_ids(HISTORIES)
    marker = tiny_model._marker_ids
    settings = GenerationSettings(max_new_tokens=10)
    alone = {}
    for budget in (0, 80):  # the prompts compute 30-44 positions each: two a forward
        backend = EngineBackend(tiny_model, slots=1, prefill_tokens=budget)
        assert backend.prefill_tokens == budget
        decoder = backend.decoder(settings)
        assert decoder.prefill_tokens == budget
        forwards: list[int] = []
        many = backend.engine.prefill_many
        backend.engine.prefill_many = lambda ps, seen=forwards, run=many, **kw: (
            seen.append(len(ps)) or run(ps, **kw)
        )
        writer = decoder.add(Sequence_(prompts[0], 10))
        decoder.step()  # it holds the one slot
        plain = [decoder.add(Sequence_(p, 0)) for p in [*prompts, prompts[1] + [5, 6]]]
        while not decoder.idle:
            decoder.step()
        assert writer.done and all(s.done and s.completion_ids == [] for s in plain)
        vectors = torch.stack([s.vector for s in plain])
        costs = [backend.engine.computed_tokens(s.prompt_ids + marker, reuse_prefix=True) for s in plain]
        if budget == 0:
            assert forwards == []  # each in the slot, after the writer left it
            alone = {"vectors": vectors, "writer": writer.completion_ids}
            continue
        # packed in arrival order while the positions fit the budget, one prompt at least
        expected, size, total = [], 0, 0
        for cost in costs:
            if size and total + cost > budget:
                expected.append(size)
                size, total = 0, 0
            size, total = size + 1, total + cost
        expected.append(size)
        assert forwards == expected and len(forwards) > 1 and max(forwards) > 1
        torch.testing.assert_close(vectors, alone["vectors"], atol=1e-5, rtol=1e-5)
        assert writer.completion_ids == alone["writer"]
    assert EngineBackend(tiny_model, slots=1, exact=True, prefill_tokens=64).prefill_tokens == 0
    with pytest.raises(ValueError, match="prefill_tokens"):
        EngineBackend(tiny_model, slots=1, prefill_tokens=-1)


def test_move_works_after_the_cache_grew(tiny_model):
    # a prompt longer than max_len grows the cache inside a forward (inference mode); the move
    # that packs the rows when a sequence leaves must still write it
    engine = DecoderEngine(tiny_model.lm, slots=2, max_len=8)
    ids = list(range(5, 17))
    engine.prefill(1, ids[:-1])
    engine.move(1, 0)
    assert engine.lens == [len(ids) - 1, 0] and engine.max_len >= len(ids)
    hidden = engine.decode([ids[-1]])
    torch.testing.assert_close(hidden[0], _reference_hidden(tiny_model, ids)[-1], atol=1e-4, rtol=1e-4)


def test_move_keeps_a_sequence_intact(tiny_model):
    engine = DecoderEngine(tiny_model.lm, slots=2, max_len=16)
    engine.prefill(1, [5, 6, 7, 8])
    engine.move(1, 0)
    assert engine.lens == [4, 0]
    hidden = engine.decode([9])
    torch.testing.assert_close(
        hidden[0], _reference_hidden(tiny_model, [5, 6, 7, 8, 9])[-1], atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("budget", [0, 1, 12])
def test_engine_backend_matches_hf_tokens_and_vectors(tiny_model, budget, exact):
    prompts = tiny_model.user_prompt_ids(HISTORIES)
    settings = GenerationSettings(max_new_tokens=budget)
    ref, ref_vecs = HFBackend(tiny_model).generate(prompts, settings)
    backend = EngineBackend(tiny_model, slots=2, exact=exact)
    got, vecs = backend.generate(prompts, settings)  # 3 prompts, 2 slots
    assert got.completion_ids == ref.completion_ids
    assert got.texts == ref.texts
    assert vecs.shape == ref_vecs.shape == (3, tiny_model.hidden_size)
    assert torch.nn.functional.cosine_similarity(vecs, ref_vecs).min() > 0.9999


def test_a_sequence_joining_mid_decode_gets_what_it_gets_alone(tiny_model):
    prompts = tiny_model.user_prompt_ids(HISTORIES)
    settings = GenerationSettings(max_new_tokens=10)
    alone, alone_vecs = HFBackend(tiny_model).generate(prompts, settings)
    backend = EngineBackend(tiny_model, slots=3)
    decoder = ContinuousDecoder(tiny_model, backend.engine, settings)
    first = decoder.add(Sequence_(prompts[0], 10))
    decoder.step()
    decoder.step()
    later = [decoder.add(Sequence_(p, 10)) for p in prompts[1:]]  # join at a token boundary
    finished = []
    while not decoder.idle:
        finished += decoder.step()
    assert {id(s) for s in finished} == {id(s) for s in [first, *later]}
    for i, seq in enumerate([first, *later]):
        assert seq.done and seq.completion_ids == alone.completion_ids[i]
        assert torch.nn.functional.cosine_similarity(seq.vector, alone_vecs[i], dim=0) > 0.9999


def test_cancel_frees_the_slot_and_the_rest_are_unaffected(tiny_model):
    prompts = tiny_model.user_prompt_ids(HISTORIES)
    settings = GenerationSettings(max_new_tokens=10)
    alone, _ = HFBackend(tiny_model).generate(prompts, settings)
    backend = EngineBackend(tiny_model, slots=2)
    decoder = ContinuousDecoder(tiny_model, backend.engine, settings, max_prefill_per_step=2)
    a, b, c = (decoder.add(Sequence_(p, 10)) for p in prompts)
    decoder.step()
    assert decoder.active == [a, b] and list(decoder.waiting) == [c]
    decoder.cancel(a)  # b moves into slot 0
    assert decoder.active == [b] and b.slot == 0
    while not decoder.idle:
        decoder.step()
    assert not a.done and a.cancelled
    assert b.completion_ids == alone.completion_ids[1] and c.completion_ids == alone.completion_ids[2]


def test_streamed_pieces_concatenate_to_the_final_text(tiny_model):
    prompts = tiny_model.user_prompt_ids(HISTORIES)
    decoder = EngineBackend(tiny_model, slots=3).decoder(GenerationSettings(max_new_tokens=16))
    pieces: list[list[str]] = [[], [], []]
    seqs = [decoder.add(Sequence_(p, 16, on_text=pieces[i].append)) for i, p in enumerate(prompts)]
    while not decoder.idle:
        decoder.step()
    for seq, got in zip(seqs, pieces, strict=True):
        assert "".join(got) == seq.text
        assert len(got) > 1 or len(seq.completion_ids) <= 2  # it really streamed


def test_text_stream_holds_back_whitespace_and_broken_characters(tiny_model):
    tok = tiny_model.tokenizer
    stream = TextStream(tok)
    ids = tok.encode("  café au lait  ", add_special_tokens=False)
    pieces = [stream.update(ids[: i + 1]) for i in range(len(ids))] + [stream.update(ids, final=True)]
    assert "".join(pieces) == "café au lait"
    assert all("\ufffd" not in p for p in pieces)


def test_int8_weights_stay_close_to_the_model(tiny_model):
    import copy

    lm = copy.deepcopy(tiny_model.lm).to(torch.bfloat16)
    ids = list(range(5, 40))
    ref = DecoderEngine(lm, slots=1).prefill(0, ids)
    engine = DecoderEngine(lm, slots=1, quantize="int8")
    engine.prefill(0, ids[:-1])
    last = engine.decode([ids[-1]])  # one row: the int8 kernel
    assert torch.nn.functional.cosine_similarity(last[0].float(), ref[-1].float(), dim=0) > 0.99
    with pytest.raises(ValueError, match="bfloat16"):
        DecoderEngine(tiny_model.lm, quantize="int8")  # a float32 model
    # auto: int8 where the kernel runs (bf16 on the CPU), plain weights otherwise
    assert DecoderEngine(lm, slots=1, quantize="auto").quantize == "int8"
    assert DecoderEngine(tiny_model.lm, slots=1, quantize="auto").quantize == "none"


def test_a_last_only_prefill_with_int8_weights_keeps_bf16_numbers(tiny_model):
    # int8 weights serve one-row steps; the one row a trimmed last layer would leave must not
    # take them: a prefill's h_T is the bf16 model's with or without them
    import copy

    lm = copy.deepcopy(tiny_model.lm).to(torch.bfloat16)
    ids = list(range(5, 40))
    plain = DecoderEngine(lm, slots=1).prefill(0, ids)[-1]
    got = DecoderEngine(lm, slots=1, quantize="int8").prefill(0, ids, last_only=True)[0]
    assert torch.equal(got, plain)


def test_int8_weights_serve_a_lone_sequence_and_prepacked_bf16_the_rest(tiny_model):
    import copy

    lm = copy.deepcopy(tiny_model.lm).to(torch.bfloat16)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN: no prepacked weights")
    plain, int8 = DecoderEngine(lm, slots=2), DecoderEngine(lm, slots=2, quantize="int8")
    prompts = [list(range(5, 30)), list(range(7, 25))]
    steps = {}
    for name, engine in (("plain", plain), ("int8", int8)):
        for slot, ids in enumerate(prompts):
            engine.prefill(slot, ids)
        two = engine.decode([3, 4])  # two rows: prepacked bf16 in both engines
        engine.reset(1)
        one = engine.decode([5])  # one row: int8 in the int8 engine
        steps[name] = (two, one)
    assert torch.equal(steps["plain"][0], steps["int8"][0])
    assert not torch.equal(steps["plain"][1], steps["int8"][1])
    cos = torch.nn.functional.cosine_similarity(steps["plain"][1].float(), steps["int8"][1].float())
    assert float(cos.min()) > 0.99


def test_prepacked_bf16_weights_give_f_linear_numbers_at_any_row_count(tiny_model):
    import copy

    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN: no prepacked weights")
    lm = copy.deepcopy(tiny_model.lm).to(torch.bfloat16)
    # exact mode: every row count on the prepacked weights (by default few rows take the bf16
    # kernel where it runs, tests/model/test_bf16_gemm.py)
    lin = DecoderEngine(lm, slots=1, exact=True).layers[0].gate_up
    assert lin.packed is not None and lin.kernel is None
    for rows in (1, 2, 16, 17, 64, 150):  # decode steps and prefills
        x = torch.randn(rows, lin.weight.shape[1], dtype=torch.bfloat16)
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight)), rows


def test_bf16_decode_steps_through_prepacked_weights_match_a_prefill(tiny_model):
    import copy

    lm = copy.deepcopy(tiny_model.lm).to(torch.bfloat16)
    ids = list(range(5, 30))
    engine = DecoderEngine(lm, slots=1, exact=True)  # few rows on oneDNN, not the bf16 kernel
    assert all(lin.packed is not None for lin in (engine.lm_head, engine.layers[0].qkv)) or not (
        torch.backends.mkldnn.is_available()
    )
    ref = engine.prefill(0, ids)[-1]  # many rows at once
    engine.reset(0)
    engine.prefill(0, ids[:-1])
    step = engine.decode([ids[-1]])[0]  # one row: the prepacked weights
    assert torch.nn.functional.cosine_similarity(step.float(), ref.float(), dim=0) > 0.999
    torch.testing.assert_close(engine.logits(step[None]), engine.logits(ref[None]), atol=0.1, rtol=0.05)


def test_unsupported_models_fall_back_to_hf(tiny_model):
    from peft import LoraConfig, get_peft_model

    assert unsupported_reason(tiny_model.lm) is None
    import copy

    peft_lm = get_peft_model(copy.deepcopy(tiny_model.lm), LoraConfig(r=2, target_modules=["q_proj"]))
    assert "merge" in unsupported_reason(peft_lm)
    model = copy.copy(tiny_model)
    model.lm = peft_lm
    assert make_backend(model, "engine").name == "hf"
    assert make_backend(tiny_model, "engine").name == "engine"
    with pytest.raises(ValueError, match="unknown generation backend"):
        make_backend(tiny_model, "vllm")  # type: ignore[arg-type]


class _Forced:
    """A grammar that lets only `ids` be written, one after the other (then a stop)."""

    def __init__(self, ids, stop):
        self.ids, self.stop = list(ids), list(stop)

    def allowed(self, completion_ids):
        n = len(completion_ids)
        return [self.ids[n]] if n < len(self.ids) else self.stop


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_a_budget_that_stops_inside_a_character_leaves_it_out(tiny_model, backend):
    """A budget that ends inside "龙" (three byte tokens here) decoded to a trailing U+FFFD in the
    text, the stream's last piece, the cache and the CLI; the text ends at "藏" now, and the
    completion ids (what h_T reads) keep every token."""
    tok = tiny_model.tokenizer
    ids = tok.encode("Rated highest: 卧虎藏龙", add_special_tokens=False)
    (prompt,) = tiny_model.user_prompt_ids(HISTORIES[:1])
    for budget in (len(ids) - 1, len(ids) - 2):
        forced = _Forced(ids, tiny_model.stop_ids)
        settings = GenerationSettings(max_new_tokens=budget)
        rollout, _ = make_backend(tiny_model, backend).generate([prompt], settings, [forced])
        assert rollout.completion_ids[0] == ids[:budget]
        assert rollout.texts[0] == "Rated highest: 卧虎藏"
    # streamed: no piece holds part of a character, and the pieces make the text
    decoder = EngineBackend(tiny_model, slots=1).decoder(GenerationSettings(max_new_tokens=len(ids) - 1))
    pieces: list[str] = []
    seq = decoder.add(Sequence_(prompt, len(ids) - 1, on_text=pieces.append, constraint=_Forced(ids, [])))
    while not decoder.idle:
        decoder.step()
    assert "".join(pieces) == seq.text == "Rated highest: 卧虎藏"
    assert all("\ufffd" not in p for p in pieces)
    # the static batcher's own cut of a longer generation (service/recommender.py) too
    from model.r2ec import reasoning_text

    assert reasoning_text(tok, ids[:-1]) == "Rated highest: 卧虎藏"
    assert reasoning_text(tok, ids) == "Rated highest: 卧虎藏龙"
