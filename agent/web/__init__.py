"""The chat page ``omnivox serve`` shows at ``/``: record or upload a clip, then talk about it.

The page is three static files next to this module (``index.html``, ``app.js``, ``style.css``):
plain HTML, CSS and JavaScript with no build step, and nothing loaded from another host (the
server may have no internet). It talks only to this server's ``/v1/chat/completions``, streamed,
with the clip as an ``input_audio`` part (decoded and re-encoded in the browser as 16 kHz WAV).

These routes need no API key: the page holds no secrets (the user types the key, and the browser
keeps it and sends it with each ``/v1`` request).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

HERE = Path(__file__).parent
# what /static serves, by name, with its media type; nothing else in this folder is served
STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# the page may load from and talk to this server only; answers' audio plays from blob: URLs
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; media-src 'self' blob: data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# revalidate on every load (ETag), so a restarted server with a newer page is seen at once
NO_CACHE = {"Cache-Control": "no-cache"}


def add_web_routes(app: FastAPI) -> None:
    """Add ``GET /`` (the page) and ``GET /static/{name}`` (its script and style) to ``app``."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        headers = {**NO_CACHE, "Content-Security-Policy": CONTENT_SECURITY_POLICY}
        return FileResponse(HERE / "index.html", media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        media_type = STATIC_FILES.get(name)
        if media_type is None:
            raise HTTPException(404, f"no static file {name!r}; the page's files are {sorted(STATIC_FILES)}")
        return FileResponse(HERE / name, media_type=media_type, headers=NO_CACHE)
