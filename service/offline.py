"""The model from Python, without HTTP: `load` a checkpoint as `r2ec serve` does, then ask the
`Recommender` it returns (service/recommender.py: `recommend`, `score`, `similar_items`,
`recommend_batch`); README, "Use the model from Python".

    import service
    rec = service.load("checkpoints/current")
    result = rec.recommend([("50", 5), ("172", 5), ("181", 4)], k=10)

bf16 answers depend slightly on what else is decoded beside them and before them (the batch's
rows, the texts speculative decoding drafts from): scores move in their last bits, and a near
tie between two items, or rarely two tokens of a greedy text, can flip. `load(...,
deterministic=True)` (`DETERMINISTIC`) gives answers that do not depend on earlier queries, and
on the batch only in float32's rounding: the same items and texts, scores that agree to about
1e-6 of their value (an order could change only between two items that close).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.config import Settings
from service.recommender import Recommender

# What makes an answer independent of earlier traffic and, but for float32's last bits, of its
# batch-mates: float32 (bf16 rounds a row's sums differently with the batch's shape, enough to
# swap near ties and flip a greedy token), no speculative drafting (its drafts come from earlier
# texts, and a checked draft rounds unlike a plain step) and exact decoding (every prompt
# prefilled whole, no shared prefix copied in). Slower than bf16: BENCHMARKS.md §3.
DETERMINISTIC: dict[str, Any] = {"dtype": "float32", "speculative_tokens": 0, "exact_decode": True}


def serve_load_kwargs(settings: Settings | None = None) -> dict[str, Any]:
    """`Recommender.load`'s arguments as `r2ec serve` passes them: from `settings`, else from
    the Settings defaults alone (R2EC_* variables in the environment are not read: pass
    `Settings()` for those, as the server reads them)."""
    return (Settings.model_construct() if settings is None else settings).load_kwargs()


def load(
    path: Path | str = "checkpoints/current",
    *,
    deterministic: bool = False,
    settings: Settings | None = None,
    **overrides: Any,
) -> Recommender:
    """A checkpoint and its catalog, loaded as `r2ec serve` loads them (`serve_load_kwargs`:
    bf16, 16 decode slots, speculative drafting, 2 warm-up queries, ...), so `recommend`
    answers as POST /recommend does for the same history. `path`: a checkpoint directory or
    a versions root whose CURRENT names one.

    `deterministic`: `DETERMINISTIC`'s settings on top (float32, no drafting, exact decoding),
    for answers that do not depend on earlier queries, nor on batch-mates beyond float32's
    rounding (module docstring). `overrides`: any other
    `Recommender.load` argument, e.g. `threads=2`, `warmup_requests=0`; they win over both.
    The load logs a WARNING where torch was imported before the project (README,
    "Use the model from Python")."""
    kwargs = serve_load_kwargs(settings)
    if deterministic:
        clash = {k: v for k, v in overrides.items() if k in DETERMINISTIC and v != DETERMINISTIC[k]}
        if clash:
            raise ValueError(f"deterministic=True sets {DETERMINISTIC}; it cannot take {clash}")
        kwargs |= DETERMINISTIC
    return Recommender.load(path, **(kwargs | overrides))
