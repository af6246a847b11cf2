"""Contrastive warm-up step time on this machine, with and without the frozen-layer item
cache and with the chat template's default system prompt or a short one. Prints a markdown
table; ratios are against the first row, all measured in this one run.

    python3 bench/bench_train.py [--config configs/ml100k-warmup.yaml] [--steps 4] [--warmup 2]

Each variant builds the recipe's model from SmolLM2 (bf16, LoRA on the top layers), draws
the same user batches (seeded), and times `contrastive_update` (forward, backward and the
optimizer step); the first `--warmup` steps are dropped (allocator warm-up), the rest
reported as a median. The one-off cost of filling the cache is reported separately.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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

    from model.data import load_prepared
    from model.item_table import ItemTable
    from model.lora import build_model, trainable_parameters
    from model.recpo import RecPOConfig
    from model.train import Optimizer, _batch_rows, contrastive_update

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
    train_rows, titles = ds.split("train"), ds.item_titles()
    rows = []
    for name, overrides in variants:
        cfg = dataclasses.replace(base_cfg, **overrides)
        torch.manual_seed(0)
        model, _ = build_model(cfg, "smollm2", ds.category)
        table = ItemTable.build(model, ds.items.to_dict("records"))
        table.set_target_counts([str(t) for t in train_rows["target_item_id"]])
        model.lm.eval()
        t = time.perf_counter()
        table.cache_lower(model, cfg.item_layer_cache_gb, progress=True)
        cache_s = time.perf_counter() - t if table.lower is not None else 0.0
        opt = Optimizer(trainable_parameters(model), cfg)
        times = []
        for step in range(args.warmup + args.steps):
            batch = _batch_rows(train_rows, cfg, step, 0)
            t = time.perf_counter()
            contrastive_update(model, table, [batch], titles, cfg, opt)
            times.append(time.perf_counter() - t)
            print(f"{name}: step {step} {times[-1]:.2f} s", flush=True)
        med = statistics.median(times[args.warmup :])
        tokens = float(np.mean([len(p) for p in table.prompt_ids]))
        rows.append((name, tokens, cache_s, med))
        del model, table, opt

    users = base_cfg.per_device_batch_size
    print(
        f"\n{users} users + {base_cfg.sampled_negatives} sampled items per step, "
        f"LoRA on the top {base_cfg.lora_layers} layers, {torch.get_num_threads()} threads\n"
    )
    print("| variant | item prompt tokens (mean) | cache fill (s, once) | s/step | users/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, tokens, cache_s, med in rows:
        speedup = rows[0][3] / med
        print(f"| {name} | {tokens:.1f} | {cache_s:.0f} | {med:.2f} | {users / med:.2f} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
