"""The FastAPI app factory. Nothing heavy at import: the lifespan loads the model + index and
connects the store; `create_app(engine=..., store=...)` lets tests bring their own."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import routes, ui
from service.batcher import BatcherClosed, BatchFailed
from service.config import Settings
from service.metrics import Metrics, RequestTimer
from service.recommender import Recommender
from service.state import ClientDisconnected, ReloadError, ReloadInProgress, ServiceState
from service.store import HistoryStore, StoreUnavailable, make_store
from service.types import EmptyHistoryError, QueryError, UnknownItemsError

log = logging.getLogger(__name__)

DESCRIPTION = """R²ec: an LLM that reasons about a user's history, then ranks the whole catalog by
the cosine of its final hidden state with item vectors made by the same model
([arXiv 2505.16994](https://arxiv.org/abs/2505.16994))."""


def create_app(
    settings: Settings | None = None,
    engine: Recommender | None = None,
    store: HistoryStore | None = None,
) -> FastAPI:
    """Build the app. `engine` / `store` replace the ones the lifespan would create (tests)."""
    settings = settings or Settings()
    metrics = Metrics()
    for name in ("service", "model", "index"):
        logging.getLogger(name).setLevel(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        executor = ThreadPoolExecutor(1, thread_name_prefix="r2ec-model")
        own_store = store is None
        the_store = store or make_store(
            settings.redis_url,
            settings.history_window,
            settings.cache_size,
            settings.cache_ttl_s,
            settings.stream_maxlen,
        )
        try:
            the_engine = engine or await asyncio.get_running_loop().run_in_executor(
                executor,
                lambda: Recommender.load(
                    settings.checkpoint,
                    dtype=settings.dtype,
                    threads=settings.threads,
                    index_kind=settings.index_kind,
                    index_nprobe=settings.index_nprobe,
                    index_ef_search=settings.index_ef_search,
                ),
            )
            state = ServiceState(settings, the_engine, the_store, metrics, executor)
            await state.start()
        except BaseException:
            executor.shutdown(wait=False)
            if own_store:
                await the_store.close()
            raise
        app.state.r2ec = state
        log.info(
            "serving model %s (%d items, store %s, max_batch %d, max_wait %.0f ms)",
            the_engine.version,
            len(the_engine.catalog.index),
            getattr(the_store, "kind", "?"),
            settings.max_batch,
            settings.max_wait_ms,
        )
        try:
            yield
        finally:
            app.state.r2ec = None
            await state.stop()
            if own_store:
                await the_store.close()
            executor.shutdown(wait=True)

    app = FastAPI(title="R²ec serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.r2ec = None
    app.add_middleware(RequestTimer, metrics=metrics)
    app.include_router(routes.recommend_router(settings))
    app.include_router(routes.router)
    app.include_router(ui.router)  # the page (GET /) and catalog search (GET /items)
    _add_error_handlers(app, metrics)
    return app


def _error(status: int, message: str, detail: Any = None, **extra: Any) -> JSONResponse:
    """Every error body: `message` (one line for people) and `detail` (FastAPI's field, a list of
    field errors for validation failures, else the message again)."""
    body = {"detail": message if detail is None else detail, "message": message, **extra}
    return JSONResponse(body, status_code=status)


def _field_error(e: dict[str, Any]) -> str:
    """'history.0.item_id: Field required'; a malformed body says where the JSON broke."""
    if e.get("type") == "json_invalid":
        at = e.get("loc", ("body", "?"))[-1]
        return f"body: invalid JSON at character {at}: {e.get('ctx', {}).get('error', e.get('msg'))}"
    where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
    return f"{where}: {e.get('msg')}"


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every failure a client can cause is a 4xx with a message; service-side trouble is a
    503 (store down, shutting down) or a 500 that still says what went wrong."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = _error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), custom_encoder={Exception: str, bytes: repr})
        return _error(422, "; ".join(_field_error(e) for e in errors), errors)

    @app.exception_handler(UnknownItemsError)
    async def unknown_items(request: Request, exc: UnknownItemsError) -> JSONResponse:
        return _error(422, str(exc), unknown_item_ids=exc.item_ids)

    @app.exception_handler(EmptyHistoryError)
    async def empty_history(request: Request, exc: EmptyHistoryError) -> JSONResponse:
        hint = "" if exc.user_id is None else f"; send `history` or POST /users/{exc.user_id}/events first"
        return _error(422, f"{exc}{hint}")

    @app.exception_handler(QueryError)
    async def bad_query(request: Request, exc: QueryError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(StoreUnavailable)
    async def store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        metrics.store_errors.labels(exc.op).inc()
        return _error(503, f"history store unavailable: {exc}")

    @app.exception_handler(ReloadError)
    async def reload_failed(request: Request, exc: ReloadError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(ReloadInProgress)
    async def reload_busy(request: Request, exc: ReloadInProgress) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(BatcherClosed)
    async def closed(request: Request, exc: BatcherClosed) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(BatchFailed)
    async def batch_failed(request: Request, exc: BatchFailed) -> JSONResponse:
        return _error(500, f"recommendation failed: {exc}")  # already logged by the batcher

    @app.exception_handler(ClientDisconnected)
    async def gone(request: Request, exc: ClientDisconnected) -> JSONResponse:
        return _error(499, "client disconnected")  # nobody reads it; nginx's convention

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")
