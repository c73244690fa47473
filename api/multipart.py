"""Streaming reader for the file part of a `multipart/form-data` request body.

Falcon's multipart support needs a Content-Length; uploads may be chunked, and they must reach S3
without being held in memory. This module works on any `read(n) -> bytes` callable, only ever asks
it for `chunk_size` bytes at a time, and keeps at most about `chunk_size + n` bytes alive
(plus `max_header_bytes` while a header block is being parsed).

Body layout (RFC 2046 §5.1.1, RFC 7578), with `D = CRLF "--" boundary`:

    preamble D [padding] CRLF headers CRLF CRLF content D ... D "--" epilogue

The stream is scanned as if it began with an extra CRLF, so the first delimiter (which has no CRLF
before it) looks exactly like every later one and the preamble is just "content" to skip.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from core.errors import BadRequest, ClientDisconnected

__all__ = ["FilePart", "open_file_part", "parse_boundary"]

Reader = Callable[[int], bytes]

_TRUNCATED = "request body ended before the multipart closing boundary"
# RFC 2046 bcharsnospace; a space is also allowed, except as the last character.
_BCHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'()+_,-./:=? ")
_PADDING = b" \t"  # RFC 2046 transport-padding allowed after a delimiter


# --- header values --------------------------------------------------------------------------


def _read_quoted(text: str, start: int) -> tuple[str, int]:
    """Quoted string opening at text[start]; returns (value, index after the closing quote).

    Browsers, urllib3 and curl's default percent-encode `"` (WHATWG) and send a backslash as is,
    while RFC 2616-style senders (curl --form-escape) backslash-escape `"` and `\\`. Treating a
    backslash as an escape only before those two characters reads both styles the same way.
    """
    out: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in '"\\':
            i += 1
            ch = text[i]
        out.append(ch)
        i += 1
    # Unterminated: a WHATWG value that ends in a backslash (`"photo\"`) looks like this.
    end = text.find('"', start + 1)
    if end < 0:
        raise BadRequest("unterminated quoted string in multipart header")
    return text[start + 1 : end], end + 1


def _parse_params(text: str) -> dict[str, str]:
    """`; name=value; name="quoted"` → {lower-case name: value}. BadRequest if malformed."""
    params: dict[str, str] = {}
    i = 0
    while i < len(text):
        if text[i] in " \t;":
            i += 1
            continue
        eq = text.find("=", i)
        name = text[i:eq].strip().lower() if eq >= 0 else ""
        if not name or any(c in name for c in ' \t;"'):
            raise BadRequest("malformed parameter in multipart header")
        i = eq + 1
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == '"':
            value, i = _read_quoted(text, i)
        else:
            end = text.find(";", i)
            end = len(text) if end < 0 else end
            value, i = text[i:end].strip(), end
        if name in params:
            # Two readers could disagree on which one counts; refuse instead of guessing.
            raise BadRequest(f"duplicate parameter {name!r} in multipart header")
        params[name] = value
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] != ";":
            raise BadRequest("malformed parameter in multipart header")
    return params


def _split_value(value: str) -> tuple[str, dict[str, str]]:
    """`type; params...` → (lower-case type, params)."""
    kind, _, rest = value.partition(";")
    return kind.strip().lower(), _parse_params(rest)


def parse_boundary(content_type: str) -> bytes:
    """From a Content-Type header value `multipart/form-data; boundary=...` (quoted or not,
    RFC 2046: 1-70 chars from the allowed set) -> boundary bytes. BadRequest if missing/invalid."""
    kind, params = _split_value(content_type)
    if kind != "multipart/form-data":
        raise BadRequest("Content-Type must be multipart/form-data")
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= 70 or boundary.endswith(" ") or not _BCHARS.issuperset(boundary):
        raise BadRequest("missing or invalid multipart boundary")
    return boundary.encode("ascii")


def _decode_ext_value(value: str) -> str | None:
    """RFC 5987 `charset'lang'percent-encoded` → str, None if unusable (then filename= is used)."""
    parts = value.split("'", 2)
    if len(parts) != 3 or parts[0].lower() not in ("utf-8", "iso-8859-1"):
        return None
    try:
        return unquote_to_bytes(parts[2]).decode(parts[0].lower())
    except UnicodeDecodeError:
        return None


def _parse_headers(block: bytes) -> dict[str, str]:
    """Part header block (CRLF-separated lines, no final blank line) → {lower-case name: value}."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        text = block.decode("latin-1")  # never fails; keeps legacy 8-bit filenames readable
    lines: list[str] = []
    for line in text.split("\r\n") if text else []:
        if line[:1] in (" ", "\t") and lines:  # obsolete line folding (RFC 5322)
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        name = name.lower()
        if not sep or not name or name != name.strip() or "\r" in line or "\n" in line:
            raise BadRequest("malformed multipart part header")
        if name in headers:
            raise BadRequest(f"duplicate {name} header in multipart part")
        headers[name] = value.strip()
    return headers


class _PartInfo:
    """What a part's headers say about it."""

    def __init__(self, block: bytes) -> None:
        headers = _parse_headers(block)
        disposition = headers.get("content-disposition")
        if disposition is None:
            raise BadRequest("multipart part has no Content-Disposition header")
        kind, params = _split_value(disposition)
        if kind != "form-data":
            raise BadRequest("multipart part is not form-data")
        self.field_name = params.get("name", "")
        # RFC 7578 §4.2: a part is a file when it carries a filename (browsers send filename=""
        # for an empty file input, which still counts as a file).
        self.is_file = "filename" in params or "filename*" in params
        extended = params.get("filename*")
        decoded = _decode_ext_value(extended) if extended is not None else None
        self.filename = decoded if decoded is not None else params.get("filename")
        self.content_type = headers.get("content-type")


# --- the stream -----------------------------------------------------------------------------


class _Scanner:
    """Buffer over `read` that finds delimiters and hands out content without copying it twice.

    Invariants: `_buf[_pos:_safe]` is content known to precede the next delimiter; `_delim_at` is
    where that delimiter starts once it has been found (then `_safe == _delim_at`).
    """

    def __init__(self, read: Reader, boundary: bytes, chunk_size: int, max_header: int) -> None:
        self._read = read
        self._delim = b"\r\n--" + boundary
        self._chunk = chunk_size
        self.max_header = max_header
        self._buf = b"\r\n"  # see the module docstring
        self._view = memoryview(self._buf)
        self._pos = 0
        self._safe = 0
        self._delim_at: int | None = None
        self._base = -2  # stream offset of _buf[0]; -2 because of the virtual CRLF
        self._eof = False
        self.saw_delimiter = False
        self._search()

    @property
    def offset(self) -> int:
        """Stream offset of the next unconsumed byte."""
        return self._base + self._pos

    # -- input

    def _fill(self) -> bool:
        """Append up to chunk_size bytes from `read` (dropping consumed ones); False at EOF.

        Collects short reads into one join so a trickling reader stays linear, not quadratic.
        """
        pieces: list[bytes | memoryview] = []
        if self._pos < len(self._buf):
            pieces.append(self._view[self._pos :])
        got = 0
        while got < self._chunk and not self._eof:
            data = self._read(self._chunk - got)
            if not data:
                self._eof = True
            else:
                pieces.append(data)
                got += len(data)
        if not got:
            return False
        self._base += self._pos
        self._safe -= self._pos
        self._pos = 0
        # join of a single bytes object returns it as is: no copy in the common case
        self._buf = b"".join(pieces)
        self._view = memoryview(self._buf)
        return True

    def _eof_error(self) -> Exception:
        if not self.saw_delimiter:
            # Nothing multipart arrived at all: a wrong boundary or a non-multipart body is
            # far likelier than a client vanishing before its first delimiter.
            return BadRequest("multipart body does not contain the boundary")
        return ClientDisconnected(_TRUNCATED)

    def _ensure(self, n: int) -> None:
        while len(self._buf) - self._pos < n:
            if not self._fill():
                raise self._eof_error()

    # -- content

    def _search(self) -> None:
        """Extend the known-content region over newly buffered bytes."""
        buf, delim = self._buf, self._delim
        found = buf.find(delim, self._safe)
        if found >= 0:
            self._delim_at = self._safe = found
            return
        # Hold back only a tail that could be the start of a delimiter cut by the chunk end.
        cr = buf.find(b"\r", max(self._safe, len(buf) - len(delim) + 1))
        while cr >= 0 and not delim.startswith(buf[cr:]):
            cr = buf.find(b"\r", cr + 1)
        self._safe = len(buf) if cr < 0 else cr

    # In content mode everything buffered has been searched: _search runs at the start of each
    # part and after each _fill, so only a held-back tail can be undecided.

    def content(self, limit: int) -> bytes | memoryview | None:
        """Up to `limit` (> 0) content bytes of the current part; None at its delimiter."""
        while self._pos >= self._safe:
            if self._delim_at is not None:
                return None
            if not self._fill():
                raise self._eof_error()
            self._search()
        start = self._pos
        self._pos = min(self._safe, start + limit)
        if start == 0 and self._pos == len(self._buf):
            return self._buf
        return self._view[start : self._pos]

    def take_content(self, limit: int, error: str) -> bytes:
        """The current part's content up to its delimiter, at most `limit` bytes of it;
        BadRequest(error) past that (it is never held whole: reading stops at limit + 1)."""
        pieces: list[bytes] = []
        taken = 0
        while (piece := self.content(limit + 1 - taken)) is not None:
            pieces.append(bytes(piece))  # a view into the buffer the next fill replaces
            taken += len(piece)
            if taken > limit:
                raise BadRequest(error)
        return b"".join(pieces)

    def skip_content(self, budget_end: int, error: str) -> None:
        """Consume content up to the next delimiter; BadRequest(error) past offset budget_end."""
        while True:
            self._pos = self._safe
            if self.offset > budget_end:
                raise BadRequest(error)
            if self._delim_at is not None:
                return
            if not self._fill():
                raise self._eof_error()
            self._search()

    # -- structure

    def next_part(self) -> bytes | None:
        """At a delimiter: consume it; return the next part's header block, None if it closes."""
        assert self._delim_at == self._pos
        self._pos = self._safe = self._pos + len(self._delim)
        self._delim_at = None
        self.saw_delimiter = True
        self._ensure(2)
        if self._buf[self._pos : self._pos + 2] == b"--":
            self._pos += 2
            self._safe = self._pos
            return None
        self._end_delimiter_line()
        # Searching from the delimiter's own CRLF also finds an empty header block.
        # The block between that CRLF and the blank line may be max_header bytes long.
        error = f"multipart part headers exceed {self.max_header} bytes"
        end = self._find(b"\r\n\r\n", self.max_header + 2, error)
        block = self._buf[self._pos + 2 : end]
        self._pos = self._safe = end + 4
        self._search()
        return block

    def _end_delimiter_line(self) -> None:
        """Skip transport padding up to the CRLF that ends a delimiter line (left unconsumed).

        Checked byte by byte so that junk (or a bare LF) is a BadRequest at once, not a
        ClientDisconnected after a search for a CRLF that never comes.
        """
        limit = self.offset + self.max_header
        while True:
            self._ensure(1)
            if self._buf[self._pos] not in _PADDING:
                break
            self._pos += 1
            if self.offset > limit:
                raise BadRequest("malformed multipart delimiter line")
        self._ensure(2)
        if self._buf[self._pos : self._pos + 2] != b"\r\n":
            raise BadRequest("malformed multipart delimiter line")

    def _find(self, needle: bytes, limit: int, error: str) -> int:
        """Index of needle starting at most `limit` bytes after _pos; BadRequest(error) if none."""
        window = limit + len(needle)
        scanned = 0  # bytes after _pos already known not to start a match
        while True:
            found = self._buf.find(needle, self._pos + scanned, self._pos + window)
            if found >= 0:
                return found
            if len(self._buf) - self._pos >= window:
                raise BadRequest(error)
            scanned = max(0, len(self._buf) - self._pos - len(needle) + 1)
            if not self._fill():
                raise self._eof_error()

    def drain_epilogue(self, budget_end: int, error: str) -> None:
        """Consume everything up to EOF (the epilogue is ignored, RFC 2046)."""
        while True:
            self._pos = self._safe = len(self._buf)
            if self.offset > budget_end:
                raise BadRequest(error)
            if not self._fill():
                return


class _Fields:
    """The non-file fields a caller asked for (`capture`), kept as raw bytes; every other
    field is skipped. Each may appear once and hold at most `max_bytes`."""

    def __init__(self, capture: frozenset[str], max_bytes: int) -> None:
        self.capture = capture
        self.max_bytes = max_bytes
        self.values: dict[str, bytes] = {}

    def take_or_skip(self, scanner: _Scanner, info: _PartInfo, budget_end: int, error: str) -> None:
        name = info.field_name
        if name not in self.capture:
            scanner.skip_content(budget_end, error)
            return
        if name in self.values:
            # Two readers could disagree on which one counts; refuse instead of guessing.
            raise BadRequest(f"the form field {name!r} appears more than once")
        self.values[name] = scanner.take_content(
            self.max_bytes, f"the form field {name!r} is longer than {self.max_bytes} bytes"
        )
        if scanner.offset > budget_end:
            raise BadRequest(error)


class FilePart:
    """The first file part of a multipart/form-data body, readable as a stream.

    Read until it returns b'': reaching the end of the part also checks the rest of the body
    (remaining fields, closing delimiter) and consumes it. `fields` holds the captured
    fields: those before the file once it is open, those after it once it was read to its
    end (`done`).
    """

    filename: str | None  # from filename*= (RFC 5987) if decodable, else filename=; raw
    field_name: str
    content_type: str | None  # the part's Content-Type header, raw

    def __init__(
        self, scanner: _Scanner, info: _PartInfo, max_skipped_bytes: int, fields: _Fields
    ) -> None:
        self.filename = info.filename
        self.field_name = info.field_name
        self.content_type = info.content_type
        self._scanner = scanner
        self._max_skipped = max_skipped_bytes
        self._fields = fields
        self._done = False

    @property
    def fields(self) -> dict[str, bytes]:
        """Captured field name -> its raw content (see `open_file_part`'s `capture`)."""
        return self._fields.values

    @property
    def done(self) -> bool:
        """The file and everything after it have been read (and checked)."""
        return self._done

    def read(self, n: int) -> bytes:
        """Exactly n bytes of the file's content, fewer only at the end of the part, b'' after it.
        n > 0 required."""
        if n <= 0:
            raise ValueError("n must be positive")
        if self._done:
            return b""
        pieces: list[bytes | memoryview] = []
        need = n
        while need:
            piece = self._scanner.content(need)
            if piece is None:
                self._finish()
                break
            pieces.append(piece)
            need -= len(piece)
        return b"".join(pieces)

    def _finish(self) -> None:
        """Check and consume everything after the file part, up to the end of the stream."""
        scanner = self._scanner
        budget_end = scanner.offset + self._max_skipped
        error = f"multipart data after the file exceeds {self._max_skipped} bytes"
        while (block := scanner.next_part()) is not None:
            info = _PartInfo(block)
            if info.is_file:
                raise BadRequest("only one file per request")
            self._fields.take_or_skip(scanner, info, budget_end, error)
        scanner.drain_epilogue(budget_end, error)
        self._done = True


def open_file_part(
    read: Reader,
    boundary: bytes,
    *,
    max_header_bytes: int = 16 * 1024,
    max_skipped_bytes: int = 1024 * 1024,
    chunk_size: int = 1024 * 1024,
    capture: frozenset[str] = frozenset(),
    max_field_bytes: int = 16 * 1024,
) -> FilePart:
    """Consume the preamble and any non-file fields before the first part that has a filename
    (skipping at most max_skipped_bytes of them), parse its headers, return a FilePart positioned
    at its first content byte.

    Fields named in `capture` are kept (at most max_field_bytes each, within the same budget)
    in the FilePart's `fields`; one of them given twice is a BadRequest. Fields after the file
    are kept once the file has been read to its end: only a bounded field is ever held, never
    the file.

    A part "has a filename" when its Content-Disposition carries filename= or filename*=, even
    empty. Errors: BadRequest for a malformed body or one without a file part; ClientDisconnected
    when the stream ends early. Exceptions raised by `read` propagate unchanged.
    """
    if chunk_size <= 0 or max_header_bytes <= 0 or max_skipped_bytes < 0:
        raise ValueError("chunk_size and max_header_bytes must be > 0, max_skipped_bytes >= 0")
    if not 1 <= len(boundary) <= 70:
        raise ValueError("boundary must come from parse_boundary")
    scanner = _Scanner(read, boundary, chunk_size, max_header_bytes)
    fields = _Fields(capture, max_field_bytes)
    error = f"multipart fields before the file exceed {max_skipped_bytes} bytes"
    budget_end = max_skipped_bytes
    scanner.skip_content(budget_end, error)  # the preamble
    while (block := scanner.next_part()) is not None:
        info = _PartInfo(block)
        if info.is_file:
            return FilePart(scanner, info, max_skipped_bytes, fields)
        fields.take_or_skip(scanner, info, budget_end, error)
    raise BadRequest("multipart body has no file part")
