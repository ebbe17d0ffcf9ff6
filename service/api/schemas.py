"""Request and response bodies of the API that are not the library's own models (TaskView, VersionInfo)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from service.db import TaskView
from service.model_server import LoadRetry
from service.registry import VersionInfo


class ErrorBody(BaseModel):
    """Every error answer: ``detail`` says what went wrong and what to fix."""

    detail: str = Field(description="What went wrong and what to do about it.")
    entry: str | None = Field(
        None, description="Archive member or dataset file concerned, for upload errors."
    )
    errors: list[dict[str, Any]] | None = Field(
        None, description="Each invalid field, for validation errors."
    )


class TaskCreated(BaseModel):
    """Answer to an accepted task; its state is at ``GET /tasks/{task_id}``."""

    task_id: str
    classes: list[str] = Field(description="Class names the task adds.")
    supervision: Literal["full", "weak"] = Field(
        description="weak: the training images have image-level labels (labels.csv), not masks."
    )


class TaskPage(BaseModel):
    """One page of tasks, newest first."""

    items: list[TaskView]
    total: int = Field(description="Number of tasks in the table.")
    offset: int
    limit: int


class ModelSummary(VersionInfo):
    """A registry version with its serving state in this API process."""

    active: bool = Field(description="The registry's pointer names this version.")
    serving: bool = Field(description="This API process answers /segment with this version.")
    load_failure: str | None = Field(None, description="Why this process could not load or warm it up.")
    serving_precision: str | None = Field(None, description="fp32, fp16 or int8 while this version serves.")
    precision_fallback: str | None = Field(
        None, description="Why it serves FP32/FP16 although INCSEG_INT8 asks for INT8 (e.g. its gate failed)."
    )


class ModelList(BaseModel):
    """Every version, oldest first."""

    active: str | None
    serving: str | None
    loading: str | None = Field(description="Version being loaded in the background, if any.")
    swaps: int = Field(description="Swaps this API process made since it started.")
    swap_failures: int = Field(description="Failed loads or warm-ups of this API process (retries included).")
    retry: LoadRetry | None = Field(
        description="The active version failed to load in this API process: the next attempt, with backoff."
    )
    load_retries: int = Field(description="Loads this API process tried again after a failure.")
    last_swap: dict[str, Any] | None = Field(
        description="The last swap: version and seconds from activation to notice, load and warm-up."
    )
    versions: list[ModelSummary]


class Activation(BaseModel):
    """Answer to an activation: the pointer now names ``active``; the swap follows in the background."""

    active: str
    previous: str | None
    serving: str | None = Field(description="Version answering /segment at the time of this answer.")


class ClassList(BaseModel):
    """Classes the serving model segments (index = label value in the PNG mask)."""

    version: str | None
    classes: list[str]


class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    ready: bool
    version: str | None
    detail: str


class SegmentSummary(BaseModel):
    """``format=json`` answer of ``POST /segment``."""

    version: str = Field(description="Model version that produced the answer (also in X-Model-Version).")
    width: int
    height: int
    classes: list[str] = Field(description="The model's classes; a label value is an index into this list.")
    fractions: dict[str, float] = Field(
        description="Fraction of the image's pixels per class name (no pixels: left out), largest first."
    )
