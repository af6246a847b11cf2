"""Catalog search (GET /items?q=), for people picking films by name."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service import schemas
from service.deps import CatalogDep

SEARCH_LIMIT = 50

router = APIRouter()


@router.get("/items", response_model=schemas.ItemSearchResponse, tags=["items"])
def search_items(
    catalog: CatalogDep,
    q: Annotated[
        str,
        Query(min_length=1, max_length=200, description="Part of a title; case and accents are ignored."),
    ],
    limit: Annotated[int, Query(ge=1, le=SEARCH_LIMIT, description="How many matches to return.")] = 10,
) -> schemas.ItemSearchResponse:
    """Catalog items whose title matches `q`, best first: the whole title, then the title's
    start, then the start of a later word, then anywhere; ties by title. Case, accents and
    punctuation are ignored, and "Godfather, The" is also found as "the godfather"."""
    # A plain `def`: FastAPI runs it on a worker thread, so the first call's index build
    # (once per catalog) never holds up the event loop.
    found = catalog.search_titles(q, limit)
    return schemas.ItemSearchResponse(
        query=q,
        items=[
            schemas.ItemMatch(
                item_id=item["item_id"],
                title=item["title"],
                year=item["year"],
                genres=item["genres"],
                match=kind,
            )
            for item, kind in found
        ],
    )
