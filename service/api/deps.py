"""FastAPI dependencies: the app's settings, task store, registry and model server, and the API key check.

The objects are built once per app by :func:`service.api.main.create_app` and kept in ``app.state``; the
``Annotated`` aliases below are what the routes declare.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader

from service.db import TaskStore
from service.model_server import ModelServer
from service.registry import Registry
from service.settings import Settings

API_KEY_HEADER = "X-API-Key"
api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="Required on every mutating endpoint when the service runs with INCSEG_API_KEY set.",
)


def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


def get_store(request: Request) -> TaskStore:
    """The task table."""
    return request.app.state.store


def get_registry(request: Request) -> Registry:
    """The model registry."""
    return request.app.state.registry


def get_model_server(request: Request) -> ModelServer:
    """The model server holding the runtime that answers ``/segment``."""
    return request.app.state.model_server


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[TaskStore, Depends(get_store)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
ModelServerDep = Annotated[ModelServer, Depends(get_model_server)]


def require_api_key(settings: SettingsDep, api_key: Annotated[str | None, Security(api_key_header)]) -> None:
    """Refuses the request with 401 unless no key is configured or the header carries the right one.

    The comparison is constant-time (``hmac.compare_digest``) so the answer time does not leak the key.
    """
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    if api_key is None or not hmac.compare_digest(api_key.encode(), expected):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail=f"missing or wrong API key: send the service's key in the {API_KEY_HEADER} header",
            headers={"WWW-Authenticate": API_KEY_HEADER},
        )


ApiKeyDep = Depends(require_api_key)
