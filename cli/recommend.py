"""`r2ec recommend`: batch recommendations for a prepared dataset's users into parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import checkpoint_run, code_commit, data_run, fail, json_dumps, os_error, warn


def recommend_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint dir (or a versions root with CURRENT)")],
    data: Annotated[Path, typer.Option(help="Prepared dataset dir: its users, histories and seen items")],
    out: Annotated[Path, typer.Option(help="Parquet file to write (one row per user and rank)")],
    split: Annotated[
        str | None,
        typer.Option(
            help="Recommend as of each user's last sample in this split (train, valid, test): its "
            "history, before its target (written as target_item_id). Default: every user's latest "
            "history, target included"
        ),
    ] = None,
    users: Annotated[
        list[str] | None,
        typer.Option(help="Only these user ids, comma-separated (repeatable), in this order"),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N users")] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Items per user")] = 10,
    reasoning: Annotated[bool, typer.Option("--reasoning/--no-reasoning")] = True,
    max_reasoning_tokens: Annotated[int, typer.Option(min=0, help="Reasoning budget in tokens")] = 64,
    mask: Annotated[
        str,
        typer.Option(
            help="What is never recommended: seen (everything the user had in the data's train, "
            "valid and test, as `r2ec eval --mask seen`), prompt (the history given only) or none"
        ),
    ] = "seen",
    batch_size: Annotated[
        int, typer.Option(min=1, help="Users decoded side by side (R2EC_MAX_BATCH's decode slots)")
    ] = 16,
    chunk_size: Annotated[
        int, typer.Option(min=1, help="Users per chunk written: a killed run loses at most one")
    ] = 256,
    resume: Annotated[
        bool, typer.Option("--resume", help="Keep the users OUT (or an interrupted run's chunks) holds")
    ] = False,
    deterministic: Annotated[
        bool,
        typer.Option(
            "--deterministic",
            help="float32, no speculative drafting, exact decoding: answers that do not depend on the "
            "batch size or the users' order but in float32's last bits (several times slower; "
            "BENCHMARKS.md §3)",
        ),
    ] = False,
    dtype: Annotated[str | None, typer.Option(help="bfloat16 (serve's default), float32 or float16")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads (default: torch's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object")] = False,
) -> None:
    """Recommend for a prepared dataset's users, as `r2ec serve` would answer them, into parquet:
    user_id, rank, item_id, score, title, reasoning, model_version; how the run was made in its
    metadata (pd.read_parquet(OUT).attrs["run"]). Written a chunk at a time: --resume goes on
    after a kill."""
    from model.checkpoint import CheckpointError
    from model.data import DataError, load_prepared
    from model.data.dataset import Busy
    from model.evaluate import MASKS
    from service.offline import DETERMINISTIC, dataset_users, load, run_batch, select_users, serve_load_kwargs

    if mask not in MASKS:
        fail(f"--mask must be one of {', '.join(MASKS)}, got {mask!r}")
    if deterministic and dtype not in (None, DETERMINISTIC["dtype"]):
        fail(f"--deterministic runs in {DETERMINISTIC['dtype']}; drop --dtype {dtype}")
    if dtype not in (None, "bfloat16", "float32", "float16"):
        fail(f"--dtype must be bfloat16, float32 or float16, got {dtype!r}")
    if out.is_dir():
        fail(f"--out {out} is a directory; give a file path")
    wanted = None if users is None else [u.strip() for arg in users for u in arg.split(",") if u.strip()]
    try:
        ds = load_prepared(data)
        chosen = select_users(dataset_users(ds, split), wanted, limit)
    except (DataError, ValueError) as exc:
        fail(str(exc))
    overrides = {"slots": batch_size} | ({} if dtype is None else {"dtype": dtype})
    overrides |= {} if threads is None else {"threads": threads}
    try:
        rec = load(checkpoint, deterministic=deterministic, **overrides)
    except (CheckpointError, ValueError, OSError) as exc:
        fail(str(exc))
    settings = serve_load_kwargs() | (DETERMINISTIC if deterministic else {}) | overrides
    drafter = rec.backend.drafter
    settings |= {"backend": rec.backend.name, "speculative_tokens": 0 if drafter is None else drafter.tokens}
    settings.pop("slots")  # the run's batch_size
    run = {
        "data": data_run(ds, data),
        "split": split,
        "mask": mask,
        "users": {"given": wanted, "limit": limit},
        "k": k,
        "reasoning": reasoning,
        **({"max_reasoning_tokens": max_reasoning_tokens} if reasoning else {}),
        "checkpoint": checkpoint_run(rec.checkpoint.path, rec.version),
        "settings": settings,
        "deterministic": deterministic,
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "code": code_commit(),
    }
    try:
        summary = run_batch(
            rec,
            chosen,
            out,
            run=run,
            k=k,
            reasoning=reasoning,
            max_reasoning_tokens=max_reasoning_tokens,
            mask=mask,  # type: ignore[arg-type]
            chunk_size=chunk_size,
            resume=resume,
        )
    except Busy as exc:
        fail(str(exc))
    except ValueError as exc:  # --resume over another question's output
        fail(str(exc))
    except OSError as exc:
        fail(os_error(exc, out.parent))
    rate = summary.users / summary.seconds if summary.seconds else 0.0
    if as_json:
        typer.echo(
            json_dumps(
                {
                    "out": str(out),
                    "users": summary.users,
                    "kept": summary.kept,
                    "failed": summary.failed,
                    "rows": summary.rows,
                    "seconds": round(summary.seconds, 2),
                    "users_per_s": round(rate, 3),
                    "run": run,
                }
            )
        )
    else:
        kept = f" ({summary.kept} kept from the earlier run)" if summary.kept else ""
        typer.echo(
            f"{summary.users} users in {summary.seconds:.1f}s ({rate:.2f} users/s){kept}: "
            f"{summary.rows} rows in {out}, model {rec.version}"
        )
    if summary.failed:
        shown = "; ".join(f"{u}: {why}" for u, why in list(summary.failed.items())[:3])
        warn(
            f"{len(summary.failed)} users got no recommendations (a later --resume asks them again): {shown}"
        )
        raise typer.Exit(1)
