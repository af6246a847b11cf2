"""`r2ec data prepare ...`: raw datasets into the canonical samples format (model/data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import DataDir, Protocol, check_protocol, fail, os_error

app = typer.Typer(help="Datasets.", no_args_is_help=True)
prepare_app = typer.Typer(help="Prepare a dataset into the canonical samples format.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")


def _report_prepared(path: Path) -> None:
    from model.data import format_stats, load_prepared

    typer.echo(f"prepared {path}")
    typer.echo(format_stats(load_prepared(path).meta))


@prepare_app.command("ml-100k")
def data_ml100k(data_dir: DataDir = Path("data"), protocol: Protocol = "loo") -> None:
    """MovieLens-100k from RecBole's atomic files inside the recbole==1.2.1 wheel."""
    from model.data import DataError, prepare_ml100k

    check_protocol(protocol)
    try:
        _report_prepared(prepare_ml100k(data_dir, protocol=protocol))
    except DataError as exc:
        fail(str(exc))
    except OSError as exc:  # a full disk, a read-only data dir: the path and what to do
        fail(os_error(exc, where=data_dir))


@prepare_app.command("atomic")
def data_atomic(
    inter: Annotated[Path, typer.Option(help="RecBole .inter file")],
    name: Annotated[
        str, typer.Option(help="Dataset name: one folder name under --data-dir (no '/', not '..')")
    ],
    item: Annotated[Path | None, typer.Option(help="RecBole .item file")] = None,
    category: Annotated[str, typer.Option(help="Noun used in prompts")] = "item",
    encoding: Annotated[
        str,
        typer.Option(
            help="The text encoding of both files (--inter and --item alike), e.g. latin-1 or "
            "cp1252; a byte it cannot decode is an error naming the file, line and byte. A UTF-8 "
            "byte-order mark is skipped; a file of another encoding than the other (a UTF-16 "
            ".item beside a UTF-8 .inter) must be converted first (iconv -f UTF-16 -t UTF-8)"
        ),
    ] = "utf-8",
    data_dir: DataDir = Path("data"),
    protocol: Protocol = "loo",
) -> None:
    """Any RecBole atomic-format dataset (.inter + .item)."""
    from model.data import DataError, prepare_atomic

    check_protocol(protocol)
    try:
        path = prepare_atomic(
            inter, item, data_dir, name, protocol=protocol, category=category, encoding=encoding
        )
        _report_prepared(path)
    except DataError as exc:
        fail(str(exc))
    except OSError as exc:  # a full disk, a read-only data dir: the path and what to do
        fail(os_error(exc, where=data_dir))


@prepare_app.command("amazon")
def data_amazon(
    reviews: Annotated[
        Path,
        typer.Option(
            help="<Category>.jsonl(.gz) reviews; with --recipe official the 5-core "
            "rating-only <Category>.csv(.gz)"
        ),
    ],
    meta: Annotated[Path, typer.Option(help="meta_<Category>.jsonl(.gz)")],
    name: Annotated[
        str | None,
        typer.Option(help="Dataset name: one folder name under --data-dir [the reviews file's name]"),
    ] = None,
    min_items: Annotated[int, typer.Option(help="Move the time window back until this many items")] = 10_000,
    recipe: Annotated[
        str,
        typer.Option(
            help="window: full reviews, 30-day steps back from the last one, histories "
            "may predate the window; official: the official RRec preprocessing (5-core "
            "CSV, items with a short title and a price, window moved back 3 months at a "
            "time, histories inside it only)"
        ),
    ] = "window",
    start: Annotated[
        str | None, typer.Option(help="official only: the window's first start, YYYY-MM-DD [2022-10-01]")
    ] = None,
    end: Annotated[
        str | None, typer.Option(help="official only: the window's fixed end, YYYY-MM-DD [2023-10-01]")
    ] = None,
    data_dir: DataDir = Path("data"),
    protocol: Protocol = "temporal",
) -> None:
    """Amazon Reviews 2023: the paper's rolled-back window, or the official code's recipe."""
    from model.data import DataError, prepare_amazon
    from model.data.amazon import RECIPES

    check_protocol(protocol)
    if recipe not in RECIPES:
        fail(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    try:
        path = prepare_amazon(
            reviews, meta, data_dir, name=name, protocol=protocol, min_items=min_items,
            recipe=recipe, start=start, end=end,
        )  # fmt: skip
        _report_prepared(path)
    except DataError as exc:
        fail(str(exc))
    except OSError as exc:  # a full disk, a read-only data dir: the path and what to do
        fail(os_error(exc, where=data_dir))
