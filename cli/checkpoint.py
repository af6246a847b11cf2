"""`r2ec checkpoint init|show`: create an untrained checkpoint, print one's metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.common import fail

app = typer.Typer(help="Create and inspect checkpoints.", no_args_is_help=True)


@app.command("init")
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


@app.command("show")
def checkpoint_show(path: Path) -> None:
    """Print a checkpoint's r2ec.json (PATH may be a run dir or hold a CURRENT pointer)."""
    from model.checkpoint import CheckpointError, read_meta, resolve_checkpoint

    try:
        typer.echo(json.dumps(read_meta(resolve_checkpoint(path)), indent=2))
    except CheckpointError as exc:
        fail(str(exc))
