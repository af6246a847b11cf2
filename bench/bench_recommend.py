"""`r2ec recommend`'s throughput, and how much its answers depend on the batch size.

    python3 bench/bench_recommend.py --checkpoint checkpoints/current --data data/ml-100k/loo \
        [--users 48] [--runs reason-16,reason-1,plain-16,plain-1,exact-16,exact-1]

Each run is one `r2ec recommend --limit USERS --k 10 --json` in a fresh process, in the order
given: `reason` with 64-token reasoning, `plain` with --no-reasoning, `fp32` with reasoning in
float32 (drafting and prefix caching on), `exact` with reasoning and --deterministic; the number
is --batch-size. users/s is the command's own (users over the
batch's time: the load and warm-up excluded). Then, for each mode run at two batch sizes, what
differs between them: (user, rank) positions holding another item, reasoning texts, and the
largest score difference at the same (user, item).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "reason": [],
    "plain": ["--no-reasoning"],
    "fp32": ["--dtype", "float32"],
    "exact": ["--deterministic"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/current")
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--users", type=int, default=48)
    parser.add_argument("--runs", default="reason-16,reason-1,plain-16,plain-1,exact-16,exact-1")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench_recommend-"))
    frames: dict[tuple[str, int], pd.DataFrame] = {}
    rows = []
    for name in args.runs.split(","):
        mode, size = name.split("-")
        path = out / f"{name}.parquet"
        command = [sys.executable, "-m", "cli", "recommend", "--checkpoint", args.checkpoint]
        command += ["--data", args.data, "--limit", str(args.users), "--k", "10", "--batch-size", size]
        command += ["--out", str(path), "--json", *MODES[mode]]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{name}: {done.stderr[-2000:]}")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        frames[(mode, int(size))] = pd.read_parquet(path)
        rows.append((mode, int(size), summary["users"], summary["seconds"], summary["users_per_s"]))
        rate = summary["users_per_s"]
        print(f"{name}: {summary['users']} users in {summary['seconds']:.1f} s = {rate:.2f} users/s")
    print("\n| mode | batch size | users | seconds | users/s |\n|---|---|---|---|---|")
    for mode, size, users, seconds, rate in rows:
        print(f"| {mode} | {size} | {users} | {seconds:.1f} | {rate:.2f} |")
    print("\n| mode | batches | positions with another item | texts differing | max abs score diff |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        sizes = sorted(s for m, s in frames if m == mode)
        if len(sizes) < 2:
            continue
        a, b = (frames[(mode, s)].sort_values(["user_id", "rank"]).reset_index(drop=True) for s in sizes[:2])
        positions = int((a["item_id"] != b["item_id"]).sum())
        texts = a.drop_duplicates("user_id").set_index("user_id")["reasoning"]
        other = b.drop_duplicates("user_id").set_index("user_id")["reasoning"]
        differing = int((texts.fillna("") != other.reindex(texts.index).fillna("")).sum())
        both = a.merge(b, on=["user_id", "item_id"], suffixes=("_a", "_b"))
        worst = float((both["score_a"] - both["score_b"]).abs().max())
        users = a.user_id.nunique()
        cells = [mode, f"{sizes[0]} vs {sizes[1]}", f"{positions} of {len(a)}", f"{differing} of {users}"]
        print(f"| {' | '.join(cells)} | {worst:.2g} |")
    print(f"\noutputs in {out}")


if __name__ == "__main__":
    main()
