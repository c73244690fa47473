"""The upload body of a request, as one `Source` of the image bytes.

Reads `req.stream` (never `bounded_stream`: it reads chunked bodies as empty), accepts a raw
body or multipart/form-data with one file, with Content-Length or chunked, and turns every
failure of the client's connection into a domain error.

A raw body, with Content-Length or chunked, under gunicorn is read straight from the socket
into the part buffers (api/gunicorn.py `socket_body`, the one adapter to gunicorn's internals).

Nothing here reads a byte of the body before the ingest loop asks for it — a multipart file
part's headers included — so every check on the request's headers (declared size, callback,
id lease) is answered at once, without waiting for the client to send its body.

A multipart body may carry the form fields `alt` and `metadata` (FORM_FIELDS), before or
after the file part, as browsers' FormData sends fields in the order they were appended.
Those before the file are kept while the file part is looked for, those after it while the
rest of the body is checked, each at most METADATA_MAX_TEXT bytes; the file is never held.
So they are known once the body has been read to its end — after the original was stored,
before the record is committed — and an invalid one fails the upload then
(`UploadBody.annotations`), with what was stored deleted again (api/uploads.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message

import falcon

from api.gunicorn import body_read_error, set_read_timeout, socket_body
from api.multipart import FilePart, open_file_part, parse_boundary
from core.errors import BadRequest
from core.ingest import ReadSource, Source
from core.models import (
    METADATA_MAX_TEXT,
    Annotations,
    clean_filename,
    parse_metadata,
    validate_alt,
)

_MULTIPART_CHUNK = 256 * 1024  # the multipart parser's read size: small enough to reject early
FORM_FIELDS = frozenset({"alt", "metadata"})  # the multipart fields an upload reads


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

    def annotations(self, given: Annotations) -> Annotations:
        """`given` (the query's or the headers') with a multipart body's `alt` and
        `metadata` fields; call once the body has been read to its end. Each may come from
        one place only (BadRequest otherwise); InvalidAlt/InvalidMetadata as for `given`."""
        if not isinstance(self.source, FilePartSource):
            return given
        fields = self.source.fields
        alt, metadata = given.alt, given.metadata
        if "alt" in fields:
            if alt is not None:
                raise BadRequest("alt is given twice: as a form field and in the query or a header")
            alt = validate_alt(_field_text(fields, "alt"))
        if "metadata" in fields:
            if metadata is not None:
                raise BadRequest(
                    "metadata is given twice: as a form field and in the query or a header"
                )
            metadata = parse_metadata(_field_text(fields, "metadata"))
        return Annotations(alt, metadata)


def upload_body(req: falcon.Request, read_timeout: float) -> UploadBody:
    """Wrap the request body; the image bytes are read later, once, by the ingest loop."""
    _check_transfer_coding(req.get_header("Transfer-Encoding"))
    set_read_timeout(req.env, read_timeout)
    length = req.content_length
    if req.content_type and req.content_type.lower().startswith("multipart/form-data"):
        boundary = parse_boundary(req.content_type)
        part = FilePartSource(_guarded(req.stream.read), boundary)
        return UploadBody(part, None, length, _query_filename(req))
    name = _query_filename(req) or _disposition_filename(req.get_header("Content-Disposition"))
    source: Source | None = socket_body(req.env, length)  # Content-Length or chunked
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

    @property
    def fields(self) -> dict[str, bytes]:
        """The FORM_FIELDS the body carries, raw: complete once the file has been read to
        its end (fields may follow it), and only then."""
        if self._part is None or not self._part.done:
            raise RuntimeError("the form fields are known once the body has been read")
        return self._part.fields

    def readinto(self, view: memoryview) -> int:
        if self._part is None:
            self._part = open_file_part(
                self._read,
                self._boundary,
                chunk_size=_MULTIPART_CHUNK,
                capture=FORM_FIELDS,
                max_field_bytes=METADATA_MAX_TEXT,
            )
        chunk = self._part.read(len(view))
        view[: len(chunk)] = chunk
        return len(chunk)


def _guarded(read: Callable[[int], bytes]) -> Callable[[int], bytes]:
    def guarded_read(n: int) -> bytes:
        try:
            return read(n)
        except Exception as exc:
            raise body_read_error(exc) from exc

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


def _field_text(fields: dict[str, bytes], name: str) -> str:
    try:
        return fields[name].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"the form field {name!r} is not UTF-8 text") from None


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


def read_capped(read: Callable[[int], bytes], limit: int) -> bytes:
    """A small body (a JSON request) read to its end or to `limit` bytes, whichever comes
    first; the client's failures become domain errors."""
    data = bytearray()
    while len(data) < limit:
        try:
            chunk = read(limit - len(data))
        except Exception as exc:
            raise body_read_error(exc) from exc
        if not chunk:
            break
        data += chunk
    return bytes(data)
