"""`python -m cli ...` (and `torchrun -m cli train ...`) runs the `r2ec` command."""

from cli import app

app(prog_name="r2ec")
