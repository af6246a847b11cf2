"""What `import torch` before the project costs: OpenMP's wait policy is read once, when libgomp
loads, so model/__init__.py's OMP_WAIT_POLICY=PASSIVE default comes too late, and
`Recommender.load` warns (journey 39, F1).

    python3 bench/bench_torch_first.py --checkpoint checkpoints/current [--rounds 2] [--queries 3]

Each round starts fresh processes, alternating: `project first` (service imported first, as
the `r2ec` command does) and `torch first` (`import torch` before it, as a notebook does), each
alone and beside a process that keeps one core busy (bench_spin.py's `busy`: what spinning
threads lose to). Each loads the checkpoint as `service.load` does (warm-up included), then
times `--queries` reasoning queries one at a time, each a different ml-100k test history.
OMP_WAIT_POLICY and GOMP_SPINCOUNT are removed from the children's environment, so each runs
with what its import order gives. Prints each process's seconds and, per neighbour, the median
ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_spin import busy  # this script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
if sys.argv[1] == "torch first":
    import torch  # noqa: F401
import service
from model.data import load_prepared

rec = service.load(sys.argv[2])
test = load_prepared(sys.argv[3]).split("test")
rows = test.head(int(sys.argv[4])).itertuples()
histories = [list(zip(r.history_item_ids, r.history_ratings)) for r in rows]
times = []
for history in histories:
    t = time.perf_counter()
    rec.recommend(history, k=10, max_reasoning_tokens=64)
    times.append(time.perf_counter() - t)
import os
print(json.dumps({"times": times, "policy": os.environ.get("OMP_WAIT_POLICY")}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/current")
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--queries", type=int, default=3)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(ROOT)
    modes = ("project first", "torch first")
    totals: dict[tuple[str, bool], list[float]] = {}
    for r in range(args.rounds):
        for neighbour in (False, True):
            for mode in modes:
                command = [sys.executable, "-c", CHILD, mode, args.checkpoint, args.data, str(args.queries)]
                other = busy() if neighbour else None
                try:
                    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
                finally:
                    if other is not None:
                        other.kill()
                        other.wait()
                if done.returncode != 0:
                    sys.exit(f"{mode}: {done.stderr}")
                warned = "OMP_WAIT_POLICY=PASSIVE" in done.stderr
                result = json.loads(done.stdout.strip().splitlines()[-1])
                total = sum(result["times"])
                totals.setdefault((mode, neighbour), []).append(total)
                each = ", ".join(f"{t:.2f}" for t in result["times"])
                where = "beside a busy core" if neighbour else "alone"
                print(f"round {r + 1}, {mode}, {where}: {total:.1f} s ({each}); warned: {warned}", flush=True)
    print(f"\n| a core kept busy | project first s | torch first s | ratio (median of {args.rounds}) |")
    print("|---|---|---|---|")
    for neighbour in (False, True):
        first = statistics.median(totals[("project first", neighbour)])
        late = statistics.median(totals[("torch first", neighbour)])
        print(f"| {'yes' if neighbour else 'no'} | {first:.1f} | {late:.1f} | {late / first:.2f}x |")


if __name__ == "__main__":
    main()
