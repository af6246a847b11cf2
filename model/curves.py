"""Training curves as a PNG, drawn from the JSONL log."""

from __future__ import annotations

import json
from pathlib import Path

from model.data.dataset import atomic_write

PANELS = (
    ("reward/mean", "reward (mean)"),
    ("valid/ndcg@10", "valid NDCG@10"),
    ("reasoning/tokens/mean", "reasoning tokens (mean)"),
    ("loss/total", "loss"),
)
# A stage without rollouts (rationale, contrastive) logs no reward or reasoning length; these
# panels stand in for the ones its log lacks, in order.
FALLBACK_PANELS = (
    ("loss/contrastive", "contrastive loss (h_T vs items)"),
    ("loss/lm", "rationale LM loss"),
    ("rank/median", "target's median in-batch rank"),
)


def choose_panels(logged: set[str]) -> list[tuple[str, str]]:
    """PANELS, each one the log lacks replaced by the next FALLBACK_PANELS entry it has."""
    spare = [p for p in FALLBACK_PANELS if p[0] in logged]
    return [p if p[0] in logged or not spare else spare.pop(0) for p in PANELS]


def plot_curves(log_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for line in Path(log_path).read_text().splitlines() if (r := log_record(line))]
    panels = choose_panels({k for r in records for k in r})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
    for ax, (key, title) in zip(axes, panels, strict=True):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if key.startswith("valid") else None, linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:  # replaced whole: a reader (or a Ctrl-C) never meets half a PNG
        atomic_write(Path(png_path), lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    finally:
        plt.close(fig)


def log_record(line: str) -> dict | None:
    """One log.jsonl line's record, with its integer step; None for a line an interruption cut
    short (what the curves draw, and what a resumed run keeps: model/train.py)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None
