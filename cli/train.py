"""`r2ec train`: one training stage on a prepared dataset (model/train.py): the rationale cold
start (the shipped recipe, configs/ml100k-onestage.yaml), RecPO, or the contrastive warm-up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import fail
from cli.overrides import SetOption, recpo_config


def train_cmd(
    data: Annotated[Path, typer.Option(help="Prepared dataset dir, e.g. data/ml-100k/loo")],
    out: Annotated[
        Path,
        typer.Option(
            help="Run dir: best/, last/, log.jsonl, curves.png. One that holds a run is refused"
            " unless --resume continues it or --overwrite replaces it"
        ),
    ],
    base: Annotated[
        str, typer.Option(help="Backbone (smollm2, tiny, HF dir, .gguf) or a checkpoint")
    ] = "smollm2",
    config: Annotated[Path | None, typer.Option(help="YAML file of RecPOConfig fields")] = None,
    stage: Annotated[
        str | None, typer.Option(help="recpo, contrastive or rationale (overrides the config)")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Overrides the config")] = None,
    time_budget_minutes: Annotated[float | None, typer.Option(help="Overrides the config")] = None,
    device: Annotated[
        str | None, typer.Option(help="auto (cuda:LOCAL_RANK if torch sees a GPU), cpu, cuda, cuda:N")
    ] = None,
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last exactly")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the run OUT holds: its checkpoints, log and curves go first")
    ] = False,
) -> None:
    """Train on a prepared dataset: rationale (the recipe), recpo or contrastive. Runs under torchrun."""
    from model.data import DataError, load_prepared
    from model.train import train

    try:
        cfg = recpo_config(
            config,
            set_,
            stage=stage,
            max_steps=max_steps,
            time_budget_minutes=time_budget_minutes,
            device=device,
        )
        ds = load_prepared(data)
        best = train(cfg, ds, base, out, resume=resume, overwrite=overwrite)
    except (DataError, ValueError, OSError) as exc:
        fail(str(exc))
    typer.echo(f"best checkpoint: {best}")
