"""Model work on a second thread that stays alive, and what it does to the model thread.

    python3 bench/bench_threads.py --checkpoint CKPT [--data data/ml-100k/loo] [--rounds 3]

The service runs every forward on one model thread, but a hot reload loads the new checkpoint
(and warms it up, and re-encodes edited items) beside it, on another thread. Each child process
here is such a service in miniature: a one-thread executor as the model thread loads the model
and times no-reasoning prefills of `--prompts` test users (the median, ms), then a checkpoint is
loaded on another thread the mode's way, then the model thread times the same prefills again:

- `none`: no second thread (the drift of the machine between the two timings);
- `pooled`: `asyncio.to_thread`, as the reload did before stop 24: the event loop's default
  executor keeps its thread alive after the load;
- `passing`: `service.state.in_passing_thread`, as the reload does now: a thread that ends with
  the load.

A torch thread's OpenMP team lives as long as the thread. With two teams alive, libgomp counts
more threads than cores and lets threads sleep between kernels instead of spinning
(`model.spin_between_kernels`), so the model thread's forwards get slower. Children alternate
modes `--rounds` times, so drift hits every mode alike; the table gives the median ratio of
after to before per mode. Compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import model  # OMP_WAIT_POLICY before torch (the children import torch, this process does not)

MODES = ("none", "pooled", "passing")


def child(checkpoint: str, data: str, mode: str, prompts: int) -> None:
    import asyncio
    import time
    from concurrent.futures import ThreadPoolExecutor

    from model.checkpoint import load_checkpoint
    from model.data import load_prepared
    from model.engine import DecoderEngine
    from model.samples import sample_histories
    from service.state import in_passing_thread

    model_thread = ThreadPoolExecutor(1, thread_name_prefix="r2ec-model")
    state: dict = {}

    def setup() -> None:
        ckpt = load_checkpoint(checkpoint)
        m = ckpt.model
        titles = dict(zip(ckpt.items["item_id"].astype(str), ckpt.items["title"], strict=True))
        rows = load_prepared(data).split("test").iloc[:prompts]
        state["ids"] = [p + m._marker_ids for p in m.user_prompt_ids(sample_histories(rows, titles))]
        state["engine"] = engine = DecoderEngine(m.lm, slots=1)
        engine.set_prefix(m.user_prompt_head())

    def timed() -> float:
        engine, times = state["engine"], []
        for ids in state["ids"]:
            engine.reset(0)
            t = time.perf_counter()
            engine.prefill(0, ids, reuse_prefix=True, last_only=True)
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    model_thread.submit(setup).result()
    model_thread.submit(timed).result()  # warm-up
    before = model_thread.submit(timed).result()
    loop = asyncio.new_event_loop()  # left open: its default executor keeps its thread

    def reload() -> None:
        load_checkpoint(checkpoint)

    if mode == "pooled":
        loop.run_until_complete(asyncio.to_thread(reload))
    elif mode == "passing":
        loop.run_until_complete(in_passing_thread(reload))
    after = model_thread.submit(timed).result()
    print(json.dumps({"mode": mode, "before": before, "after": after}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.checkpoint, args.data, args.child, args.prompts)
        return
    model.spin_between_kernels()  # as `r2ec serve` runs (the children inherit it)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--checkpoint", args.checkpoint, "--data", args.data]
            cmd += ["--prompts", str(args.prompts), "--child", mode]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            runs[mode].append(res)
            print(f"round {r + 1} {mode}: {res['before']:.1f} -> {res['after']:.1f} ms", file=sys.stderr)
    print(f"\n| load on another thread ({args.rounds} rounds) | prefill ms before | after | after / before |")
    print("|---|---|---|---|")
    labels = ("none", "pooled thread (`asyncio.to_thread`)", "passing thread (`in_passing_thread`)")
    for mode, label in zip(MODES, labels, strict=True):
        before = statistics.median(x["before"] for x in runs[mode])
        after = statistics.median(x["after"] for x in runs[mode])
        ratio = statistics.median(x["after"] / x["before"] for x in runs[mode])
        print(f"| {label} | {before:.1f} | {after:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
