"""`r2ec train`: one training stage on a prepared dataset (model/train.py): the rationale cold
start (the shipped recipe, configs/ml100k-onestage.yaml), RecPO, or the contrastive warm-up."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.common import fail, os_error
from cli.overrides import SetOption, recpo_config

if TYPE_CHECKING:
    from model.train import TrainingInterrupted


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
    from model.train import TrainingInterrupted, train

    signals: list[int] = []  # the signals that stopped the run (none: Ctrl-C, or none taken)
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
        with _sigterm_as_interrupt() as signals:
            best = train(cfg, ds, base, out, resume=resume, overwrite=overwrite)
    except TrainingInterrupted as stop:
        by = signals[-1] if signals else signal.SIGINT
        if stop.main:
            typer.secho(_how_to_continue(stop, by), err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(128 + by) from None  # as a shell reports a process ended by that signal
    except KeyboardInterrupt:  # outside the steps: loading the model and data, the setup
        if not signals:
            raise  # Ctrl-C: as before, 130
        if os.environ.get("RANK", "0") == "0":
            name = signal.Signals(signals[-1]).name
            said = f"stopped ({name}) while setting up, before the first step: run the command again"
            typer.secho(said, err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(128 + signals[-1]) from None
    except OSError as exc:  # a full disk, a read-only OUT: the path and what to do
        fail(os_error(exc, where=out))
    except (DataError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"best checkpoint: {best}")


REPEAT_S = 30.0  # a SIGTERM this soon after the one that stops a run is not raised again


@contextmanager
def _sigterm_as_interrupt() -> Iterator[list[int]]:
    """SIGTERM (`kill`, `docker stop`, a batch scheduler's preemption, torchrun passing on its
    own) stops a run as Ctrl-C does: the step in flight is dropped, the curves are drawn and
    the resume line printed, where Python's default would end the process on the spot. Yields
    the signals taken."""
    taken: list[int] = []
    raised_at = [0.0]  # when a SIGTERM last interrupted

    def stop(signum: int, _frame: object) -> None:
        taken.append(signum)
        # a repeat within REPEAT_S lets the run stop (curves, resume line); a later one raises
        # again, in case the first was lost (one that lands in a __del__ is dropped)
        if len(taken) == 1 or time.monotonic() - raised_at[0] >= REPEAT_S:
            raised_at[0] = time.monotonic()
            raise KeyboardInterrupt

    try:
        previous, installed = signal.signal(signal.SIGTERM, stop), True
    except ValueError:  # not the main thread (an embedding caller): leave SIGTERM as it is
        previous, installed = None, False
    # yielded outside that `except`: an error of the caller's is not chained to this ValueError
    try:
        yield taken
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


def _how_to_continue(stop: TrainingInterrupted, by: int = signal.SIGINT) -> str:
    """One line: where the run stopped, what OUT/last holds and the command that goes on from
    it (this command with --resume), or, with nothing saved yet, the one that starts over."""
    args = [a for a in sys.argv[1:] if a not in ("--resume", "--no-resume", "--overwrite", "--no-overwrite")]
    what = "interrupted" if by == signal.SIGINT else f"interrupted ({signal.Signals(by).name})"
    if stop.saved_step is None:
        return (
            f"{what} after step {stop.step}, before the first save (step {stop.save_every}): "
            f"nothing to resume; start over with: {_launcher()} {shlex.join([*args, '--overwrite'])}"
        )
    return (
        f"{what} after step {stop.step}; {stop.out / 'last'} holds step {stop.saved_step}: "
        f"continue with: {_launcher()} {shlex.join([*args, '--resume'])}"
    )


def _launcher() -> str:
    """How this run was started, as far as a worker can tell: `r2ec`, or torchrun's command
    when its variables are set (its other options, e.g. a multi-node rendezvous, are the
    launcher's and not visible here)."""
    per_node = os.environ.get("LOCAL_WORLD_SIZE")
    if per_node is None or "TORCHELASTIC_RUN_ID" not in os.environ:
        return "r2ec"
    nodes = int(os.environ.get("WORLD_SIZE", per_node)) // max(int(per_node), 1)
    more = f" --nnodes {nodes} ..." if nodes > 1 else ""
    return f"torchrun{more} --nproc_per_node {per_node} -m cli"
