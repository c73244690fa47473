"""Streaming originals and variants out of S3: ranges, conditional requests, safe headers.

The store is asked before anything is promised: a GET opens the S3 response (ranged when
the client asked for a range), a HEAD stats the object, and only once the store has answered
are the status and headers set. A store that is down is a 503 problem, never a 200 whose
body never comes. A 304 or 416 is decided from the record alone.

The body is never buffered: it is relayed by api/splice.py (splice(2) under gunicorn, else
1 MiB chunks read ahead), so a multi-GB original costs the same memory as a thumbnail. When
the client goes away the WSGI server closes the relay, which closes the S3 response and
releases its connection.

Behind deploy/nginx.conf with PICSTREAM_ACCEL_REDIRECT=1 (gunicorn then marks every request,
deploy/gunicorn.conf.py) a GET is handed off instead: the app decides status and headers as
above and answers at once with X-Accel-Redirect; nginx fetches the bytes from the store with a
presigned URL and the range decided here, so a client that reads slowly (or never) ties up an
nginx connection, not a request thread. The store is then asked by nginx, which maps its
failures to the same 404/503 problems.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

import falcon

from api import presign, splice
from api.http import (
    ByteRange,
    Unsatisfiable,
    content_disposition,
    etag_matches,
    if_range_allows,
    modified_since,
    parse_range,
)
from api.limits import CountedBody, Slots
from core.errors import NotFound, StorageUnavailable
from core.storage import OpenObject, Store

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
IMMUTABLE = "private, max-age=31536000, immutable"
# Without the version in the URL the bytes behind it may change (a reconvert with another
# profile rewrites `w1024.webp`): caches must revalidate, which the ETag makes cheap.
REVALIDATE = "private, no-cache"
# A pinned signed link with PICSTREAM_SIGNED_CACHE=public: a CDN may keep it, but not past
# the moment the link stops working (after that, the origin would refuse it).
SHARED = "public, max-age={seconds}, immutable"
VERSION_LENGTH = 16

# Hand-off to nginx (deploy/nginx.conf, location /_picstream/store). The WSGI name of the
# mark gunicorn puts on requests when PICSTREAM_ACCEL_REDIRECT=1.
ACCEL_MARK = "HTTP_X_PICSTREAM_ACCEL_REDIRECT"
STORE_LOCATION = "/_picstream/store"
# Our headers travel to nginx under these names and are put back on a 200/206 only: under
# their own names nginx would keep Cache-Control, Content-Disposition and Accept-Ranges even on
# an error page (a 503 marked immutable for a year), and drop the rest.
FRONT_PREFIX = "X-Picstream-Front-"
HANDED_OVER = (
    "ETag",
    "Last-Modified",
    "Cache-Control",
    "Content-Disposition",
    "Accept-Ranges",
    "X-Content-Type-Options",
    "Vary",
    "Access-Control-Allow-Origin",  # api/cors.py
    "Access-Control-Expose-Headers",
)


def version(blake3: str) -> str:
    """The `?v=` that pins a URL to these bytes (links in records carry it)."""
    return blake3[:VERSION_LENGTH]


class SignedCaching:
    """Middleware: whether shared caches (CDNs) may keep pinned signed links
    (PICSTREAM_SIGNED_CACHE=public), told to every request as `req.context.shared_cache`
    for `_cache_control`. Only api/auth.py marks a request signed (`req.context.signed`),
    after checking its signature; a request with the key is never public."""

    def __init__(self, public: bool) -> None:
        self.public = public

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.shared_cache = self.public


def front_name(resp: falcon.Response, name: str) -> str:
    """The name header `name` must be set under on `resp`: when the download is handed to
    nginx, one of HANDED_OVER travels as FRONT_PREFIX + name (deploy/nginx.conf puts it
    back). For middleware that adds headers after the resource has answered (api/cors.py)."""
    handed_off = resp.get_header("X-Accel-Redirect") == STORE_LOCATION
    return FRONT_PREFIX + name if handed_off and name in HANDED_OVER else name


@dataclass(frozen=True, slots=True)
class Blob:
    """What is served: where it is and what the record says about it."""

    key: str
    size: int
    blake3: str
    content_type: str
    modified: datetime
    filename: str | None


def serve(
    req: falcon.Request,
    resp: falcon.Response,
    store: Store,
    blob: Blob,
    prefetch: Executor | None = None,
    *,
    slots: Slots,
    pinnable: bool = True,
) -> None:
    """Answer GET/HEAD for one stored blob: 200, 206, 304 or 416 — or the problem the store
    had (503 when it is down, 404 when the file is gone), raised before any header is set.
    A relayed body holds one of `slots` (503 busy when none is free). `pinnable=False`: the
    URL names no fixed bytes (`/best`), so `?v=` never makes it immutable."""
    etag = f'"{blob.blake3}"'
    if _not_modified(req, blob, etag):
        _describe(req, resp, blob, etag, pinnable)
        resp.delete_header("Content-Type")  # RFC 9110 15.4.5: a 304 carries no content
        resp.status = falcon.HTTP_304
        return
    try:
        wanted = _range(req, blob, etag)
    except Unsatisfiable:
        _describe(req, resp, blob, etag, pinnable)
        raise falcon.HTTPRangeNotSatisfiable(blob.size) from None
    start, length = (0, blob.size) if wanted is None else (wanted.start, wanted.length)
    if req.method == "GET" and length and req.env.get(ACCEL_MARK) == "1":
        _describe(req, resp, blob, etag, pinnable)
        _hand_off(resp, store, blob, wanted)
        return
    if req.method == "HEAD" or length == 0:
        _ask_store(req, store, blob, start, length)  # a stat: no body to relay
    else:  # from here on the WSGI server closes the relay
        resp.stream = _relay(req, store, blob, start, length, prefetch, slots)
    _describe(req, resp, blob, etag, pinnable)
    if wanted is not None:
        resp.status = falcon.HTTP_206
        resp.set_header("Content-Range", wanted.content_range(blob.size))
    resp.content_length = length


def _not_modified(req: falcon.Request, blob: Blob, etag: str) -> bool:
    """RFC 9110 13.2.2: If-None-Match decides when present; only without it does
    If-Modified-Since (`curl -z`, `wget -N`, caches revalidating by date)."""
    if_none_match = req.get_header("If-None-Match")
    if if_none_match is not None:
        return etag_matches(if_none_match, etag)
    return not modified_since(req.get_header("If-Modified-Since"), blob.modified)


def _describe(
    req: falcon.Request, resp: falcon.Response, blob: Blob, etag: str, pinnable: bool
) -> None:
    resp.set_header("ETag", etag)
    resp.set_header("Last-Modified", format_datetime(blob.modified, usegmt=True))
    resp.set_header("Accept-Ranges", "bytes")
    resp.set_header("Cache-Control", _cache_control(req, blob, pinnable))
    resp.set_header("X-Content-Type-Options", "nosniff")
    resp.set_header("Content-Disposition", content_disposition(blob.filename))
    resp.content_type = blob.content_type


def _cache_control(req: falcon.Request, blob: Blob, pinnable: bool) -> str:
    """Immutable only when the URL pins these bytes; public (a CDN may keep it) only for a
    pinned signed link on a deployment that allows it, and no longer than the link lives.
    An answer to a request with the key is always private: the key is not in the URL, so a
    shared cache would hand it to anyone who asks for the same URL."""
    if not (pinnable and req.get_param("v") == version(blake3=blob.blake3)):
        return REVALIDATE
    if req.context.get("signed") and req.context.get("shared_cache"):
        # `expires` was verified (ASCII digits, not past) before the request got here.
        remaining = max(0, int(req.get_param("expires") or 0) - int(time.time()))
        return SHARED.format(seconds=remaining)
    return IMMUTABLE


def _hand_off(resp: falcon.Response, store: Store, blob: Blob, wanted: ByteRange | None) -> None:
    """Let nginx send the bytes: status, Content-Length and Content-Range come from the store's
    answer to exactly the range decided here (none: the whole object, 200)."""
    for name in HANDED_OVER:
        value = resp.get_header(name)
        if value is not None:
            resp.delete_header(name)
            resp.set_header(FRONT_PREFIX + name, value)
    resp.set_header("X-Accel-Redirect", STORE_LOCATION)
    resp.set_header("X-Picstream-Store-Path", presign.store_path(store, blob.key))
    if wanted is not None:
        resp.set_header("X-Picstream-Store-Range", f"bytes={wanted.start}-{wanted.end}")


def _range(req: falcon.Request, blob: Blob, etag: str) -> ByteRange | None:
    if not if_range_allows(req.get_header("If-Range"), etag):
        return None
    return parse_range(req.get_header("Range"), blob.size)


def _relay(
    req: falcon.Request,
    store: Store,
    blob: Blob,
    start: int,
    length: int,
    prefetch: Executor | None,
    slots: Slots,
) -> CountedBody:
    """The open S3 response as a relay that holds a download slot until its body is out or
    the server closes it. The slot is taken first: a refused download costs no S3 request."""
    slots.admit()
    try:
        body = _ask_store(req, store, blob, start, length)
        assert body is not None  # a GET of a non-empty range
        return slots.counted(splice.relay(body, req.env, CHUNK, prefetch))
    except BaseException:
        slots.release()
        raise


def _ask_store(
    req: falcon.Request, store: Store, blob: Blob, start: int, length: int
) -> OpenObject | None:
    """The open S3 response for a GET; for a HEAD (or an empty body) None, once a stat has
    shown the file is there."""
    try:
        if req.method == "HEAD" or length == 0:
            _check_size(blob, store.stat(blob.key).size)
            return None
        body = store.open_range(blob.key, start, length)
    except NotFound:
        # The record says the file exists, the store says it does not: 404, not 503. The
        # usual cause is a race with a deletion (the record goes first, then the files) or
        # with a reconvert that dropped this variant: the file is gone for good, and a 503
        # would tell clients to retry in vain. Real data loss is permanent too; the warning
        # is for the operator.
        log.warning(
            "%s %s: %s is in the record but not in the store", req.method, req.path, blob.key
        )
        raise NotFound("the stored file of this image is missing") from None
    try:
        _check_size(blob, body.size)
    except StorageUnavailable:
        body.close()
        raise
    return body


def _check_size(blob: Blob, stored: int | None) -> None:
    # Not the file the record describes (rewritten after the record was read, or damaged):
    # the record's Content-Length would be a lie. A fresh request reads a fresh record, so
    # it is worth a retry: 503 rather than 404.
    if stored is not None and stored != blob.size:
        raise StorageUnavailable("the stored file changed while it was being read; try again")
