"""CORS: which web pages may call the API from a browser, and read what it answers.

`PICSTREAM_CORS_ORIGINS` lists exact origins (`https://app.example.com`), and may hold `*`:

- A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered here,
  before routing and before api/auth.py (browsers never send credentials on a preflight),
  on any path, routed or not (a tus client preflights `/v1/tus/{id}`): `204` with what may
  be sent, cached by the browser for `Access-Control-Max-Age`. From an origin that is not
  allowed it is a `403 forbidden` problem with no `Access-Control-*` header, which the
  browser reports as a CORS failure and `curl -v` explains.
- A listed origin may send anything the API takes (key, upload token, signed link); every
  answer to it, problems included, carries `Access-Control-Allow-Origin: <origin>`,
  `Access-Control-Expose-Headers` and `Vary: Origin`.
- `*` lets any page read signed links (GET/HEAD of a SIGNABLE path with `sig`): such an
  answer carries `Access-Control-Allow-Origin: *` whatever the `Origin`, even none, so it
  does not vary by origin and a CDN keeps one copy. Never anything that needs a key or token.
- `Access-Control-Allow-Credentials` is never sent: the API takes bearer headers, not
  cookies, and a credentialed request could not use `*` anyway.

With no origins configured nothing is added at all (not even `Vary: Origin`: no answer then
depends on the origin), and every preflight is a 403.
"""

from __future__ import annotations

import falcon

from api.auth import SIGNABLE
from api.downloads import front_name
from core.errors import Forbidden

ANY = "*"
ALLOW_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
SIGNED_METHODS = ("GET", "HEAD")
# What a page may send: our auth, conditionals and ranges, the digest of an upload, what
# EventSource sends on a reconnect, the tus protocol's headers, and two that common
# libraries add (jQuery, method-override shims).
ALLOW_HEADERS = ", ".join(
    (
        "Authorization",
        "Content-Type",
        "Range",
        "If-None-Match",
        "If-Modified-Since",
        "If-Range",
        "Repr-Digest",
        "Last-Event-ID",
        "Tus-Resumable",
        "Upload-Length",
        "Upload-Offset",
        "Upload-Metadata",
        "Upload-Defer-Length",
        "Upload-Checksum",
        "Upload-Concat",
        "X-Requested-With",
        "X-HTTP-Method-Override",
    )
)
# What a page may read beyond the CORS-safelisted response headers: where a new image or
# upload is, validators and ranges, why to wait, the request id to quote in a bug report
# (api/requestid.py), and the tus headers (without which tus-js and Uppy cannot resume).
EXPOSE_HEADERS = ", ".join(
    (
        "Location",
        "ETag",
        "Last-Modified",
        "Content-Range",
        "Content-Length",
        "Content-Disposition",
        "Accept-Ranges",
        "Retry-After",
        "Picstream-Image",
        "X-Request-Id",
        "Tus-Resumable",
        "Tus-Version",
        "Tus-Extension",
        "Tus-Max-Size",
        "Tus-Checksum-Algorithm",
        "Upload-Offset",
        "Upload-Length",
        "Upload-Expires",
        "Upload-Metadata",
        "Upload-Defer-Length",
    )
)
MAX_AGE = "600"  # seconds a browser may reuse a preflight answer (Chromium caps it at 7200)


class Cors:
    """Middleware; first in the list, so a preflight never reaches authentication."""

    def __init__(self, origins: frozenset[str]) -> None:
        self.exact = origins - {ANY}
        self.signed_anywhere = ANY in origins

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not _is_preflight(req):
            return
        if self._allow_origin(req) is None:
            raise Forbidden(
                f"origin {req.get_header('Origin')!r} may not call this API here"
                " (PICSTREAM_CORS_ORIGINS)"
            )
        resp.status = falcon.HTTP_204
        resp.complete = True  # no routing, no auth, no resource

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        """Runs for every answer, falcon's and our problems included."""
        if not (self.exact or self.signed_anywhere):
            return
        allowed = self._allow_origin(req)
        if allowed != ANY:  # the answer depends on the Origin: caches must key on it
            _vary_origin(resp)
        if allowed is None:
            return
        # A download handed to nginx carries its headers under other names (api/downloads.py).
        resp.set_header(front_name(resp, "Access-Control-Allow-Origin"), allowed)
        if _is_preflight(req):
            methods = ", ".join(SIGNED_METHODS) if allowed == ANY else ALLOW_METHODS
            resp.set_header("Access-Control-Allow-Methods", methods)
            resp.set_header("Access-Control-Allow-Headers", ALLOW_HEADERS)
            resp.set_header("Access-Control-Max-Age", MAX_AGE)
        else:
            resp.set_header(front_name(resp, "Access-Control-Expose-Headers"), EXPOSE_HEADERS)

    def _allow_origin(self, req: falcon.Request) -> str | None:
        """`Access-Control-Allow-Origin` for this request: `*` for a signed read when any
        origin may make those, the origin itself when it is listed, else None."""
        if self.signed_anywhere and _is_signed_read(req):
            return ANY
        origin = req.get_header("Origin")
        return origin if origin in self.exact else None


def _is_preflight(req: falcon.Request) -> bool:
    return (
        req.method == "OPTIONS"
        and req.get_header("Origin") is not None
        and req.get_header("Access-Control-Request-Method") is not None
    )


def _is_signed_read(req: falcon.Request) -> bool:
    """A GET/HEAD (asked for, on a preflight) of a signable path with a signature. Whether
    the signature is good is api/auth.py's business: a bad one is a 403 a page may read."""
    method = req.get_header("Access-Control-Request-Method") if _is_preflight(req) else req.method
    return (
        method in SIGNED_METHODS
        and req.get_param("sig") is not None
        and SIGNABLE.fullmatch(req.path) is not None
    )


def _vary_origin(resp: falcon.Response) -> None:
    """Add `Origin` to Vary, keeping what is there (`Accept` on /best)."""
    name = front_name(resp, "Vary")
    current = resp.get_header(name)
    if not current:
        resp.set_header(name, "Origin")
        return
    present = {part.strip().lower() for part in current.split(",")}
    if not present & {"origin", "*"}:
        resp.set_header(name, f"{current}, Origin")
