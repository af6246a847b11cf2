"""`r2ec serve`: the HTTP service (service/app.py) under uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli import common
from cli.common import fail


def serve(
    host: Annotated[str, typer.Option(envvar="R2EC_HOST", help="Bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="R2EC_PORT", min=1, max=65535, help="TCP port")] = 8000,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint dir (default $R2EC_CHECKPOINT or checkpoints/current)")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="redis://host:port/db (default $R2EC_REDIS_URL; empty = in-process)")
    ] = None,
    max_batch: Annotated[
        int | None,
        typer.Option(help="Requests decoded at once: decode slots (continuous, default) or a batch (static)"),
    ] = None,
    max_wait_ms: Annotated[
        float | None, typer.Option(help="Static batching only: how long a batch waits for more requests")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="bfloat16, float16 or float32")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
    device: Annotated[str | None, typer.Option(help="cpu (default), cuda, cuda:N or auto")] = None,
) -> None:
    """Start the HTTP service (FastAPI + uvicorn). Every setting also reads R2EC_* env vars."""
    from pydantic import ValidationError

    from model.checkpoint import CURRENT_FILE, META_FILE, CheckpointError, read_meta, resolve_checkpoint
    from service.app import create_app
    from service.config import Settings
    from service.server import StartupError, run

    overrides = {
        "log_level": common.LOG_LEVEL,  # `r2ec --log-level`, which reads R2EC_LOG_LEVEL too
        "log_format": common.LOG_FORMAT,  # `r2ec --log-format`, R2EC_LOG_FORMAT
        "checkpoint": checkpoint,
        "redis_url": redis_url,
        "max_batch": max_batch,
        "max_wait_ms": max_wait_ms,
        "dtype": dtype,
        "threads": threads,
        "device": device,
    }
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        fail(f"bad setting: {exc}")
    path = settings.checkpoint
    try:
        read_meta(resolve_checkpoint(path))
    except CheckpointError as exc:
        if any((path / name).exists() for name in (META_FILE, CURRENT_FILE, "best")):
            fail(str(exc))  # a damaged checkpoint, a pointer to a missing version: it says what to do
        fail(f"{exc}; create one with `r2ec checkpoint init --data DIR --out {path}`")
    # On SIGTERM: stop accepting, answer what is in flight within R2EC_SHUTDOWN_GRACE_S (the rest
    # gets a JSON 503 + Retry-After), then exit (service/server.py).
    try:
        run(create_app(settings), settings, host=host, port=port)
    except StartupError as exc:  # the first load failed: a damaged file, named
        fail(str(exc))
