"""Model speed on this machine: backbone load (first and cached), reasoning tokens/s at
batch 1 and 8, item encoding items/s. Prints a markdown table.

    python3 bench/bench_model.py [--data data/ml-100k/loo] [--tokens 64] [--dtype bfloat16]

The "first load" runs in a subprocess with an empty cache dir, so it includes the GGUF
dequantisation and conversion; "cached" is the same call once the safetensors dir exists.
Generation is greedy with `min_new_tokens = max_new_tokens`, so every row writes exactly
`--tokens` tokens and tokens/s is comparable across batch sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from model.data import load_prepared  # before torch: model/__init__ sets OMP_WAIT_POLICY

LOAD_SNIPPET = """
import json, time
t = time.perf_counter()
from model.backbone import BackboneConfig, load_backbone
load_backbone(BackboneConfig(base="smollm2", dtype={dtype!r}))
print(json.dumps({{"seconds": time.perf_counter() - t}}))
"""


def timed_load(cache_dir: str, dtype: str) -> float:
    env = {**os.environ, "R2EC_CACHE_DIR": cache_dir}
    out = subprocess.run(
        [sys.executable, "-c", LOAD_SNIPPET.format(dtype=dtype)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--items", type=int, default=256, help="items to encode")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    from model.backbone import BackboneConfig, load_backbone
    from model.prompts import PromptConfig
    from model.r2ec import R2ec, left_pad
    from model.samples import sample_histories

    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as cache:
        first = timed_load(cache, args.dtype)
        cached = min(timed_load(cache, args.dtype) for _ in range(args.repeats))
    rows += [("load, first (GGUF -> safetensors)", f"{first:.1f} s"), ("load, cached", f"{cached:.2f} s")]

    ds = load_prepared(args.data)
    lm, tok = load_backbone(BackboneConfig(base="smollm2", dtype=args.dtype))
    model = R2ec(lm, tok, PromptConfig(category=ds.category))
    test = ds.split("test")
    titles = dict(zip(ds.items["item_id"].astype(str), ds.items["title"].astype(str), strict=True))
    histories = sample_histories(test.head(8), titles)

    def generate(batch: list) -> float:
        ids = model.user_prompt_ids(batch)
        padded = left_pad(ids, model.pad_id, model.device)
        t = time.perf_counter()
        with torch.no_grad():
            lm.generate(
                input_ids=padded.input_ids,
                attention_mask=padded.attention_mask,
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                do_sample=False,
                temperature=None,
                top_k=None,
                top_p=None,
                pad_token_id=model.pad_id,
            )
        return time.perf_counter() - t

    generate(histories[:1])  # warm-up
    tps = {}
    for bs in (1, 8):
        secs = min(generate(histories[:bs]) for _ in range(args.repeats))
        tps[bs] = bs * args.tokens / secs
        rows.append((f"generate {args.tokens} tokens, batch {bs}", f"{secs:.2f} s = {tps[bs]:.1f} tok/s"))
    rows.append(("batch 8 / batch 1 tokens/s", f"{tps[8] / tps[1]:.2f}x"))

    items = ds.items.head(args.items).to_dict("records")
    model.item_vectors(items[:32])  # warm-up
    t = time.perf_counter()
    vecs = model.item_vectors(items, batch_size=32)
    secs = time.perf_counter() - t
    rows.append(
        (f"encode {len(items)} items (batch 32), dim {vecs.shape[1]}", f"{len(items) / secs:.1f} items/s")
    )

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}\n")
    print("| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
