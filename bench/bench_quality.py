"""The ml-100k quality table: full-ranking Hit/NDCG@5/10/20 under the `seen` mask (the
field's protocol; NDCG@10 under `none` beside it), with per-user standard errors, for Pop,
SASRec, the untrained backbone and trained checkpoints, each model with and without
reasoning and the paired per-user difference between the two. Each row is one
`r2ec eval --json` run; results are appended to a JSONL file as they come, so an interrupted
run keeps what it measured.

    python3 bench/bench_quality.py --base-checkpoint checkpoints/current \\
        --trained warmup=runs/ml100k/warmup --trained recpo=runs/ml100k/recpo

Rows: pop; sasrec; untrained (the base checkpoint) and each `--trained` NAME=PATH as
"NAME no reasoning" and "NAME +reasoning" (one `--compare-reasoning` run that also gives the
no-reasoning numbers and the paired difference). `--splits valid,test`; `--skip` drops rows by
label, `--only` keeps just the named rows, `--limit N` evaluates the first N users of the
split. Reasoning is greedy, 64 tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from model.text_quality import CLAIM_KINDS

METRICS = ["hit@5", "ndcg@5", "hit@10", "ndcg@10", "hit@20", "ndcg@20"]


def run_eval(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "cli", "eval", *args, "--json"]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--base-checkpoint", default="checkpoints/current", help="the untrained model")
    parser.add_argument("--trained", action="append", default=[], help="NAME=CHECKPOINT, repeatable")
    parser.add_argument("--splits", default="test")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--skip", action="append", default=[], help="row label to leave out")
    parser.add_argument("--only", action="append", default=[], help="run just these row labels")
    parser.add_argument("--limit", type=int, default=None, help="first N users of the split only")
    parser.add_argument("--out", default="bench/out/quality.jsonl")
    args = parser.parse_args()

    models = [("untrained", args.base_checkpoint)]
    for spec in args.trained:
        name, _, path = spec.partition("=")
        if not path:
            parser.error(f"--trained wants NAME=CHECKPOINT, got {spec!r}")
        models.append((name, path))
    rows: list[tuple[str, list[str]]] = [("pop", ["--baseline", "pop"]), ("sasrec", ["--baseline", "sasrec"])]
    common = ["--batch-size", str(args.batch_size), "--max-reasoning-tokens", str(args.tokens)]
    for name, path in models:
        rows.append((f"{name} no reasoning", ["--checkpoint", path, "--no-reasoning", *common]))
        rows.append((f"{name} +reasoning", ["--checkpoint", path, "--compare-reasoning", *common]))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = []
    for split in args.splits.split(","):
        for label, extra in rows:
            if label in args.skip or (args.only and label not in args.only):
                continue
            print(f"== {label} on {split}", file=sys.stderr, flush=True)
            limit = [] if args.limit is None else ["--limit", str(args.limit)]
            result = run_eval(["--data", args.data, "--split", split, *extra, *limit])
            record = {"label": label, **result}
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            table.append(record)

    print_table(table)


def print_table(table: list[dict]) -> None:
    """Markdown: seen-mask metrics ± standard error, NDCG@10 under `none`, the paired
    reasoning on - off NDCG@10 difference and the target's geometric rank ratio (on / off) where
    measured, and the texts' quality."""
    head = " | NDCG@10 none | on - off (paired) | rank on / off (users better, worse) | texts |"
    print("| model | split | " + " | ".join(METRICS) + head)
    print("|---|---|" + "---|" * (len(METRICS) + 4))
    for r in table:
        values = " | ".join(f"{r['metrics'][m]:.4f} ± {r['stderr'][m]:.4f}" for m in METRICS)
        none = r.get("by_mask", {}).get("none", {}).get("ndcg@10", float("nan"))
        pair = r.get("paired_ndcg@10")
        paired = f"{pair['diff']:+.4f} ± {pair['stderr']:.4f} ({pair['ratio']:.2f}x)" if pair else ""
        pr = r.get("paired_rank")
        ranks = f"{pr['rank_ratio']:.3f}x ({pr['a_better']}, {pr['b_better']})" if pr else ""
        q = r.get("text_quality")
        texts = (
            f"d2 {q['distinct_2']:.2f}, loops {q['loop_share']:.0%}, unknown {q['unknown_title_share']:.0%}"
            if q
            else ""
        )
        for kind in CLAIM_KINDS:  # the claims that hold, where texts make them
            if q and q.get(f"{kind}_hold_share") is not None:
                texts += f", {kind} hold {q[f'{kind}_hold_share']:.0%}"
        print(f"| {r['label']} | {r['split']} | {values} | {none:.4f} | {paired} | {ranks} | {texts} |")


if __name__ == "__main__":
    main()
