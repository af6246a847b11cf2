"""How far back does the co-watch signal reach? The counts the prompt's hints come from
(model/cowatch.py), ranked alone, at other windows than the hints' 10.

    python3 bench/bench_cowatch.py [--data data/ml-100k/loo] [--windows 5 10 20] [--split test]

A checkpoint's `PromptConfig.cowatch_window` (10) sets two things at once: how many steps apart
two items may be and still count as a pair in the table, and how many of a history's latest
items score the candidates (the k-th latest weighted 1 / k). Each pair (pairs within P, scored
from the latest S) of `--windows` is ranked under the same harness as every model (the `seen`
mask, popularity breaking ties; model/evaluate.py `evaluate_cowatch`) and paired per user
against the hints' default (`cowatch_window`, 10, for both): NDCG@10 difference ± its
standard error, users whose target ranks better / worse, mean log(rank / the hints' rank). No
model is loaded; a few seconds a row.
"""

from __future__ import annotations

import argparse

from model.data import load_prepared  # before torch: model/__init__ sets OMP_WAIT_POLICY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--windows", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    if min(args.windows) < 1:
        parser.error(f"--windows must be >= 1, got {args.windows}")

    from model.evaluate import EvalConfig, evaluate_cowatch, paired_cells
    from model.prompts import PromptConfig

    hinted = PromptConfig.cowatch_window  # the hints' default window, for pairs and scoring alike

    dataset = load_prepared(args.data)
    cfg = EvalConfig(split=args.split)
    hints = evaluate_cowatch(dataset, cfg, hinted)
    print(f"{hints.count} {args.split} users, `seen` mask, {args.data}")
    print("| pairs within | scored from the latest | ndcg@10 (± s.e.) |", end="")
    print(f" against ({hinted}, {hinted}): ndcg@10 (paired) | better / worse | log(rank / hints' rank) |")
    print("|---|---|---|---|---|---|")
    for pairs in args.windows:
        for scored in args.windows:
            r = hints if pairs == scored == hinted else evaluate_cowatch(dataset, cfg, pairs, scored)
            vs = paired_cells(r.ranks, hints.ranks, r.users) if r is not hints else " | | "
            print(f"| {pairs} | {scored} | {r.metrics['ndcg@10']:.4f} ± {r.stderr['ndcg@10']:.4f} | {vs} |")


if __name__ == "__main__":
    main()
