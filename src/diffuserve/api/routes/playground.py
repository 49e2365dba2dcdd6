"""The web playground: one static page at `/` and `/playground` that calls this server's own Images API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from diffuserve.errors import RouteNotFound

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
PAGE = "index.html"
# Everything the page loads besides itself; any other name is a 404, so no path reaches the filesystem.
SCRIPTS = ("events.js", "editor.js", "timing.js", "results.js", "history.js", "jobs.js", "playground.js")
JAVASCRIPT, CSS = "text/javascript; charset=utf-8", "text/css; charset=utf-8"
ASSETS = {name: JAVASCRIPT for name in SCRIPTS} | {"playground.css": CSS}
# The browser may fetch nothing from another origin: the page works offline and leaks no prompt.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate each time, so a server upgrade never pairs a cached page with a newer API.
    "Cache-Control": "no-cache",
}

# No auth: a browser cannot send a bearer header when it opens a page. The files are the same for every
# caller and name nothing of the server; the page asks for the key before it calls the API.
router = APIRouter(include_in_schema=False)


def _file(name: str, media_type: str) -> FileResponse:
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=HEADERS)


@router.get("/")
@router.get("/playground")
async def page() -> FileResponse:
    return _file(PAGE, "text/html; charset=utf-8")


@router.get("/playground/{asset}")
async def asset(asset: str) -> FileResponse:
    media_type = ASSETS.get(asset)
    if media_type is None:
        raise RouteNotFound(f"no route GET /playground/{asset}")
    return _file(asset, media_type)
