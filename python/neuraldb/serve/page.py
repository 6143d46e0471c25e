"""The web page at ``/``: list and search the facts, add and delete one, and ask a prompt with and without the edits
side by side. Static files (``static/``, shipped as package data) that call the same HTTP API as any client; the
page asks for the bearer token and keeps it in the page's memory only (never in storage or a cookie).

The page loads nothing from elsewhere, and its Content-Security-Policy says so: scripts, styles and requests come
from this server only.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi.responses import Response

__all__ = ["PAGE_FILES", "add_page"]

# URL path -> (file in static/, media type)
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", "text/css; charset=utf-8"),
}

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_page(app: Any) -> None:
    """Serve the page's files on ``app`` (read once, here: a missing file fails at start, not at the first visit)."""
    static = resources.files("neuraldb.serve") / "static"
    for url, (name, media_type) in PAGE_FILES.items():
        app.add_api_route(
            url, _responder((static / name).read_bytes(), media_type), methods=["GET"], include_in_schema=False
        )
    app.add_api_route("/favicon.ico", _no_icon, methods=["GET"], include_in_schema=False)


async def _no_icon() -> Response:
    return Response(status_code=204)  # browsers ask for one; a 404 would log an error on every visit


def _responder(body: bytes, media_type: str) -> Any:
    async def serve() -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return serve
