"""`r2ec user erase`: erase a user from the service's Redis (service/store.py `erase_user`), what
DELETE /users/{id} does, from a shell: for any id, one ending in /events or /history too (the
route's path cannot name those: it is that user's events or history), and without a running
service or its admin key."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Annotated

import typer

from cli.common import fail

if TYPE_CHECKING:
    from service.store import Erased

app = typer.Typer(help="Users' data in the service's Redis.", no_args_is_help=True)


@app.command("erase")
def erase(
    user_id: Annotated[str, typer.Argument(help="The user id, as the service stores it")],
    redis_url: Annotated[
        str, typer.Option(envvar="R2EC_REDIS_URL", help="The service's Redis (redis://host:port/db)")
    ] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the receipt as one JSON object")] = False,
) -> None:
    """Erase a user: history, seen items, event ids, stream entries, the reasonings cached for
    their stored history; recorded in the ledger the next `r2ec retrain` honours. What this
    cannot remove: docs/operations.md, "Erasing a user"."""
    from service.schemas import check_id
    from service.store import StoreUnavailable

    if not redis_url:
        fail(
            "--redis-url (R2EC_REDIS_URL) is needed: without Redis each replica keeps its own "
            "store, erased by DELETE /users/{id} on each"
        )
    try:
        check_id(user_id)
    except ValueError as exc:
        fail(f"user id {user_id!r} {exc}")
    try:
        erased = asyncio.run(_erase(redis_url, user_id))
    except StoreUnavailable as exc:
        fail(str(exc))
    receipt = {
        "user_id": erased.user_id,
        "erased_at": erased.erased_at,
        "history_events": erased.history_events,
        "seen_items": erased.seen_items,
        "stream_entries": erased.stream_entries,
        "cached_reasonings": erased.cached_reasonings,
    }
    if as_json:
        typer.echo(json.dumps(receipt))
        return
    typer.echo(f"erased {user_id!r} at {receipt['erased_at']}")
    typer.echo(
        f"  removed  {erased.history_events} history events, {erased.seen_items} seen items, "
        f"{erased.stream_entries} stream entries, {erased.cached_reasonings} cached reasonings"
    )
    typer.echo('  remains  see docs/operations.md, "Erasing a user" (model weights, AOF/RDB, backups, logs)')


async def _erase(redis_url: str, user_id: str) -> Erased:
    from service.store import RedisStore

    store = RedisStore(redis_url, timeout_s=10.0)  # a shell's patience, not a request's
    try:
        return await store.erase_user(user_id)
    finally:
        await store.close()
