"""The web console: static files (api/static/console/, and the browser libraries it uses from
api/static/vendor/) served at `/` and `/console/…`, same origin as the API.

The files hold no secret (a person pastes an API key into the page, which keeps it in
`sessionStorage`), so they are served without a key: `PATHS` is exactly the list api/auth.py
lets through. Nothing is built: the files are read from the installed package once, at
start-up. They carry no version in their names, so every answer is `no-cache` with a strong
ETag: a browser revalidates (a `304`) and never runs yesterday's script against today's API.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import falcon

# URL path -> file in the `api` package. Exactly these paths are served, each an exact route;
# tests/integration/test_console.py checks that every file under static/console/ is listed.
FILES: dict[str, str] = {
    "/": "static/console/index.html",
    "/console/app.css": "static/console/app.css",
    "/console/app.js": "static/console/app.js",
    "/console/api.js": "static/console/api.js",
    "/console/dom.js": "static/console/dom.js",
    "/console/gallery.js": "static/console/gallery.js",
    "/console/image.js": "static/console/image.js",
    "/console/snippet.js": "static/console/snippet.js",
    "/console/uploads.js": "static/console/uploads.js",
    "/console/vendor/tus.min.js": "static/vendor/tus.min.js",
    "/console/vendor/thumbhash.js": "static/vendor/thumbhash.js",
}
PATHS = frozenset(FILES)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}

# The page runs only its own scripts and styles (no inline script or style attribute, no
# eval), talks to its own origin only, and shows images from there, from blob: and data:
# URLs (a decoded ThumbHash placeholder). Sent on every file: harmless on scripts, and a
# file opened on its own is as locked down as the page.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str  # quoted, strong: the file's SHA-256

    @classmethod
    def load(cls, name: str) -> StaticFile:
        body = resources.files("api").joinpath(name).read_bytes()
        suffix = name[name.rfind(".") :]
        content_type = CONTENT_TYPES[suffix]  # a KeyError at start-up, never a wrong type
        return cls(body, content_type, f'"{hashlib.sha256(body).hexdigest()[:32]}"')


class ConsoleFile:
    """One file of the console (GET and HEAD, no key)."""

    def __init__(self, file: StaticFile) -> None:
        self.file = file

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._answer(req, resp)
        if resp.status == falcon.HTTP_200:
            resp.data = self.file.body

    def on_head(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._answer(req, resp)
        if resp.status == falcon.HTTP_200:
            resp.content_length = len(self.file.body)

    def _answer(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = self.file.content_type
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("ETag", self.file.etag)
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        # Signed image links travel in URLs: never tell another site which page it was on.
        resp.set_header("Referrer-Policy", "no-referrer")
        if req.if_none_match and any(
            tag == "*" or tag == self.file.etag.strip('"') for tag in req.if_none_match
        ):
            resp.status = falcon.HTTP_304


def console_routes() -> list[tuple[str, object]]:
    """(path, resource) for every file of the console, read from the package now."""
    return [(path, ConsoleFile(StaticFile.load(name))) for path, name in FILES.items()]
