"""What several commands share: the error exit and the dataset options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

DataDir = Annotated[Path, typer.Option(envvar="R2EC_DATA_DIR", help="Where prepared datasets live.")]
Protocol = Annotated[str, typer.Option(help="Split protocol: loo or temporal.")]
LOG_LEVEL: str | None = None  # what `r2ec --log-level` set (cli/main.py), for the service's loggers
LOG_FORMAT: str | None = None  # what `r2ec --log-format` set (cli/main.py): text or json


def fail(message: str) -> NoReturn:
    """Print `error: message` in red to stderr and exit 2, click's code for a usage error."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def check_protocol(protocol: str) -> None:
    from model.data import PROTOCOLS

    if protocol not in PROTOCOLS:
        fail(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
