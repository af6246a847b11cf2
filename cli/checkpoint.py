"""`r2ec checkpoint init|export|show|record-backbone|rollback`: create a servable checkpoint
(untrained, or from a shipped one), export a small one to ship, print one's metadata (and
whether its backbone is the one here), record the backbone of one written before checkpoints
recorded it, point a versions root's CURRENT at another of its versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer

from cli.common import code_commit, fail, os_error, warn

app = typer.Typer(help="Create and inspect checkpoints.", no_args_is_help=True)


@app.command("init")
def checkpoint_init(
    data: Annotated[Path, typer.Option(help="Prepared dataset dir, e.g. data/ml-100k/loo")],
    out: Annotated[Path, typer.Option(help="Checkpoint dir to write")],
    base: Annotated[
        str | None,
        typer.Option(
            help="smollm2 (the default), tiny, an HF dir or a .gguf; with --from: where that"
            " checkpoint's backbone is on this machine, when not where its r2ec.json says"
        ),
    ] = None,
    from_checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--from", help="A trained checkpoint (e.g. the shipped artifacts/ml100k) instead of --base"
        ),
    ] = None,
    dtype: str = "bfloat16",
    device: Annotated[
        str,
        typer.Option(help="Where the catalog is encoded: auto (a GPU if torch sees one), cpu, cuda, cuda:N"),
    ] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Item prompts encoded per forward pass")] = 32,
    allow_backbone_mismatch: Annotated[
        bool,
        typer.Option(
            envvar="R2EC_ALLOW_BACKBONE_MISMATCH",
            help="With --from: load it over a backbone other than the one its r2ec.json records "
            "(refused by default: its answers may be wrong); the copy records the one it is written over",
        ),
    ] = False,
) -> None:
    """A checkpoint the service can load: the untrained --base, or the model of --from, with
    the dataset's catalog encoded by it (and, for a model whose prompts name co-watch hints, the
    hints counted from the dataset's training interactions; the measured metrics of --from are
    kept only when it was trained on the same dataset).

    The catalog is encoded in chunks kept in OUT.partial/ until OUT is written: a run killed
    part way (a large catalog takes hours on a CPU) resumes from the last finished chunk when
    run again with the same data, model, device and batch size."""
    from model.checkpoint import CheckpointError, partial_dir
    from model.data import DataError

    try:
        meta = _init(data, out, base, from_checkpoint, dtype, device, batch_size, allow_backbone_mismatch)
    except (CheckpointError, DataError, ValueError, OSError) as exc:
        kept = partial_dir(out)
        resume = f" (the items encoded so far are kept in {kept}: run it again to resume)"
        fail(f"{exc}{resume if kept.is_dir() else ''}")
    typer.echo(f"wrote {out} (version {meta['version']}, {meta['num_items']} items)")


def _init(
    data: Path,
    out: Path,
    base: str | None,
    from_checkpoint: Path | None,
    dtype: str,
    device: str = "auto",
    batch_size: int = 32,
    allow_backbone_mismatch: bool = False,
) -> dict:
    import numpy as np
    import pandas as pd

    from model.backbone_digest import RECORD_KEY as BACKBONE_KEY
    from model.checkpoint import (
        ITEMS_FILE,
        VECTORS_FILE,
        check_catalog_text,
        check_replaceable,
        create_base_checkpoint,
        encode_catalog,
        load_checkpoint_model,
        partial_dir,
        read_meta,
        resolve_checkpoint,
        same_items,
        save_checkpoint,
        trained_data,
    )
    from model.cowatch import CoWatch
    from model.data import load_prepared
    from model.prompts import PromptConfig

    check_replaceable(out)  # before minutes of encoding
    ds = load_prepared(data)
    dataset = ds.describe() | {"path": str(data)}
    if from_checkpoint is None:
        prompts = PromptConfig(category=ds.category)
        return create_base_checkpoint(
            out,
            base or "smollm2",
            ds.items,
            prompts=prompts,
            dtype=dtype,
            dataset=dataset,
            device=device,
            batch_size=batch_size,
            resumable=True,
        )
    path = resolve_checkpoint(from_checkpoint)
    src = read_meta(path)
    model = load_checkpoint_model(
        path,
        dtype=dtype,
        merge_lora=False,
        base=base,
        device=device,
        allow_backbone_mismatch=allow_backbone_mismatch,
    )
    check_catalog_text(ds.items, model.tokenizer, str(data))  # before minutes of encoding
    if model.prompts.cowatch_hints:  # the hints name what others watched in DATA, not in the source's data
        model.cowatch = CoWatch.from_samples(
            ds.split("train"), ds.item_titles(), model.prompts.cowatch_window
        )
    same_catalog = (path / VECTORS_FILE).exists() and same_items(pd.read_parquet(path / ITEMS_FILE), ds.items)
    # the stored table where it is DATA's catalog; else DATA's items encoded once (never the source's)
    partial = partial_dir(out)
    vectors = (
        np.load(path / VECTORS_FILE)
        if same_catalog
        else encode_catalog(model, ds.items, batch_size=batch_size, partial=partial, progress=True)
    )
    trained_on = trained_data(src)
    # what the weights were made over is the source's record, not the backbone loaded now:
    # under --allow-backbone-mismatch the two differ, and recording the one loaded would make
    # the copy read "match" (a source with no record gives a copy with none). Only untrained
    # rows whose catalog was encoded here are wholly this backbone's.
    own = src["weights"] == "base" and not same_catalog
    kept = {} if own or BACKBONE_KEY not in src else {BACKBONE_KEY: src[BACKBONE_KEY]}
    # metrics measured on another dataset say nothing of this checkpoint's
    same_data = (trained_on.get("name"), trained_on.get("protocol")) == (ds.name, ds.protocol)
    meta = save_checkpoint(
        out,
        model,
        base=base or src["base"],
        weights=src["weights"],
        items=ds.items,
        item_vectors=vectors,
        dataset=dataset,
        metrics=src.get("metrics") if same_data else None,
        extra={k: src[k] for k in ("train", "provenance") if k in src}
        # `dataset` is now DATA (the catalog, the hints); the weights still come from this
        | ({"trained_on": trained_on} if trained_on else {})
        | kept
        | {"from": str(from_checkpoint)},
        record_backbone=own,
    )
    shutil.rmtree(partial, ignore_errors=True)
    return meta


@app.command("export")
def checkpoint_export(
    src: Annotated[Path, typer.Argument(help="A checkpoint, a run dir (its best/) or a versions root")],
    out: Annotated[Path, typer.Option(help="Where to write the small copy, e.g. artifacts/ml100k")],
    command: Annotated[str, typer.Option(help="The command that produced SRC, for the record")] = "",
    metrics: Annotated[
        Path | None, typer.Option(help="A JSON file of measured results to embed (e.g. r2ec eval --json)")
    ] = None,
) -> None:
    """A small copy to ship: LoRA adapter, tokenizer, catalog, metadata with provenance (the
    command, the git commit, the training config, measured metrics); no item vectors."""
    from datetime import UTC, datetime

    from model.backbone import BUILTIN_BASES
    from model.checkpoint import CheckpointError, export_checkpoint

    provenance = {
        "command": command,
        **code_commit(),
        "exported_at": datetime.now(UTC).isoformat(),
        "measured": None,
    }
    if metrics is not None:
        try:
            provenance["measured"] = json.loads(metrics.read_text())
        except (OSError, ValueError) as exc:
            fail(f"--metrics {metrics}: {exc}")
    try:
        meta = export_checkpoint(src, out, provenance)
    except CheckpointError as exc:
        fail(str(exc))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    typer.echo(f"exported {meta['version']} to {out} ({size / 1e6:.1f} MB)")
    if meta["base"] not in BUILTIN_BASES:
        warn(
            f"the copy holds its backbone by reference, {meta['base']!r}, not its weights: where"
            f" that is not there, write a copy that names where it is with `r2ec checkpoint init"
            f" --data DATA --from {out} --base PATH --out NEW`",
            "note",
        )


@app.command("show")
def checkpoint_show(path: Path) -> None:
    """Print a checkpoint's r2ec.json (PATH may be a run dir or hold a CURRENT pointer), then, on
    stderr, whether the backbone it names is here the one it records (its "backbone")."""
    from model.checkpoint_meta import CheckpointError, read_meta, resolve_checkpoint

    try:
        where = resolve_checkpoint(path)
        meta = read_meta(where)
    except CheckpointError as exc:
        fail(str(exc))
    typer.echo(json.dumps(meta, indent=2))
    line = _backbone_line(where, meta)
    if line is not None:
        warn(line, "backbone")


def _backbone_line(path: Path, meta: dict) -> str | None:
    """What `show` says of a checkpoint's backbone: None for full weights (no backbone)."""
    from model.backbone_digest import RECORD_KEY, describe, same, summary

    if meta.get("weights") == "full":
        return None
    base, recorded = str(meta.get("base", "")), meta.get(RECORD_KEY)
    try:
        here = describe(base)
    except OSError as exc:
        here, missing = None, str(exc)
    if not recorded:
        known = f"{base!r} here is {summary(here)}" if here else f"{base!r} is not here ({missing})"
        return (
            f"not recorded (written before checkpoints recorded it): cannot be checked; {known}. If that "
            f"is the one it was built on: r2ec checkpoint record-backbone {path}"
        )
    if here is None:
        return f"records {summary(recorded)}; {base!r} is not here ({missing})"
    if same(recorded, here):
        return f"{summary(recorded)}: the one {base!r} is here"
    return (
        f"MISMATCH: it records {summary(recorded)}, but {base!r} here is {summary(here)}: loads refuse "
        "it (R2EC_ALLOW_BACKBONE_MISMATCH overrides)"
    )


@app.command("record-backbone")
def checkpoint_record_backbone(
    path: Annotated[Path, typer.Argument(help="A checkpoint, a run dir (its best/) or a versions root")],
) -> None:
    """Record in PATH's r2ec.json the backbone its base names as it is on this machine (its
    digest), for a checkpoint written before checkpoints recorded it, whose backbone you know to
    be the one it was built on; its loads check it from then on. Refuses one that records it
    already: that record is what it was written over. Only r2ec.json changes (one rename)."""
    from model.backbone_digest import RECORD_KEY, describe, summary
    from model.checkpoint_meta import META_FILE, CheckpointError, read_meta, resolve_checkpoint
    from model.data.dataset import atomic_write

    try:
        where = resolve_checkpoint(path)
        meta = read_meta(where)
    except CheckpointError as exc:
        fail(str(exc))
    if meta.get("weights") == "full":
        fail(f"{where} holds full fine-tuned weights: it has no backbone to record")
    if meta.get(RECORD_KEY):
        fail(f"{where} records its backbone already ({summary(meta[RECORD_KEY])}): not replacing it")
    try:
        record = describe(str(meta.get("base", "")))
    except OSError as exc:
        fail(f"the backbone {meta.get('base')!r} of {where} cannot be read here: {exc}")
    text = json.dumps({**meta, RECORD_KEY: record}, indent=2, default=str)
    try:
        atomic_write(where / META_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        fail(os_error(exc, where=where))
    typer.echo(f"{where / META_FILE}: backbone {summary(record)}")


@app.command("rollback")
def checkpoint_rollback(
    root: Annotated[Path, typer.Argument(help="A versions root (holds CURRENT), e.g. /checkpoints")],
    version: Annotated[str, typer.Argument(help="The version to serve: the name of a directory under ROOT")],
    wait_seconds: Annotated[
        float,
        typer.Option(
            help="How long to wait for a retrain publishing or pruning (moments) to release the lock"
        ),
    ] = 60.0,
) -> None:
    """Point ROOT/CURRENT at VERSION (back to an earlier one, or forward again) in one rename,
    under the lock retraining publishes and prunes under: a retrain running now finds CURRENT
    moved and does not publish over it. VERSION's r2ec.json must read. Replicas follow at
    their next watch tick."""
    from model.checkpoint import CURRENT_FILE, CheckpointError, set_current

    if not wait_seconds >= 0:
        fail(f"--wait-seconds must be >= 0, got {wait_seconds}")
    try:
        before = set_current(root, version, timeout_s=wait_seconds)
    except CheckpointError as exc:
        fail(str(exc))
    except OSError as exc:  # a read-only root, a full disk: the path and what to do
        fail(os_error(exc, where=root))
    if before == version:
        typer.echo(f"{root / CURRENT_FILE} already names {version}")
    else:
        typer.echo(f"{root / CURRENT_FILE} -> {version} (was {before or 'unreadable'})")
