"""Process settings that must be in place before torch loads, imported first by cli/main.py.

`import model` sets OpenMP's wait policy (model/__init__.py); `r2ec serve` also lets OpenMP's
threads spin briefly between kernels (`model.spin_between_kernels`), since a service replica
owns its cores."""

from __future__ import annotations

import sys

import model


def command(argv: list[str]) -> str | None:
    """The subcommand in `r2ec [--log-level L] COMMAND ...`, read before typer parses anything."""
    args = iter(argv)
    for arg in args:
        if arg == "--log-level":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


if command(sys.argv[1:]) == "serve":
    model.spin_between_kernels()
