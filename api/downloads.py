"""Streaming originals and variants out of S3: ranges, conditional requests, safe headers.

The body is never buffered: an S3 GET (ranged when the client asked for a range) is relayed
in 1 MiB chunks, so a multi-GB original costs the same memory as a thumbnail. When the client
goes away the WSGI server closes the iterator, which closes the S3 response and releases its
connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

import falcon

from api import splice
from api.http import (
    ByteRange,
    Unsatisfiable,
    content_disposition,
    etag_matches,
    if_range_allows,
    parse_range,
)
from core.storage import Store

CHUNK = 1024 * 1024
IMMUTABLE = "private, max-age=31536000, immutable"
# Without the version in the URL the bytes behind it may change (a reconvert with another
# profile rewrites `w1024.webp`): caches must revalidate, which the ETag makes cheap.
REVALIDATE = "private, no-cache"
VERSION_LENGTH = 16


def version(blake3: str) -> str:
    """The `?v=` that pins a URL to these bytes (links in records carry it)."""
    return blake3[:VERSION_LENGTH]


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
) -> None:
    """Answer GET/HEAD for one stored blob (200, 206, 304 or 416)."""
    etag = f'"{blob.blake3}"'
    resp.set_header("ETag", etag)
    resp.set_header("Last-Modified", format_datetime(blob.modified, usegmt=True))
    resp.set_header("Accept-Ranges", "bytes")
    pinned = req.get_param("v") == version(blake3=blob.blake3)
    resp.set_header("Cache-Control", IMMUTABLE if pinned else REVALIDATE)
    resp.set_header("X-Content-Type-Options", "nosniff")
    resp.set_header("Content-Disposition", content_disposition(blob.filename))
    resp.content_type = blob.content_type
    if etag_matches(req.get_header("If-None-Match"), etag):
        resp.status = falcon.HTTP_304
        return
    wanted = _range(req, blob, etag)
    start, length = (0, blob.size) if wanted is None else (wanted.start, wanted.length)
    if wanted is not None:
        resp.status = falcon.HTTP_206
        resp.set_header("Content-Range", wanted.content_range(blob.size))
    resp.content_length = length
    if req.method == "HEAD" or length == 0:
        return
    client = splice.available(req.env)
    if client is not None:
        resp.stream = splice.SpliceRelay(store, blob.key, start, length, client)
    else:
        resp.stream = relay(store, blob.key, start, length, prefetch)


def _range(req: falcon.Request, blob: Blob, etag: str) -> ByteRange | None:
    if not if_range_allows(req.get_header("If-Range"), etag):
        return None
    try:
        return parse_range(req.get_header("Range"), blob.size)
    except Unsatisfiable:
        raise falcon.HTTPRangeNotSatisfiable(blob.size) from None


def relay(
    store: Store, key: str, offset: int, length: int, prefetch: Executor | None
) -> Iterator[bytes]:
    """The S3 object's bytes [offset, offset+length) in CHUNK pieces, the next one fetched
    while the current one is sent."""
    if length == 0:
        return iter(())
    return store.stream(key, offset, length, CHUNK, prefetch)
