"""Process settings that must be in place before torch loads, imported first by cli/main.py.

`import model` sets OpenMP's wait policy (model/__init__.py); `r2ec serve` also lets OpenMP's
threads spin briefly between kernels (`model.spin_between_kernels`): right for a replica with
cores of its own (a host, Guaranteed QoS with the static CPU manager); where it shares them,
GOMP_SPINCOUNT=0 (deploy/k8s/config.yaml), which this leaves as set."""

from __future__ import annotations

import sys

import model

# `r2ec`'s own options that take a value (cli/main.py), as `--log-level INFO`; `--opt=value`
# is one argument
VALUED = frozenset({"--log-level", "--log-format"})


def command(argv: list[str]) -> str | None:
    """The subcommand in `r2ec [--log-level L] [--log-format F] COMMAND ...`, read before typer
    parses anything."""
    args = iter(argv)
    for arg in args:
        if arg in VALUED:
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


if command(sys.argv[1:]) == "serve":
    model.spin_between_kernels()
