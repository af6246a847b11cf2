"""Greedy-token agreement of the engine with HF `generate` at batch 1, prompt by prompt: the
engine as served (prefix cache, grouped attention, speculative decoding; here always alone),
without speculative decoding (R2EC_SPECULATIVE_TOKENS=0), and in exact mode (R2EC_EXACT_DECODE:
no prefix cache, attention per query head, no speculation). Every text is decoded under its
prompt's title grammar, as served (model/constrained.py).

Two measures per setting, both against HF `generate`'s text for the prompt alone (the reference):

- free-running: the setting writes its own text; the share of positions equal to the
  reference's, and the first position that differs. Once one near-tie falls the other way the
  two texts part and every later position can differ, so one flip early in a text costs most of
  it: the measure says how often two decoders write the same text.
- teacher-forced: the setting reads the reference text and, at every position, picks its own
  greedy token after the reference's tokens before it; the share equal to the reference's next
  token. Each position is judged on its own, the usual per-token agreement of two
  implementations of one model (e.g. of a quantised model with its original). The served engine
  reads the reference as its speculative check does, 1 + `speculative_tokens` positions a
  forward (`DecoderEngine.extend`); the others one position a forward (`decode`).

HF's own other batch shapes are the first line, the noise floor: free-running, its batches of 8;
teacher-forced, one forward over [prompt; reference], the shape training and `vectors` use. bf16
rounds differently with the shape of a matmul, as the engine's paths differ from HF's. The
speculative engine drafts from the texts of the prompts before (as a service does from the
users it answered before), never from a prompt's own earlier text.

    python3 bench/bench_agreement.py --checkpoint runs/hints/best [--rows 8] [--tokens 64]

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
    args = parser.parse_args()

    import torch

    from model.checkpoint import load_checkpoint
    from model.constrained import constrain_logits
    from model.generation import EngineBackend, HFBackend
    from model.r2ec import GenerationSettings
    from model.samples import sample_histories

    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.model
    titles = dict(zip(ckpt.items["item_id"].astype(str), ckpt.items["title"], strict=True))
    test = load_prepared(args.data).split("test").iloc[: args.rows]
    histories = sample_histories(test, titles)
    prompts, limits = model.user_prompt_ids(histories), model.title_lists(histories)
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
        engine, chunk = backend.engine, 1 + (backend.drafter.tokens if backend.drafter else 0)
        engine.reset(0)
        hidden = [engine.prefill(0, list(prompt), reuse_prefix=True)[-1:]]
        at = 0
        while at < len(text) - 1:  # the last token's successor is not compared
            piece = text[at : min(at + chunk, len(text) - 1)]
            hidden.append(engine.extend([piece])[0] if chunk > 1 else engine.decode(piece))
            at += len(piece)
        engine.reset(0)
        return greedy(engine.logits(torch.cat(hidden)), constraint, text)

    batched = [
        ids
        for at in range(0, len(pairs), 8)
        for ids in hf.generate(prompts[at : at + 8], full, limits[at : at + 8])[0].completion_ids
    ]
    forced = [hf_forced(p, r, c) for (p, c), r in zip(pairs, ref, strict=True)]
    report("hf (batches of 8; one forward)", ref, batched, forced)
    settings = {
        "served (speculative)": {},
        "no speculation": {"speculative_tokens": 0},
        "exact": {"exact": True},
    }
    for name, kwargs in settings.items():
        backend = EngineBackend(model, slots=1, **kwargs)
        forced = [engine_forced(backend, p, r, c) for (p, c), r in zip(pairs, ref, strict=True)]
        got = [backend.generate([p], full, [c])[0].completion_ids[0] for p, c in pairs]
        report(name, ref, got, forced)


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
    print(
        f"{name}: free-running {agreement(ref, got):.1%} of positions (per prompt {same}, first "
        f"difference at {first}); teacher-forced {agreement(ref, forced):.1%}, "
        f"{sum(map(len, missed))} of {sum(map(len, ref))} positions differ (per prompt: {missed})",
        flush=True,
    )


if __name__ == "__main__":
    main()
