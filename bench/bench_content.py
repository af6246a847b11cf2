"""Does rec_head read what the reasoning says? h_T read after other texts in the reasoning's
slot, each paired per user against the model's own text, on a trained checkpoint.

    python3 bench/bench_content.py --checkpoint CKPT [--data data/ml-100k/loo] [--users 943]
    python3 bench/bench_content.py --checkpoint CKPT --users 200 --samples 4 [--temperature 1.0]

For the first `--users` test users (the `seen` mask, the catalog ranked by h_T · item vectors),
h_T is read after [prompt; text; closing marker] for these texts:
- `own`: the model's own greedy reasoning (64 tokens, every claim under the grammar of what
  holds, model/constrained.py), as served;
- `true`: the data-built rationale of the prompt's window (model/rationale.py `rationale_parts`,
  no hindsight, then the stop token): every claim true, in the format the shipped recipe trains
  (`rationale_hindsight: false`, no "Picks:");
- `stored`: the data-built rationale of the user's whole stored history (the prepared sample's,
  up to its 20 items, as many as the service's Redis window keeps by default) where the prompt
  shows the checkpoint's latest `max_history` (10 for the shipped model): whether a summary of
  what the prompt leaves out would carry information the model reads (it was trained on the
  window's only);
- `other`: another user's data-built rationale (the next test user's): a text of the same form
  about someone else;
- `stop`: the stop token alone: the trained reading position with no text;
- `off`: no reasoning (the fast path, h_T right after the prompt).
With `--fuse W`: `X + off` for X each of `own`, `true`, `other` and `stop`, the unit h_T after X
plus W times the unit h_T after the prompt alone, the sum ranking the catalog: a reasoning
mode that ranks by both states, at the cost of one more token's forward, since the prompt's
prefill is shared. `other + off` and `stop + off` are its controls: a gain they share is
ensembling two reading positions, not what the text says.
With `--samples K`: K texts sampled at `--temperature` (top-k 50, as RecPO's rollouts) under the
same grammars, each read alone (`sample 1..K`), and `mean`: the mean of the K + 1 normalised h_T
(greedy and samples), self-consistency over reasonings (K + 1 times the decoding).
Prints NDCG@10 with its standard error (clustered by user) and, against `own`, the paired NDCG@10
difference and the paired whole-rank comparison (model/evaluate.py `paired_ranks`: users
ranked better / worse, mean log(rank / rank of own) ± s.e.). All texts are read through the same
backend (model/generation.py, the engine), so `own` is the served reading. Compare within
one run only.
"""

from __future__ import annotations

import argparse

from model.data import load_prepared  # before torch: model/__init__ sets OMP_WAIT_POLICY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--users", type=int, default=943, help="first N test users")
    parser.add_argument("--samples", type=int, default=0, help="K sampled texts per user (0: none)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fuse", type=float, default=0.0, help="weight W of `off` in `X + off` (0: none)")
    args = parser.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    from model.checkpoint import load_checkpoint
    from model.evaluate import EvalConfig, eval_rows, evaluate_scores, paired_cells
    from model.generation import EngineBackend
    from model.r2ec import GenerationSettings
    from model.rationale import catalog_facts, history_facts, rationale_parts
    from model.samples import sample_histories

    torch.manual_seed(args.seed)
    ckpt = load_checkpoint(args.checkpoint)
    model, window = ckpt.model, ckpt.model.prompts.max_history
    dataset = load_prepared(args.data)
    titles, facts = dataset.item_titles(), catalog_facts(dataset.items.to_dict("records"))
    vectors = torch.as_tensor(np.asarray(ckpt.item_vectors, dtype=np.float32))
    backend = EngineBackend(model, slots=8)
    greedy = GenerationSettings(max_new_tokens=64)
    sampled = GenerationSettings(max_new_tokens=64, do_sample=True, temperature=args.temperature)
    readings = ["own", "true", "stored", "other", "stop", "off"]
    if args.samples:
        readings += [f"sample {i + 1}" for i in range(args.samples)] + ["mean"]
    fused = ["own", "true", "other", "stop"] if args.fuse else []
    readings += [f"{k} + off" for k in fused]
    cfg = EvalConfig(limit=args.users, batch_size=8)

    # each user's data-built rationale, and whose text `other` reads: the next user's
    rows = eval_rows(dataset, cfg)

    def built(n: int) -> dict:
        """Each user's data-built rationale of the latest `n` history items."""
        return {
            i: rationale_parts(
                r.history_item_ids, r.history_ratings, r.target_item_id, facts, max_history=n, hindsight=False
            )[0]
            for i, r in zip(rows.index, rows.itertuples(index=False), strict=True)
        }

    # `rationale_parts` keeps a history's latest n: the longest history's length keeps all of
    # each one (a history no longer than the window reads as `true` does)
    true, stored = built(window), built(max(map(len, rows.history_item_ids)))
    after = dict(zip(rows.index, [*rows.index[1:], rows.index[0]], strict=True))

    def h_t(chunk) -> dict[str, torch.Tensor]:
        """Every reading's h_T for one batch of users, (B, H) each."""
        histories = sample_histories(chunk, titles)
        prompts = model.user_prompt_ids(histories)
        grammars = model.title_lists(histories, facts=history_facts(histories, facts))
        out = {
            "own": backend.generate(prompts, greedy, grammars)[1],
            "true": backend.vectors(prompts, model.completion_ids([true[i] for i in chunk.index])),
            "stored": backend.vectors(prompts, model.completion_ids([stored[i] for i in chunk.index])),
            "other": backend.vectors(prompts, model.completion_ids([true[after[i]] for i in chunk.index])),
            "stop": backend.vectors(prompts, [[model.stop_ids[0]] for _ in prompts]),
            "off": backend.generate(prompts, GenerationSettings(max_new_tokens=0))[1],
        }
        for i in range(args.samples):
            out[f"sample {i + 1}"] = backend.generate(prompts, sampled, grammars)[1]
        if args.samples:
            drawn = ["own"] + [f"sample {i + 1}" for i in range(args.samples)]
            # the sum of the unit vectors: the same ranking as their mean (scores are h_T · h_v)
            out["mean"] = sum(F.normalize(out[k].float(), dim=-1) for k in drawn)
        for k in fused:
            out[f"{k} + off"] = F.normalize(out[k].float(), dim=-1) + args.fuse * F.normalize(
                out["off"].float(), dim=-1
            )
        return out

    read: dict[tuple, dict[str, torch.Tensor]] = {}  # each batch's readings, written once

    def scorer(reading: str):
        def score(chunk):
            key = tuple(chunk.index)
            if key not in read:
                read[key] = h_t(chunk)
            return model.score(read[key][reading], vectors)

        return score

    results = {r: evaluate_scores(dataset, cfg, scorer(r), progress=r == "own") for r in readings}
    own = results["own"].ranks
    print(f"\n{len(own)} test users, `seen` mask, {args.checkpoint}")
    header = "| h_T read after | ndcg@10 (± s.e.) | against `own`: ndcg@10 (paired) | better / worse |"
    print(header + " log(rank / own's) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        vs = paired_cells(r.ranks, own, r.users) if name != "own" else ""
        print(f"| {name} | {r.metrics['ndcg@10']:.4f} ± {r.stderr['ndcg@10']:.4f} | {vs or ' | | '} |")


if __name__ == "__main__":
    main()
