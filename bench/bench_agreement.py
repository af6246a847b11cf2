"""Greedy-token agreement of the engine with HF `generate` at batch 1, prompt by prompt, with and
without the engine's exact mode (R2EC_EXACT_DECODE: no prefix cache, attention per query head).
Prints one line per setting: each prompt's share of positions equal to HF's text, and the first
position that differs.

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

    from bench_decode import agreement  # this script's folder is on sys.path

    from model.checkpoint import load_checkpoint
    from model.generation import EngineBackend, HFBackend
    from model.r2ec import GenerationSettings
    from model.samples import sample_histories

    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.model
    titles = dict(zip(ckpt.items["item_id"].astype(str), ckpt.items["title"], strict=True))
    test = load_prepared(args.data).split("test").iloc[: args.rows]
    prompts = model.user_prompt_ids(sample_histories(test, titles))
    full = GenerationSettings(max_new_tokens=args.tokens)
    hf = HFBackend(model)
    ref = [hf.generate([p], full)[0].completion_ids[0] for p in prompts]
    for exact in (False, True):
        engine = EngineBackend(model, slots=1, exact=exact)
        got = [engine.generate([p], full)[0].completion_ids[0] for p in prompts]
        same = [round(agreement([r], [g]), 2) for r, g in zip(ref, got, strict=True)]
        first = [
            next((i for i, (a, b) in enumerate(zip(r, g, strict=False)) if a != b), None)
            for r, g in zip(ref, got, strict=True)
        ]
        print(f"exact {exact}: agreement {same}, first difference at {first}")


if __name__ == "__main__":
    main()
