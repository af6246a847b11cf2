"""The `r2ec` command: data, checkpoint, eval, recommend, train, serve, retrain, user.

Thin: each command parses options and calls one function of model/, index/ or service/.
One module per command group; `main.py` assembles them into the root `app`.
"""

from cli.main import app

__all__ = ["app"]
