"""The `r2ec` command: data, checkpoint, eval, train, serve, retrain.

Thin: each command parses options and calls one function of model/, index/ or service/.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see model/__init__

import typer

app = typer.Typer(
    help="R²ec: a recommender LLM that reasons before it recommends.", no_args_is_help=True
)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
prepare_app = typer.Typer(
    help="Prepare a dataset into the canonical samples format.", no_args_is_help=True
)
data_app.add_typer(prepare_app, name="prepare")
ckpt_app = typer.Typer(help="Create and inspect checkpoints.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(ckpt_app, name="checkpoint")

DataDir = Annotated[
    Path, typer.Option(envvar="R2EC_DATA_DIR", help="Where prepared datasets live.")
]
Protocol = Annotated[str, typer.Option(help="Split protocol: loo or temporal.")]


@app.callback()
def _main(log_level: Annotated[str, typer.Option(envvar="R2EC_LOG_LEVEL")] = "INFO") -> None:
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _check_protocol(protocol: str) -> None:
    from model.data import PROTOCOLS

    if protocol not in PROTOCOLS:
        _fail(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")


def _report_prepared(path: Path) -> None:
    from model.data import format_stats, load_prepared

    typer.echo(f"prepared {path}")
    typer.echo(format_stats(load_prepared(path).meta))


@prepare_app.command("ml-100k")
def data_ml100k(data_dir: DataDir = Path("data"), protocol: Protocol = "loo") -> None:
    """MovieLens-100k from RecBole's atomic files inside the recbole==1.2.1 wheel."""
    from model.data import DataError, prepare_ml100k

    _check_protocol(protocol)
    try:
        _report_prepared(prepare_ml100k(data_dir, protocol=protocol))
    except DataError as exc:
        _fail(str(exc))


@prepare_app.command("atomic")
def data_atomic(
    inter: Annotated[Path, typer.Option(help="RecBole .inter file")],
    name: Annotated[str, typer.Option(help="Dataset name (folder under --data-dir)")],
    item: Annotated[Path | None, typer.Option(help="RecBole .item file")] = None,
    category: Annotated[str, typer.Option(help="Noun used in prompts")] = "item",
    data_dir: DataDir = Path("data"),
    protocol: Protocol = "loo",
) -> None:
    """Any RecBole atomic-format dataset (.inter + .item)."""
    from model.data import DataError, prepare_atomic

    _check_protocol(protocol)
    try:
        path = prepare_atomic(inter, item, data_dir, name, protocol=protocol, category=category)
        _report_prepared(path)
    except DataError as exc:
        _fail(str(exc))


@prepare_app.command("amazon")
def data_amazon(
    reviews: Annotated[Path, typer.Option(help="<Category>.jsonl(.gz) reviews")],
    meta: Annotated[Path, typer.Option(help="meta_<Category>.jsonl(.gz)")],
    name: Annotated[str | None, typer.Option(help="Dataset name")] = None,
    min_items: Annotated[
        int, typer.Option(help="Roll the time window back until this many items")
    ] = 10_000,
    data_dir: DataDir = Path("data"),
    protocol: Protocol = "temporal",
) -> None:
    """Amazon Reviews 2023 with the paper's protocol (no k-core, rolled-back time window)."""
    from model.data import DataError, prepare_amazon

    _check_protocol(protocol)
    try:
        path = prepare_amazon(
            reviews, meta, data_dir, name=name, protocol=protocol, min_items=min_items
        )
        _report_prepared(path)
    except DataError as exc:
        _fail(str(exc))


@ckpt_app.command("init")
def checkpoint_init(
    data: Annotated[Path, typer.Option(help="Prepared dataset dir, e.g. data/ml-100k/loo")],
    out: Annotated[Path, typer.Option(help="Checkpoint dir to write")],
    base: Annotated[str, typer.Option(help="smollm2, tiny, an HF dir or a .gguf")] = "smollm2",
    dtype: str = "bfloat16",
) -> None:
    """An untrained checkpoint (base by reference + encoded catalog) the service can load."""
    from model.checkpoint import create_base_checkpoint
    from model.data import load_prepared
    from model.prompts import PromptConfig

    ds = load_prepared(data)
    meta = create_base_checkpoint(
        out,
        base,
        ds.items,
        prompts=PromptConfig(category=ds.category),
        dtype=dtype,
        dataset={"name": ds.name, "protocol": ds.protocol, "path": str(data)},
    )
    typer.echo(f"wrote {out} (version {meta['version']}, {meta['num_items']} items)")


@ckpt_app.command("show")
def checkpoint_show(path: Path) -> None:
    """Print a checkpoint's r2ec.json."""
    from model.checkpoint import CheckpointError, read_meta

    try:
        typer.echo(json.dumps(read_meta(path), indent=2))
    except CheckpointError as exc:
        _fail(str(exc))


@app.command("eval")
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
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Full-ranking Hit@5/10/20 and NDCG@5/10/20 over the whole catalog."""
    from model.data import DataError, load_prepared
    from model.evaluate import EvalConfig, evaluate_popularity

    if sum(x is not None for x in (checkpoint, base, baseline)) != 1:
        _fail("give exactly one of --checkpoint, --base or --baseline")
    if baseline is not None and baseline != "pop":
        _fail(f"--baseline must be 'pop', got {baseline!r}")
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
        _fail(str(exc))
    if baseline == "pop":
        result = evaluate_popularity(ds.split("train"), samples, ds.items, cfg)
        label = "pop"
    else:
        result, label = _eval_model(ds, samples, cfg, checkpoint, base, dtype)
    payload = {
        "model": label,
        "split": split,
        "reasoning": reasoning and baseline is None,
        **result.to_dict(),
    }
    if as_json:
        typer.echo(json.dumps(payload))
        return
    typer.echo(
        f"{label} on {ds.name}/{ds.protocol} {split}: {result.count} samples in {result.seconds:.1f}s"
    )
    for name, value in result.metrics.items():
        typer.echo(f"  {name:<8} {value:.4f}")
    for ex in result.examples:
        typer.echo(
            f"\n[user {ex['user_id']}] target {ex['target']!r} ranked {ex['rank']}\n{ex['reasoning']}"
        )


def _eval_model(ds, samples, cfg, checkpoint, base, dtype):
    from model.backbone import BackboneConfig, load_backbone
    from model.checkpoint import CheckpointError, load_checkpoint
    from model.evaluate import evaluate_model
    from model.prompts import PromptConfig
    from model.r2ec import R2ec

    if checkpoint is not None:
        try:
            ckpt = load_checkpoint(checkpoint, dtype=dtype)
        except CheckpointError as exc:
            _fail(str(exc))
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
    if vectors is None:
        vectors = model.item_vectors(ds.items.to_dict("records"), progress=True)
    return evaluate_model(model, samples, ds.items, vectors, cfg), label
