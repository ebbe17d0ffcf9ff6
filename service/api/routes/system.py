"""Service-level routes: the serving classes, liveness, readiness and Prometheus metrics.

``/health``, ``/ready`` and ``/metrics`` never wait for a thread of FastAPI's shared pool, so they answer
while inference or uploads hold every thread: the first two are answered on the event loop (no
dependency that would run in the pool), and the task-table read of ``/metrics`` runs in a thread of its
own limiter, one scrape at a time.
"""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import ModelServerDep, ReadKeyDep, RegistryDep
from service.api.schemas import ClassList, ErrorBody, Health, Readiness
from service.metrics import render_metrics
from service.model_server import ModelServer, NoModelLoaded

router = APIRouter(tags=["system"])
SCRAPE_THREADS = anyio.CapacityLimiter(1)  # /metrics reads the task table here, not in the shared pool


@router.get(
    "/classes",
    summary="Classes the serving model segments",
    dependencies=[ReadKeyDep],
    responses={
        401: {"model": ErrorBody, "description": "Missing or wrong X-API-Key (the service has a key)."}
    },
)
def get_classes(registry: RegistryDep, server: ModelServerDep) -> ClassList:
    """The serving version's classes (label value = index); the active version's while none serves yet."""
    try:
        with server.lease(wait_s=0) as runtime:
            return ClassList(version=runtime.version, classes=runtime.classes)
    except NoModelLoaded:
        active = registry.active()
        classes = registry.get(active).classes if active is not None else ["background"]
        return ClassList(version=active, classes=classes)


@router.get("/health", summary="Liveness")
async def health() -> Health:
    """Answers 200 while the process serves HTTP."""
    return Health()


@router.get(
    "/ready",
    summary="Readiness: a model is loaded and warmed up",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "No model loaded and warmed up yet, and why."}},
)
async def ready(request: Request) -> Readiness | JSONResponse:
    """200 once a model version is loaded and warmed up, else 503 with the reason."""
    server: ModelServer = request.app.state.model_server  # not a dependency: those run in the shared pool
    state = server.status()
    if state.ready:
        return Readiness(ready=True, version=state.serving_version, detail=f"serving {state.serving_version}")
    if state.loading is not None:
        why = f"loading and warming up {state.loading}"
    elif state.failures:
        # the errors name files: they are for key holders (GET /models), not for this public route
        why = "; ".join(f"{name} failed to load (GET /models has the error)" for name in state.failures)
        if state.retry is not None:
            why += f"; attempt {state.retry.attempts + 1} in {state.retry.next_attempt_in_s:.0f} s"
    elif state.active_version is None:
        why = "no model version exists yet: post a base task to /tasks"
    else:
        why = f"version {state.active_version} is not loaded yet"
    body = Readiness(ready=False, version=state.serving_version, detail=why)
    return JSONResponse(body.model_dump(), status_code=status.HTTP_503_SERVICE_UNAVAILABLE)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    """Request figures per route, model swaps, active version, tasks by state, ``/segment`` admission."""
    text = await anyio.to_thread.run_sync(
        render_metrics, request.app.state.task_registry, limiter=SCRAPE_THREADS
    )
    return Response(text, media_type=CONTENT_TYPE_LATEST)
