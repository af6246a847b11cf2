"""`r2ec retrain`: new stream events -> warm-started RecPO -> gated publish (model/retrain.py),
once or on a timer. With a Redis URL it reads the stream and the erasure ledger there, and drops
erased users' events and seed interactions (service/store.py `read_stream_checked`, `read_erasures`)."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from cli.common import fail, os_error
from cli.overrides import SetOption, recpo_config

if TYPE_CHECKING:
    from model.retrain import ReadErasures, ReadEvents, RetrainConfig, RetrainResult
    from service.store import ErasureLedger, StreamRead


def retrain_cmd(
    data: Annotated[Path, typer.Option(help="Seed prepared dataset, e.g. data/ml-100k/loo")],
    root: Annotated[
        Path, typer.Option(envvar="R2EC_CHECKPOINT", help="Versions root: version dirs + the CURRENT pointer")
    ] = Path("checkpoints"),
    redis_url: Annotated[
        str, typer.Option(envvar="R2EC_REDIS_URL", help="Event stream's Redis; '' = no stream (dataset only)")
    ] = "",
    config: Annotated[Path | None, typer.Option(help="YAML file of RecPOConfig fields")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Overrides the config")] = None,
    time_budget_minutes: Annotated[float | None, typer.Option(help="Overrides the config")] = None,
    set_: SetOption = None,
    tolerance: Annotated[
        float,
        typer.Option(
            help="Publish if NDCG@10 >= current - tolerance - Z paired s.e. (negative: demand a gain"
            " of -tolerance + Z s.e.)"
        ),
    ] = 0.0,
    gate_z: Annotated[
        float,
        typer.Option(
            help="Z: standard errors of the paired per-sample NDCG@10 difference given as doubt"
            " (0: compare the means; 2: reject only a credible drop, or with a negative tolerance"
            " publish only a credible gain)"
        ),
    ] = 0.0,
    keep: Annotated[int, typer.Option(help="Versions to keep (the current one always stays)")] = 3,
    min_events: Annotated[int, typer.Option(help="New stream events needed to train")] = 1,
    every_minutes: Annotated[
        float | None, typer.Option(help="Run forever, this many minutes apart (a scheduler's loop)")
    ] = None,
    retry_minutes: Annotated[
        float,
        typer.Option(help="With --every-minutes: retry a failed run after this long, doubling per failure"),
    ] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per run")] = False,
) -> None:
    """Read new events (and drop erased users' data), rebuild the samples, warm-start RecPO
    from CURRENT, publish if not worse."""
    from model.retrain import RetrainConfig

    try:
        train_cfg = recpo_config(config, set_, max_steps=max_steps, time_budget_minutes=time_budget_minutes)
        cfg = RetrainConfig(
            root=root,
            data=data,
            train=train_cfg,
            tolerance=tolerance,
            gate_z=gate_z,
            keep=keep,
            min_events=min_events,
        )
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if redis_url:
        from service.redis_conn import RedisUrlError, parse

        try:
            parse(redis_url)  # a URL that cannot work fails here, not at each run of a loop
        except RedisUrlError as exc:
            fail(str(exc))
    if every_minutes is None:
        _retrain_once(cfg, redis_url, as_json)
        return
    if every_minutes <= 0:
        fail(f"--every-minutes must be > 0, got {every_minutes}")
    if retry_minutes <= 0:
        fail(f"--retry-minutes must be > 0, got {retry_minutes}")
    run_forever(lambda: _retrain_once(cfg, redis_url, as_json), 60 * every_minutes, 60 * retry_minutes)


def next_delay_s(failures: int, every_s: float, retry_s: float) -> float:
    """Seconds until the next run: `every_s` after a success (failures == 0); after the n-th
    failure in a row, retry_s * 2^(n-1), never more than `every_s`. A trainer whose Redis was
    restarting retries in minutes, not at the next 6-hour tick."""
    if failures <= 0:
        return every_s
    return min(every_s, retry_s * 2 ** min(failures - 1, 30))


def run_forever(
    run_once: Callable[[], None], every_s: float, retry_s: float, sleep: Callable[[float], None] = time.sleep
) -> None:
    """The scheduler's loop: a failed run (an error exit, or any exception) is reported and
    retried with backoff (`next_delay_s`); the loop itself never dies of it."""
    failures = 0
    while True:
        try:
            run_once()
            failures = 0
        except typer.Exit as exc:
            failures = failures + 1 if exc.exit_code else 0
        except Exception:
            typer.secho(traceback.format_exc(), fg=typer.colors.RED, err=True)
            failures += 1
        delay = next_delay_s(failures, every_s, retry_s)
        if failures:
            typer.secho(f"retrain failed ({failures} in a row); retrying in {delay / 60:.1f} min", err=True)
        sleep(delay)


def _retrain_once(cfg: RetrainConfig, redis_url: str, as_json: bool) -> None:
    from model.retrain import retrain

    try:
        if redis_url:
            result = retrain(cfg, _stream_reader(redis_url), _erasure_reader(redis_url))
        else:
            result = retrain(cfg, None)
    except OSError as exc:  # a full disk, a read-only root (FileNotFoundError: a missing file)
        _failed(os_error(exc, where=cfg.root), as_json)
    except (ValueError, RuntimeError) as exc:  # Checkpoint/Data/RetrainError, Redis down
        _failed(str(exc), as_json)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    else:
        _report(result)


def _failed(message: str, as_json: bool) -> NoReturn:
    """`fail`; under --json also one object on stdout, `{"status": "failed", "error": ...}`,
    so whatever reads a run's result (a scheduler's log pipeline) reads a failed one too."""
    if as_json:
        typer.echo(json.dumps({"status": "failed", "error": message}))
    fail(message)


def _stream_reader(redis_url: str) -> ReadEvents:
    """The service's Redis event stream as retraining's read_events (service/store.py), which
    also counts the events its cap trimmed before they were read (`read_stream_checked`)."""
    from service.store import StoreUnavailable, read_stream_checked

    def read(cursor: str | None, mark: dict[str, int] | None = None) -> StreamRead:
        try:
            return read_stream_checked(redis_url, cursor, mark)
        except StoreUnavailable as exc:
            hint = "start Redis or pass --redis-url '' to retrain on the dataset only"
            raise RuntimeError(f"{exc}; {hint}") from exc

    return read


def _erasure_reader(redis_url: str) -> ReadErasures:
    """The service's erasure ledger as retraining's read_erasures (service/store.py)."""
    from service.store import StoreUnavailable, read_erasures

    def read() -> ErasureLedger:
        try:
            return read_erasures(redis_url)
        except StoreUnavailable as exc:
            hint = "start Redis and run again (the events read so far are kept in the log)"
            raise RuntimeError(f"{exc}; {hint}") from exc

    return read


def _report(result: RetrainResult) -> None:
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    typer.echo(f"retrain {result.status}: {result.reason}")
    typer.echo(
        f"  events   {result.new_events} new, {result.events_total} consumed in total"
        f"{'' if result.stream else ' (no stream)'}, cursor {result.last_event_id or '-'}"
    )
    if result.events_lost or result.events_lost_exact is False:
        count = (
            result.events_lost
            if result.events_lost_exact
            else f"at least {result.events_lost}"
            if result.events_lost
            else "an unknown number of"
        )
        typer.secho(
            f"  LOST     {count} events trimmed from the stream before this run read them"
            " (R2EC_STREAM_MAXLEN: docs/operations.md, R2ecRetrainLostEvents)",
            fg=typer.colors.YELLOW,
        )
    if result.events_in_seed:
        typer.echo(
            f"  events   {result.events_in_seed} of them already in the seed data (same user, item,"
            " rating, time): not added"
        )
    if result.erased_users:
        typer.echo(
            f"  erasures {result.erased_users} users in the ledger: {result.purged_events} events of"
            f" {result.purged_users} dropped from the log, {result.erased_seed_users} left out of the seed"
        )
    if result.samples:
        typer.echo("  samples  " + ", ".join(f"{k}={v}" for k, v in result.samples.items()))
    typer.echo(f"  current  {result.current_version}  {result.metric} {fmt(result.current_metric)}")
    if result.candidate_version:
        typer.echo(f"  trained  {result.candidate_version}  {result.metric} {fmt(result.candidate_metric)}")
    if result.paired_diff is not None:
        typer.echo(
            f"  paired   {result.paired_diff:+.4f} ± {result.paired_stderr:.4f} {result.metric}"
            f" (candidate - current, {result.paired_samples} valid samples)"
        )
    if result.published_version:
        typer.echo(f"  CURRENT -> {result.published_version}")
    if result.pruned:
        typer.echo(f"  pruned   {', '.join(result.pruned)}")
