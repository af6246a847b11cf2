"""Would a reasoning step that copies the strongest co-watch hints lift the ranking? A
zero-training probe for issue 11 (reasoning the ranking uses), on a trained checkpoint.

    python3 bench/bench_hint_copy.py --checkpoint CKPT [--data data/ml-100k/loo] [--users 200] [--hints 3]

The idea: the prompt lists the 10 items other users most often watched next (model/cowatch.py),
strongest first, and the model ranks below what those counts rank alone (BENCHMARKS.md §1).
A text ending "Picks: A; B; C." with the `--hints` strongest hints (the sentence
`rationale_hint_picks` trains, model/rationale.py `picks_line`) would put their titles right
before the closing marker, where h_T is read, the way an item's own vector is read after its
title; no choice is needed from the LM, which picks among the hints at chance
(bench/bench_hint_choice.py). Before training a model to write it, this measures what h_T after
such a text gives the model as it is. For the first `--users` test users (the `seen` mask, the
catalog ranked by h_T · item vectors), four readings of h_T:
- `off`: straight after the prompt (no reasoning);
- `on`: after the model's own greedy reasoning (64 tokens, title grammar), as served;
- `on + copy`: after that reasoning with " Picks: A; B; C." appended;
- `copy`: after "Picks: A; B; C." alone.
Prints NDCG@5/10/20 with the per-user standard error, and each reading against `off` (the
paired per-user difference of NDCG@10).
"""

from __future__ import annotations

import argparse

from model.data import load_prepared  # before torch: model/__init__ sets OMP_WAIT_POLICY

READINGS = ("off", "on", "on + copy", "copy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--users", type=int, default=200, help="first N test users")
    parser.add_argument("--hints", type=int, default=3, help="strongest hints the text copies")
    args = parser.parse_args()

    import numpy as np
    import torch

    from model.checkpoint import load_checkpoint
    from model.evaluate import EvalConfig, evaluate_scores, paired_difference
    from model.generation import EngineBackend
    from model.r2ec import GenerationSettings
    from model.rationale import catalog_facts, history_facts, picks_line
    from model.samples import sample_histories

    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.model
    if model.cowatch is None or not model.prompts.cowatch_hints:
        raise SystemExit("this checkpoint's prompts name no co-watch hints")
    dataset = load_prepared(args.data)
    titles = dataset.item_titles()
    facts = catalog_facts(dataset.items.to_dict("records"))
    vectors = torch.as_tensor(np.asarray(ckpt.item_vectors, dtype=np.float32))
    backend = EngineBackend(model, slots=8)
    tok = model.tokenizer
    full, none = GenerationSettings(max_new_tokens=64), GenerationSettings(max_new_tokens=0)
    written: dict[tuple, tuple] = {}  # a chunk's greedy reasoning, shared by the readings

    def scorer(reading: str):
        def score(chunk):
            histories = sample_histories(chunk, titles)
            prompts = model.user_prompt_ids(histories)
            if reading == "off":
                return model.score(backend.generate(prompts, none)[1], vectors)
            key = tuple(chunk.index)
            if key not in written:
                grammars = model.title_lists(histories, facts=history_facts(histories, facts))
                rollout, users = backend.generate(prompts, full, grammars)
                written[key] = (rollout.completion_ids, users)
            completions, users = written[key]
            if reading == "on":
                return model.score(users, vectors)
            texts = []
            for history, completion in zip(histories, completions, strict=True):
                hints = model.cowatch.hints([e.item_id for e in history], model.prompts.cowatch_hints)
                sentence = picks_line([titles[i] for i in hints[: args.hints]])
                if reading == "copy":
                    texts.append(tok(sentence, add_special_tokens=False)["input_ids"])
                else:  # the reasoning without its end token, then the sentence
                    own = [t for t in completion if t not in model.stop_ids]
                    texts.append(own + tok(" " + sentence, add_special_tokens=False)["input_ids"])
            return model.score(backend.vectors(prompts, texts), vectors)

        return score

    cfg = EvalConfig(limit=args.users, batch_size=8)
    results = {r: evaluate_scores(dataset, cfg, scorer(r), progress=True) for r in READINGS}
    print(f"\n{args.users} test users, `seen` mask, {args.hints} hints copied\n")
    print("| h_T read after | ndcg@5 | ndcg@10 (± s.e.) | ndcg@20 | against `off` (paired ndcg@10) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        m = r.metrics
        d = paired_difference(r.ranks, results["off"].ranks, users=r.users)
        vs = "" if name == "off" else f"{d['diff']:+.4f} ± {d['stderr']:.4f} ({d['ratio']:.2f}x)"
        print(
            f"| {name} | {m['ndcg@5']:.4f} | {m['ndcg@10']:.4f} ± {r.stderr['ndcg@10']:.4f} "
            f"| {m['ndcg@20']:.4f} | {vs} |"
        )


if __name__ == "__main__":
    main()
