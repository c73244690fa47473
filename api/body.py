"""The upload body of a request, as one `read(n)` callable over the image bytes.

Reads `req.stream` (never `bounded_stream`: it reads chunked bodies as empty), accepts a raw
body or multipart/form-data with one file, with Content-Length or chunked, and turns every
failure of the client's connection into a domain error.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from typing import Any

import falcon

from api.multipart import open_file_part, parse_boundary
from core.errors import BadRequest, ClientDisconnected, ClientTimeout
from core.ingest import Reader
from core.models import clean_filename

_READ_CHUNK = 256 * 1024  # multipart parser's read size: small enough to reject early


@dataclass(frozen=True, slots=True)
class UploadBody:
    read: Reader
    # The image's length when known up front: Content-Length of a raw body (a multipart
    # envelope's length is not the image's).
    declared_size: int | None
    # Content-Length of the whole request, multipart envelope included.
    request_length: int | None
    filename: str | None


def upload_body(req: falcon.Request, read_timeout: float) -> UploadBody:
    """Wrap the request body; the image bytes are read later, once, by the ingest loop."""
    _set_read_timeout(req.env, read_timeout)
    read = _guarded(req.stream.read)
    length = req.content_length
    if req.content_type and req.content_type.lower().startswith("multipart/form-data"):
        part = open_file_part(read, parse_boundary(req.content_type), chunk_size=_READ_CHUNK)
        name = clean_filename(part.filename) or _query_filename(req)
        return UploadBody(part.read, None, length, name)
    name = _query_filename(req) or _disposition_filename(req.get_header("Content-Disposition"))
    return UploadBody(_bounded(read, length), length, length, name)


def _set_read_timeout(env: dict[str, Any], seconds: float) -> None:
    # gunicorn sets no read timeout on bodies: a client that stalls would hold this thread
    # forever. With one set, the stalled read raises TimeoutError (-> 408).
    sock = env.get("gunicorn.socket")
    if isinstance(sock, socket.socket):
        sock.settimeout(seconds)


def _guarded(read: Callable[[int], bytes]) -> Reader:
    """Map what the server raises while reading the body to domain errors."""

    def guarded_read(n: int) -> bytes:
        try:
            return read(n)
        except TimeoutError:
            raise ClientTimeout("the client sent no data for too long; upload cancelled") from None
        except Exception as exc:
            # gunicorn raises NoMoreData (an OSError) or a chunk parse error when the
            # client goes away or sends a broken chunked body.
            raise ClientDisconnected(
                f"the request body could not be read ({type(exc).__name__})"
            ) from exc

    return guarded_read


def _bounded(read: Reader, length: int | None) -> Reader:
    """Never read past Content-Length (servers other than gunicorn may block there)."""
    if length is None:
        return read
    left = length

    def bounded_read(n: int) -> bytes:
        nonlocal left
        if left <= 0:
            return b""
        chunk = read(min(n, left))
        left -= len(chunk)
        return chunk

    return bounded_read


def _query_filename(req: falcon.Request) -> str | None:
    return clean_filename(req.get_param("filename"))


def _disposition_filename(header: str | None) -> str | None:
    if not header:
        return None
    msg = Message()
    msg["Content-Disposition"] = header
    try:
        return clean_filename(msg.get_filename())
    except (ValueError, LookupError):
        raise BadRequest("the Content-Disposition header is malformed") from None
