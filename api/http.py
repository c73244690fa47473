"""Pure HTTP helpers for downloads: Range, conditional requests, Content-Disposition.

No I/O here, so every rule is unit-tested on its own.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import quote

# RFC 9110 14.1: range units are case-insensitive. Digits are ASCII only (`\d` would also take
# other scripts' digits, which int() then reads as numbers).
_RANGE = re.compile(
    r"[ \t]*bytes[ \t]*=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*", re.IGNORECASE | re.ASCII
)
# A position with more significant digits lies past any representation we can hold (S3 objects
# end below 5 TiB, 13 digits). Such numbers are compared as digit strings, never passed to int():
# int() refuses more than 4,300 digits (sys.get_int_max_str_digits), which was a 500.
_MAX_DIGITS = 18


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
    Positions of any length are valid: a first position beyond the end is a 416, a last
    position or suffix length beyond it means "to the end" / "all of it".
    """
    if not header:
        return None
    match = _RANGE.fullmatch(header)
    if not match:
        return None  # multi-range or another unit: answer 200 with everything
    first, last = _significant(match.group(1)), _significant(match.group(2))
    if first is None and last is None:
        return None
    if first is None:  # suffix: the last N bytes
        assert last is not None
        suffix = _position(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return ByteRange(0 if suffix is None else max(0, size - suffix), size - 1)
    if last is not None and (len(last), last) < (len(first), first):
        return None  # last-pos before first-pos: invalid, ignore the header
    start = _position(first)
    if start is None or start >= size:
        raise Unsatisfiable
    end = _position(last) if last is not None else None
    return ByteRange(start, size - 1 if end is None else min(end, size - 1))


def _significant(digits: str) -> str | None:
    """The digits without leading zeros ("0" for zero), None when there are none."""
    return (digits.lstrip("0") or "0") if digits else None


def _position(digits: str) -> int | None:
    """The number, or None when it is beyond any size (too many digits to matter)."""
    return int(digits) if len(digits) <= _MAX_DIGITS else None


def etag_matches(header: str | None, etag: str) -> bool:
    """If-None-Match: weak comparison against our strong ETag (`"…"`), `*` matches."""
    if not header:
        return False
    for candidate in header.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def modified_since(header: str | None, modified: datetime) -> bool:
    """If-Modified-Since (RFC 9110 13.1.3): False when the client's copy, dated by the header,
    is current (`modified`, to the second as Last-Modified sends it, is not later), so a 304
    is due. A missing or unparseable date is ignored (True). The caller checks the rest of
    the rule: GET/HEAD only, and only without If-None-Match."""
    if not header:
        return True
    try:
        since = parsedate_to_datetime(header.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return True
    if since.tzinfo is None:  # "-0000": a date in UTC with no zone information
        since = since.replace(tzinfo=UTC)
    return modified.replace(microsecond=0) > since


def if_range_allows(header: str | None, etag: str) -> bool:
    """If-Range: honour the Range only when the client's copy is still current (strong
    ETag comparison; a date never matches, so the full body is sent)."""
    return header is None or header.strip() == etag


def content_disposition(filename: str | None, disposition: str = "inline") -> str:
    """RFC 6266 with an ASCII fallback and an RFC 8187 `filename*` for the real name.

    Control characters, quotes and backslashes never reach the header; a name that leaves
    nothing printable gets no filename parameter at all.
    """
    # SECURITY: the uploader's file name goes into a header the downloader's browser reads:
    # no CR/LF (header injection), the quoted fallback keeps only [A-Za-z0-9._ ()+,=@-] (no
    # quote, backslash or ';'), and the real name is percent-encoded (RFC 8187).
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
