"""Pure HTTP helpers for downloads: Range, conditional requests, Content-Disposition.

No I/O here, so every rule is unit-tested on its own.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import quote

_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


class Unsatisfiable(Exception):
    """A syntactically valid range that lies outside the representation (416)."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range a `Range` header asks for, or None to send the whole body.

    RFC 9110 14.2: a header we don't understand (other units, several ranges, garbage) is
    ignored and the full representation sent; a valid range wholly past the end is a 416.
    """
    if not header:
        return None
    match = _RANGE.fullmatch(header)
    if not match:
        return None  # multi-range or another unit: answer 200 with everything
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    end = size - 1 if not last else min(int(last), size - 1)
    if last and int(last) < start:
        return None  # invalid: ignore the header
    if start >= size:
        raise Unsatisfiable
    return ByteRange(start, end)


def etag_matches(header: str | None, etag: str) -> bool:
    """If-None-Match: weak comparison against our strong ETag (`"…"`), `*` matches."""
    if not header:
        return False
    for candidate in header.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def if_range_allows(header: str | None, etag: str) -> bool:
    """If-Range: honour the Range only when the client's copy is still current (strong
    ETag comparison; a date never matches, so the full body is sent)."""
    return header is None or header.strip() == etag


def content_disposition(filename: str | None, disposition: str = "inline") -> str:
    """RFC 6266 with an ASCII fallback and an RFC 8187 `filename*` for the real name.

    Control characters, quotes and backslashes never reach the header; a name that leaves
    nothing printable gets no filename parameter at all.
    """
    if not filename:
        return disposition
    name = "".join(ch for ch in filename if ch.isprintable()).strip()
    if not name:
        return disposition
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    ascii_name = re.sub(r"[^A-Za-z0-9._ ()+,=@-]", "_", ascii_name).strip()
    stem, dot, ext = ascii_name.rpartition(".")
    if dot and not stem.strip("._ "):  # nothing left of the name but its extension
        ascii_name = f"image.{ext}" if ext else "image"
    elif not ascii_name.strip("._ "):
        ascii_name = "image"
    header = f'{disposition}; filename="{ascii_name}"'
    if ascii_name != name:
        header += f"; filename*=UTF-8''{quote(name, safe='')}"
    return header
