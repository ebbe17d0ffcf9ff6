"""The FastAPI application: ``uvicorn service.api.main:create_app --factory``.

``create_app`` builds the task store, the registry and the model server from the settings, mounts the
routes by resource, and maps the library's exceptions to JSON error bodies whose ``detail`` says what to
fix. The lifespan starts the model server (background load of the active version, watcher for new ones)
and a clean-up of leftover uploads (``service.staging``), and stops the ``/segment`` batcher and the model
server on shutdown.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.admission import Admission
from service.api.deps import API_KEY_HEADER, ReadKeyDep
from service.api.routes import console, models, segment, system, tasks
from service.api.routes.segment import VERSION_HEADER
from service.api.schemas import ErrorBody
from service.archive import UploadError
from service.batcher import Batcher
from service.db import TaskConflict, TaskNotFound, TaskStore
from service.jobs import QueueUnavailable
from service.metrics import RequestMetricsMiddleware, task_registry
from service.model_server import ModelServer, NoModelLoaded
from service.registry import Registry
from service.settings import Settings, get_settings
from service.staging import clean_staging_in_background

logger = logging.getLogger(__name__)

QUEUE_RETRY_AFTER_S = 5  # Retry-After of a 503 while the broker is unreachable (Redis restarts in seconds)
REQUEST_ID_HEADER = "X-Request-ID"
KEY_REFUSED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong X-API-Key (the service has a key)."}
}


def _error(status_code: int, detail: str, **extra: object) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status_code)


async def _upload_error(request: Request, err: UploadError) -> JSONResponse:
    return _error(err.status_code, str(err), entry=err.entry)


async def _task_not_found(request: Request, err: TaskNotFound) -> JSONResponse:
    task_id = err.args[0] if err.args else "?"
    return _error(status.HTTP_404_NOT_FOUND, f"no task {task_id!r}; GET /tasks lists the task ids")


async def _task_conflict(request: Request, err: TaskConflict) -> JSONResponse:
    return _error(status.HTTP_409_CONFLICT, str(err))


async def _no_model(request: Request, err: NoModelLoaded) -> JSONResponse:
    if err.retry_after_s is None:  # no version exists: only a task helps
        return _error(status.HTTP_409_CONFLICT, str(err))
    response = _error(status.HTTP_503_SERVICE_UNAVAILABLE, str(err))
    response.headers["Retry-After"] = str(err.retry_after_s)
    return response


async def _queue_unavailable(request: Request, err: QueueUnavailable) -> JSONResponse:
    response = _error(status.HTTP_503_SERVICE_UNAVAILABLE, str(err))
    response.headers["Retry-After"] = str(QUEUE_RETRY_AFTER_S)
    return response


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    errors = [
        {"location": ".".join(map(str, e["loc"])), "message": e["msg"], "type": e["type"]}
        for e in err.errors()
    ]
    summary = "; ".join(f"{e['location']}: {e['message']}" for e in errors)
    return _error(status.HTTP_422_UNPROCESSABLE_CONTENT, f"invalid request: {summary}", errors=errors)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"detail": str(err.detail)}, status_code=err.status_code, headers=err.headers)


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    """A generic 500: the exception text (paths, SQL, values) goes to the log only, under a request id."""
    request_id = uuid.uuid4().hex[:16]
    logger.error("request %s: %s %s failed", request_id, request.method, request.url.path, exc_info=err)
    response = _error(
        status.HTTP_500_INTERNAL_SERVER_ERROR,
        f"internal error; the service log has the details under request id {request_id}",
        request_id=request_id,
    )
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


# Exception class -> handler; FastAPI's parameter for them takes handlers of each class's own type.
EXCEPTION_HANDLERS: dict[int | type[Exception], Callable[[Request, Any], Coroutine[Any, Any, Response]]] = {
    UploadError: _upload_error,
    TaskNotFound: _task_not_found,
    TaskConflict: _task_conflict,
    NoModelLoaded: _no_model,
    QueueUnavailable: _queue_unavailable,
    RequestValidationError: _validation_error,
    StarletteHTTPException: _http_error,
    Exception: _internal_error,
}


def segment_batcher(settings: Settings) -> Batcher:
    """The ``/segment`` batcher of ``settings``: its window, its largest batch, its model runs at once."""
    return Batcher(settings.batch_window_ms / 1000, settings.batch_max_size, settings.inference_runs)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Builds the API for ``settings`` (default: the environment's, see :func:`get_settings`)."""
    settings = settings or get_settings()
    store = TaskStore(settings.task_database_url)
    registry = Registry(settings.registry_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # a fresh model server per lifespan: a server that was stopped is never restarted
        model_server = ModelServer(settings, registry)
        app.state.model_server = model_server
        app.state.segment_admission = Admission(settings.segment_concurrency, settings.segment_queue)
        batcher = segment_batcher(settings)
        app.state.segment_batcher = batcher
        model_server.start()
        clean_staging_in_background(settings, store)
        try:
            yield
        finally:
            await batcher.stop()
            model_server.stop()

    app = FastAPI(
        title="incseg",
        summary="Class-incremental semantic segmentation: POST /tasks adds classes, POST /segment segments.",
        version="0.1.0",
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.registry = registry
    app.state.model_server = ModelServer(settings, registry)  # not started: "no model" until the lifespan
    app.state.segment_admission = Admission(settings.segment_concurrency, settings.segment_queue)
    app.state.segment_batcher = segment_batcher(settings)
    app.state.task_registry = task_registry(store)
    app.add_middleware(RequestMetricsMiddleware)
    if settings.cors_allow_origins:  # no CORS headers at all unless origins are listed
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[API_KEY_HEADER, "Content-Type"],
            expose_headers=["Location", "Retry-After", VERSION_HEADER, REQUEST_ID_HEADER],
        )
    for module in (tasks, segment, models):  # reads need a key too when one is set
        app.include_router(module.router, dependencies=[ReadKeyDep], responses=KEY_REFUSED)
    for module in (system, console):
        app.include_router(module.router)
    return app
