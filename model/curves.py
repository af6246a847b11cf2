"""Training curves as a PNG, drawn from the JSONL log."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

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

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
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
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=Path(png_path).parent)
    os.close(fd)
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, png_path)
