"""``/tasks``: post a dataset archive to add classes, follow the task, list and cancel tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.api.deps import ApiKeyDep, RegistryDep, SettingsDep, StoreDep
from service.api.schemas import ErrorBody, TaskCreated, TaskPage
from service.api.upload import stream_upload
from service.archive import receive_dataset
from service.db import TaskStore, TaskView
from service.jobs import cancel_task, submit_task
from service.registry import Registry, VersionInfo
from service.settings import Settings
from training.extra import train_extra_installed
from training.method_spec import check_continuation, parse_method_spec, sigmoid_family

router = APIRouter(prefix="/tasks", tags=["tasks"])

DATASET_FIELD = "dataset"
MAX_PAGE = 100
DATASET_DESCRIPTION = (
    "zip or tar.gz of a dataset folder (project format, Pascal VOC or ADE20K layout) at the archive root "
    "or in one top folder"
)


class TaskForm(BaseModel):
    """The optional form fields of ``POST /tasks`` (the service's defaults fill what is left out)."""

    model_config = ConfigDict(extra="forbid")

    method: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Method spec: ft, lwf, ilt, mib, alife, plop, star, mib+sdr, mib(kd=100)... "
        "(default: INCSEG_DEFAULT_METHOD)",
    )
    epochs: int | None = Field(None, ge=1, le=1000)
    size: int | None = Field(None, ge=32, le=2048, description="Training crop and evaluation size in pixels.")
    batch_size: int | None = Field(None, ge=1, le=256)


UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": [DATASET_FIELD],
                "properties": {
                    DATASET_FIELD: {
                        "type": "string",
                        "format": "binary",
                        "description": DATASET_DESCRIPTION,
                    },
                    **{
                        name: {**schema, "description": schema.get("description", "")}
                        for name, schema in TaskForm.model_json_schema()["properties"].items()
                    },
                },
            },
        }
    },
}


def _form_options(
    fields: dict[str, str], settings: Settings, continued: tuple[str, str] | None
) -> tuple[str, dict]:
    """Validates the form fields; returns the method and the step options with the defaults filled in.

    A task continues a model (``continued``: what it is, e.g. "the active model v3", and the method
    that trained it, or None for the first model), so its method must be of that model's family:
    per-class sigmoids (star) or a softmax (every other method). Left out, the method is the default,
    or that model's own method when the default cannot continue it; given, a method of the other
    family is refused here rather than failing in the worker.
    """
    try:
        form = TaskForm.model_validate({name: value for name, value in fields.items() if value != ""})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, detail=f"invalid form field: {problems}"
        ) from err
    options = {
        "epochs": form.epochs or settings.default_epochs,
        "size": form.size or settings.default_size,
        "batch_size": form.batch_size or settings.default_batch_size,
    }
    method = form.method or settings.default_method
    _check_method(method)
    if continued is None:
        return method, options
    model, trained_with = continued
    try:
        check_continuation(
            f"{model} was trained with {trained_with}",
            sigmoid_family(trained_with),
            method,
            sigmoid_family(method),
        )
    except ValueError as err:
        if form.method is None:
            return trained_with, options
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, detail=f"form field method: {err}"
        ) from err
    return method, options


def _continued_model(store: TaskStore, active: VersionInfo | None) -> tuple[str, str] | None:
    """The model a new task will continue and its method: the last unfinished task's, else the active one.

    Tasks run in the order posted, each from the model the one before it made, so a task posted while
    another is queued continues that one's model (if that task fails, the worker refuses a method of
    the wrong family with the same message).
    """
    unfinished = store.unfinished()
    if unfinished:
        ahead = store.get(unfinished[-1])
        return f"the model of task {ahead.id} (queued before it)", ahead.method
    if active is not None and active.history and "method" in active.history[-1]:
        return f"the active model {active.name}", active.history[-1]["method"]
    return None


def _check_method(method: str) -> None:
    """Refuses a bad method spec now rather than in the worker.

    With the training stack installed the spec is built (names, arguments, combination rules; the
    methods are imported on first use); an API-only install checks its syntax and names, and the worker
    fails a task whose arguments its builder refuses, with the same message.
    """
    try:
        if train_extra_installed():
            from training.methods import build_method

            build_method(method)
        else:
            parse_method_spec(method)
    except ValueError as err:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, detail=f"form field method: {err}"
        ) from err


def _submit(
    upload_path: Path,
    filename: str,
    fields: dict[str, str],
    settings: Settings,
    store: TaskStore,
    registry: Registry,
) -> TaskView:
    """Validates options and archive, stages the dataset and queues the task (blocking: run in a thread)."""
    name = registry.active()
    active = registry.get(name) if name is not None else None  # read once: its method and its classes
    method, options = _form_options(fields, settings, _continued_model(store, active))
    known = active.classes if active is not None else ["background"]
    staged = receive_dataset(upload_path, filename, settings.staging_dir, settings, known)
    return submit_task(store, settings, staged, method, options)  # it deletes the staged data if it fails


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Add classes: upload a dataset archive",
    dependencies=[ApiKeyDep],
    openapi_extra={"requestBody": UPLOAD_BODY},
    responses={
        400: {"model": ErrorBody, "description": "Malformed multipart body, archive or dataset."},
        401: {"model": ErrorBody, "description": "Missing or wrong X-API-Key."},
        403: {"model": ErrorBody, "description": "Read-only key, or a cross-site request from a browser."},
        413: {"model": ErrorBody, "description": "Upload, entry count or uncompressed size over the limits."},
        415: {"model": ErrorBody, "description": "Not multipart/form-data, or not a zip / tar.gz archive."},
        422: {"model": ErrorBody, "description": "Invalid options or dataset content (named entry)."},
        503: {"model": ErrorBody, "description": "The task queue (Redis) is unreachable; post again later."},
    },
)
async def create_task(
    request: Request, response: Response, settings: SettingsDep, store: StoreDep, registry: RegistryDep
) -> TaskCreated:
    """Validates the archive and its dataset, then queues a training step; 202 with the task id."""
    upload = await stream_upload(request, DATASET_FIELD, settings.staging_dir, settings.max_upload_bytes)
    archive_path = upload.saved_path()
    try:
        task = await run_in_threadpool(
            _submit, archive_path, upload.filename, upload.fields, settings, store, registry
        )
    finally:
        archive_path.unlink(missing_ok=True)
    response.headers["Location"] = f"/tasks/{task.id}"
    return TaskCreated(task_id=task.id, classes=task.classes, supervision=task.supervision)


@router.get("", summary="List tasks, newest first")
def list_tasks(
    store: StoreDep,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1, description="Tasks to skip.")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Tasks per page.")] = 20,
) -> TaskPage:
    """One page of the task table, newest first, with the total count."""
    items, total = store.page(offset, limit)
    return TaskPage(items=items, total=total, offset=offset, limit=limit)


TASK_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No task with this id."}
}


@router.get("/{task_id}", summary="A task's state, progress and metrics", responses=TASK_NOT_FOUND)
def get_task(task_id: str, store: StoreDep) -> TaskView:
    """State, progress (phase, epoch, fraction, loss), options, metrics and, once done, the model version."""
    return store.get(task_id)


@router.delete(
    "/{task_id}",
    summary="Cancel a queued or running task",
    dependencies=[ApiKeyDep],
    responses={
        **TASK_NOT_FOUND,
        401: {"model": ErrorBody, "description": "Missing or wrong X-API-Key."},
        403: {"model": ErrorBody, "description": "Read-only key, or a cross-site request from a browser."},
        409: {"model": ErrorBody, "description": "The task already finished."},
    },
)
def delete_task(task_id: str, settings: SettingsDep, store: StoreDep) -> TaskView:
    """Cancels the task: a queued one never starts, a running one stops at its next progress report."""
    return cancel_task(store, settings, task_id)
