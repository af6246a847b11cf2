"""Greedy-token agreement of the engine with HF `generate` at batch 1, prompt by prompt: the
engine as served (prefix cache, grouped attention, speculative decoding; here always alone),
without speculative decoding (R2EC_SPECULATIVE_TOKENS=0), and in exact mode (R2EC_EXACT_DECODE:
no prefix cache, attention per query head, no speculation). Every text is decoded under its
prompt's title grammar, as served (model/constrained.py). Prints one line per setting: each
prompt's share of positions equal to HF's text, the first position that differs, and the
share over all positions. HF's own batches of 8 are the first line: the noise floor, since bf16
rounds differently with the batch shape (as the engine's paths differ from HF's). The
speculative engine drafts from the texts of the prompts before (as a service does from the
users it answered before), never from a prompt's own earlier text.

    python3 bench/bench_agreement.py --checkpoint runs/hints/best [--rows 8] [--tokens 64]

bench/bench_decode.py reports the same agreement over its first 4 prompts with timings; this one
takes every prompt and says where each text leaves the reference's.
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

    from model.checkpoint import load_checkpoint
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
    batched = [
        ids
        for at in range(0, len(pairs), 8)
        for ids in hf.generate(prompts[at : at + 8], full, limits[at : at + 8])[0].completion_ids
    ]
    report("hf, batches of 8", ref, batched)
    settings = {
        "served (speculative)": {},
        "no speculation": {"speculative_tokens": 0},
        "exact": {"exact": True},
    }
    for name, kwargs in settings.items():
        engine = EngineBackend(model, slots=1, **kwargs)
        got = [
            engine.generate([p], full, [c])[0].completion_ids[0] for p, c in zip(prompts, limits, strict=True)
        ]
        report(name, ref, got)


def report(name: str, ref: list[list[int]], got: list[list[int]]) -> None:
    from bench_decode import agreement  # this script's folder is on sys.path

    same = [round(agreement([r], [g]), 2) for r, g in zip(ref, got, strict=True)]
    first = [
        next((i for i, (a, b) in enumerate(zip(r, g, strict=False)) if a != b), None)
        for r, g in zip(ref, got, strict=True)
    ]
    print(f"{name}: {agreement(ref, got):.1%} of positions; per prompt {same}, first difference at {first}")


if __name__ == "__main__":
    main()
