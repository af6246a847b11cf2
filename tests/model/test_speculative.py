"""Speculative decoding (model/speculative.py, ContinuousDecoder._speculate): drafts looked up in
the prompt and in remembered texts, checked in one forward (several sequences' together), and
never a token that greedy decoding would not write."""

import pytest
import torch

from model.constrained import TitleList, TokenStrings
from model.engine import DecoderEngine
from model.generation import EngineBackend, HFBackend, Sequence_
from model.prompts import HistoryEntry
from model.r2ec import GenerationSettings
from model.speculative import NgramDrafter

HISTORIES = [
    [HistoryEntry("Toy Story", 5.0), HistoryEntry("Fargo", 4.0), HistoryEntry("Heat", 3.0)],
    [HistoryEntry("Star Wars", 5.0), HistoryEntry("Casino", 2.0)],
    [HistoryEntry("Babe", 2.0), HistoryEntry("Casino", 4.5), HistoryEntry("Heat", 1.0)],
]


def test_a_draft_follows_the_latest_earlier_match_in_the_context_first():
    d = NgramDrafter(tokens=3, max_ngram=2, memory=4)
    assert d.draft([1, 2, 3, 9, 1, 2]) == [3, 9, 1]  # "1 2" came before, then "3 9 1"
    assert d.draft([4, 2, 5, 6, 4, 2, 7, 4, 2]) == [7, 4, 2]  # the latest of two matches
    assert d.draft([5, 1, 7, 8]) == []  # no n-gram of the tail occurred before
    d.remember([7, 8, 5, 6, 4])
    assert d.draft([1, 7, 8]) == [5, 6, 4]  # from a remembered text
    assert d.draft([9, 9, 8]) == [5, 6, 4]  # a shorter n-gram when the longer is unknown
    assert d.draft([1, 7, 8], limit=1) == [5] and d.draft([1, 7, 8], limit=0) == []
    assert d.draft([7, 8, 1, 1, 7, 8]) == [1, 1, 7]  # the sequence's own text before memory


def test_forgotten_texts_leave_the_index():
    d = NgramDrafter(tokens=2, max_ngram=1, memory=2)
    d.remember([1, 2, 3])
    d.remember([4, 5, 6])
    d.remember([7, 8, 9])
    d.remember([10, 11, 12])  # [1, 2, 3] and [4, 5, 6] are gone, and so are their n-grams
    assert len(d) == 2 and d.draft([1]) == [] and d.draft([4]) == []
    assert d.draft([7]) == [8, 9] and d.draft([11]) == [12]
    d.remember([5])  # too short to continue anything: not kept
    assert len(d) == 2
    with pytest.raises(ValueError, match="tokens"):
        NgramDrafter(tokens=0)


def test_truncate_only_forgets(tiny_model):
    engine = DecoderEngine(tiny_model.lm, slots=1, max_len=16)
    engine.prefill(0, [5, 6, 7, 8])
    engine.truncate(0, 2)
    assert engine.lens == [2]
    with pytest.raises(ValueError, match="cannot keep 3"):
        engine.truncate(0, 3)
    # what is kept computes on as if the forgotten positions had never been written
    hidden = engine.prefill(0, [9, 10])
    ref = tiny_model.lm.get_decoder()(input_ids=torch.tensor([[5, 6, 9, 10]])).last_hidden_state[0]
    torch.testing.assert_close(hidden, ref[2:], atol=1e-4, rtol=1e-4)


def test_extend_appends_several_tokens_to_rows_of_different_lengths(tiny_model):
    engine = DecoderEngine(tiny_model.lm, slots=3, max_len=8)  # the cache grows under it
    seqs = [list(range(5, 16)), list(range(30, 34)), list(range(40, 47))]
    for j, s in enumerate(seqs):
        engine.prefill(j, s[:-3])
    hidden = engine.extend([s[-3:] for s in seqs])
    assert hidden.shape == (3, 3, tiny_model.hidden_size) and engine.lens == [len(s) for s in seqs]
    for j, s in enumerate(seqs):
        ref = tiny_model.lm.get_decoder()(input_ids=torch.tensor([s])).last_hidden_state[0, -3:]
        torch.testing.assert_close(hidden[j], ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="same number"):
        engine.extend([[1, 2], [3]])


def _one_by_one(backend, prompts, settings, lists=None):
    lists = lists or [None] * len(prompts)
    out = [backend.generate([p], settings, [c]) for p, c in zip(prompts, lists, strict=True)]
    return [r.completion_ids[0] for r, _ in out], torch.cat([v for _, v in out])


@pytest.mark.parametrize("budget", [1, 2, 5, 24])
def test_speculative_decoding_writes_the_greedy_text(tiny_model, budget):
    prompts = tiny_model.user_prompt_ids(HISTORIES)
    settings = GenerationSettings(max_new_tokens=budget)
    ref, ref_vecs = _one_by_one(EngineBackend(tiny_model, slots=1, speculative_tokens=0), prompts, settings)
    spec = EngineBackend(tiny_model, slots=1, speculative_tokens=4)
    for _ in range(2):  # the second round drafts from the texts the first one wrote
        got, vecs = _one_by_one(spec, prompts, settings)
        assert got == ref
        assert torch.nn.functional.cosine_similarity(vecs, ref_vecs).min() > 0.9999
    if budget > 2:  # drafts were checked, and the remembered texts made them right
        assert spec.drafter.accepted > 0 and spec.drafter.drafted >= spec.drafter.accepted
    else:  # a budget of 1 or 2 leaves no room for a draft
        assert spec.drafter.drafted == 0


@pytest.mark.parametrize("slots", [2, 3, 5])
def test_several_sequences_check_their_drafts_in_one_forward(tiny_model, slots):
    prompts = tiny_model.user_prompt_ids(HISTORIES) * 2  # 6 prompts: 5 live at most
    settings = GenerationSettings(max_new_tokens=24)
    ref, ref_vecs = EngineBackend(tiny_model, slots=slots, speculative_tokens=0).generate(prompts, settings)
    spec = EngineBackend(tiny_model, slots=slots, speculative_tokens=8)
    for _ in range(2):  # the second round drafts from the first round's texts
        got, vecs = spec.generate(prompts, settings)  # 3 prompts together, rows of other lengths
        assert got.completion_ids == ref.completion_ids
        assert torch.nn.functional.cosine_similarity(vecs, ref_vecs).min() > 0.9999
    assert spec.drafter.accepted > 0


def test_with_six_live_sequences_the_step_is_a_plain_one(tiny_model):
    prompts = tiny_model.user_prompt_ids(HISTORIES) * 2
    spec = EngineBackend(tiny_model, slots=6, speculative_tokens=8)
    spec.generate(prompts, GenerationSettings(max_new_tokens=24))  # texts to draft from
    drafted = spec.drafter.drafted
    decoder = spec.decoder()
    for p in prompts:
        decoder.add(Sequence_(p, 24))
    decoder.step()  # admits all six, then one step: 16 rows leave no room for 2-token drafts
    assert len(decoder.active) == 6 and spec.drafter.drafted == drafted


def test_a_draft_that_runs_into_a_stop_ends_the_text_there(tiny_model):
    prompts = tiny_model.user_prompt_ids(HISTORIES)
    settings = GenerationSettings(max_new_tokens=24)
    ref, _ = _one_by_one(HFBackend(tiny_model), prompts, settings)
    stop = ref[0][5]  # make the random model's 6th token a stop token: it ends the text
    spec = EngineBackend(tiny_model, slots=1, speculative_tokens=8)
    spec.model.stop_ids = [*spec.model.stop_ids, stop]
    try:
        spec.drafter.remember(ref[0] + [1, 2, 3])  # a draft that goes on past the stop
        decoder = spec.decoder(settings)
        seq = decoder.add(Sequence_(prompts[0], 24))
        while not decoder.idle:
            decoder.step()
    finally:
        spec.model.stop_ids = spec.model.stop_ids[:-1]
    cut = ref[0].index(stop) + 1
    assert seq.completion_ids == ref[0][:cut] and spec.drafter.accepted > 0
    # h_T after exactly the written text, not after the draft's rejected or unused tokens
    want = HFBackend(tiny_model).vectors([prompts[0]], [seq.completion_ids])[0]
    assert torch.nn.functional.cosine_similarity(seq.vector, want, dim=0) > 0.9999


def test_drafts_are_checked_under_the_title_grammar(tiny_model):
    strings = TokenStrings(tiny_model.tokenizer)
    lists = [TitleList([e.title for e in h], strings, trigger="") for h in HISTORIES]
    prompts = tiny_model.user_prompt_ids(HISTORIES)
    settings = GenerationSettings(max_new_tokens=24)
    ref, _ = _one_by_one(EngineBackend(tiny_model, slots=1, speculative_tokens=0), prompts, settings, lists)
    spec = EngineBackend(tiny_model, slots=1, speculative_tokens=8)
    # remembered free texts (not lists) draft tokens the grammar forbids: none of them is kept
    free, _ = _one_by_one(spec, prompts, settings)
    assert free != ref
    before = (spec.drafter.drafted, spec.drafter.accepted)
    got, _ = _one_by_one(spec, prompts, settings, lists)
    assert got == ref
    drafted, accepted = spec.drafter.drafted - before[0], spec.drafter.accepted - before[1]
    assert drafted > accepted  # drafts were checked, and some of their tokens refused


def test_a_sequence_cancelled_by_its_own_listener_mid_draft_leaves_the_rest_intact(tiny_model):
    prompts = tiny_model.user_prompt_ids(HISTORIES)
    settings = GenerationSettings(max_new_tokens=24)
    ref, _ = EngineBackend(tiny_model, slots=2, speculative_tokens=0).generate(prompts, settings)
    spec = EngineBackend(tiny_model, slots=2, speculative_tokens=8)
    spec.generate(prompts, settings)  # the same texts, remembered: whole tails are confirmed at once
    decoder = spec.decoder(settings)
    cut = len(ref.completion_ids[0]) - 4  # cancelled a few tokens before its end, inside one step
    first = decoder.add(
        Sequence_(
            prompts[0], 24, on_text=lambda _: len(first.completion_ids) >= cut and decoder.cancel(first)
        )
    )
    rest = [decoder.add(Sequence_(p, 24)) for p in prompts[1:]]
    while not decoder.idle:
        decoder.step()
    assert first.cancelled and not first.done and cut <= len(first.completion_ids) < cut + 4
    assert [s.completion_ids for s in rest] == ref.completion_ids[1:]
    decoder.cancel(rest[0])  # a finished sequence stays finished
    assert rest[0].done and not rest[0].cancelled


def test_sampling_exact_decoding_and_int8_do_not_speculate(tiny_model):
    import copy

    assert EngineBackend(tiny_model, slots=1, exact=True).drafter is None
    backend = EngineBackend(tiny_model, slots=1)
    assert backend.decoder(GenerationSettings(do_sample=True, temperature=1.0)).drafter is None
    assert backend.decoder().drafter is backend.drafter
    # int8 weights serve one-row steps only: a checked draft (several rows) would run on bf16
    lm = copy.deepcopy(tiny_model.lm).to(torch.bfloat16)
    bf16 = type(tiny_model)(lm, tiny_model.tokenizer)
    assert EngineBackend(bf16, slots=1, quantize="int8").drafter is None
    with pytest.raises(ValueError, match="speculative_tokens"):
        EngineBackend(tiny_model, slots=1, speculative_tokens=-1)
