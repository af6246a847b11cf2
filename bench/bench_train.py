"""Contrastive warm-up step time on this machine, with and without the frozen-layer item
cache and with the chat template's default system prompt or a short one. Prints a markdown
table; ratios are against the first row, all measured in this one run.

    python3 bench/bench_train.py [--config configs/ml100k-warmup.yaml] [--steps 4] [--warmup 2]

Each variant builds a `Trainer` for the recipe's model from SmolLM2 (bf16, LoRA on the top
layers), which draws the same user batches (seeded), and times `Trainer.step` (forward,
backward and the optimizer step); the first `--warmup` steps are dropped (allocator
warm-up), the rest reported as a median. The one-off setup (filling the cache, then the
first encoding of the whole catalog) is reported separately.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

from model.data import load_prepared  # before torch: model/__init__ sets OMP_WAIT_POLICY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--config", default="configs/ml100k-warmup.yaml")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--system-prompt", default="You recommend movies.")
    args = parser.parse_args()

    import numpy as np
    import torch

    from model.recpo import RecPOConfig
    from model.train import Trainer

    ds = load_prepared(args.data)
    base_cfg = RecPOConfig.from_yaml(args.config)
    variants = [
        ("no cache, template's system prompt", dict(item_layer_cache_gb=0.0, system_prompt=None)),
        ("frozen-layer item cache", dict(item_layer_cache_gb=2.0, system_prompt=None)),
        (
            f"cache + system prompt {args.system_prompt!r}",
            dict(item_layer_cache_gb=2.0, system_prompt=args.system_prompt),
        ),
    ]
    rows = []
    for name, overrides in variants:
        cfg = dataclasses.replace(base_cfg, **overrides)
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            trainer = Trainer(cfg, ds, "smollm2", out)  # seeds torch with cfg.seed
            setup_s = time.perf_counter() - t
            times = []
            for step in range(args.warmup + args.steps):
                t = time.perf_counter()
                trainer.step()
                times.append(time.perf_counter() - t)
                print(f"{name}: step {step} {times[-1]:.2f} s", flush=True)
        med = statistics.median(times[args.warmup :])
        tokens = float(np.mean(trainer.table.lengths))
        rows.append((name, tokens, setup_s, med))
        del trainer

    users = base_cfg.per_device_batch_size
    print(
        f"\n{users} users + {base_cfg.sampled_negatives} sampled items per step, "
        f"LoRA on the top {base_cfg.lora_layers} layers, {torch.get_num_threads()} threads\n"
    )
    print("| variant | item prompt tokens (mean) | setup (s, once) | s/step | users/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, tokens, setup_s, med in rows:
        speedup = rows[0][3] / med
        print(f"| {name} | {tokens:.1f} | {setup_s:.0f} | {med:.2f} | {users / med:.2f} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
