"""What several commands share: the error exit, the dataset options, strict JSON, and what a run
block (r2ec eval's JSON and --ranks-out, r2ec recommend's output) says of the data, the
checkpoint and the code's commit."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from service.build import code_commit  # noqa: F401  (the commands' name for it)

DataDir = Annotated[Path, typer.Option(envvar="R2EC_DATA_DIR", help="Where prepared datasets live.")]
Protocol = Annotated[str, typer.Option(help="Split protocol: loo or temporal.")]
LOG_LEVEL: str | None = None  # what `r2ec --log-level` set (cli/main.py), for the service's loggers
LOG_FORMAT: str | None = None  # what `r2ec --log-format` set (cli/main.py): text or json


def fail(message: str) -> NoReturn:
    """Print `error: message` in red to stderr and exit 2, click's code for a usage error."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


# what to do about an OSError, by errno: the disk is full, the volume read-only, the user barred
_DISK_FULL = "free some space there and run the command again"
_OS_ERROR_HINTS = {
    errno.ENOSPC: _DISK_FULL,
    errno.EDQUOT: _DISK_FULL,
    errno.EROFS: "that volume is mounted read-only: mount it read-write or use a directory on another",
    errno.EACCES: "this user may not use it: change its permissions or owner, or use another directory",
    errno.EPERM: "this user may not use it: change its permissions or owner, or use another directory",
}


def os_error(exc: OSError, where: Path | str | None = None) -> str:
    """One line for an OSError (a full disk, a read-only or foreign directory): the path it
    names (else `where`, the directory the command writes under), what happened and what to
    do about it."""
    if exc.errno is None:  # a message of the project's own ("--resume: no ...", "could not write X: ...")
        return str(exc)
    if exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}"
    elif where is not None:  # e.g. a failed fsync: no file known, the command's directory is
        text = f"writing under {where}: {exc.strerror or exc}"
    else:
        text = str(exc)
    hint = _OS_ERROR_HINTS.get(exc.errno)
    return f"{text}; {hint}" if hint else text


def warn(message: str, kind: str = "warning") -> None:
    """Print `kind: message` in yellow to stderr (stdout may be a --json payload)."""
    typer.secho(f"{kind}: {message}", fg=typer.colors.YELLOW, err=True)


def check_protocol(protocol: str) -> None:
    from model.data import PROTOCOLS

    if protocol not in PROTOCOLS:
        fail(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, an infinite ratio) replaced by None, through
    dicts, lists and tuples: strict JSON parsers (JavaScript, Go, serde) refuse NaN/Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def json_dumps(obj: Any, **kwargs: Any) -> str:
    """Standard JSON: non-finite numbers written as null (`finite`)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def data_run(ds: Any, path: Path) -> dict[str, Any]:
    """A run block's `data`: the prepared dataset's absolute path, name and protocol."""
    return {"path": str(Path(path).resolve()), "name": ds.name, "protocol": ds.protocol}


def checkpoint_run(path: Path | str, version: str) -> dict[str, Any]:
    """A run block's `checkpoint`: the loaded checkpoint's absolute path and version."""
    return {"path": str(Path(path).resolve()), "version": version}
