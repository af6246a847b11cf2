"""The root `r2ec` app: logging setup, then each group's commands in `r2ec --help` order."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

import cli._env  # noqa: F401  (first: OpenMP settings before any command loads torch or faiss)
from cli import common
from cli.checkpoint import app as checkpoint_app
from cli.common import fail
from cli.data import app as data_app
from cli.eval import eval_cmd
from cli.exposures import app as exposures_app
from cli.recommend import recommend_cmd
from cli.retrain import retrain_cmd
from cli.serve import serve
from cli.train import train_cmd
from cli.user import app as user_app
from service.logs import FORMATS, setup_logging

app = typer.Typer(help="R²ec: a recommender LLM that reasons before it recommends.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(checkpoint_app, name="checkpoint")
app.command("eval")(eval_cmd)
app.command("recommend")(recommend_cmd)
app.command("train")(train_cmd)
app.command("serve")(serve)
app.command("retrain")(retrain_cmd)
app.add_typer(user_app, name="user")
app.add_typer(exposures_app, name="exposures")


@app.callback()
def _main(
    log_level: Annotated[
        str, typer.Option(envvar="R2EC_LOG_LEVEL", help="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    ] = "INFO",
    log_format: Annotated[
        str, typer.Option(envvar="R2EC_LOG_FORMAT", help="text, or json: one object a line")
    ] = "text",
) -> None:
    level = logging.getLevelName(log_level.upper())  # a name's number ("WARN" too), else a string
    if not isinstance(level, int) or level == logging.NOTSET:
        fail(f"--log-level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {log_level!r}")
    if log_format.lower() not in FORMATS:
        fail(f"--log-format must be text or json, got {log_format!r}")
    common.LOG_LEVEL = logging.getLevelName(level)  # the canonical name, for `r2ec serve`
    common.LOG_FORMAT = log_format.lower()
    setup_logging(level, common.LOG_FORMAT)
