"""The upload body of a request, as one `Source` of the image bytes.

Reads `req.stream` (never `bounded_stream`: it reads chunked bodies as empty), accepts a raw
body or multipart/form-data with one file, with Content-Length or chunked, and turns every
failure of the client's connection into a domain error.

A raw body with Content-Length under gunicorn is read straight from the socket into the part
buffers (`SocketBody`): gunicorn's own body reader copies every byte about six times through
BytesIO buffers, which cost more CPU than hashing and uploading together (bench/upload.py).

Nothing here reads a byte of the body before the ingest loop asks for it — a multipart file
part's headers included — so every check on the request's headers (declared size, callback,
id lease) is answered at once, without waiting for the client to send its body.

This module is also the one adapter to gunicorn's internals (`SocketBody`, `body_unread`,
`force_close`); each shape it relies on is checked, and tests/integration/test_bad_inputs.py
fails when one moves.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from typing import Any

import falcon

from api.multipart import FilePart, open_file_part, parse_boundary
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
    # From ?filename= or Content-Disposition; a multipart file part's own name comes first.
    given_filename: str | None

    @property
    def filename(self) -> str | None:
        """The client's name for the file (a multipart part's is known once it was read)."""
        part_name = self.source.filename if isinstance(self.source, FilePartSource) else None
        return part_name or self.given_filename


def upload_body(req: falcon.Request, read_timeout: float) -> UploadBody:
    """Wrap the request body; the image bytes are read later, once, by the ingest loop."""
    _check_transfer_coding(req.get_header("Transfer-Encoding"))
    _set_read_timeout(req.env, read_timeout)
    length = req.content_length
    if req.content_type and req.content_type.lower().startswith("multipart/form-data"):
        boundary = parse_boundary(req.content_type)
        part = FilePartSource(_guarded(req.stream.read), boundary)
        return UploadBody(part, None, length, _query_filename(req))
    name = _query_filename(req) or _disposition_filename(req.get_header("Content-Disposition"))
    source: Source | None = SocketBody.attach(req.env, length) if length is not None else None
    if source is None:
        source = ReadSource(_bounded(_guarded(req.stream.read), length))
    return UploadBody(source, length, length, name)


def _check_transfer_coding(header: str | None) -> None:
    """Only `chunked` is a transfer coding we undo. gunicorn 27 refuses codings that do not
    end in chunked but passes `gzip, chunked` on with only the chunking removed: the image
    would be stored still compressed."""
    if header is None:
        return
    codings = [c.strip(" \t").lower() for c in header.split(",") if c.strip(" \t")]
    if codings != ["chunked"]:
        raise BadRequest(
            f"Transfer-Encoding {header.strip()!r} is not supported: send the image as is,"
            " with Content-Length or Transfer-Encoding: chunked"
        )


class FilePartSource:
    """The file part of a multipart body as a Source, opened (its headers awaited) on the
    first read rather than when the request arrives."""

    def __init__(self, read: Callable[[int], bytes], boundary: bytes) -> None:
        self._read = read
        self._boundary = boundary
        self._part: FilePart | None = None

    @property
    def filename(self) -> str | None:
        return clean_filename(self._part.filename) if self._part else None

    def readinto(self, view: memoryview) -> int:
        if self._part is None:
            self._part = open_file_part(self._read, self._boundary, chunk_size=_MULTIPART_CHUNK)
        chunk = self._part.read(len(view))
        view[: len(chunk)] = chunk
        return len(chunk)


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


def body_unread(env: dict[str, Any]) -> bool:
    """Whether the request declared a body that is not yet read to its end.

    Under gunicorn its reader says so exactly; under any other server a declared body is
    assumed unread (closing a connection too often only costs a reconnect).
    """
    chunked = "HTTP_TRANSFER_ENCODING" in env
    if not chunked and env.get("CONTENT_LENGTH", "0").strip() in ("", "0"):
        return False
    reader: Any = getattr(env.get("wsgi.input"), "reader", None)
    kind = type(reader).__name__
    if kind == "LengthReader" and isinstance(getattr(reader, "length", None), int):
        return bool(reader.length > 0)
    if kind == "ChunkedReader" and hasattr(reader, "parser"):
        return bool(reader.parser is not None)  # None once the last chunk was read
    return True


def force_close(env: dict[str, Any]) -> bool:
    """Make gunicorn close the connection after this answer and say `Connection: close`.

    gunicorn drops the application's `Connection` header (hop-by-hop) and has no public way to
    ask for a close: it announces keep-alive, drains up to 64 KiB of the unread body and then
    closes anyway, under a client that was told it could send its next request there. Its
    Response has `force_close()` (what gunicorn itself calls at max_requests); the only way to
    it from a WSGI application is the `wsgi.early_hints` callback gunicorn 27 puts in every
    environ, a closure over that Response. Returns whether it worked.
    """
    hints = env.get("wsgi.early_hints")
    code, cells = getattr(hints, "__code__", None), getattr(hints, "__closure__", None)
    if code is None or not cells:
        return False
    captured = dict(zip(code.co_freevars, cells, strict=False))
    try:
        response = captured["resp"].cell_contents
    except (KeyError, ValueError):
        return False
    if type(response).__module__ != "gunicorn.http.wsgi" or not hasattr(response, "force_close"):
        return False
    response.force_close()
    return True
