"""The web console: ``/`` serves its page, ``/console/*`` its scripts, styles and icon (``service/console``).

The console is plain HTML, CSS and JavaScript modules that call the API from the browser; nothing is built
at run time and nothing is loaded from elsewhere, so it works on an offline machine.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

CONSOLE_DIR = Path(__file__).resolve().parents[2] / "console"
# the page runs only its own scripts and styles; images come from the service or from the browser (blob:)
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)

router = APIRouter(tags=["console"])
router.mount("/console", StaticFiles(directory=CONSOLE_DIR), name="console")


@router.get("/", include_in_schema=False)
def console_page() -> FileResponse:
    """The console's single page (its sections are picked by the URL fragment: #segment, #tasks, #models)."""
    return FileResponse(
        CONSOLE_DIR / "index.html",
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"},
    )
