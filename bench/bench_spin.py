"""OpenMP threads between kernels: a decode step with threads that sleep at once
(`GOMP_SPINCOUNT=0`, what OMP_WAIT_POLICY=PASSIVE alone gives) against threads that spin
briefly first (`model.SERVE_SPINCOUNT`, what `r2ec serve` sets), alone and beside a process that
keeps one core busy.

    python3 bench/bench_spin.py --checkpoint CKPT [--spins 0,10000] [--rounds 3]

libgomp reads the spin count once, when it loads, so each setting runs in its own child
process: it loads the checkpoint's model into the lean decoder (model/engine.py), prefills a
200-token prompt and times 30 batch-1 decode steps (`decode` + `logits` + argmax), best of 3.
The children alternate settings `--rounds` times, so drift hits every setting alike; the table
gives each setting's median and its ratio to the first setting of the same neighbour. Compare
within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import model  # OMP_WAIT_POLICY before torch (the children import torch, this process does not)


def child(checkpoint: str, quantize: str, steps: int = 30) -> None:
    from model.checkpoint import load_checkpoint
    from model.engine import DecoderEngine

    lm = load_checkpoint(checkpoint).model.lm  # LoRA merged at load
    engine = DecoderEngine(lm, slots=1, quantize=quantize)
    prompt = list(range(100, 300))

    def run() -> float:
        engine.reset(0)
        engine.prefill(0, prompt)
        t = time.perf_counter()
        for _ in range(steps):
            engine.logits(engine.decode([100])).argmax(-1)
        return (time.perf_counter() - t) / steps

    run()  # warm-up
    print(json.dumps({"step_ms": 1e3 * min(run() for _ in range(3))}))


def busy() -> subprocess.Popen:
    """A process that keeps one core busy (a pure-Python loop) until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--spins", default=f"0,{model.SERVE_SPINCOUNT}", help="GOMP_SPINCOUNT values")
    parser.add_argument("--quantize", default="none", choices=["none", "int8"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.checkpoint, args.quantize)
        return

    spins = args.spins.split(",")
    times: dict[tuple[str, bool], list[float]] = {}
    for r in range(args.rounds):
        for neighbour in (False, True):
            for spin in spins:
                other = busy() if neighbour else None
                try:
                    env = {**os.environ, "GOMP_SPINCOUNT": spin}
                    cmd = [sys.executable, __file__, "--child", "--checkpoint", args.checkpoint]
                    cmd += ["--quantize", args.quantize]
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                finally:
                    if other is not None:
                        other.kill()
                        other.wait()
                ms = json.loads(out.stdout.strip().splitlines()[-1])["step_ms"]
                times.setdefault((spin, neighbour), []).append(ms)
                print(f"round {r + 1}: spin {spin}, busy neighbour {neighbour}: {ms:.1f} ms", file=sys.stderr)

    print(f"\n| GOMP_SPINCOUNT | a core kept busy | batch-1 step ms (median of {args.rounds}) ", end="")
    print("| tok/s | ratio |")
    print("|---|---|---|---|---|")
    for neighbour in (False, True):
        base = statistics.median(times[(spins[0], neighbour)])
        for spin in spins:
            ms = statistics.median(times[(spin, neighbour)])
            beside = "yes" if neighbour else "no"
            print(f"| {spin} | {beside} | {ms:.1f} | {1e3 / ms:.1f} | {base / ms:.2f}x |")


if __name__ == "__main__":
    main()
