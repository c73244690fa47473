"""Streaming image header sniffer: format, displayed size and orientation from a body's head.

While an upload streams in, the API keeps the first bytes of the body and calls
:func:`sniff` after each read. The sniffer answers from as few bytes as possible, without
decoding pixels and without any imaging library:

* :class:`Sniffed` once it knows the format, the size and the EXIF-style orientation
  (for a format the workers cannot decode, the format alone: it is refused anyway);
* :class:`NeedMore` with the exact head length its next step needs;
* :class:`~core.errors.NotAnImage` / :class:`~core.errors.CorruptImage` otherwise.

How it is built: every call re-parses from offset 0 (stateless, cheap: headers are small
and the caller only calls again once ``NeedMore.at_least`` bytes are there). Parsers read
through a :class:`_Head`. Reading past the end of the head raises ``_Short`` while more
bytes may come (turned into ``NeedMore``), or ``_Truncated`` once the body is final; each
parser decides whether a truncation means "dimensions unknown" (a JPEG whose frame header
lies beyond the caller's head cap) or corruption (a PNG cut inside IHDR). Structures
already received in full (an EXIF blob, a HEIF box) are read through a *strict* head,
where running off the end is corruption. Every loop is bounded.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from zlib import crc32

from core.errors import CorruptImage, NotAnImage

__all__ = [
    "MAX_SIDE",
    "MIME_TYPES",
    "SUPPORTED",
    "SUPPORTED_FORMATS",
    "NeedMore",
    "Sniffed",
    "sniff",
]

# Formats the workers decode: the sniffer reads their size and orientation.
_DECODED: dict[str, str] = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
    "webp": "image/webp",
    "avif": "image/avif",
    "heic": "image/heic",
    "tiff": "image/tiff",
    "bmp": "image/bmp",
}
# Formats recognised by their signature only (format, no size): the API refuses them with
# 415 whatever their header says.
_RECOGNISED: dict[str, str] = {
    "jp2": "image/jp2",
    "jxl": "image/jxl",
    "pnm": "image/x-portable-anymap",
    "svg": "image/svg+xml",
    "ico": "image/x-icon",
    "psd": "image/vnd.adobe.photoshop",
    "qoi": "image/qoi",
    "jxr": "image/jxr",
    "exr": "image/x-exr",
    "dds": "image/vnd-ms.dds",
    "icns": "image/icns",
    "hdr": "image/vnd.radiance",
}
# The one list of accepted formats: settings' default and the worker's decoders follow it.
SUPPORTED_FORMATS: tuple[str, ...] = tuple(_DECODED)
SUPPORTED: frozenset[str] = frozenset(_DECODED)
MIME_TYPES: dict[str, str] = _DECODED | _RECOGNISED

# The largest side the supported formats can store (PNG, BMP and TIFF use 31/32-bit sizes).
# A bigger claim is header corruption; big-but-legal sizes are the caller's pixel limit.
MAX_SIDE = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Sniffed:
    """What the head says. ``width``/``height`` are the DISPLAYED size (orientations 5-8
    swap the stored sides) and are both None when the head cannot tell (always, for a
    format outside SUPPORTED)."""

    format: str
    width: int | None
    height: int | None
    orientation: int

    @property
    def content_type(self) -> str:
        return MIME_TYPES[self.format]


@dataclass(frozen=True, slots=True)
class NeedMore:
    """Call again once the head holds at least ``at_least`` bytes (counted from offset 0)."""

    at_least: int


def sniff(head: bytes | bytearray | memoryview, final: bool) -> Sniffed | NeedMore:
    """Identify the image whose body starts with ``head``.

    ``final=True`` means no more bytes will come (end of body, or the caller's head cap):
    then the answer is never NeedMore. Raises NotAnImage when no image signature matches
    and CorruptImage when the header of a SUPPORTED format is invalid.
    """
    data = head if isinstance(head, bytes) else bytes(head)
    if not data:
        if final:
            raise NotAnImage("the body is empty")
        return NeedMore(1)
    key = _identify(data, final)
    if isinstance(key, int):
        return NeedMore(max(key, len(data) + 1))
    if key not in _PARSERS:
        return Sniffed(key, None, None, 1)
    parser, label = _PARSERS[key]
    try:
        return parser(_Head(data, final, label))
    except _Short as short:
        return NeedMore(max(short.at_least, len(data) + 1))
    except _Truncated:
        raise CorruptImage(f"the {label} header is truncated") from None


# --------------------------------------------------------------------------- head reading


class _Short(Exception):
    """More bytes may come; the current step needs the head to hold ``at_least`` bytes."""

    def __init__(self, at_least: int) -> None:
        super().__init__(at_least)
        self.at_least = at_least


class _Truncated(Exception):
    """The body is complete and a parser needed bytes past its end."""


class _Head:
    """The bytes received so far, with bounds-checked reads (see the module docstring)."""

    __slots__ = ("data", "final", "label", "strict")

    def __init__(self, data: bytes, final: bool, label: str, strict: bool = False) -> None:
        self.data = data
        self.final = final
        self.label = label
        self.strict = strict

    def need(self, n: int, ask: int = 0) -> None:
        """Make sure ``n`` bytes are there. ``ask`` (>= n) is what to request when they are
        not, for a caller that already knows the step after this one needs that much."""
        if n <= len(self.data):
            return
        if self.strict:
            raise CorruptImage(f"the {self.label} header is malformed")
        if self.final:
            raise _Truncated
        raise _Short(max(n, ask))

    def unpack(self, fmt: str, offset: int) -> tuple[Any, ...]:
        self.need(offset + struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.data, offset)

    def sub(self, start: int, end: int) -> _Head:
        """A strict head over ``data[start:end]`` (a structure that must be complete)."""
        self.need(end)
        return _Head(self.data[start:end], True, self.label, strict=True)


def _run_end(pattern: re.Pattern[bytes], data: bytes, pos: int) -> int:
    """Where a run of ``pattern`` starting at ``pos`` ends (``pos`` when there is none)."""
    run = pattern.match(data, pos)
    return pos if run is None else run.end()


def _corrupt(label: str, what: str) -> CorruptImage:
    return CorruptImage(f"the {label} header is invalid: {what}")


def _sized(fmt: str, width: int, height: int, orientation: int = 1) -> Sniffed:
    """Validate stored dimensions, then build the answer with the displayed size."""
    _check_size(fmt, width, height)
    if not 1 <= orientation <= 8:
        orientation = 1
    if orientation >= 5:  # the transposing orientations swap the sides on display
        width, height = height, width
    return Sniffed(fmt, width, height, orientation)


def _check_size(fmt: str, width: int, height: int) -> None:
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise _corrupt(fmt.upper(), f"impossible size {width}x{height}")


# --------------------------------------------------------------------------- identification

# A probe looks at the head and returns a parser key (match), None (ruled out), or the
# head length it needs to decide.
_Probe = Callable[[bytes], str | int | None]


def _at(data: bytes, offset: int, magic: bytes) -> int:
    """0 when ``magic`` is at ``offset``, -1 when it cannot be, else the length needed."""
    got = data[offset : offset + len(magic)]
    if got == magic:
        return 0
    if len(data) < offset + len(magic) and magic.startswith(got):
        return offset + len(magic)
    return -1


def _signature(key: str, *parts: tuple[int, bytes]) -> _Probe:
    def probe(data: bytes) -> str | int | None:
        for offset, magic in parts:
            found = _at(data, offset, magic)
            if found:
                return None if found < 0 else found
        return key

    return probe


_WHITESPACE = b" \t\n\r\x0b\x0c"
# Every DIB header size Windows and OS/2 define: 12 is the OS/2 1.x BITMAPCOREHEADER.
_BMP_HEADERS = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"})
_HEIF_BRANDS = _AVIF_BRANDS | _HEIC_BRANDS | {b"mif1", b"msf1", b"mif2", b"miaf"}
_MAX_FTYP = 4096
_SVG_SCAN = 4096  # an SVG's root element must show up within this many bytes...
_MAX_SVG_PROLOG = 32  # ...after at most this many declarations, comments, PIs
_XML_SPACE = re.compile(rb"[ \t\r\n]+")
_XML_NAME = re.compile(rb"[A-Za-z_:][-A-Za-z0-9_.:]*")
_PNM_SCAN = 1024  # how far _probe_pnm looks past #-comments for the first number
_PNM_SKIP = re.compile(rb"(?:[ \t\n\r\x0b\x0c]+|#[^\r\n]*[\r\n])*")


def _probe_bmp(data: bytes) -> str | int | None:
    # "BM" alone is weak evidence: also require a DIB header size that exists.
    found = _at(data, 0, b"BM")
    if found:
        return None if found < 0 else found
    if len(data) < 18:
        return 18
    return "bmp" if int.from_bytes(data[14:18], "little") in _BMP_HEADERS else None


def _probe_isobmff(data: bytes) -> str | int | None:
    # A plausible ftyp box is under 64 KiB: its 32-bit size starts with two zero bytes.
    for offset, magic in ((0, b"\x00\x00"), (4, b"ftyp")):
        found = _at(data, offset, magic)
        if found:
            return None if found < 0 else found
    size = int.from_bytes(data[:4], "big")
    if not 16 <= size <= _MAX_FTYP:
        return None
    if len(data) < 12:
        return 12
    if data[8:12] in _HEIF_BRANDS:
        return "heif"
    if len(data) < size:
        return size
    brands = {data[i : i + 4] for i in range(16, size - 3, 4)}
    return "heif" if brands & _HEIF_BRANDS else None


def _probe_pnm(data: bytes) -> str | int | None:
    """P1..P7 and whitespace; for P1-P6 also a number next (after any #-comments), since
    a three-byte magic alone would take text such as "P1 is..." for a bitmap."""
    checks = (data[:1] == b"P", data[1:2] in b"1234567", data[2:3] in _WHITESPACE)
    if not all(checks[: len(data)]):
        return None
    if len(data) < 3:
        return 3
    if data[1] == ord("7"):
        return "pnm"
    head = data[:_PNM_SCAN]
    pos = _run_end(_PNM_SKIP, head, 2)
    if pos < len(head) and head[pos] != ord("#"):
        return "pnm" if head[pos] in b"0123456789" else None
    return "pnm" if len(data) >= _PNM_SCAN else len(data) + 1


def _probe_ico(data: bytes) -> str | int | None:
    found = [_at(data, 0, magic) for magic in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00")]
    if 0 not in found:  # neither icon nor cursor (yet)
        undecided = [n for n in found if n > 0]
        return min(undecided) if undecided else None
    if len(data) < 10:
        return 10
    count = int.from_bytes(data[4:6], "little")
    # Excluding "ftyp" keeps a 256-byte ISOBMFF ftyp box from passing as an icon.
    return "ico" if count and data[9] in (0, 255) and data[4:8] != b"ftyp" else None


def _probe_svg(data: bytes) -> str | int | None:
    """Text whose first element (after the XML prolog) is <svg>."""
    text = data[:_SVG_SCAN]
    if len(text) < 3 and text == b"\xef\xbb\xbf"[: len(text)]:
        return 3  # maybe a UTF-8 byte order mark
    pos = 3 if text.startswith(b"\xef\xbb\xbf") else 0
    for _ in range(_MAX_SVG_PROLOG):
        pos = _run_end(_XML_SPACE, text, pos)
        if len(text) - pos < 4:
            if len(data) >= _SVG_SCAN or (pos < len(text) and text[pos : pos + 1] != b"<"):
                return None
            return max(pos + 4, len(data) + 1)
        if text[pos] != ord("<"):
            return None
        if text.startswith(b"<?", pos):
            end = _find_end(text, pos + 2, b"?>")
        elif text.startswith(b"<!--", pos):
            end = _find_end(text, pos + 4, b"-->")
        elif text.startswith(b"<!", pos):
            end = _doctype_end(text, pos)
        else:
            name = _XML_NAME.match(text, pos + 1)
            if name is None:
                return None
            if name.end() >= len(text):
                return None if len(data) >= _SVG_SCAN else len(data) + 1
            return "svg" if name[0] == b"svg" or name[0].endswith(b":svg") else None
        if end < 0:
            return None if len(data) >= _SVG_SCAN else len(data) + 1
        pos = end
    return None


def _find_end(text: bytes, start: int, closer: bytes) -> int:
    at = text.find(closer, start)
    return at if at < 0 else at + len(closer)


def _doctype_end(text: bytes, pos: int) -> int:
    """End of a <!DOCTYPE ...> declaration, which may hold an [internal subset]."""
    close = text.find(b">", pos)
    bracket = text.find(b"[", pos)
    if 0 <= bracket < close or (close < 0 and bracket >= 0):
        subset_end = text.find(b"]", bracket)
        return -1 if subset_end < 0 else _find_end(text, subset_end, b">")
    return close if close < 0 else close + 1


# Order matters only where a head could match two probes; earlier wins.
_PROBES: tuple[_Probe, ...] = (
    _signature("jpeg", (0, b"\xff\xd8\xff")),
    _signature("png", (0, b"\x89PNG\r\n\x1a\n")),
    _signature("gif", (0, b"GIF87a")),
    _signature("gif", (0, b"GIF89a")),
    _signature("webp", (0, b"RIFF"), (8, b"WEBP")),
    _probe_isobmff,
    _signature("jp2", (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n")),
    _signature("jp2", (0, b"\xff\x4f\xff\x51")),  # raw codestream
    _signature("jxl", (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n")),
    _signature("jxl", (0, b"\xff\x0a")),
    _signature("tiff", (0, b"II*\x00")),
    _signature("tiff", (0, b"MM\x00*")),
    _signature("tiff", (0, b"II+\x00")),  # BigTIFF
    _signature("tiff", (0, b"MM\x00+")),
    _signature("jxr", (0, b"II\xbc\x01")),
    _probe_bmp,
    _signature("psd", (0, b"8BPS")),
    _signature("qoi", (0, b"qoif")),
    _signature("exr", (0, b"\x76\x2f\x31\x01")),
    _signature("dds", (0, b"DDS ")),
    _signature("icns", (0, b"icns")),
    _signature("hdr", (0, b"#?RADIANCE\n")),
    _signature("hdr", (0, b"#?RGBE\n")),
    _probe_pnm,
    _probe_ico,
    _probe_svg,
)


def _identify(data: bytes, final: bool) -> str | int:
    """The parser key for ``data``, or the head length needed to decide."""
    pending: list[int] = []
    for probe in _PROBES:
        found = probe(data)
        if isinstance(found, str):
            # An earlier probe that could still match would win: wait for it to decide.
            if pending and not final:
                return min(pending)
            return found
        if found is not None:
            pending.append(found)
    if pending and not final:
        return min(pending)
    raise NotAnImage("the body does not start with the signature of any known image format")


# --------------------------------------------------------------------------- EXIF / TIFF

_TAG_WIDTH, _TAG_HEIGHT, _TAG_ORIENTATION = 256, 257, 274
_MAX_IFD_ENTRIES = 4096


def _tiff_ifd0(h: _Head) -> dict[int, int]:
    """Width, height and orientation tags of a TIFF structure's first IFD (if present).

    Reads the whole IFD0 entry table: tags should be sorted, but decoders accept
    unsorted ones, so stopping at the first tag above 274 could miss an orientation.
    """
    h.need(8)
    order = h.data[:2]
    if order not in (b"II", b"MM"):
        raise _corrupt(h.label, "unknown byte order")
    e = "<" if order == b"II" else ">"
    (version,) = h.unpack(e + "H", 2)
    if version == 42:
        (offset,) = h.unpack(e + "I", 4)
        count_fmt, entry_size, header = "H", 12, 8
    elif version == 43:  # BigTIFF: 64-bit offsets and counts
        offset_size, _, offset = h.unpack(e + "HHQ", 4)
        if offset_size != 8:
            raise _corrupt(h.label, "bad BigTIFF offset size")
        count_fmt, entry_size, header = "Q", 20, 16
    else:
        raise _corrupt(h.label, "bad TIFF version")
    if offset < header:
        raise _corrupt(h.label, "IFD0 offset points into the file header")
    (count,) = h.unpack(e + count_fmt, offset)
    if count == 0:
        raise _corrupt(h.label, "IFD0 is empty")
    table = offset + struct.calcsize(e + count_fmt)
    count = min(count, _MAX_IFD_ENTRIES)
    h.need(table + count * entry_size)
    return _ifd_values(h.data, e, table, count, entry_size)


def _ifd_values(data: bytes, e: str, table: int, count: int, entry_size: int) -> dict[int, int]:
    # Classic entry: tag u16, type u16, count u32, value u32. BigTIFF: count/value are u64.
    big = entry_size == 20
    layout = e + ("HHQ" if big else "HHI")
    value_at = 12 if big else 8
    formats = {3: "H", 4: "I", 16: "Q"} if big else {3: "H", 4: "I"}  # SHORT, LONG, LONG8
    tags: dict[int, int] = {}
    for index in range(count):
        at = table + index * entry_size
        tag, kind, n = struct.unpack_from(layout, data, at)
        wanted = tag in (_TAG_WIDTH, _TAG_HEIGHT, _TAG_ORIENTATION) and tag not in tags
        if wanted and kind in formats and n >= 1:
            (tags[tag],) = struct.unpack_from(e + formats[kind], data, at + value_at)
    return tags


def _exif_orientation(blob: bytes) -> int:
    """Orientation (1..8) from a TIFF-structured EXIF blob; 1 when absent or unreadable."""
    if blob.startswith(b"Exif\x00\x00"):  # some PNG writers keep the JPEG APP1 prefix
        blob = blob[6:]
    try:
        tags = _tiff_ifd0(_Head(blob, True, "EXIF", strict=True))
    except CorruptImage:
        return 1  # decoders ignore a broken EXIF block; so do we
    value = tags.get(_TAG_ORIENTATION, 1)
    return value if 1 <= value <= 8 else 1


def _parse_tiff(h: _Head) -> Sniffed:
    h.need(16 if h.data[2:4] in (b"+\x00", b"\x00+") else 8)
    try:
        tags = _tiff_ifd0(h)
    except _Truncated:
        # IFD0 may sit at the very end of the file (after the strips), out of the head.
        return Sniffed("tiff", None, None, 1)
    if _TAG_WIDTH not in tags or _TAG_HEIGHT not in tags:
        raise _corrupt("TIFF", "IFD0 has no ImageWidth/ImageLength")
    return _sized("tiff", tags[_TAG_WIDTH], tags[_TAG_HEIGHT], tags.get(_TAG_ORIENTATION, 1))


# --------------------------------------------------------------------------- JPEG

# SOFn markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) are not frames.
_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
# Markers without a length field: TEM, RST0-7, SOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
_JPEG_EOI, _JPEG_SOS, _JPEG_APP1 = 0xD9, 0xDA, 0xE1
# Caps that keep a hostile head from making the re-parse-per-call design quadratic. Real
# files have a few dozen segments before the frame header and no junk between them; past
# either cap the size is simply reported unknown.
_MAX_JPEG_SEGMENTS = 256
_MAX_JPEG_JUNK = 256
_FILL = re.compile(rb"\xff+")


def _parse_jpeg(h: _Head) -> Sniffed:
    orientation = 1
    exif_seen = False  # decoders use the first Exif APP1 only
    pos = 2
    junk = 0
    try:
        for _ in range(_MAX_JPEG_SEGMENTS):
            marker_at = _jpeg_marker(h, pos, _MAX_JPEG_JUNK - junk)
            if marker_at < 0:
                break
            junk += marker_at - pos
            pos = marker_at
            marker = h.data[pos + 1]
            if marker in _JPEG_STANDALONE:
                pos += 2
                continue
            if marker in (_JPEG_EOI, _JPEG_SOS):
                raise _corrupt("JPEG", "no frame header before the image data")
            (length,) = h.unpack(">H", pos + 2)
            if length < 2:
                raise _corrupt("JPEG", "segment length below 2")
            if marker in _JPEG_SOF:
                return _jpeg_frame(h, pos, length, orientation)
            end = pos + 2 + length
            if marker == _JPEG_APP1 and not exif_seen:
                # The whole segment is needed anyway, to reach the marker after it (+4).
                h.need(end, ask=end + 4)
                if h.data.startswith(b"Exif\x00\x00", pos + 4):
                    exif_seen = True
                    orientation = _exif_orientation(h.data[pos + 10 : end])
            pos = end
    except _Truncated:
        pass  # the frame header was not reached: the head cap may well have cut a valid file
    return Sniffed("jpeg", None, None, orientation)


def _jpeg_marker(h: _Head, pos: int, budget: int) -> int:
    """Position of the marker at or after ``pos``, or -1 once more than ``budget`` bytes of
    junk precede it. Like libjpeg and Pillow, skip 0xFF fill bytes and garbage between
    segments. Asks for marker + length (4 bytes) at a time."""
    data = h.data
    limit = pos + budget
    while pos <= limit:
        h.need(pos + 2, ask=pos + 4)
        if data[pos] != 0xFF:
            found = data.find(b"\xff", pos, limit + 1)
            pos = min(len(data), limit + 1) if found < 0 else found
        elif data[pos + 1] == 0xFF:
            pos = _run_end(_FILL, data, pos + 1) - 1
        elif data[pos + 1] == 0x00:  # a stuffed zero is entropy data, not a marker
            pos += 2
        else:
            return pos
    return -1


def _jpeg_frame(h: _Head, pos: int, length: int, orientation: int) -> Sniffed:
    _precision, height, width, components = h.unpack(">BHHB", pos + 4)
    if components == 0 or length != 8 + 3 * components:
        raise _corrupt("JPEG", "malformed frame header")
    if width == 0:
        raise _corrupt("JPEG", "frame width is 0")
    if height == 0:
        # Legal in theory: the height then comes in a DNL segment after the first scan.
        return Sniffed("jpeg", None, None, orientation)
    return _sized("jpeg", width, height, orientation)


# --------------------------------------------------------------------------- PNG

_PNG_DEPTHS: dict[int, frozenset[int]] = {
    0: frozenset({1, 2, 4, 8, 16}),  # greyscale
    2: frozenset({8, 16}),  # truecolour
    3: frozenset({1, 2, 4, 8}),  # indexed
    4: frozenset({8, 16}),  # greyscale + alpha
    6: frozenset({8, 16}),  # truecolour + alpha
}
_MAX_PNG_CHUNKS = 256  # before IDAT; past it the orientation is reported as 1
_PNG_MAX_LENGTH = 2**31 - 1


def _parse_png(h: _Head) -> Sniffed:
    h.need(33)  # signature + IHDR
    length, kind = struct.unpack_from(">I4s", h.data, 8)
    if kind != b"IHDR" or length != 13:
        raise _corrupt("PNG", "the first chunk is not a 13-byte IHDR")
    (crc,) = struct.unpack_from(">I", h.data, 29)
    if crc32(h.data[12:29]) != crc:
        raise _corrupt("PNG", "IHDR checksum mismatch")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(
        ">IIBBBBB", h.data, 16
    )
    if depth not in _PNG_DEPTHS.get(colour, frozenset()):
        raise _corrupt("PNG", f"bit depth {depth} is invalid for colour type {colour}")
    if compression != 0 or filtering != 0 or interlace > 1:
        raise _corrupt("PNG", "unknown compression, filter or interlace method")
    _check_size("png", width, height)
    try:
        orientation = _png_orientation(h)
    except _Truncated:
        orientation = 1  # the head ended before IDAT: no eXIf seen so far
    return _sized("png", width, height, orientation)


def _png_orientation(h: _Head) -> int:
    """Walk chunk headers (skipping their data) from after IHDR up to IDAT for an eXIf."""
    pos = 33
    for _ in range(_MAX_PNG_CHUNKS):
        length, kind = h.unpack(">I4s", pos)
        if length > _PNG_MAX_LENGTH or not kind.isalpha():
            raise _corrupt("PNG", "malformed chunk header")
        if kind in (b"IDAT", b"IEND"):
            return 1
        if kind == b"eXIf":
            h.need(pos + 8 + length)
            return _exif_orientation(h.data[pos + 8 : pos + 8 + length])
        pos += 12 + length
    return 1


# --------------------------------------------------------------------------- GIF, WebP, BMP


def _parse_gif(h: _Head) -> Sniffed:
    width, height = h.unpack("<HH", 6)
    return _sized("gif", width, height)


def _parse_webp(h: _Head) -> Sniffed:
    # Orientation stays 1: browsers ignore EXIF in WebP.
    (kind,) = h.unpack("4s", 12)
    data = h.data
    if kind == b"VP8 ":  # lossy: key frame header, then 14-bit sizes (2 bits of scaling)
        h.need(30)
        if data[20] & 1 or data[23:26] != b"\x9d\x01\x2a":
            raise _corrupt("WebP", "bad VP8 key frame header")
        width, height = struct.unpack_from("<HH", data, 26)
        return _sized("webp", width & 0x3FFF, height & 0x3FFF)
    if kind == b"VP8L":  # lossless: signature byte, then 14-bit sizes minus one
        h.need(25)
        (bits,) = struct.unpack_from("<I", data, 21)
        if data[20] != 0x2F or bits >> 29:
            raise _corrupt("WebP", "bad VP8L header")
        return _sized("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if kind == b"VP8X":  # extended: 24-bit canvas sizes minus one
        h.need(30)
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        if width * height > 2**32 - 1:
            raise _corrupt("WebP", "canvas larger than the format allows")
        return _sized("webp", width, height)
    raise _corrupt("WebP", "the first chunk is not VP8, VP8L or VP8X")


def _parse_bmp(h: _Head) -> Sniffed:
    (header_size,) = h.unpack("<I", 14)
    if header_size == 12:  # OS/2 1.x BITMAPCOREHEADER: unsigned 16-bit sizes
        width, height = h.unpack("<HH", 18)
    else:
        width, height = h.unpack("<ii", 18)
        height = abs(height)  # negative height: rows stored top-down
    return _sized("bmp", width, height)


# --------------------------------------------------------------------------- ISOBMFF / HEIF

# Boxes walked while streaming (top level, meta children): real files have a handful.
_MAX_BOXES = 64
# Entries of a box that is parsed once complete (infe items, ipco properties).
_MAX_ITEMS = 4096
_Box = tuple[bytes, int, int | None]  # type, payload start, end (None: to end of file)


def _boxes(h: _Head, pos: int, limit: int | None, cap: int = _MAX_BOXES) -> Iterator[_Box]:
    """The boxes from ``pos`` up to ``limit`` (None: the end of the file, unknown yet)."""
    for _ in range(cap):
        if limit is not None and pos + 8 > limit:
            return
        size, kind = h.unpack(">I4s", pos)
        start = pos + 8
        if size == 1:  # 64-bit size follows the type
            (size,) = h.unpack(">Q", pos + 8)
            start = pos + 16
        elif size == 0:  # the box runs to the end of its parent (or of the file)
            yield kind, start, limit
            return
        if size < start - pos:
            raise _corrupt(h.label, "box smaller than its header")
        end = pos + size
        if limit is not None and end > limit:
            raise _corrupt(h.label, "box overruns its parent")
        yield kind, start, end
        pos = end


def _fields(box: _Head, start: int, end: int, fmt: str) -> tuple[Any, ...]:
    """Unpack ``fmt`` at ``start`` inside a box that ends at ``end``."""
    if start + struct.calcsize(fmt) > end:
        raise _corrupt(box.label, "box too short for its fields")
    return box.unpack(fmt, start)


def _ftyp_brands(h: _Head) -> list[bytes]:
    """Major brand first, then the compatible brands."""
    (size,) = h.unpack(">I", 0)
    h.need(size)
    return [h.data[8:12]] + [h.data[i : i + 4] for i in range(16, size - 3, 4)]


def _heif_format(brands: list[bytes], item_type: bytes | None) -> str:
    """avif or heic. The primary item's coding decides when known (it is what a decoder
    will actually decode); the brands are the fallback."""
    if item_type == b"av01":
        return "avif"
    if item_type in (b"hvc1", b"hev1"):
        return "heic"
    if brands[0] in _AVIF_BRANDS:
        return "avif"
    if brands[0] in _HEIC_BRANDS:
        return "heic"
    listed = set(brands)
    return "avif" if listed & _AVIF_BRANDS and not listed & _HEIC_BRANDS else "heic"


def _parse_heif(h: _Head) -> Sniffed:
    brands = _ftyp_brands(h)
    try:
        for kind, start, end in _boxes(h, 0, None):
            if kind == b"meta":  # usually right after ftyp; if mdat comes first, skip it
                return _heif_meta(h, brands, start + 4, end)  # +4: FullBox version/flags
    except _Truncated:
        pass
    return Sniffed(_heif_format(brands, None), None, None, 1)


@dataclass(slots=True)
class _HeifItems:
    primary: int | None = None
    types: dict[int, bytes] | None = None
    properties: list[tuple[bytes, bytes]] | None = None  # ipco children: (type, payload)
    associations: dict[int, list[int]] | None = None  # item -> 1-based ipco indices


def _heif_meta(h: _Head, brands: list[bytes], start: int, end: int | None) -> Sniffed:
    """Read pitm, iinf and iprp (skipping every other box by its size) and describe the
    primary item."""
    items = _HeifItems()
    for kind, box_start, box_end in _boxes(h, start, end):
        if kind not in (b"pitm", b"iinf", b"iprp"):
            continue
        if box_end is None:
            raise _corrupt(h.label, f"{kind.decode()} box without a size")
        box = h.sub(box_start, box_end)
        if kind == b"pitm":
            items.primary = _heif_pitm(box)
        elif kind == b"iinf":
            items.types = _heif_iinf(box)
        else:
            items.properties, items.associations = _heif_iprp(box)
        if None not in (items.primary, items.types, items.properties):
            break
    types = items.types or {}
    fmt = _heif_format(brands, None if items.primary is None else types.get(items.primary))
    if items.primary is None or items.properties is None or items.associations is None:
        return Sniffed(fmt, None, None, 1)
    indices = items.associations.get(items.primary, [])
    return _heif_primary(fmt, items.properties, indices)


def _heif_pitm(box: _Head) -> int:
    (version,) = _fields(box, 0, len(box.data), ">B")
    (item,) = _fields(box, 4, len(box.data), ">H" if version == 0 else ">I")
    return int(item)


def _heif_iinf(box: _Head) -> dict[int, bytes]:
    """Item id -> item type (hvc1, av01, grid, Exif...) from the infe entries."""
    (version,) = _fields(box, 0, len(box.data), ">B")
    types: dict[int, bytes] = {}
    for kind, start, end in _boxes(box, 6 if version == 0 else 8, len(box.data), _MAX_ITEMS):
        if kind != b"infe" or end is None:
            continue
        (infe_version,) = _fields(box, start, end, ">B")
        if infe_version == 2:
            item, _protection, item_type = _fields(box, start + 4, end, ">HH4s")
        elif infe_version == 3:
            item, _protection, item_type = _fields(box, start + 4, end, ">IH4s")
        else:  # versions 0 and 1 predate item types
            continue
        types.setdefault(item, item_type)
    return types


def _heif_iprp(box: _Head) -> tuple[list[tuple[bytes, bytes]], dict[int, list[int]]]:
    properties: list[tuple[bytes, bytes]] = []
    associations: dict[int, list[int]] = {}
    for kind, start, end in _boxes(box, 0, len(box.data)):
        if end is None:
            continue
        if kind == b"ipco":
            properties = [
                (prop, box.data[prop_start : end if prop_end is None else prop_end])
                for prop, prop_start, prop_end in _boxes(box, start, end, _MAX_ITEMS)
            ]
        elif kind == b"ipma":
            _heif_ipma(box, start, end, associations)
    return properties, associations


def _heif_ipma(box: _Head, start: int, end: int, associations: dict[int, list[int]]) -> None:
    (version_flags, count) = _fields(box, start, end, ">II")
    version, wide = version_flags >> 24, version_flags & 1
    item_fmt = ">H" if version == 0 else ">I"
    mask = 0x7FFF if wide else 0x7F  # the top bit is the "essential" flag
    pos = start + 8
    for _ in range(count):  # bounded: each entry takes >= 3 bytes of a complete box
        (item,) = _fields(box, pos, end, item_fmt)
        pos += struct.calcsize(item_fmt)
        (n,) = _fields(box, pos, end, ">B")
        pos += 1
        values = _fields(box, pos, end, f">{n}{'H' if wide else 'B'}")
        pos += n * (2 if wide else 1)
        associations.setdefault(item, []).extend(value & mask for value in values)


# 2x2 matrices (a, b, c, d) in y-up coordinates for the eight EXIF orientations: the
# transform that turns the stored raster into the displayed one.
_Matrix = tuple[int, int, int, int]
_EXIF_MATRICES: dict[_Matrix, int] = {
    (1, 0, 0, 1): 1,
    (-1, 0, 0, 1): 2,  # mirror left-right
    (-1, 0, 0, -1): 3,  # rotate 180
    (1, 0, 0, -1): 4,  # mirror top-bottom
    (0, -1, -1, 0): 5,  # transpose
    (0, 1, -1, 0): 6,  # rotate 90 clockwise
    (0, 1, 1, 0): 7,  # transverse
    (0, -1, 1, 0): 8,  # rotate 90 anticlockwise
}
_ROTATIONS: tuple[_Matrix, ...] = ((1, 0, 0, 1), (0, -1, 1, 0), (-1, 0, 0, -1), (0, 1, -1, 0))
# imir axis 0 exchanges top and bottom, 1 exchanges left and right (ISO/IEC 23008-12:2022).
_MIRRORS: tuple[_Matrix, ...] = ((1, 0, 0, -1), (-1, 0, 0, 1))


def _then(first: _Matrix, second: _Matrix) -> _Matrix:
    """The matrix of applying ``first`` and then ``second``."""
    a, b, c, d = second
    p, q, r, s = first
    return (a * p + b * r, a * q + b * s, c * p + d * r, c * q + d * s)


def _heif_primary(fmt: str, properties: list[tuple[bytes, bytes]], indices: list[int]) -> Sniffed:
    """Size from ispe (cropped by clap), orientation from irot/imir in association order."""
    size: tuple[int, int] | None = None
    clap: tuple[int, ...] | None = None
    matrix: _Matrix = (1, 0, 0, 1)
    for index in indices:
        if index == 0:  # "no property"
            continue
        if index > len(properties):
            raise _corrupt(fmt.upper(), "item associated with a missing property")
        kind, payload = properties[index - 1]
        if kind == b"ispe" and size is None and len(payload) >= 12:
            size = struct.unpack_from(">II", payload, 4)  # after FullBox version/flags
        elif kind == b"irot" and payload:  # angle = (x & 3) * 90 degrees anticlockwise
            matrix = _then(matrix, _ROTATIONS[payload[0] & 3])
        elif kind == b"imir" and payload:
            matrix = _then(matrix, _MIRRORS[payload[0] & 1])
        elif kind == b"clap" and clap is None and len(payload) >= 32:
            clap = struct.unpack_from(">IIIIiIiI", payload)
    orientation = _EXIF_MATRICES[matrix]
    if size is None:
        return Sniffed(fmt, None, None, orientation)
    width, height = size
    _check_size(fmt, width, height)
    if clap is not None:
        width, height = _clap_size(fmt, clap, width, height)
    return _sized(fmt, width, height, orientation)


def _clap_size(fmt: str, clap: tuple[int, ...], width: int, height: int) -> tuple[int, int]:
    """Clean-aperture size, rounded half up as libheif does."""
    width_n, width_d, height_n, height_d = clap[:4]
    if width_d == 0 or height_d == 0:
        raise _corrupt(fmt.upper(), "clean aperture with a zero denominator")
    clean_width = (2 * width_n + width_d) // (2 * width_d)
    clean_height = (2 * height_n + height_d) // (2 * height_d)
    if not (0 < clean_width <= width and 0 < clean_height <= height):
        raise _corrupt(fmt.upper(), "clean aperture outside the image")
    return clean_width, clean_height


# key -> (parser, label for messages). A key without a parser is a format recognised by
# its signature only: the workers cannot decode it, so its size does not matter (415).
_PARSERS: dict[str, tuple[Callable[[_Head], Sniffed], str]] = {
    "jpeg": (_parse_jpeg, "JPEG"),
    "png": (_parse_png, "PNG"),
    "gif": (_parse_gif, "GIF"),
    "webp": (_parse_webp, "WebP"),
    "heif": (_parse_heif, "HEIF"),
    "tiff": (_parse_tiff, "TIFF"),
    "bmp": (_parse_bmp, "BMP"),
}
