"""`r2ec eval`: full-ranking Hit/NDCG of a checkpoint, an untrained backbone or popularity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.common import fail

if TYPE_CHECKING:
    import pandas as pd

    from model.data import PreparedDataset
    from model.evaluate import EvalConfig, EvalResult


def eval_cmd(
    data: Annotated[Path, typer.Option(help="Prepared dataset dir")],
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint to evaluate")] = None,
    base: Annotated[str | None, typer.Option(help="Evaluate an untrained backbone instead")] = None,
    baseline: Annotated[str | None, typer.Option(help="'pop' for the popularity baseline")] = None,
    split: str = "test",
    reasoning: Annotated[bool, typer.Option("--reasoning/--no-reasoning")] = True,
    max_reasoning_tokens: int = 64,
    batch_size: int = 8,
    limit: Annotated[int | None, typer.Option(help="Only the first N samples")] = None,
    mask: Annotated[bool, typer.Option("--mask/--no-mask", help="Mask history items")] = True,
    dtype: str = "bfloat16",
    device: Annotated[str, typer.Option(help="auto (GPU if torch sees one), cpu, cuda, cuda:N")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Full-ranking Hit@5/10/20 and NDCG@5/10/20 over the whole catalog."""
    from model.data import DataError, load_prepared
    from model.evaluate import EvalConfig, evaluate_popularity

    if sum(x is not None for x in (checkpoint, base, baseline)) != 1:
        fail("give exactly one of --checkpoint, --base or --baseline")
    if baseline is not None and baseline != "pop":
        fail(f"--baseline must be 'pop', got {baseline!r}")
    try:
        ds = load_prepared(data)
        samples = ds.split(split)
        cfg = EvalConfig(
            split=split,
            reasoning=reasoning,
            max_reasoning_tokens=max_reasoning_tokens,
            batch_size=batch_size,
            limit=limit,
            mask_history=mask,
        )
    except (DataError, ValueError) as exc:
        fail(str(exc))
    if baseline == "pop":
        result = evaluate_popularity(ds.split("train"), samples, ds.items, cfg)
        label = "pop"
    else:
        result, label = _eval_model(ds, samples, cfg, checkpoint, base, dtype, device)
    payload = {
        "model": label,
        "split": split,
        "reasoning": reasoning and baseline is None,
        **result.to_dict(),
    }
    if as_json:
        typer.echo(json.dumps(payload))
        return
    typer.echo(f"{label} on {ds.name}/{ds.protocol} {split}: {result.count} samples in {result.seconds:.1f}s")
    for name, value in result.metrics.items():
        typer.echo(f"  {name:<8} {value:.4f}")
    for ex in result.examples:
        typer.echo(f"\n[user {ex['user_id']}] target {ex['target']!r} ranked {ex['rank']}\n{ex['reasoning']}")


def _eval_model(
    ds: PreparedDataset,
    samples: pd.DataFrame,
    cfg: EvalConfig,
    checkpoint: Path | None,
    base: str | None,
    dtype: str,
    device: str,
) -> tuple[EvalResult, str]:
    """Evaluate a checkpoint (its stored item table when the catalog is the same) or an
    untrained backbone; returns the result and the row's label."""
    from model.backbone import BackboneConfig, load_backbone
    from model.checkpoint import CheckpointError, load_checkpoint
    from model.distributed import resolve_device
    from model.evaluate import evaluate_model
    from model.prompts import PromptConfig
    from model.r2ec import R2ec

    try:
        where = resolve_device(device)
    except ValueError as exc:
        fail(str(exc))
    if checkpoint is not None:
        try:
            ckpt = load_checkpoint(checkpoint, dtype=dtype)
        except CheckpointError as exc:
            fail(str(exc))
        model, label = ckpt.model, f"checkpoint {ckpt.version}"
        same_catalog = list(ckpt.items["item_id"]) == list(ds.items["item_id"])
        vectors = ckpt.item_vectors if same_catalog else None
    else:
        lm, tok = load_backbone(BackboneConfig(base=base, dtype=dtype))
        model, label, vectors = (
            R2ec(lm, tok, PromptConfig(category=ds.category)),
            f"base {base}",
            None,
        )
    model.lm.to(where)
    if vectors is None:
        vectors = model.item_vectors(ds.items.to_dict("records"), progress=True)
    return evaluate_model(model, samples, ds.items, vectors, cfg), label
