"""Greedy-token agreement of the engine with HF `generate` at batch 1, prompt by prompt: the
engine as served (prefix cache, grouped attention, speculative decoding, few-row matmuls through
model/bf16_gemm.py's kernel; here always alone), the same with every matmul on oneDNN, without
speculative decoding (R2EC_SPECULATIVE_TOKENS=0), and in exact mode (R2EC_EXACT_DECODE:
no prefix cache, attention per query head, no speculation). Every text is decoded under its
prompt's title grammar, as served (model/constrained.py).

Two measures per setting, both against HF `generate`'s text for the prompt alone (the reference):

- free-running: the setting writes its own text; the share of positions equal to the
  reference's, and the first position that differs. Once one near-tie falls the other way the
  two texts part and every later position can differ, so one flip early in a text costs most of
  it: the measure says how often two decoders write the same text.
- teacher-forced: the setting's own decoder runs as it does when serving (prefix cache, the
  drafts it looks up and checks several positions a forward, a plain one-row step when there is
  no draft) but is made to write the reference text, and at every position its own greedy pick
  after the reference's tokens before it is recorded; the share equal to the reference's token.
  Each position is judged on its own, the usual per-token agreement of two implementations of
  one model (e.g. of a quantised model with its original).

HF's own other batch shapes are the first line, the noise floor: free-running, its batches of 8;
teacher-forced, one forward over [prompt; reference], the shape training and `vectors` use. bf16
rounds differently with the shape of a matmul, as the engine's paths differ from HF's. The
speculative engine drafts from the texts of the prompts before (as a service does from the
users it answered before), never from a prompt's own earlier text.

    python3 bench/bench_agreement.py --checkpoint runs/ml100k/onestage/best [--rows 8] [--tokens 64] \
        [--settings served,onednn,nospec,exact]

bench/bench_decode.py reports the free-running agreement over its first 4 prompts with timings;
this one takes every prompt and says where each text leaves the reference's.
"""

from __future__ import annotations

import argparse

from model.data import load_prepared  # before torch: model/__init__ sets OMP_WAIT_POLICY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--rows", type=int, default=8, help="test prompts")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help=f"engine settings to compare with HF, of {','.join(SETTINGS)} (HF's own row always runs)",
    )
    args = parser.parse_args()
    if args.tokens < 1:
        parser.error("--tokens must be >= 1")
    chosen = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not chosen or any(s not in SETTINGS for s in chosen):
        parser.error(f"--settings: choose from {','.join(SETTINGS)}")

    import torch
    from bench_decode import onednn_only  # this script's folder is on sys.path

    from model.checkpoint import load_checkpoint
    from model.constrained import constrain_logits
    from model.generation import ContinuousDecoder, EngineBackend, HFBackend, Sequence_
    from model.r2ec import GenerationSettings
    from model.rationale import catalog_facts, history_facts
    from model.samples import sample_histories

    class Forced(ContinuousDecoder):
        """A ContinuousDecoder that writes each sequence's `reference` text whatever the model
        picks, and records the model's own greedy pick (under the title grammar) at every
        position: the served path's steps, drafts and checks, on the reference's text."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.reference: dict[Sequence_, list[int]] = {}
            self.picks: dict[Sequence_, dict[int, int]] = {}

        def _next_tokens(self, logits, seqs, written=None):
            written = [q.completion_ids for q in seqs] if written is None else written
            own = super()._next_tokens(logits, seqs, written)
            out = []
            for seq, text, pick in zip(seqs, written, own, strict=True):
                ref = self.reference[seq]
                if len(text) < len(ref):
                    self.picks.setdefault(seq, {}).setdefault(len(text), pick)
                    out.append(ref[len(text)])
                else:  # a draft checked past the reference's stop token: dropped when it ends
                    out.append(pick)
            return out

    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.model
    titles = dict(zip(ckpt.items["item_id"].astype(str), ckpt.items["title"], strict=True))
    test = load_prepared(args.data).split("test").iloc[: args.rows]
    histories = sample_histories(test, titles)
    # as served: every claim under the grammar of what holds (model/constrained.py)
    facts = history_facts(histories, catalog_facts(ckpt.items.to_dict("records")))
    prompts, limits = model.user_prompt_ids(histories), model.title_lists(histories, facts=facts)
    full = GenerationSettings(max_new_tokens=args.tokens)
    hf = HFBackend(model)
    pairs = list(zip(prompts, limits, strict=True))
    ref = [hf.generate([p], full, [c])[0].completion_ids[0] for p, c in pairs]

    def greedy(logits: torch.Tensor, constraint, text: list[int]) -> list[int]:
        """The greedy token at each of `text`'s positions from its logits (row j: after the
        prompt and text[:j]), under the title grammar as decoding applies it."""
        allowed = [None if constraint is None else constraint.allowed(text[:j]) for j in range(len(text))]
        return constrain_logits(logits, allowed).argmax(dim=-1).tolist()

    @torch.inference_mode()
    def hf_forced(prompt: list[int], text: list[int], constraint) -> list[int]:
        ids = torch.tensor([list(prompt) + text[:-1]], device=model.device)
        logits = model.lm(input_ids=ids).logits[0, len(prompt) - 1 :].float()
        return greedy(logits, constraint, text)

    def engine_forced(backend: EngineBackend, prompt: list[int], text: list[int], constraint) -> list[int]:
        """The backend's decoder as served (prefix cache, drafts and their checks, the plain
        step when there is no draft), made to write `text` whatever it picks (`Forced`)."""
        decoder = Forced(model, backend.engine, full, backend.engine.slots, backend.drafter)
        seq = decoder.add(Sequence_(list(prompt), args.tokens, constraint=constraint))
        decoder.reference[seq] = text
        while not decoder.idle:
            decoder.step()
        if seq.completion_ids != text:
            raise RuntimeError("the forced decoder did not write the reference text")
        picks = decoder.picks[seq]
        return [picks[j] for j in range(len(text))]

    batched = [
        ids
        for at in range(0, len(pairs), 8)
        for ids in hf.generate(prompts[at : at + 8], full, limits[at : at + 8])[0].completion_ids
    ]
    forced = [hf_forced(p, r, c) for (p, c), r in zip(pairs, ref, strict=True)]
    report("hf (batches of 8; one forward)", ref, batched, forced)

    def backend_for(onednn: bool = False, **kwargs) -> EngineBackend:
        backend = EngineBackend(model, slots=1, **kwargs)
        if onednn:
            onednn_only(backend.engine)
        return backend

    for key in chosen:
        name, kwargs = SETTINGS[key]
        # each measure on a backend of its own, so both draft from the texts of earlier prompts only
        backend = backend_for(**kwargs)
        forced = [engine_forced(backend, p, r, c) for (p, c), r in zip(pairs, ref, strict=True)]
        backend = backend_for(**kwargs)
        got = [backend.generate([p], full, [c])[0].completion_ids[0] for p, c in pairs]
        report(name, ref, got, forced)


# --settings: name printed, EngineBackend arguments (onednn: every matmul on oneDNN)
SETTINGS: dict[str, tuple[str, dict]] = {
    "served": ("served (speculative)", {}),
    "onednn": ("served, matmuls on oneDNN (before stop 25)", {"onednn": True}),
    "nospec": ("no speculation", {"speculative_tokens": 0}),
    "exact": ("exact", {"exact": True}),
}


def share_and_stderr(ref: list[list[int]], got: list[list[int]]) -> tuple[float, float]:
    """The share of reference positions equal in `got` (a ratio over all prompts' positions)
    and its standard error over prompts (the ratio estimator's: prompts are the sampled units,
    and one early flip costs a whole text)."""
    import math

    same = [sum(a == b for a, b in zip(r, g, strict=False)) for r, g in zip(ref, got, strict=True)]
    sizes = [len(r) for r in ref]
    k, share = len(ref), sum(same) / max(1, sum(sizes))
    if k < 2:
        return share, float("nan")
    spread = sum((m - share * n) ** 2 for m, n in zip(same, sizes, strict=True)) / (k - 1)
    return share, math.sqrt(spread / k) / (sum(sizes) / k)


def report(name: str, ref: list[list[int]], got: list[list[int]], forced: list[list[int]]) -> None:
    from bench_decode import agreement  # this script's folder is on sys.path

    same = [round(agreement([r], [g]), 2) for r, g in zip(ref, got, strict=True)]
    first = [
        next((i for i, (a, b) in enumerate(zip(r, g, strict=False)) if a != b), None)
        for r, g in zip(ref, got, strict=True)
    ]
    missed = [
        [i for i, (a, b) in enumerate(zip(r, f, strict=True)) if a != b]
        for r, f in zip(ref, forced, strict=True)
    ]
    free, free_se = share_and_stderr(ref, got)
    parted = sum(f is not None for f in first)
    print(
        f"{name}: free-running {free:.1%} ± {free_se:.1%} of positions, {parted} of {len(ref)} texts "
        f"part from the reference's (per prompt {same}, first "
        f"difference at {first}); teacher-forced {agreement(ref, forced):.1%}, "
        f"{sum(map(len, missed))} of {sum(map(len, ref))} positions differ (per prompt: {missed})",
        flush=True,
    )


if __name__ == "__main__":
    main()
