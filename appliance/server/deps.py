"""Typed dependencies of the routes: the app's state, the caller's key, the request record.

All ``async``: FastAPI would run plain functions on its thread pool, a needless hop for a few
attribute reads (and one ``stat`` of the key file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from appliance.server.auth import KeyChecker
from appliance.server.engine import Engine
from appliance.server.masking import Masker, MaskingPolicy
from appliance.server.record import RequestRecord
from appliance.server.requestlog import RequestLog
from appliance.server.settings import ServerSettings


@dataclass(frozen=True)
class AppState:
    """Everything a route may use; one instance per app, on ``app.state.appliance``."""

    settings: ServerSettings
    engine: Engine
    keys: KeyChecker
    request_log: RequestLog
    masking: MaskingPolicy = field(default_factory=lambda: MaskingPolicy("off", {}))
    masker: Masker | None = None  # built at start when a policy can need it


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.appliance
    return state


async def get_record(request: Request) -> RequestRecord:
    return RequestRecord.of(request)


State = Annotated[AppState, Depends(get_state)]
Record = Annotated[RequestRecord, Depends(get_record)]


async def get_engine(state: State) -> Engine:
    return state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


# Stateless: it only reads the header, and declares the scheme in the OpenAPI document
# (the "Authorize" button of /docs). Errors are ours (auto_error=False), in the OpenAI shape.
_bearer = HTTPBearer(auto_error=False, description="An API key from `appliance keys add`.")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def require_key(state: State, record: Record, bearer: Bearer) -> str:
    """The caller's key name; 401 for a missing, malformed, unknown or revoked key.

    :class:`~appliance.server.middleware.KeyMiddleware` checked the key already, before the
    body was read, and noted its name; the check here is for a route it was told is public.
    """
    if record.key_name is not None:
        return record.key_name
    name = state.keys.check(bearer.credentials if bearer is not None else None)
    record.key_name = name
    return name


async def require_key_for_docs(state: State, record: Record, bearer: Bearer) -> str | None:
    """Like :func:`require_key`, unless the operator made the docs public."""
    if state.settings.public_docs:
        return None
    return await require_key(state, record, bearer)


KeyName = Annotated[str, Depends(require_key)]
