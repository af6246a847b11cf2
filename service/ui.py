"""The page people try the service with (GET /, files under service/static/) and the catalog
search it uses (GET /items?q=). Plain files, no build step, nothing fetched from elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse

from service import schemas
from service.deps import CatalogDep
from service.errors import documented

STATIC = Path(__file__).parent / "static"
# Only these files are served; a request never names a path on disk.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
SEARCH_LIMIT = 50
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate: a redeploy shows the new page at once
# The page loads only its own script and stylesheet (no inline script, style or handler) and
# its icon as a data: URL, and talks only to its own origin; no site may frame it (its buttons
# post events to a user's history: clickjacking). Beside the headers every response gets
# (service/headers.py).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
PAGE_HEADERS = {**NO_CACHE, "Content-Security-Policy": CSP, "X-Frame-Options": "DENY"}

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, f"no static file {name!r}")
    return FileResponse(STATIC / name, media_type=media_type, headers=PAGE_HEADERS)


@router.get(
    "/items",
    response_model=schemas.ItemSearchResponse,
    tags=["items"],
    responses=documented(422, 500, 503),
)
def search_items(
    catalog: CatalogDep,
    q: Annotated[
        schemas.SearchQuery,
        Query(description=f"Part of a title, at most {schemas.SEARCH_MAX} characters; any case or accents."),
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
