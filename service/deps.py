"""What a route may ask for, as `Annotated` dependency aliases.

Everything comes from the `ServiceState` the lifespan built, so a test swaps any part with
`app.dependency_overrides[get_state] = ...` (or one getter). The admin check is a dependency too:
a route opts in with `dependencies=Admin`, and a route that reads or writes a user's data with
`dependencies=UserData` (checked only where R2EC_CLIENT_KEY is set).
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from service.catalog import Catalog
from service.config import Settings
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


def _check(sent: str | None, keys: tuple[str, ...]) -> None:
    if not sent:
        raise HTTPException(401, "missing X-API-Key header", {"WWW-Authenticate": "X-API-Key"})
    # every key compared, in constant time each: the answer's time does not say which came close
    if not sum(secrets.compare_digest(sent.encode(), key.encode()) for key in keys):
        raise HTTPException(403, "invalid API key")


def require_admin(settings: SettingsDep, x_api_key: ApiKey) -> None:
    key = settings.admin_key
    if key is None:
        raise HTTPException(403, "admin API disabled: set R2EC_API_KEY to enable admin routes")
    _check(x_api_key, (key,))


def require_user_key(settings: SettingsDep, x_api_key: ApiKey) -> None:
    """The client key or the admin key, where R2EC_CLIENT_KEY is set; else nothing."""
    if keys := settings.user_keys:
        _check(x_api_key, keys)


Admin = [Depends(require_admin)]
UserData = [Depends(require_user_key)]
