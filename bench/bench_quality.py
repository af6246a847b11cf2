"""The ml-100k quality table: full-ranking Hit/NDCG@5/10/20 (history masked) for Pop, the
untrained backbone with and without reasoning, and trained checkpoints with and without
reasoning, on valid and/or test. Each row is one `r2ec eval --json` run; results are appended
to a JSONL file as they come, so an interrupted run keeps what it measured.

    python3 bench/bench_quality.py --base-checkpoint checkpoints/current \\
        --trained warmup=runs/ml100k/warmup --trained recpo=runs/ml100k/recpo

Rows: pop; untrained (the base checkpoint) with and without reasoning; each `--trained`
NAME=PATH with and without reasoning. `--splits valid,test`; `--skip` drops rows by label
(e.g. `--skip "warmup +reasoning"`), `--only` keeps just the named rows, `--limit N` evaluates
the first N users of the split. Reasoning is greedy, 64 tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

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
    rows: list[tuple[str, list[str]]] = [("pop", ["--baseline", "pop"])]
    common = ["--batch-size", str(args.batch_size), "--max-reasoning-tokens", str(args.tokens)]
    for name, path in models:
        rows.append((f"{name} no reasoning", ["--checkpoint", path, "--no-reasoning", *common]))
        rows.append((f"{name} +reasoning", ["--checkpoint", path, "--reasoning", *common]))

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

    print("| model | split | " + " | ".join(METRICS) + " | users | seconds |")
    print("|---|---|" + "---|" * (len(METRICS) + 2))
    for r in table:
        values = " | ".join(f"{r['metrics'][m]:.4f}" for m in METRICS)
        print(f"| {r['label']} | {r['split']} | {values} | {r['count']} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
