"""RecPO's rollout settings side by side: the sampling temperature and the reasoning budget
(the official code samples at 2.0 with up to 640 tokens; configs/ml100k-recpo.yaml at 1.0
with 64). Prints a markdown table; all rows measured in this one run, on the same users.

    python3 bench/bench_rollouts.py --checkpoint artifacts/ml100k [--users 16] [--generations 4] \
        [--settings 1.0:64,2.0:64,1.0:640,1.0:64:free]

A setting is TEMPERATURE:TOKENS, and `:free` samples the title list freely instead of under the
prompt's title grammar (`constrain_titles`, the default since stop 20).

Each setting runs RecPO's own rollout (model/rollout.py: G sampled texts per user, scored
against the whole item table, fused reward, group advantages) on the same training users,
with no update. What decides a setting:

- the reward's spread within a group (GRPO learns only from differences between a user's G
  texts: a group whose texts all rank the target alike gives zero advantage), and the share of
  groups with any spread;
- the reward's level (a setting whose texts rank the target worse starts RecPO lower);
- the texts: repeated-4-gram loops, unknown titles, distinct-2, length, the share that ran
  into the budget without stopping;
- seconds per rollout, the bulk of a RecPO step on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

from model.data import load_prepared  # before torch: model/__init__ sets OMP_WAIT_POLICY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="the warm start RecPO would run from")
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--config", default="configs/ml100k-recpo.yaml")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="users per rollout call")
    parser.add_argument(
        "--settings", default="1.0:64,2.0:64,1.0:640,1.0:64:free", help="TEMPERATURE:TOKENS[:free],..."
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np
    import torch

    from model.recpo import RecPOConfig
    from model.text_quality import text_quality
    from model.train import Trainer

    ds = load_prepared(args.data)
    cfg = RecPOConfig.from_yaml(args.config, num_generations=args.generations, item_layer_cache_gb=0.0)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, ds, args.checkpoint, out)
    rows = trainer.train_rows.sample(n=args.users, random_state=args.seed)
    titles = list(ds.item_titles().values())
    settings = []
    for spec in args.settings.split(","):
        t, n, *free = spec.split(":")
        settings.append((float(t), int(n), free == ["free"]))
    print(
        f"{args.users} training users x {args.generations} texts, checkpoint {args.checkpoint}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    stops = set(trainer.model.stop_ids)
    results = []
    for temperature, tokens, free in settings:
        trainer.recpo.cfg = dataclasses.replace(
            cfg, temperature=temperature, max_completion_length=tokens, constrain_titles=not free
        )
        torch.manual_seed(args.seed)
        stats, texts, lengths, capped, spread = [], [], [], 0, 0
        seconds = 0.0
        for start in range(0, len(rows), args.batch):
            t = time.perf_counter()
            rb = trainer.recpo.rollout(rows.iloc[start : start + args.batch])
            seconds += time.perf_counter() - t
            completions = rb.rollout.completion_ids
            capped += sum(len(c) >= tokens and (not c or c[-1] not in stops) for c in completions)
            lengths += [len(c) for c in completions]
            texts += rb.rollout.texts
            stats.append(rb.stats)
            # a group whose G rewards are all equal has zero advantages: nothing to learn from
            spread += int((rb.advantages.view(-1, args.generations).abs().sum(1) > 1e-6).sum())
        quality = text_quality(texts, titles)
        n = len(texts)
        row = {
            "temperature": temperature,
            "tokens": tokens,
            "titles": "free" if free else "grammar",
            "reward": float(np.mean([r["reward/mean"] for r in stats])),
            "ndcg": float(np.mean([r["reward/ndcg/mean"] for r in stats])),
            "group_std": float(np.mean([r["reward/std"] for r in stats])),
            "groups_with_spread": spread / len(rows),
            "rank_median": float(np.median([r["rank/median"] for r in stats])),
            "mean_tokens": float(np.mean(lengths)),
            "capped": capped / n,
            "loops": quality.loop_share,
            "unknown": quality.unknown_title_share,
            "distinct_2": quality.distinct_2,
            "s_per_text": seconds / n,
            "example": texts[0][:160],
        }
        results.append(row)
        print(row, flush=True)
    columns = {
        "temperature": "{}",
        "budget": "{}",
        "title list": "{}",
        "reward mean": "{:.4f}",
        "NDCG reward": "{:.4f}",
        "reward std in a group": "{:.4f}",
        "groups with any spread": "{:.0%}",
        "median target rank": "{:.0f}",
        "tokens": "{:.1f}",
        "ran into the budget": "{:.0%}",
        "loops": "{:.0%}",
        "unknown titles": "{:.0%}",
        "distinct-2": "{:.2f}",
        "s per text": "{:.2f}",
    }
    keys = ["temperature", "tokens", "titles", "reward", "ndcg", "group_std", "groups_with_spread"]
    keys += ["rank_median", "mean_tokens", "capped", "loops", "unknown", "distinct_2", "s_per_text"]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for r in results:
        print("| " + " | ".join(f.format(r[k]) for f, k in zip(columns.values(), keys, strict=True)) + " |")
    print()
    for r in results:
        print(f"- T={r['temperature']}, {r['tokens']} tokens, {r['titles']}: {r['example']!r}")


if __name__ == "__main__":
    main()
