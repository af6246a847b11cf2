"""The ml-100k quality table: full-ranking Hit/NDCG@5/10/20 under the `seen` mask (the
field's protocol; NDCG@10 under `none` beside it), with per-user standard errors, for Pop,
SASRec, the co-watch counts, the untrained backbone and trained checkpoints, each model with
and without reasoning and the paired per-user difference between the two. Each model is one
`r2ec eval --json` run; results are appended to a JSONL file as they come, so an interrupted
run keeps what it measured.

    r2ec checkpoint init --data data/ml-100k/loo --out checkpoints/base   # the untrained model
    python3 bench/bench_quality.py --base-checkpoint checkpoints/base \\
        --trained warmup=runs/ml100k/warmup --trained recpo=runs/ml100k/recpo

Rows: pop; sasrec (`--sasrec-epochs`, 10 as every documented number); cowatch; untrained (the
base checkpoint, `checkpoints/base` by default: not `checkpoints/current`, which the quickstart
fills with the trained shipped model) and each `--trained` NAME=PATH as "NAME no reasoning" and
"NAME +reasoning", both from one `--compare-reasoning` run (which also gives the paired
difference; a plain `--no-reasoning` run when only the first is asked for). `--splits
valid,test`; `--skip` drops rows by label, `--only` keeps just the named rows, `--limit N`
evaluates the first N users of the split (distinct-2 then does not compare with a full run's).
Reasoning is greedy, 64 tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from model.evaluate import run_of_column
from model.text_quality import CLAIM_KINDS

METRICS = ["hit@5", "ndcg@5", "hit@10", "ndcg@10", "hit@20", "ndcg@20"]


def run_eval(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "cli", "eval", *args, "--json"]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:  # r2ec eval printed its one-line error on stderr
        sys.exit(out.returncode)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument(
        "--base-checkpoint",
        default="checkpoints/base",
        help="the untrained model, as `r2ec checkpoint init --data DATA --out checkpoints/base` writes it",
    )
    parser.add_argument("--trained", action="append", default=[], help="NAME=CHECKPOINT, repeatable")
    parser.add_argument("--splits", default="test")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sasrec-epochs", type=int, default=10, help="as every documented SASRec number")
    parser.add_argument("--skip", action="append", default=[], help="row label to leave out")
    parser.add_argument("--only", action="append", default=[], help="run just these row labels")
    parser.add_argument("--limit", type=int, default=None, help="first N users of the split only")
    parser.add_argument("--out", default="bench/out/quality.jsonl")
    args = parser.parse_args()

    def wanted(label: str) -> bool:
        return label not in args.skip and (not args.only or label in args.only)

    models = [("untrained", args.base_checkpoint)]
    for spec in args.trained:
        name, _, path = spec.partition("=")
        if not path:
            parser.error(f"--trained wants NAME=CHECKPOINT, got {spec!r}")
        models.append((name, path))
    # each run: the labels it gives rows to, and its arguments
    runs: list[tuple[list[str], list[str]]] = [
        (["pop"], ["--baseline", "pop"]),
        (["sasrec"], ["--baseline", "sasrec", "--sasrec-epochs", str(args.sasrec_epochs)]),
        (["cowatch"], ["--baseline", "cowatch"]),
    ]
    common = ["--batch-size", str(args.batch_size), "--max-reasoning-tokens", str(args.tokens)]
    for name, path in models:
        labels = [f"{name} no reasoning", f"{name} +reasoning"]
        if not any(map(wanted, labels)):
            continue
        if not Path(path).exists():
            sys.exit(
                f"error: {name} checkpoint {path} does not exist"
                + (
                    f"; write it with `r2ec checkpoint init --data {args.data} --out {path}`"
                    f" or leave its rows out with --skip"
                    if name == "untrained"
                    else ""
                )
            )
        # one --compare-reasoning run gives both rows; the fast path alone when only it is asked for
        mode = "--compare-reasoning" if wanted(labels[1]) else "--no-reasoning"
        runs.append((labels, ["--checkpoint", path, mode, *common]))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = []
    for split in args.splits.split(","):
        for labels, extra in runs:
            if not any(map(wanted, labels)):
                continue
            print(f"== {' / '.join(filter(wanted, labels))} on {split}", file=sys.stderr, flush=True)
            limit = [] if args.limit is None else ["--limit", str(args.limit)]
            result = run_eval(["--data", args.data, "--split", split, *extra, *limit])
            for record in rows_of(labels, result):
                if wanted(record["label"]):
                    with out.open("a") as f:
                        f.write(json.dumps(record, allow_nan=False) + "\n")
                    table.append(record)

    print_table(table)


def rows_of(labels: list[str], result: dict) -> list[dict]:
    """The table rows one run gives: a baseline's or a --no-reasoning run's one row, or a
    --compare-reasoning run's two. Its "no reasoning" row is its without_reasoning pass: what
    that pass measured, named and described as a --no-reasoning run of the model would be, and
    nothing of the reasoning pass (texts, drafting, time)."""
    if "without_reasoning" not in result:
        return [{"label": labels[-1] if result["reasoning"] else labels[0], **result}]
    off = result["without_reasoning"]
    fast = {"label": labels[0], "model": f"{result['model']} without reasoning", "reasoning": False}
    fast |= {k: result[k] for k in ("split", "mask", "count", "backend", "quantize") if k in result}
    fast |= {k: off[k] for k in ("metrics", "stderr", "seconds") if k in off}
    if "run" in result:
        fast["run"] = run_of_column(result["run"], "rank_without_reasoning")
    return [fast, {"label": labels[1], **result}]


def _num(value: float | None, spec: str = ".4f") -> str:
    """A number of the JSON (null where it is undefined: one user's s.e., an infinite ratio)."""
    return "nan" if value is None else format(value, spec)


def print_table(table: list[dict]) -> None:
    """Markdown: seen-mask metrics ± standard error, NDCG@10 under `none`, the paired
    reasoning on - off NDCG@10 difference and the target's geometric rank ratio (on / off) where
    measured, and the texts' quality."""
    head = " | NDCG@10 none | on - off (paired) | rank on / off (users better, worse) | texts |"
    print("| model | split | " + " | ".join(METRICS) + head)
    print("|---|---|" + "---|" * (len(METRICS) + 4))
    for r in table:
        values = " | ".join(f"{_num(r['metrics'][m])} ± {_num(r['stderr'][m])}" for m in METRICS)
        none = _num(r.get("by_mask", {}).get("none", {}).get("ndcg@10")) if r.get("by_mask") else ""
        pair = r.get("paired_ndcg@10")
        paired = ""
        if pair:
            paired = f"{pair['diff']:+.4f} ± {_num(pair['stderr'])} ({_num(pair['ratio'], '.2f')}x)"
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
        print(f"| {r['label']} | {r['split']} | {values} | {none} | {paired} | {ranks} | {texts} |")


if __name__ == "__main__":
    main()
