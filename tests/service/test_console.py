"""The web console in a real browser: Debian's chromium driven by Playwright against ``incseg serve``.

One embedded service (API + worker, filesystem broker) serves the module's tests, with two tiny published
versions to start from; each test opens its own browser context and fails on any console error of its
pages. Screenshots of every page at desktop and phone width go to ``$INCSEG_SCREENSHOTS`` (default: a
folder under pytest's temporary directory, printed by the test).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
from PIL import Image

from export.processing import overlay, voc_palette
from service.registry import Registry
from service.settings import Settings
from tests.service.api_support import (
    INCSEG_SCRIPT,
    ApiProcess,
    ServiceProcess,
    free_port,
    png_bytes,
    publish_version,
    wait_until,
)
from tests.service.conftest import make_dataset_archive, tiny_settings
from training.data import write_synthetic_dataset

if TYPE_CHECKING:
    from playwright import sync_api
    from playwright.sync_api import ViewportSize
else:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is in the dev extra: pip install -e .[dev]"
    )

pytestmark = pytest.mark.timeout(600)

CHROMIUM = Path("/usr/bin/chromium")
DESKTOP: ViewportSize = {"width": 1280, "height": 860}
PHONE: ViewportSize = {"width": 390, "height": 844}
PAGES = ("segment", "tasks", "models")
UI_TIMEOUT_MS = 30_000  # one UI step on a busy 2-core machine
TASK_TIMEOUT_S = 300
FAILED_LOAD = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")
IMAGE_HEIGHT, IMAGE_WIDTH = 40, 56


def chromium_path() -> Path:
    """Debian's chromium, installed with apt when missing (CI runs as root); skips if that cannot be done."""
    if CHROMIUM.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip(f"{CHROMIUM} is missing and apt-get cannot install it here (not root or no apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
    ):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0:
            pytest.skip(f"{CHROMIUM} is missing and `{' '.join(command)}` failed: {result.stderr[-500:]}")
    return CHROMIUM


@dataclass
class Service:
    """The running service: its URL, its settings and its registry (the test process publishes into it)."""

    url: str
    settings: Settings
    registry: Registry

    def get(self, path: str) -> dict:
        response = httpx.get(f"{self.url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def wait_serving(self, version: str) -> None:
        wait_until(lambda: self.get("/models")["serving"] == version, 60, f"{version} to be served")


def console_settings(data_dir: Path, **overrides: object) -> Settings:
    """The conftest's tiny embedded settings with a long orphan timeout and a fast pointer poll."""
    return tiny_settings(
        data_dir,
        f"test-{uuid.uuid4().hex[:12]}",
        **{"orphan_timeout_s": 120.0, "poll_interval_s": 0.2, **overrides},
    )


def published_registry(settings: Settings) -> Registry:
    """The settings' registry with v1 (background, a, b) and v2 (+ c), v2 active."""
    registry = Registry(settings.registry_dir)
    publish_version(registry, ["background", "a", "b"])
    registry.activate(publish_version(registry, ["background", "a", "b", "c"]))
    return registry


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """``incseg serve`` (API + one worker, embedded broker) on a free port, v2 serving."""
    root = tmp_path_factory.mktemp("console-service")
    settings = console_settings(root / "data")
    registry = published_registry(settings)
    url = f"http://127.0.0.1:{free_port()}"
    command = [str(INCSEG_SCRIPT), "serve", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]]
    server = ServiceProcess(command, settings, root / "serve.log")
    try:
        server.wait_healthy(url, 120)
        running = Service(url, settings, registry)
        running.wait_serving("v2")
        yield running
    finally:
        server.stop(60)


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    """Headless Debian chromium."""
    executable = chromium_path()
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(executable), headless=True)
        sync_api.expect.set_options(timeout=UI_TIMEOUT_MS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go: ``$INCSEG_SCREENSHOTS`` or a folder of this test session."""
    folder = Path(os.environ["INCSEG_SCREENSHOTS"]) if "INCSEG_SCREENSHOTS" in os.environ else None
    folder = folder or tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class ConsoleErrors:
    """Console errors and uncaught exceptions of a page; statuses a test provokes on purpose are allowed."""

    allowed_statuses: set[int] = field(default_factory=set)
    messages: list[str] = field(default_factory=list)

    def on_console(self, message: sync_api.ConsoleMessage) -> None:
        if message.type != "error":
            return
        failed = FAILED_LOAD.search(message.text)
        if failed is None or int(failed[1]) not in self.allowed_statuses:
            self.messages.append(f"console.error: {message.text} ({message.location.get('url')})")

    def on_page_error(self, error: Exception) -> None:
        self.messages.append(f"uncaught: {error}")


@dataclass
class Console:
    """One browser context on the console: its page and what went wrong in it."""

    page: sync_api.Page
    errors: ConsoleErrors
    requests: list[sync_api.Request]

    def open(self, name: str) -> None:
        self.page.goto(f"/#{name}")
        sync_api.expect(self.page.locator(f"[data-page={name}]")).to_be_visible()

    def testid(self, testid: str) -> sync_api.Locator:
        return self.page.get_by_test_id(testid)


def open_console(browser: sync_api.Browser, url: str) -> tuple[sync_api.BrowserContext, Console]:
    context = browser.new_context(viewport=DESKTOP, base_url=url)
    page = context.new_page()
    console = Console(page, ConsoleErrors(), [])
    page.on("console", console.errors.on_console)
    page.on("pageerror", console.errors.on_page_error)
    page.on("request", lambda request: console.requests.append(request))
    return context, console


@pytest.fixture
def console(browser: sync_api.Browser, service: Service) -> Iterator[Console]:
    """A fresh browser context (its own sessionStorage) on the service; fails the test on console errors."""
    context, opened = open_console(browser, service.url)
    yield opened
    context.close()
    assert opened.errors.messages == [], "\n".join(opened.errors.messages)


def choose_image(console: Console, name: str = "street.png", seed: int = 0) -> bytes:
    data = png_bytes(IMAGE_HEIGHT, IMAGE_WIDTH, seed)
    console.testid("segment-input").set_input_files({"name": name, "mimeType": "image/png", "buffer": data})
    return data


def shown_pixels(console: Console) -> np.ndarray:
    """The RGB pixels of the result image as the page holds them (drawn to a canvas at natural size)."""
    values = console.testid("segment-result").evaluate(
        """img => {
            const canvas = new OffscreenCanvas(img.naturalWidth, img.naturalHeight);
            const context = canvas.getContext("2d");
            context.drawImage(img, 0, 0);
            return [img.naturalHeight, img.naturalWidth,
                    Array.from(context.getImageData(0, 0, img.naturalWidth, img.naturalHeight).data)];
        }"""
    )
    height, width, flat = values
    return np.array(flat, dtype=np.uint8).reshape(height, width, 4)[..., :3]


def segment_directly(service: Service, image: bytes, output: str) -> httpx.Response:
    response = httpx.post(
        f"{service.url}/segment",
        params={"format": output},
        content=image,
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response


def test_segment_shows_the_overlay_the_mask_and_the_legend(service: Service, console: Console) -> None:
    serving = service.get("/models")["serving"]
    console.open("segment")
    image = choose_image(console)

    result = console.testid("segment-result")
    sync_api.expect(result).to_have_attribute("data-view", "overlay")
    sync_api.expect(result).to_have_attribute("data-version", serving)
    sync_api.expect(console.testid("segment-version")).to_contain_text(f"Answered by {serving}")

    # the overlay is the service's mask blended over the image exactly as the service's own overlay
    mask = segment_directly(service, image, "png")
    assert mask.headers["X-Model-Version"] == serving
    labels = np.asarray(Image.open(io.BytesIO(mask.content)))
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    assert np.array_equal(shown_pixels(console), overlay(pixels, labels))

    # the legend: each class present, its colour and its pixel share as the service counts them
    summary = segment_directly(service, image, "json").json()
    entries = console.testid("segment-legend").locator("li")
    sync_api.expect(entries).to_have_count(len(summary["fractions"]))
    for name, fraction in summary["fractions"].items():
        entry = console.testid("segment-legend").locator(f'li[data-class="{name}"]')
        sync_api.expect(entry.locator(".share")).to_have_text(f"{100 * fraction:.1f} %")
        index = summary["classes"].index(name)
        colour = entry.locator(".swatch").evaluate("node => getComputedStyle(node).backgroundColor")
        assert colour == "rgb({}, {}, {})".format(*voc_palette()[index]), (name, colour)

    console.page.get_by_role("radio", name="Mask").check()
    sync_api.expect(result).to_have_attribute("data-view", "mask")
    assert np.array_equal(shown_pixels(console), voc_palette()[labels])
    console.page.get_by_role("radio", name="Overlay").check()
    sync_api.expect(result).to_have_attribute("data-view", "overlay")


def test_a_task_shows_its_progress_then_its_validation_table(
    service: Service, console: Console, tmp_path: Path
) -> None:
    archive = make_dataset_archive(tmp_path, 3, seed=2)
    console.open("tasks")
    console.testid("task-input").set_input_files(archive)
    console.page.get_by_label("Method").fill("mib")
    console.page.get_by_label("Epochs").fill("1")
    console.page.get_by_role("button", name="Start task").click()

    row = console.testid("tasks-table").locator("tbody tr").first
    sync_api.expect(row).to_have_attribute("data-task-id", re.compile(".+"))
    task_id = row.get_attribute("data-task-id")
    seen: set[str | None] = set()

    def finished() -> bool:
        state = row.get_attribute("data-state")
        seen.add(state)
        return state in ("done", "failed", "cancelled")

    wait_until(finished, TASK_TIMEOUT_S, f"task {task_id} to finish in the table", poll_s=0.1)
    task = service.get(f"/tasks/{task_id}")
    assert task["state"] == "done", task["error"]
    assert seen & {"queued", "running", "exporting"}, f"the table never showed the task unfinished: {seen}"

    metrics = console.testid("task-metrics")
    for group in ("old", "new", "all"):
        value = task["metrics"][f"miou_{group}"]
        sync_api.expect(metrics.locator(f'tr[data-group="{group}"] td')).to_have_text(f"{100 * value:.1f} %")
    per_class = console.testid("task-class-iou").locator("tbody tr")
    sync_api.expect(per_class).to_have_count(len(task["metrics"]["per_class_iou"]))
    for name in task["classes"]:
        cells = console.testid("task-class-iou").locator(f'tr[data-class="{name}"] td')
        sync_api.expect(cells.first).to_have_text("new")
    sync_api.expect(row.locator("td").nth(5)).to_have_text(task["model_version"])

    console.open("models")
    version_row = console.testid("models-table").locator(f'tr[data-version="{task["model_version"]}"]')
    sync_api.expect(version_row).to_contain_text(f"{100 * task['metrics']['miou_all']:.1f} %")
    sync_api.expect(console.page.locator("#chart-body svg polyline")).to_have_count(3)


def test_cancel_a_task_from_its_row(service: Service, console: Console, tmp_path: Path) -> None:
    archive = make_dataset_archive(tmp_path, 5, seed=5)
    console.open("tasks")
    console.testid("task-input").set_input_files(archive)
    console.page.get_by_label("Epochs").fill("500")
    console.page.get_by_role("button", name="Start task").click()
    row = console.testid("tasks-table").locator("tbody tr").first
    sync_api.expect(row).to_have_attribute("data-state", re.compile("queued|running"))
    task_id = row.get_attribute("data-task-id")
    row.get_by_test_id(f"cancel-{task_id}").click()
    sync_api.expect(row).to_have_attribute("data-state", "cancelled", timeout=120_000)
    assert service.get(f"/tasks/{task_id}")["state"] == "cancelled"


def test_activate_an_older_version_then_segment_with_it(service: Service, console: Console) -> None:
    listing = service.get("/models")
    older = next(version["name"] for version in listing["versions"] if not version["active"])
    console.open("models")
    sync_api.expect(console.testid(f"activate-{listing['active']}")).to_be_disabled()

    # dismissing the confirmation changes nothing
    console.testid(f"activate-{older}").click()
    dialog = console.page.get_by_role("dialog")
    sync_api.expect(dialog).to_contain_text(f"Activate {older}?")
    console.page.keyboard.press("Escape")
    sync_api.expect(dialog).to_be_hidden()
    assert service.get("/models")["active"] == listing["active"]

    console.testid(f"activate-{older}").click()
    console.testid("confirm-ok").click()
    sync_api.expect(console.testid("models-notice")).to_have_text(
        f"{older} is serving: /segment answers with it."
    )
    sync_api.expect(console.testid(f"activate-{older}")).to_be_disabled()
    sync_api.expect(console.testid("serving-badge")).to_have_text(f"serving {older}")

    console.open("segment")
    choose_image(console, seed=3)
    sync_api.expect(console.testid("segment-result")).to_have_attribute("data-version", older)
    sync_api.expect(console.testid("segment-version")).to_contain_text(f"Answered by {older}")


def test_a_bad_archive_shows_the_services_message(service: Service, console: Console, tmp_path: Path) -> None:
    bad = tmp_path / "holiday-photos.zip"
    bad.write_bytes(b"these bytes are no zip archive\n" * 8)
    with bad.open("rb") as file:
        direct = httpx.post(f"{service.url}/tasks", files={"dataset": (bad.name, file)}, timeout=30)
    assert 400 <= direct.status_code < 500, direct.text
    console.errors.allowed_statuses.add(direct.status_code)
    tasks_before = service.get("/tasks")["total"]

    console.open("tasks")
    console.testid("task-input").set_input_files(bad)
    console.page.get_by_role("button", name="Start task").click()
    sync_api.expect(console.testid("task-error")).to_have_text(
        f"{direct.status_code}: {direct.json()['detail']}"
    )
    assert service.get("/tasks")["total"] == tasks_before


def test_the_api_key_is_asked_once_and_sent_on_every_request(
    browser: sync_api.Browser, tmp_path: Path
) -> None:
    settings = console_settings(tmp_path / "data", api_key="console-test-key")
    published_registry(settings)
    api = ApiProcess(settings, tmp_path / "api.log")
    try:
        api.wait_healthy()
        wait_until(lambda: httpx.get(f"{api.url}/ready").status_code == 200, 60, "v2 to be served")
        context, console = open_console(browser, api.url)
        console.errors.allowed_statuses.add(401)
        console.open("models")

        # reads need the key too: the first one answers 401 and the key dialog says why; a wrong key is
        # refused with the service's detail and asked for again
        key_dialog = console.page.get_by_role("dialog", name="API key")
        sync_api.expect(key_dialog).to_contain_text("missing or wrong API key")
        console.page.get_by_label("The service's key").fill("wrong-key")
        console.testid("key-save").click()
        sync_api.expect(console.testid("models-error")).to_contain_text("401: missing or wrong API key")
        assert console.page.evaluate("sessionStorage.getItem('incseg.apiKey')") is None

        console.testid("api-key-button").click()
        console.page.get_by_label("The service's key").fill("console-test-key")
        saved_at = len(console.requests)
        console.testid("key-save").click()
        console.page.reload()  # the models page loads again, now with the key
        console.testid("activate-v1").click()
        console.testid("confirm-ok").click()
        sync_api.expect(console.testid("models-notice")).to_have_text(
            "v1 is serving: /segment answers with it."
        )

        # kept for the browser session: a reload asks nothing and every request carries the key
        console.page.reload()
        sync_api.expect(console.testid("serving-badge")).to_have_text("serving v1")
        console.open("tasks")
        sync_api.expect(console.page.locator("#tasks-empty")).to_be_visible()
        api_calls = [r for r in console.requests[saved_at:] if r.resource_type == "fetch"]
        assert {"/models/v1/activate", "/models", "/tasks"} <= {httpx.URL(r.url).path for r in api_calls}
        assert all(r.headers.get("x-api-key") == "console-test-key" for r in api_calls), [
            (r.url, r.headers.get("x-api-key")) for r in api_calls
        ]
        assert console.page.evaluate("sessionStorage.getItem('incseg.apiKey')") == "console-test-key"
        sync_api.expect(key_dialog).to_be_hidden()
        context.close()
        assert console.errors.messages == [], "\n".join(console.errors.messages)

        # another browser session starts without the key
        fresh_context, fresh = open_console(browser, api.url)
        fresh.open("segment")
        assert fresh.page.evaluate("sessionStorage.getItem('incseg.apiKey')") is None
        fresh_context.close()
    finally:
        api.stop(30)


def test_keyboard_reaches_every_page_with_a_visible_focus(console: Console) -> None:
    console.open("segment")
    page = console.page
    for _ in range(10):  # skip link, brand-free header: the Tasks tab comes within a few presses
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.dataset.pageLink") == "tasks":
            break
    else:
        raise AssertionError("Tab never reached the Tasks link")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid", f"the focused link shows no focus ring (outline-style {outline})"
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("[data-page=tasks]")).to_be_visible()
    sync_api.expect(page.get_by_role("heading", name="Tasks", level=1)).to_be_focused()

    page.keyboard.press("Tab")
    sync_api.expect(console.testid("task-input")).to_be_focused()
    ring = page.locator('[data-drop-for="task-input"] label').evaluate(
        "node => getComputedStyle(node).outlineStyle"
    )
    assert ring == "solid", f"the archive drop zone shows no focus ring (outline-style {ring})"
    for label in ("Method", "Epochs"):
        page.keyboard.press("Tab")
        sync_api.expect(page.get_by_label(label)).to_be_focused()
    page.keyboard.press("Tab")
    sync_api.expect(page.get_by_role("button", name="Start task")).to_be_focused()


def test_every_page_at_desktop_and_phone_width(
    service: Service, console: Console, screenshots: Path, tmp_path: Path
) -> None:
    shapes = write_synthetic_dataset(tmp_path / "shapes", 3, 1, 0, 96, seed=4) / "images" / "train_00000.png"
    written = []
    for width_name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        console.page.set_viewport_size(viewport)
        for name in PAGES:
            console.open(name)
            if name == "segment":
                console.testid("segment-input").set_input_files(shapes)
                sync_api.expect(console.testid("segment-legend").locator("li").first).to_be_visible()
            if name == "tasks":
                rows_or_none = console.page.locator("[data-testid=tasks-table] tbody tr, #tasks-empty")
                sync_api.expect(rows_or_none.first).to_be_visible()
                done = console.testid("tasks-table").locator('tr[data-state="done"]')
                if done.count() and not console.testid("task-metrics").is_visible():
                    done.first.get_by_role("button", name="Details").click()
                    sync_api.expect(console.testid("task-metrics")).to_be_visible()
            if name == "models":
                sync_api.expect(console.testid("models-table").locator("tbody tr").first).to_be_visible()
            overflow = console.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{name} at {width_name} width scrolls sideways by {overflow} px"
            path = screenshots / f"{name}-{width_name}.png"
            console.page.screenshot(path=path, full_page=True)
            written.append(path)
    assert all(path.stat().st_size > 0 for path in written)
    print(f"\nconsole screenshots: {screenshots}")
