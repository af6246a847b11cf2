"""Work beside the model thread, on a thread that stays alive, and what it does to the model.

    python3 bench/bench_threads.py --checkpoint CKPT [--data data/ml-100k/loo] [--rounds 3] [--modes ...]

The service runs every forward on one model thread, but two things run beside it: a hot reload
loads the new checkpoint (and warms it up, and re-encodes edited items) on another thread, and a
cache hit that carries its h_T is answered by one index search off the model thread, so it
never waits for a decode tick. Each child process here is such a service in miniature: a
one-thread executor as the model thread loads the checkpoint as the service does
(`Recommender.load`), answers one query (its index search runs there, as in the service) and
times no-reasoning prefills of `--prompts` test users (the median, ms); then the mode's work
runs on another thread; then the model thread times the same prefills again:

- `none`: nothing (the drift of the machine between the two timings);
- `reload-pooled`: a checkpoint loaded through `asyncio.to_thread`, as the reload did before
  stop 24 (the event loop's default executor keeps its thread alive after the load);
- `reload-passing`: the same through `service.state.in_passing_thread`, as the reload does now
  (a thread that ends with the load);
- `hits-pooled`: 20 cache hits answered (`Recommender.answer_cached`) on the event loop's
  default executor, as the service did before stop 24 (`asyncio.to_thread`);
- `hits-service`: the same on a thread like the service's hits thread, whose FAISS calls run
  without an OpenMP team (`index.faiss_index.search_without_threads`).

A thread's OpenMP team lives as long as the thread, and with a second team alive the model
thread's forwards got slower. FAISS's OpenMP calls bind to torch's libgomp when torch is
imported first, as in the service, so a FAISS search on another thread starts a second team
of torch's runtime; the children import in that order. Children alternate modes `--rounds`
times, so drift hits every mode alike; the table gives per mode the medians before and after
and the median (and range) of the rounds' after / before ratios. Compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import model  # OMP_WAIT_POLICY before torch (the children import torch, this process does not)

MODES = ("none", "reload-pooled", "reload-passing", "hits-pooled", "hits-service")
HITS = 20


def child(checkpoint: str, data: str, mode: str, prompts: int) -> None:
    import asyncio
    import time
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    # torch before faiss, the order `r2ec serve` imports them in: torch's libgomp loads first and
    # FAISS's OpenMP calls bind to it (one runtime for both; imported the other way round, FAISS
    # keeps its own libgomp and its teams do not touch torch's)
    import torch  # noqa: F401

    from index import search_without_threads
    from model.checkpoint import load_checkpoint
    from model.data import load_prepared
    from model.samples import sample_histories
    from service.recommender import Recommender
    from service.state import in_passing_thread
    from service.store import Event
    from service.types import Query

    model_thread = ThreadPoolExecutor(1, thread_name_prefix="r2ec-model")
    state: dict = {}

    def setup() -> None:
        rec = Recommender.load(checkpoint, warmup_requests=0)
        rows = load_prepared(data).split("test").iloc[:prompts]
        items = rec.checkpoint.items
        titles = dict(zip(items["item_id"].astype(str), items["title"], strict=True))
        m = rec.model
        state["ids"] = [p + m._marker_ids for p in m.user_prompt_ids(sample_histories(rows, titles))]
        history = tuple(Event(str(i), 4.0) for i in rows["history_item_ids"].iloc[0][-5:])
        query = Query(history, k=10, max_reasoning_tokens=8)
        answered = rec.recommend_batch([query])[0]  # the model thread's own index search
        state["hit"] = replace(rec.prepare(query), cached=answered.generated)
        state["rec"], state["engine"] = rec, rec.backend.engine

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
    rec, hit = state["rec"], state["hit"]

    def reload() -> None:
        load_checkpoint(checkpoint)

    async def hits(executor: ThreadPoolExecutor | None) -> None:
        for _ in range(HITS):
            result = await loop.run_in_executor(executor, rec.answer_cached, hit)
            assert result.cache == "hit"

    if mode == "reload-pooled":
        loop.run_until_complete(asyncio.to_thread(reload))
    elif mode == "reload-passing":
        loop.run_until_complete(in_passing_thread(reload))
    elif mode == "hits-pooled":
        loop.run_until_complete(hits(None))  # None: the loop's default executor, as to_thread
    elif mode == "hits-service":
        loop.run_until_complete(hits(ThreadPoolExecutor(1, initializer=search_without_threads)))
    after = model_thread.submit(timed).result()
    print(json.dumps({"mode": mode, "before": before, "after": after}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.checkpoint, args.data, args.child, args.prompts)
        return
    model.spin_between_kernels()  # as `r2ec serve` runs (the children inherit it)
    modes = list(dict.fromkeys(m.strip() for m in args.modes.split(",") if m.strip()))
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes takes some of {', '.join(MODES)}")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            cmd = [sys.executable, __file__, "--checkpoint", args.checkpoint, "--data", args.data]
            cmd += ["--prompts", str(args.prompts), "--child", mode]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            runs[mode].append(res)
            print(f"round {r + 1} {mode}: {res['before']:.1f} -> {res['after']:.1f} ms", file=sys.stderr)
    head = f"beside the model thread ({args.rounds} rounds)"
    print(f"\n| {head} | prefill ms before | after | after / before (range) |")
    print("|---|---|---|---|")
    for mode in modes:
        before = statistics.median(x["before"] for x in runs[mode])
        after = statistics.median(x["after"] for x in runs[mode])
        ratios = [x["after"] / x["before"] for x in runs[mode]]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(f"| {mode} | {before:.1f} | {after:.1f} | {statistics.median(ratios):.2f}x ({spread}) |")


if __name__ == "__main__":
    main()
