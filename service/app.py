"""The FastAPI app factory. Nothing heavy at import: the lifespan loads the model + index and
connects the store; `create_app(engine=..., store=...)` lets tests bring their own."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.routing import BaseRoute

from service import routes, ui
from service.access_log import AccessLog
from service.build import package_version
from service.config import Settings, unknown_env
from service.deps import require_user_key
from service.errors import add_error_handlers
from service.headers import SecurityHeaders
from service.limits import AuthThrottle, BodyLimit
from service.metrics import Metrics
from service.recommender import Recommender
from service.request_id import RequestId
from service.state import ServiceState
from service.store import HistoryStore, StoreUnavailable, make_store

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
    metrics = Metrics(variant=settings.variant)
    for name in ("service", "model", "index"):
        logging.getLogger(name).setLevel(settings.log_level)
    for line in unknown_env():
        log.warning("%s", line)

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
            settings.event_dedup_ttl_s,
            settings.user_ttl_s,
            dedup_max=settings.event_dedup_max,
        )
        try:
            try:
                await _check_store_format(the_store)  # before the model's load: refused at once
                the_engine = engine or await asyncio.get_running_loop().run_in_executor(
                    executor,
                    lambda: Recommender.load_or_fall_back(settings.checkpoint, **settings.load_kwargs()),
                )
            except (ValueError, OSError) as exc:  # a damaged or unreadable file (CheckpointError), a device
                # or a store in a newer format (StoreFormatError): why the service cannot start, in
                # one line: `r2ec serve` prints it in place of the lifespan's traceback (service/server.py)
                app.state.startup_error = str(exc)
                raise
            state = ServiceState(settings, the_engine, the_store, metrics, executor)
            await state.start()
        except BaseException:
            executor.shutdown(wait=False)
            if own_store:
                await the_store.close()
            raise
        app.state.r2ec = state
        # the state holds the model from here: this frame lives as long as the process, and a
        # name in it would keep the first model alive past every reload (~1.3 GB of SmolLM2)
        del the_engine
        log.info(
            "serving model %s (%d items, store %s, max_batch %d, max_wait %.0f ms)",
            state.engine.version,
            len(state.engine.catalog.index),
            getattr(the_store, "kind", "?"),
            settings.max_batch,
            settings.max_wait_ms,
        )
        log_auth(settings)
        try:
            yield
        finally:
            app.state.r2ec = None
            await state.stop()
            if own_store:
                await the_store.close()
            executor.shutdown(wait=True)

    # R2EC_DOCS=false: no /docs, /redoc (pages that run a CDN's script) or /openapi.json
    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(
        title="R²ec serve", version=package_version(), description=DESCRIPTION, lifespan=lifespan, **docs
    )
    app.state.r2ec = None
    app.state.startup_error = None  # set by the lifespan when the first load fails
    # wrong keys per client address (service/deps.py; None: R2EC_AUTH_FAILURES=0): the app's, so
    # a reload keeps what it counted
    failures, window_s = settings.auth_failures, settings.auth_failure_window_s
    app.state.auth_throttle = AuthThrottle(failures, window_s) if failures else None
    # ui.router: the page (GET /) and catalog search (GET /items)
    routers = [routes.recommend_router(settings), routes.router, ui.router]
    for router in routers:
        app.include_router(router)
    served = [route for router in routers for route in router.routes]
    refused = metrics.rejections.labels("body_too_large").inc
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        on_refused=refused,
        body_timeout_s=settings.body_timeout_s,
        on_timeout=metrics.rejections.labels("body_timeout").inc,
    )
    # one line and the latency per request, the 413s too, with the request id (inside RequestId);
    # the routes name what a request refused before routing asked for, and FastAPI's /docs
    own = [r for r in app.router.routes if hasattr(r, "path_regex")]  # FastAPI's /docs, /openapi.json
    app.add_middleware(AccessLog, metrics=metrics, routes=[*own, *served])
    app.add_middleware(RequestId)  # every response carries X-Request-ID
    app.add_middleware(SecurityHeaders)  # outermost: nosniff and no-referrer on every response
    add_error_handlers(app, metrics, served)
    if not settings.user_keys:
        _open_user_routes_in_schema(app, served)
    return app


async def _check_store_format(store: HistoryStore) -> None:
    """Mark the store's format where it has none and refuse one newer than this code's
    (service/store.py `check_format`: StoreFormatError, the start's one-line error). A Redis that
    does not answer yet is no reason not to start (/readyz says degraded): checked next start."""
    check = getattr(store, "check_format", None)  # the in-process store's data is this process's
    if check is None:
        return
    try:
        await check(package_version())
    except StoreUnavailable as exc:
        log.warning("the store's format marker was not checked, checked at the next start: %s", exc)


MIN_KEY_LENGTH = 16  # characters; `openssl rand -hex 24` gives 48


def log_auth(settings: Settings) -> None:
    """Say at startup who may call what, so an operator reads from the log whether a key took
    effect: a WARNING while the routes of users' data are open (no R2EC_CLIENT_KEY), an INFO
    line for the admin API, and a WARNING for a key shorter than MIN_KEY_LENGTH. Never the keys.
    The service still starts without keys: the quickstart and a service only your own backend
    reaches run that way (README, "Who may call what")."""
    if settings.user_keys:
        log.info("user routes (/recommend, /users/*) take X-API-Key: R2EC_CLIENT_KEY or the admin key")
    else:
        log.warning(
            "R2EC_CLIENT_KEY is unset: user routes are open: /recommend and /users/* take no key; "
            "anyone who reaches this port can read and write any user's history (and fill the "
            "store with made-up users); set R2EC_CLIENT_KEY unless only your own backend reaches it"
        )
    if settings.admin_key is None:
        log.info(
            "admin API disabled (R2EC_API_KEY unset): item edits, DELETE /users/{id} and "
            "/admin/reload answer 403"
        )
    else:
        log.info("admin API enabled: item edits, DELETE /users/{id} and /admin/reload take R2EC_API_KEY")
    for name, key in (("R2EC_API_KEY", settings.admin_key), ("R2EC_CLIENT_KEY", settings.user_key)):
        if key is not None and len(key) < MIN_KEY_LENGTH:
            log.warning(
                "%s is %d characters long: use at least %d random ones (openssl rand -hex 24)",
                name,
                len(key),
                MIN_KEY_LENGTH,
            )


def _open_user_routes_in_schema(app: FastAPI, served: Sequence[BaseRoute]) -> None:
    """Without R2EC_CLIENT_KEY the routes of users' data take no key (service/deps.py
    `require_user_key`): their OpenAPI operations say so, rather than the security requirement
    their dependency declares for when one is set (a client generated from the schema would
    send a key, and a checker expects a 401 without one). The routes are those that depend on
    `require_user_key` (`UserData`), found in `served`."""

    def takes_user_key(route: BaseRoute) -> bool:
        dependant = getattr(route, "dependant", None)  # an APIRoute's
        return dependant is not None and any(d.call is require_user_key for d in dependant.dependencies)

    open_ops = [
        (route.path_format, method.lower())
        for route in served
        if takes_user_key(route)
        for method in getattr(route, "methods", ())
    ]
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for path, method in open_ops:
                schema["paths"].get(path, {}).get(method, {}).pop("security", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def begin_drain(app: FastAPI) -> None:
    """Shutdown has begun: the app stops taking recommendations and answers the queued ones
    within R2EC_SHUTDOWN_GRACE_S (service/state.py). Called by the server on SIGTERM."""
    state: ServiceState | None = app.state.r2ec
    if state is not None:
        state.begin_drain()
