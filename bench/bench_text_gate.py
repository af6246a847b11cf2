"""The publish gate's text check on a real checkpoint: the current version against itself,
against copies of it whose lm_head is damaged, and (--train-steps) against a candidate the
retrain recipe trains from it.

    python3 bench/bench_text_gate.py --checkpoint checkpoints/current [--data data/ml-100k/loo]
        [--config deploy/retrain.yaml] [--damage flat,noise] [--noise 2] [--train-steps 0]

Each version is evaluated as `r2ec retrain`'s gate evaluates it (model/retrain.py `validate`:
the recipe's `eval_limit` first valid samples, reasoning greedy under the claims' grammars at
the recipe's budget, in the recipe's dtype), and checked against the current version's texts
with the default bounds (`text_gate`, `TextGate()`). Prints, per candidate, each text measure
against the current version's, the verdict with the measures beyond their bounds, NDCG@10, and
the seconds its evaluation took (the text measures come out of that same evaluation: the check
itself only compares two dicts). Candidates:

- `itself`: the current version evaluated a second time (what an unchanged candidate meets);
- `flat`: lm_head zeroed (untied from the input embeddings, which stay): every logit equal, so
  greedy writes the lowest token id the grammar allows at each step;
- `noise`: lm_head plus gaussian noise of `--noise` times its weights' standard deviation;
- `recipe` (with --train-steps N): one `retrain` run of the recipe (--config) from the current
  version for N steps on --data, no stream, tolerance 1 so that its verdict is the text check's
  (its row's seconds: the whole run, both evaluations and the training; the row above it, the
  current version as that run measured it). `--damage '' --no-itself` runs it alone.

The damaged copies are written whole (weights "full", ~270 MB each for SmolLM2-135M in bf16)
under --work, which is removed after. Outputs bench/out/text_gate.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

from model.data import load_prepared  # before torch: model/__init__ sets OMP_WAIT_POLICY


def damaged(src: Path, out: Path, damage: str, noise: float, dtype: str) -> Path:
    import numpy as np
    import torch

    from model.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(src, dtype=dtype)
    lm = ckpt.model.lm
    weight = lm.lm_head.weight.detach().clone()
    if damage == "flat":
        weight.zero_()
    elif damage == "noise":
        gen = torch.Generator().manual_seed(0)
        weight += noise * weight.float().std() * torch.randn(weight.shape, generator=gen).to(weight.dtype)
    else:
        raise ValueError(f"unknown damage {damage!r}")
    lm.config.tie_word_embeddings = False
    lm.lm_head.weight = torch.nn.Parameter(weight)
    base = str(ckpt.meta.get("base"))
    vectors = np.asarray(ckpt.item_vectors)
    save_checkpoint(out, ckpt.model, base=base, weights="full", items=ckpt.items, item_vectors=vectors)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/current")
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--config", default="deploy/retrain.yaml", help="the retrain recipe (RecPOConfig)")
    parser.add_argument("--damage", default="flat,noise", help="comma-separated; '' for none")
    parser.add_argument(
        "--itself", action=argparse.BooleanOptionalAction, default=True, help="the current version again"
    )
    parser.add_argument("--noise", type=float, default=2.0, help="noise: times lm_head's std")
    parser.add_argument("--train-steps", type=int, default=0, help="> 0: also a recipe run this long")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--out", default="bench/out/text_gate.json")
    args = parser.parse_args()

    import yaml

    from model.evaluate import validation_eval_config
    from model.recpo import RecPOConfig
    from model.retrain import TEXT_MEASURES, RetrainConfig, TextGate, retrain, text_gate, validate
    from model.rewards import ndcg_at_k

    cfg = RecPOConfig(**(yaml.safe_load(Path(args.config).read_text()) or {}))
    dataset = load_prepared(args.data)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-text-gate-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{validation_eval_config(cfg)}, dtype {cfg.dtype}; {args.checkpoint} on {args.data}")

    def evaluated(path: Path) -> tuple[dict, float, float]:
        import torch

        start = time.perf_counter()
        ranks, _, texts = validate(path, dataset, cfg)
        ndcg = float(ndcg_at_k(torch.as_tensor(ranks, dtype=torch.float64), 10).mean())
        return texts, ndcg, time.perf_counter() - start

    rows = []
    try:
        candidates = [("itself", lambda: Path(args.checkpoint))] if args.itself else []
        for damage in filter(None, args.damage.split(",")):
            candidates.append(
                (damage, lambda d=damage: damaged(Path(args.checkpoint), work / d, d, args.noise, cfg.dtype))
            )
        if candidates:
            current, current_ndcg, seconds = evaluated(Path(args.checkpoint))
            first = {"candidate": "current", "texts": current, "ndcg@10": current_ndcg}
            rows.append({**first, "seconds": seconds})
        for name, make in candidates:
            texts, ndcg, seconds = evaluated(make())
            check = text_gate(texts, current, TextGate(), cfg)
            rows.append(
                {"candidate": name, "texts": texts, "ndcg@10": ndcg, "seconds": seconds, "check": check}
            )
            shutil.rmtree(work / name, ignore_errors=True)
        if args.train_steps > 0:
            root = work / "versions"
            shutil.copytree(args.checkpoint, root / "v0")
            (root / "CURRENT").write_text("v0\n")
            train = dataclasses.replace(cfg, max_steps=args.train_steps)
            start = time.perf_counter()
            result = retrain(RetrainConfig(root, dataset.path, train, tolerance=1.0))
            check = result.text_gate
            current = {"candidate": "current, in that run", "texts": check.get("current")}
            rows.append({**current, "ndcg@10": result.current_metric, "seconds": 0.0})
            rows.append(
                {
                    "candidate": f"recipe, {args.train_steps} steps",
                    "texts": check.get("candidate"),
                    "ndcg@10": result.candidate_metric,
                    "seconds": time.perf_counter() - start,
                    "check": check,
                    "paired": [result.paired_diff, result.paired_stderr],
                }
            )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    measures = list(TEXT_MEASURES)
    print("| candidate | " + " | ".join(measures) + " | NDCG@10 | text check | s |")
    print("|---" * (len(measures) + 4) + "|")
    for row in rows:
        texts = row["texts"] or {}
        cells = ["-" if texts.get(m) is None else f"{texts[m]:.3f}" for m in measures]
        check = row.get("check")
        verdict = (
            "-"
            if check is None
            else "not checked"
            if not check["checked"]
            else "passes"
            if check["passed"]
            else "rejected: " + ", ".join(f["measure"] for f in check["failed"])
        )
        print(
            f"| {row['candidate']} | "
            + " | ".join(cells)
            + f" | {row['ndcg@10']:.4f} | {verdict} | {row['seconds']:.0f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
