"""What a route may ask for, as `Annotated` dependency aliases.

Everything comes from the `ServiceState` the lifespan built, so a test swaps any part with
`app.dependency_overrides[get_state] = ...` (or one getter). The admin check is a dependency too:
a route opts in with `dependencies=Admin`, and a route that reads or writes a user's data with
`dependencies=UserData` (checked only where R2EC_CLIENT_KEY is set). A client address that sent
too many wrong keys is refused with 429 before its key is compared (service/limits.py
`AuthThrottle`).
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from service.catalog import Catalog
from service.config import Settings
from service.limits import AuthThrottle, client_address
from service.logs import Throttled
from service.state import ServiceState
from service.store import HistoryStore


def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "r2ec", None)
    if state is None:
        raise HTTPException(503, "the service is starting: model not loaded yet")
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_state_or_none(request: Request) -> ServiceState | None:
    """For the probes, which answer while the service starts."""
    return getattr(request.app.state, "r2ec", None)


MaybeStateDep = Annotated[ServiceState | None, Depends(get_state_or_none)]


def get_catalog(state: StateDep) -> Catalog:
    """The served model's catalog (read once per request: a reload may swap it afterwards)."""
    return state.engine.catalog


def get_store(state: StateDep) -> HistoryStore:
    return state.store


def get_settings(state: StateDep) -> Settings:
    return state.settings


CatalogDep = Annotated[Catalog, Depends(get_catalog)]
StoreDep = Annotated[HistoryStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


# Declared as a security scheme, so the OpenAPI docs offer an "Authorize" box for it.
api_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="The admin key (R2EC_API_KEY) for every route; the client key (R2EC_CLIENT_KEY) "
    "for the routes of a user's data, where one is set.",
)
ApiKey = Annotated[str | None, Security(api_key_header)]


log = logging.getLogger(__name__)
# a WARNING every 10 s at most while addresses are refused; never the address (personal data in a
# log that outlives the request; the access line's request id finds the request)
throttled_log = Throttled(log)


class AuthThrottled(HTTPException):
    """429 `auth_throttled` (service/errors.py answers an HTTPException's `code` where it has one)."""

    code = "auth_throttled"


def _check(request: Request, state: ServiceState, sent: str | None, keys: tuple[str, ...]) -> None:
    if not sent:  # no key, no guess: not counted against the address
        raise HTTPException(401, "missing X-API-Key header", {"WWW-Authenticate": "X-API-Key"})
    throttle: AuthThrottle | None = getattr(request.app.state, "auth_throttle", None)
    client = client_address(request.scope) if throttle is not None else ""
    if throttle is not None and (wait := throttle.blocked(client)):
        # the key is not compared: a right guess is told nothing until the address may try again
        state.metrics.rejections.labels("auth_throttled").inc()
        throttled_log.warn("an address sent too many wrong API keys: its requests get 429 auth_throttled")
        raise AuthThrottled(
            429,
            f"too many wrong API keys from this address: at most {throttle.failures} per "
            f"{throttle.window_s:g} s (R2EC_AUTH_FAILURES, R2EC_AUTH_FAILURE_WINDOW_S); try again "
            f"in {math.ceil(wait)} s",
            {"Retry-After": str(max(1, math.ceil(wait)))},
        )
    # every key compared, in constant time each: the answer's time does not say which came close
    if not sum(secrets.compare_digest(sent.encode(), key.encode()) for key in keys):
        state.metrics.auth_failures.inc()
        if throttle is not None:
            throttle.failed(client)
        raise HTTPException(403, "invalid API key")


def require_admin(request: Request, state: StateDep, x_api_key: ApiKey) -> None:
    key = state.settings.admin_key
    if key is None:
        raise HTTPException(403, "admin API disabled: set R2EC_API_KEY to enable admin routes")
    _check(request, state, x_api_key, (key,))


def require_user_key(request: Request, state: StateDep, x_api_key: ApiKey) -> None:
    """The client key or the admin key, where R2EC_CLIENT_KEY is set; else nothing."""
    if keys := state.settings.user_keys:
        _check(request, state, x_api_key, keys)


Admin = [Depends(require_admin)]
UserData = [Depends(require_user_key)]
