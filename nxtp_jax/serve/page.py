"""The web page at `/`: plain HTML, JS and CSS shipped in the package (no CDN, works offline)."""

from __future__ import annotations

import importlib.resources
from typing import Callable

from starlette.requests import Request
from starlette.responses import Response

FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/static/page.css": ("page.css", "text/css; charset=utf-8"),
}


def _read(name: str) -> bytes:
    return importlib.resources.files("nxtp_jax.serve").joinpath("static", name).read_bytes()


def endpoints() -> list[tuple[str, Callable, str]]:
    """(path, handler, media type) per file of the page."""

    def serve(name: str, media_type: str):
        body = _read(name)  # read once at start-up

        async def endpoint(request: Request) -> Response:
            return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})

        return endpoint

    return [(path, serve(name, media), media) for path, (name, media) in FILES.items()]
