"""``incseg demo --url``: drives a running service the way a new user would.

The demo writes small synthetic datasets that split the classes into a base task, a second task that adds
classes from masks and a third (weak) task that adds classes from image-level labels (``labels.csv``), and
then, through HTTP only: posts each task in turn and follows it with a progress bar, segmenting the same
demo image before the second task, after it and after the weak task, and prints which classes appeared and
how the version changed. Overlays of the image after each step are saved next to the data.
"""

from __future__ import annotations

import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from training.data.synth import write_synthetic_dataset

FINISHED = ("done", "failed", "cancelled")
VERSION_HEADER = "X-Model-Version"


class ServiceError(RuntimeError):
    """The service answered an error or a task failed; the message carries the service's own detail."""


@dataclass(frozen=True)
class DemoOptions:
    """Sizes of the demo; the defaults finish the three steps in a few minutes on 2 CPU cores.

    Attributes:
        classes: Foreground classes in all; the base task learns the first
            ``classes - new_classes - weak_classes``.
        new_classes: Classes the second task adds (from masks).
        weak_classes: Classes the third task adds from image-level labels (the last ones).
        train_images: Training images per task.
        val_images: Validation images per task.
        image_size: Side of the synthetic images in pixels.
        epochs: Training epochs per task.
        size: Training crop and evaluation size.
        batch_size: Training batch size.
        method: Method of every task (None: the service's default; star trains its own step 0).
        seed: Seed of the synthetic data.
    """

    classes: int = 8
    new_classes: int = 2
    weak_classes: int = 2
    train_images: int = 120
    val_images: int = 30
    image_size: int = 64
    epochs: int = 8
    size: int = 64
    batch_size: int = 8
    method: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class Segmentation:
    """A ``format=json`` answer: the version that answered and the pixel fraction of each class."""

    version: str
    fractions: dict[str, float]


class ServiceClient:
    """Thin typed wrapper over the service's HTTP API (httpx; every error becomes a :class:`ServiceError`)."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise ServiceError(
                f"{method} {self.http.base_url}{path}: {err}; is the service running?"
            ) from err
        if response.is_error:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            if response.status_code == httpx.codes.UNAUTHORIZED:
                detail = f"{detail} (give it with --api-key or $INCSEG_API_KEY, or --data-dir on its machine)"
            raise ServiceError(f"{method} {path} answered {response.status_code}: {detail}")
        return response

    def health(self) -> None:
        self._request("GET", "/health")

    def models(self) -> dict:
        return self._request("GET", "/models").json()

    def post_task(self, archive: Path, fields: dict[str, str]) -> str:
        with archive.open("rb") as file:
            files = {"dataset": (archive.name, file, "application/zip")}
            return self._request("POST", "/tasks", files=files, data=fields).json()["task_id"]

    def task(self, task_id: str) -> dict:
        return self._request("GET", f"/tasks/{task_id}").json()

    def segment(self, image: Path) -> Segmentation:
        response = self._request(
            "POST",
            "/segment",
            params={"format": "json"},
            content=image.read_bytes(),
            headers={"Content-Type": "image/png"},
        )
        return Segmentation(response.headers[VERSION_HEADER], response.json()["fractions"])

    def overlay(self, image: Path) -> bytes:
        files = {"image": (image.name, image.read_bytes(), "image/png")}
        return self._request("POST", "/segment", params={"format": "overlay"}, files=files).content

    def wait_task(self, task_id: str, on_update: Callable[[dict], None], poll_s: float = 0.5) -> dict:
        """Polls the task until it finishes; raises :class:`ServiceError` unless it is done."""
        while True:
            task = self.task(task_id)
            on_update(task)
            if task["state"] in FINISHED:
                if task["state"] != "done":
                    raise ServiceError(f"task {task_id} {task['state']}: {task.get('error') or 'no message'}")
                return task
            time.sleep(poll_s)

    def wait_serving(self, version: str, timeout_s: float = 120.0, poll_s: float = 0.25) -> None:
        """Waits until this API process answers with ``version`` (it loads and warms it up first)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            models = self.models()
            if models["serving"] == version:
                return
            failure = next((m["load_failure"] for m in models["versions"] if m["name"] == version), None)
            if failure:
                raise ServiceError(f"the service could not load {version}: {failure}")
            time.sleep(poll_s)
        raise ServiceError(f"the service did not start serving {version} within {timeout_s:.0f} s")


@dataclass(frozen=True)
class DemoDatasets:
    """The demo's three task archives and the image it segments after each step.

    Attributes:
        base: The base task (masks, the first classes only).
        step: The second task (masks, the base classes and the new ones).
        weak: The weak task (every class; training images labelled by ``labels.csv`` only, val by masks).
        image: A validation image of the weak task's dataset that shows classes of both later tasks.
    """

    base: Path
    step: Path
    weak: Path
    image: Path


def write_demo_datasets(out: Path, options: DemoOptions) -> DemoDatasets:
    """Writes the three task datasets as zip archives, and the demo image.

    Each dataset is drawn with its own seed over every class; the base dataset keeps the first
    ``classes - new_classes - weak_classes`` classes and the second the next ``new_classes`` too (the
    others' pixels become background, as in the overlapped protocol); the weak dataset lists every class,
    so the service keeps the known ones and adds the last ``weak_classes`` from its ``labels.csv``.

    Raises:
        ValueError: When a task would get no class.
    """
    base_classes = options.classes - options.new_classes - options.weak_classes
    if min(base_classes, options.new_classes, options.weak_classes) < 1:
        raise ValueError(
            f"need at least one base, one new and one weak class, got {options.classes} classes for "
            f"{options.new_classes} new and {options.weak_classes} weak"
        )
    folders = {}
    for index, name in enumerate(("base", "step", "weak")):
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        folders[name] = write_synthetic_dataset(
            folder,
            options.classes,
            options.train_images,
            options.val_images,
            options.image_size,
            options.seed + index,
            weak_train=name == "weak",
        )
    _keep_classes(folders["base"], base_classes)
    _keep_classes(folders["step"], base_classes + options.new_classes)
    archives = {name: _zip(folder, out / f"{name}.zip") for name, folder in folders.items()}
    return DemoDatasets(
        **archives,
        image=_image_with_new_classes(folders["weak"], base_classes, base_classes + options.new_classes),
    )


def _keep_classes(dataset: Path, count: int) -> None:
    """Keeps the first ``count`` foreground classes of a dataset; the others' pixels become background."""
    names = (dataset / "classes.txt").read_text().split()
    (dataset / "classes.txt").write_text("\n".join(names[: count + 1]) + "\n")
    for mask_path in (dataset / "masks").glob("*.png"):
        labels = np.asarray(Image.open(mask_path))  # (S, S) uint8
        labels = np.where((labels > count) & (labels != 255), 0, labels).astype(np.uint8)
        Image.fromarray(labels).save(mask_path)


def _image_with_new_classes(dataset: Path, base_classes: int, mask_classes: int) -> Path:
    """The validation image showing most pixels of both later tasks' classes: those after ``base_classes``
    up to ``mask_classes`` (the mask task's) and those after ``mask_classes`` (the weak task's)."""
    stems = (dataset / "splits" / "val.txt").read_text().split()

    def new_pixels(stem: str) -> tuple[int, int]:
        labels = np.asarray(Image.open(dataset / "masks" / f"{stem}.png"))  # (S, S) class indices
        mask_task = int(((labels > base_classes) & (labels <= mask_classes)).sum())
        weak_task = int(((labels > mask_classes) & (labels != 255)).sum())
        return min(mask_task, weak_task), mask_task + weak_task

    return dataset / "images" / f"{max(stems, key=new_pixels)}.png"


def _zip(folder: Path, archive: Path) -> Path:
    """Zips a dataset folder with its files at the archive root."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zipped.write(path, path.relative_to(folder).as_posix())
    return archive


def _run_task(client: ServiceClient, console: Console, label: str, archive: Path, fields: dict) -> dict:
    """Posts one task and follows it with a progress bar until it is done; returns the final task."""
    task_id = client.post_task(archive, fields)
    console.print(f"{label}: task {task_id} queued ({archive.stat().st_size // 1024} KiB archive)")
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        bar = progress.add_task(label, total=1.0, status="queued")

        def update(task: dict) -> None:
            parts = [task["state"], task.get("phase") or ""]
            if task.get("epoch") is not None:
                parts.append(f"epoch {task['epoch'] + 1}")
            if task.get("loss") is not None:
                parts.append(f"loss {task['loss']:.3f}")
            progress.update(
                bar, completed=task.get("fraction") or 0.0, status=" ".join(p for p in parts if p)
            )

        task = client.wait_task(task_id, update)
    console.print(
        f"{label}: done -> model {task['model_version']} ({task['supervision']} supervision)"
        f"{_scores(task.get('metrics'))}"
    )
    return task


def _scores(metrics: dict | None) -> str:
    if not metrics:
        return ""
    figures = [
        f"{key} {100 * metrics[f'miou_{key}']:.1f}"
        for key in ("old", "new", "all")
        if metrics.get(f"miou_{key}") is not None
    ]
    return f" (mIoU {', '.join(figures)})" if figures else ""


def run_demo(url: str, out: Path, options: DemoOptions, api_key: str | None = None) -> dict:
    """Runs the whole demo against the service at ``url``; returns what it measured.

    Returns:
        ``segmentations``: the demo image's segmentation after each task (base, second, weak);
        ``added``: the classes each later task added; ``appeared``: those of them the segmentation after
        that task shows and the one before did not; ``tasks``: the three finished tasks; ``seconds``.

    Raises:
        ServiceError: The service is unreachable, refused a request, or a task failed.
    """
    console = Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    client = ServiceClient(url, api_key)
    started = time.monotonic()
    tasks, segmentations = [], []
    try:
        client.health()
        existing = client.models()["versions"]
        if existing:
            console.print(f"note: the service already has {len(existing)} version(s); the demo adds its own")
        datasets = write_demo_datasets(out, options)
        fields = {
            "epochs": str(options.epochs),
            "size": str(options.size),
            "batch_size": str(options.batch_size),
        }
        if options.method is not None:
            fields["method"] = options.method
        for label, archive, overlay in (
            ("base task", datasets.base, "before.jpg"),
            ("second task", datasets.step, "after.jpg"),
            ("weak task (image-level labels)", datasets.weak, "after-weak.jpg"),
        ):
            tasks.append(_run_task(client, console, label, archive, fields))
            client.wait_serving(tasks[-1]["model_version"])
            segmentations.append(client.segment(datasets.image))
            (out / overlay).write_bytes(client.overlay(datasets.image))
    finally:
        client.close()
    elapsed = time.monotonic() - started
    table = Table(
        "class", *(f"after {s.version}" for s in segmentations), title=f"segment {datasets.image.name}"
    )
    for name in sorted(
        set().union(*(s.fractions for s in segmentations)),
        key=lambda n: -segmentations[-1].fractions.get(n, 0),
    ):
        table.add_row(name, *(_pct(s.fractions.get(name)) for s in segmentations))
    console.print(table)
    added = [task["classes"] for task in tasks[1:]]
    appeared = [
        [name for name in after.fractions if name not in before.fractions]
        for before, after in zip(segmentations, segmentations[1:], strict=False)
    ]
    for task, classes, shown in zip(tasks[1:], added, appeared, strict=True):
        console.print(
            f"{task['model_version']} ({task['supervision']} supervision) added {', '.join(classes)}; "
            f"appeared in the segmentation: {', '.join(shown) or 'none'}"
        )
    console.print(
        f"overlays: {', '.join(str(out / name) for name in ('before.jpg', 'after.jpg', 'after-weak.jpg'))}; "
        f"{elapsed:.0f} s in all"
    )
    return {
        "segmentations": segmentations,
        "added": added,
        "appeared": appeared,
        "seconds": elapsed,
        "tasks": tasks,
    }


def _pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f} %"
