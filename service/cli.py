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

app = typer.Typer(help="R²ec: a recommender LLM that reasons before it recommends.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
prepare_app = typer.Typer(help="Prepare a dataset into the canonical samples format.", no_args_is_help=True)
data_app.add_typer(prepare_app, name="prepare")
ckpt_app = typer.Typer(help="Create and inspect checkpoints.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(ckpt_app, name="checkpoint")

DataDir = Annotated[Path, typer.Option(envvar="R2EC_DATA_DIR", help="Where prepared datasets live.")]
Protocol = Annotated[str, typer.Option(help="Split protocol: loo or temporal.")]


@app.callback()
def _main(log_level: Annotated[str, typer.Option(envvar="R2EC_LOG_LEVEL")] = "INFO") -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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
    min_items: Annotated[int, typer.Option(help="Roll the time window back until this many items")] = 10_000,
    data_dir: DataDir = Path("data"),
    protocol: Protocol = "temporal",
) -> None:
    """Amazon Reviews 2023 with the paper's protocol (no k-core, rolled-back time window)."""
    from model.data import DataError, prepare_amazon

    _check_protocol(protocol)
    try:
        path = prepare_amazon(reviews, meta, data_dir, name=name, protocol=protocol, min_items=min_items)
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
    """Print a checkpoint's r2ec.json (PATH may be a run dir or hold a CURRENT pointer)."""
    from model.checkpoint import CheckpointError, read_meta, resolve_checkpoint

    try:
        typer.echo(json.dumps(read_meta(resolve_checkpoint(path)), indent=2))
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
    device: Annotated[str, typer.Option(help="auto (GPU if torch sees one), cpu, cuda, cuda:N")] = "auto",
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


def _eval_model(ds, samples, cfg, checkpoint, base, dtype, device):
    from model.backbone import BackboneConfig, load_backbone
    from model.checkpoint import CheckpointError, load_checkpoint
    from model.distributed import resolve_device
    from model.evaluate import evaluate_model
    from model.prompts import PromptConfig
    from model.r2ec import R2ec

    try:
        where = resolve_device(device)
    except ValueError as exc:
        _fail(str(exc))
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
    model.lm.to(where)
    if vectors is None:
        vectors = model.item_vectors(ds.items.to_dict("records"), progress=True)
    return evaluate_model(model, samples, ds.items, vectors, cfg), label


@app.command("train")
def train_cmd(
    data: Annotated[Path, typer.Option(help="Prepared dataset dir, e.g. data/ml-100k/loo")],
    out: Annotated[Path, typer.Option(help="Run dir: best/, last/, log.jsonl, curves.png")],
    base: Annotated[
        str, typer.Option(help="Backbone (smollm2, tiny, HF dir, .gguf) or a checkpoint")
    ] = "smollm2",
    config: Annotated[Path | None, typer.Option(help="YAML file of RecPOConfig fields")] = None,
    stage: Annotated[str | None, typer.Option(help="recpo or contrastive (overrides the config)")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Overrides the config")] = None,
    time_budget_minutes: Annotated[float | None, typer.Option(help="Overrides the config")] = None,
    device: Annotated[
        str | None, typer.Option(help="auto (cuda:LOCAL_RANK if torch sees a GPU), cpu, cuda, cuda:N")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last exactly")] = False,
) -> None:
    """RecPO (or the contrastive warm-up) on a prepared dataset. Also runs under torchrun."""
    from model.data import DataError, load_prepared
    from model.recpo import RecPOConfig
    from model.train import train

    overrides = {
        "stage": stage,
        "max_steps": max_steps,
        "time_budget_minutes": time_budget_minutes,
        "device": device,
    }
    try:
        cfg = (
            RecPOConfig.from_yaml(config, **overrides)
            if config
            else RecPOConfig(**{k: v for k, v in overrides.items() if v is not None})
        )
        ds = load_prepared(data)
        best = train(cfg, ds, base, out, resume=resume)
    except (DataError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(f"best checkpoint: {best}")


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(envvar="R2EC_HOST", help="Bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="R2EC_PORT", help="TCP port")] = 8000,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint dir (default $R2EC_CHECKPOINT or checkpoints/current)")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="redis://host:port/db (default $R2EC_REDIS_URL; empty = in-process)")
    ] = None,
    max_batch: Annotated[int | None, typer.Option(help="Micro-batch size (1 = no batching)")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="Micro-batch wait")] = None,
    dtype: Annotated[str | None, typer.Option(help="bfloat16 or float32")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
) -> None:
    """Start the HTTP service (FastAPI + uvicorn). Every setting also reads R2EC_* env vars."""
    import uvicorn
    from pydantic import ValidationError

    from model.checkpoint import CheckpointError, read_meta, resolve_checkpoint
    from service.app import create_app
    from service.config import Settings

    overrides = {
        "checkpoint": checkpoint,
        "redis_url": redis_url,
        "max_batch": max_batch,
        "max_wait_ms": max_wait_ms,
        "dtype": dtype,
        "threads": threads,
    }
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        _fail(f"bad setting: {exc}")
    try:
        read_meta(resolve_checkpoint(settings.checkpoint))
    except CheckpointError as exc:
        _fail(f"{exc}; create one with `r2ec checkpoint init --data DIR --out {settings.checkpoint}`")
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=10,
    )


@app.command("retrain")
def retrain_cmd(
    data: Annotated[Path, typer.Option(help="Seed prepared dataset, e.g. data/ml-100k/loo")],
    root: Annotated[
        Path, typer.Option(envvar="R2EC_CHECKPOINT", help="Versions root: version dirs + the CURRENT pointer")
    ] = Path("checkpoints"),
    redis_url: Annotated[
        str, typer.Option(envvar="R2EC_REDIS_URL", help="Event stream's Redis; '' = no stream (dataset only)")
    ] = "",
    config: Annotated[Path | None, typer.Option(help="YAML file of RecPOConfig fields")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Overrides the config")] = None,
    time_budget_minutes: Annotated[float | None, typer.Option(help="Overrides the config")] = None,
    tolerance: Annotated[
        float, typer.Option(help="Publish if NDCG@10 >= current - tolerance (negative: demand a gain)")
    ] = 0.0,
    keep: Annotated[int, typer.Option(help="Versions to keep (the current one always stays)")] = 3,
    min_events: Annotated[int, typer.Option(help="New stream events needed to train")] = 1,
    every_minutes: Annotated[
        float | None, typer.Option(help="Run forever, this many minutes apart (a scheduler's loop)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per run")] = False,
) -> None:
    """Read new events, rebuild the samples, warm-start RecPO from CURRENT, publish if not worse."""
    import time

    from model.recpo import RecPOConfig
    from model.retrain import RetrainConfig

    overrides = {"max_steps": max_steps, "time_budget_minutes": time_budget_minutes}
    try:
        train_cfg = (
            RecPOConfig.from_yaml(config, **overrides)
            if config
            else RecPOConfig(**{k: v for k, v in overrides.items() if v is not None})
        )
        cfg = RetrainConfig(
            root=root, data=data, train=train_cfg, tolerance=tolerance, keep=keep, min_events=min_events
        )
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    if every_minutes is None:
        _retrain_once(cfg, redis_url, as_json)
        return
    if every_minutes <= 0:
        _fail(f"--every-minutes must be > 0, got {every_minutes}")
    while True:  # a failed run is reported and retried at the next tick
        try:
            _retrain_once(cfg, redis_url, as_json)
        except typer.Exit:
            pass
        time.sleep(60 * every_minutes)


def _retrain_once(cfg, redis_url: str, as_json: bool) -> None:
    from model.retrain import retrain

    try:
        result = retrain(cfg, _stream_reader(redis_url) if redis_url else None)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # Checkpoint/Data/RetrainError, Redis down
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    typer.echo(f"retrain {result.status}: {result.reason}")
    typer.echo(
        f"  events   {result.new_events} new, {result.events_total} consumed in total"
        f"{'' if result.stream else ' (no stream)'}, cursor {result.last_event_id}"
    )
    if result.samples:
        typer.echo("  samples  " + ", ".join(f"{k}={v}" for k, v in result.samples.items()))
    typer.echo(f"  current  {result.current_version}  {result.metric} {fmt(result.current_metric)}")
    if result.candidate_version:
        typer.echo(f"  trained  {result.candidate_version}  {result.metric} {fmt(result.candidate_metric)}")
    if result.published_version:
        typer.echo(f"  CURRENT -> {result.published_version}")
    if result.pruned:
        typer.echo(f"  pruned   {', '.join(result.pruned)}")


def _stream_reader(redis_url: str):
    """read_events(after) over the service's Redis stream, paged, as model.retrain.StreamEvents."""
    import asyncio

    from model.retrain import StreamEvent
    from service.store import RedisStore, StoreUnavailable

    async def read_all(after: str) -> list[StreamEvent]:
        store = RedisStore(redis_url, timeout_s=10.0)
        out: list[StreamEvent] = []
        try:
            while page := await store.read_events(after, count=10_000):
                out += [
                    StreamEvent(e.id, e.user_id, e.event.item_id, e.event.rating, e.event.timestamp)
                    for e in page
                ]
                after = page[-1].id
        finally:
            await store.close()
        return out

    def read(after: str) -> list[StreamEvent]:
        try:
            return asyncio.run(read_all(after))
        except StoreUnavailable as exc:
            hint = "start Redis or pass --redis-url '' to retrain on the dataset only"
            raise RuntimeError(f"{exc}; {hint}") from exc

    return read


if __name__ == "__main__":
    app()
