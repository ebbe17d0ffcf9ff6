"""FastAPI dependencies: the app's settings, task store, registry and model server, and the API key checks.

The objects are built once per app by :func:`service.api.main.create_app` and kept in ``app.state``; the
``Annotated`` aliases below are what the routes declare.
"""

from __future__ import annotations

import hmac
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader
from pydantic import SecretStr

from service.db import TaskStore
from service.model_server import ModelServer
from service.registry import Registry
from service.settings import Settings

API_KEY_HEADER = "X-API-Key"
api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="The service's key (INCSEG_API_KEY) on every endpoint but /health, /ready, /metrics and the "
    "docs, or the read-only key (INCSEG_API_READ_KEY) on reads; not needed while the service runs without "
    "a key (on loopback).",
)

PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")  # what nginx, Caddy, Traefik and others add


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


def _matches(given: str | None, key: SecretStr | None) -> bool:
    """Whether the header value is ``key``, compared in constant time so the answer time leaks nothing."""
    if given is None or key is None:
        return False
    return hmac.compare_digest(given.encode(), key.get_secret_value().encode())


def _unauthorized(what: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail=f"missing or wrong API key: send the service's {what} in the {API_KEY_HEADER} header",
        headers={"WWW-Authenticate": API_KEY_HEADER},
    )


def _same_site(request: Request, settings: Settings) -> bool:
    """Whether a browser sent the request from the service's own pages or an allowed origin.

    Browsers name the page's origin in the ``Origin`` header of every cross-origin request and of every
    POST or DELETE; other clients (curl, httpx, the CLI) send none.
    """
    origin = request.headers.get("origin")
    if origin is None or origin in settings.cors_allow_origins:
        return True
    return urlsplit(origin).netloc == request.headers.get("host")


def _refuse_proxied(request: Request) -> None:
    """Refuses with 403 a request that a proxy forwarded to a service without a key.

    A process without a key listens on loopback, trusting whoever can connect there; a reverse proxy on
    the same machine would hand that trust to everyone who reaches the proxy.
    """
    if any(name in request.headers for name in PROXY_HEADERS):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail="this service runs without an API key and answers only clients on its own machine, but "
            "the request came through a proxy: set INCSEG_API_KEY (see the README's Security section)",
        )


def require_read_key(
    request: Request, settings: SettingsDep, api_key: Annotated[str | None, Security(api_key_header)]
) -> None:
    """Refuses the request with 401 unless no key is configured or the header carries either key.

    Without any key, a request a proxy forwarded is refused with 403 (see :func:`_refuse_proxied`).
    """
    if settings.api_key is None and settings.api_read_key is None:
        _refuse_proxied(request)
        return
    if not (_matches(api_key, settings.api_key) or _matches(api_key, settings.api_read_key)):
        raise _unauthorized("key (or its read-only key)")


def require_api_key(
    request: Request, settings: SettingsDep, api_key: Annotated[str | None, Security(api_key_header)]
) -> None:
    """Lets a mutation through only with the service's key, or, with none configured, from the same site.

    Without a key (a process on loopback) a page on another site, open in a browser on this machine,
    could still post a form to the service (a cross-site request forgery); such requests carry a foreign
    ``Origin`` and are refused with 403, as are requests a proxy forwarded (see :func:`_refuse_proxied`).
    """
    if settings.api_key is None:
        _refuse_proxied(request)
        if not _same_site(request, settings):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"cross-site request from {request.headers['origin']!r} refused: call the API from "
                "its own pages, a client that is no browser, or an origin in INCSEG_CORS_ALLOW_ORIGINS",
            )
        return
    if _matches(api_key, settings.api_key):
        return
    if _matches(api_key, settings.api_read_key):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"the read-only key cannot change anything: send the service's key ({API_KEY_HEADER})",
        )
    raise _unauthorized("key")


ReadKeyDep = Depends(require_read_key)
ApiKeyDep = Depends(require_api_key)
