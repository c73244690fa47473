"""The upload body of a request, as one `Source` of the image bytes.

Reads `req.stream` (never `bounded_stream`: it reads chunked bodies as empty), accepts a raw
body or multipart/form-data with one file, with Content-Length or chunked, and turns every
failure of the client's connection into a domain error.

A raw body with Content-Length under gunicorn is read straight from the socket into the part
buffers (`SocketBody`): gunicorn's own body reader copies every byte about six times through
BytesIO buffers, which cost more CPU than hashing and uploading together (bench/upload.py).
"""

from __future__ import annotations

import io
import socket
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from typing import Any

import falcon

from api.multipart import open_file_part, parse_boundary
from core.errors import BadRequest, ClientDisconnected, ClientTimeout
from core.ingest import ReadSource, Source
from core.models import clean_filename

_MULTIPART_CHUNK = 256 * 1024  # the multipart parser's read size: small enough to reject early


@dataclass(frozen=True, slots=True)
class UploadBody:
    source: Source
    # The image's length when known up front: Content-Length of a raw body (a multipart
    # envelope's length is not the image's).
    declared_size: int | None
    # Content-Length of the whole request, multipart envelope included.
    request_length: int | None
    filename: str | None


def upload_body(req: falcon.Request, read_timeout: float) -> UploadBody:
    """Wrap the request body; the image bytes are read later, once, by the ingest loop."""
    _set_read_timeout(req.env, read_timeout)
    length = req.content_length
    if req.content_type and req.content_type.lower().startswith("multipart/form-data"):
        read = _guarded(req.stream.read)
        part = open_file_part(read, parse_boundary(req.content_type), chunk_size=_MULTIPART_CHUNK)
        name = clean_filename(part.filename) or _query_filename(req)
        return UploadBody(ReadSource(part.read), None, length, name)
    name = _query_filename(req) or _disposition_filename(req.get_header("Content-Disposition"))
    source: Source | None = SocketBody.attach(req.env, length) if length is not None else None
    if source is None:
        source = ReadSource(_bounded(_guarded(req.stream.read), length))
    return UploadBody(source, length, length, name)


def _set_read_timeout(env: dict[str, Any], seconds: float) -> None:
    # gunicorn sets no read timeout on bodies: a client that stalls would hold this thread
    # forever. With one set, the stalled read raises TimeoutError (-> 408).
    sock = env.get("gunicorn.socket")
    if isinstance(sock, socket.socket):
        sock.settimeout(seconds)


def _client_error(exc: BaseException) -> Exception:
    """What a failed body read means to the client."""
    if isinstance(exc, TimeoutError):
        return ClientTimeout("the client sent no data for too long; upload cancelled")
    # gunicorn raises NoMoreData (an OSError) or a chunk parse error when the client goes
    # away or sends a broken chunked body.
    return ClientDisconnected(f"the request body could not be read ({type(exc).__name__})")


def _guarded(read: Callable[[int], bytes]) -> Callable[[int], bytes]:
    def guarded_read(n: int) -> bytes:
        try:
            return read(n)
        except Exception as exc:
            raise _client_error(exc) from exc

    return guarded_read


def _bounded(read: Callable[[int], bytes], length: int | None) -> Callable[[int], bytes]:
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


class SocketBody:
    """A Content-Length body read with recv_into from gunicorn's socket.

    Bytes gunicorn already buffered (read together with the headers) are served first; the
    count is written back to gunicorn's LengthReader so keep-alive finds the body consumed.
    Only attached when gunicorn's objects have exactly the expected shape; otherwise the
    caller falls back to the portable `req.stream.read`.
    """

    def __init__(self, reader: Any, unreader: Any, sock: socket.socket, length: int) -> None:
        self.reader = reader
        self.unreader = unreader
        self.sock = sock
        self.left = length

    @classmethod
    def attach(cls, env: dict[str, Any], length: int) -> SocketBody | None:
        body = env.get("wsgi.input")
        reader = getattr(body, "reader", None)
        unreader = getattr(reader, "unreader", None)
        sock = getattr(unreader, "sock", None)
        shaped = (
            type(reader).__name__ == "LengthReader"
            and getattr(reader, "length", None) == length
            and isinstance(getattr(body, "buf", None), io.BytesIO)
            and body.buf.getbuffer().nbytes == 0  # type: ignore[union-attr]
            and isinstance(getattr(unreader, "buf", None), io.BytesIO)
            and isinstance(sock, socket.socket)
        )
        return cls(reader, unreader, sock, length) if shaped else None  # type: ignore[arg-type]

    def readinto(self, view: memoryview) -> int:
        n = min(len(view), self.left)
        if n == 0:
            return 0
        try:
            got = self._buffered_into(view, n) or self.sock.recv_into(view, n)
        except Exception as exc:
            raise _client_error(exc) from exc
        if got == 0:  # the client closed the connection mid-body
            raise ClientDisconnected(f"request body ended {self.left} bytes early")
        self.left -= got
        self.reader.length -= got
        return int(got)

    def _buffered_into(self, view: memoryview, n: int) -> int:
        held: io.BytesIO = self.unreader.buf
        data = held.getvalue()
        if not data:
            return 0
        take = min(n, len(data))
        view[:take] = data[:take]
        rest = io.BytesIO()
        rest.write(data[take:])  # anything past the body stays for gunicorn (pipelining)
        self.unreader.buf = rest
        return take


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
