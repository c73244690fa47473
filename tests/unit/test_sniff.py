"""core.sniff: formats, displayed sizes, orientation, streaming (NeedMore), corrupt input.

Every fixture is built here with struct (no files, no imaging library): the sniffer only
reads headers, so a few well-formed header bytes followed by filler are a faithful image.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable, Sequence
from functools import cache

import pytest

from core.errors import CorruptImage, NotAnImage
from core.sniff import MIME_TYPES, SUPPORTED, NeedMore, Sniffed, sniff

# --------------------------------------------------------------------------- fixture builders


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png(
    width: int = 32,
    height: int = 16,
    *,
    depth: int = 8,
    colour: int = 2,
    methods: tuple[int, int, int] = (0, 0, 0),
    before_idat: Sequence[bytes] = (),
    bad_crc: bool = False,
) -> bytes:
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBB", width, height, depth, colour) + bytes(methods))
    if bad_crc:
        ihdr = ihdr[:-1] + bytes([ihdr[-1] ^ 1])
    chunks = [
        ihdr,
        *before_idat,
        png_chunk(b"IDAT", zlib.compress(bytes(64))),
        png_chunk(b"IEND", b""),
    ]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def tiff(
    tags: dict[int, tuple[int, int]],
    *,
    order: str = "<",
    gap: int = 0,
    big: bool = False,
) -> bytes:
    """A TIFF structure whose IFD0 holds ``tags`` ({tag: (type, value)}: 3 SHORT, 4 LONG,
    16 LONG8), placed after ``gap`` filler bytes (where a real file keeps its strips)."""
    mark = b"II" if order == "<" else b"MM"
    value_size = 8 if big else 4
    ifd_at = (16 if big else 8) + gap
    if big:
        header = mark + struct.pack(order + "HHHQ", 43, 8, 0, ifd_at)
        ifd = struct.pack(order + "Q", len(tags))
    else:
        header = mark + struct.pack(order + "HI", 42, ifd_at)
        ifd = struct.pack(order + "H", len(tags))
    for tag, (kind, value) in sorted(tags.items()):
        packed = struct.pack(order + {3: "H", 4: "I", 16: "Q"}[kind], value)
        count = struct.pack(order + ("Q" if big else "I"), 1)
        ifd += struct.pack(order + "HH", tag, kind) + count + packed.ljust(value_size, b"\0")
    ifd += bytes(value_size)  # no next IFD
    return header + bytes(gap) + ifd


def exif(orientation: int, order: str = ">") -> bytes:
    return tiff({0x010F: (4, 0), 0x0112: (3, orientation), 0x011A: (4, 72)}, order=order)


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def jpeg(
    width: int = 640,
    height: int = 480,
    *,
    orientation: int | None = None,
    padding: int = 0,
    sof: int = 0xC0,
    order: str = ">",
) -> bytes:
    """JFIF, optional APP1 Exif, ``padding`` bytes of APP2 ICC chunks, DQT, SOF, DHT, SOS."""
    parts = [b"\xff\xd8", segment(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0")]
    if orientation is not None:
        parts.append(segment(0xE1, b"Exif\0\0" + exif(orientation, order)))
    while padding > 0:
        size = min(padding, 65000)
        parts.append(segment(0xE2, b"ICC_PROFILE\0\x01\x01" + bytes(size)))
        padding -= size
    parts.append(segment(0xDB, bytes(65)))
    components = bytes([1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1])
    parts.append(segment(sof, struct.pack(">BHHB", 8, height, width, 3) + components))
    parts.append(segment(0xC4, bytes(29)))
    parts.append(segment(0xDA, bytes([3, 1, 0, 2, 0x11, 3, 0x11, 0, 63, 0])))
    parts.append(b"\x12\x34" * 32 + b"\xff\xd9")
    return b"".join(parts)


def sof_offset(data: bytes) -> int:
    return data.index(b"\xff\xc0")


def box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def full_box(kind: bytes, payload: bytes, version: int = 0, flags: int = 0) -> bytes:
    return box(kind, bytes([version]) + flags.to_bytes(3, "big") + payload)


def heif(
    width: int = 400,
    height: int = 300,
    *,
    transforms: Sequence[tuple[bytes, int]] = (),
    item_type: bytes = b"hvc1",
    brands: Sequence[bytes] = (b"heic", b"mif1", b"heic"),
    mdat_first: bool = False,
    clap: tuple[int, ...] | None = None,
) -> bytes:
    """A HEIF file with one image item (id 1), its ispe, and ``transforms`` (irot/imir with
    their byte) associated in the given order."""
    properties = [full_box(b"ispe", struct.pack(">II", width, height)), box(b"hvcC", bytes(23))]
    if clap is not None:
        properties.append(box(b"clap", struct.pack(">IIIIiIiI", *clap)))
    properties += [box(kind, bytes([value])) for kind, value in transforms]
    associations = bytes([0x81, *range(2, len(properties) + 1)])  # ispe (essential), ...
    ipma = full_box(b"ipma", struct.pack(">IHB", 1, 1, len(associations)) + associations)
    iprp = box(b"iprp", box(b"ipco", b"".join(properties)) + ipma)
    infe = full_box(b"infe", struct.pack(">HH", 1, 0) + item_type + b"\0", version=2)
    meta = full_box(
        b"meta",
        full_box(b"hdlr", bytes(4) + b"pict" + bytes(13))
        + full_box(b"pitm", struct.pack(">H", 1))
        + full_box(b"iloc", bytes([0x44, 0]) + struct.pack(">H", 0))
        + full_box(b"iinf", struct.pack(">H", 1) + infe)
        + iprp,
    )
    ftyp = box(b"ftyp", brands[0] + bytes(4) + b"".join(brands[1:]))
    mdat = box(b"mdat", bytes(5000))
    return ftyp + (mdat + meta if mdat_first else meta + mdat)


def bmp(width: int, height: int, *, core: bool = False) -> bytes:
    if core:  # OS/2 1.x BITMAPCOREHEADER: 16-bit unsigned sizes
        info = struct.pack("<IHHHH", 12, width, height, 1, 24)
    else:
        info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    offset = 14 + len(info)
    return b"BM" + struct.pack("<IHHI", offset + 64, 0, 0, offset) + info + bytes(64)


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b",;"


def riff(chunk: bytes, payload: bytes) -> bytes:
    body = b"WEBP" + chunk + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_vp8(width: int, height: int, start_code: bytes = b"\x9d\x01\x2a") -> bytes:
    return riff(
        b"VP8 ", b"\x50\x02\x00" + start_code + struct.pack("<HH", width, height) + bytes(20)
    )


def webp_vp8l(width: int, height: int) -> bytes:
    bits = (width - 1) | (height - 1) << 14 | 1 << 28
    return riff(b"VP8L", b"\x2f" + struct.pack("<I", bits) + bytes(20))


def webp_vp8x(width: int, height: int) -> bytes:
    sizes = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return riff(b"VP8X", b"\x10\0\0\0" + sizes) + b"ALPH" + bytes(12)


SVG = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<!-- made by hand -->\n'
    b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" [ <!ENTITY e "x"> ]>\n'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="90" height="60"><circle r="4"/></svg>\n'
)

# name -> (bytes, expected answer)
VALID: dict[str, tuple[bytes, Sniffed]] = {
    "png": (png(32, 16), Sniffed("png", 32, 16, 1)),
    "png 16-bit grey+alpha": (png(7, 9, depth=16, colour=4), Sniffed("png", 7, 9, 1)),
    "png interlaced palette": (
        png(
            5, 3, depth=4, colour=3, methods=(0, 0, 1), before_idat=[png_chunk(b"PLTE", bytes(48))]
        ),
        Sniffed("png", 5, 3, 1),
    ),
    "png eXIf 6": (
        png(32, 16, before_idat=[png_chunk(b"gAMA", bytes(4)), png_chunk(b"eXIf", exif(6))]),
        Sniffed("png", 16, 32, 6),
    ),
    "png eXIf with Exif prefix": (
        png(32, 16, before_idat=[png_chunk(b"eXIf", b"Exif\0\0" + exif(3, "<"))]),
        Sniffed("png", 32, 16, 3),
    ),
    "jpeg": (jpeg(640, 480), Sniffed("jpeg", 640, 480, 1)),
    "jpeg exif 8 little-endian": (
        jpeg(640, 480, orientation=8, order="<"),
        Sniffed("jpeg", 480, 640, 8),
    ),
    "jpeg progressive": (jpeg(3, 5, sof=0xC2), Sniffed("jpeg", 3, 5, 1)),
    "gif": (gif(300, 200), Sniffed("gif", 300, 200, 1)),
    "webp vp8": (webp_vp8(16383, 9), Sniffed("webp", 16383, 9, 1)),
    "webp vp8 scaled": (webp_vp8(0x4000 | 20, 0xC000 | 30), Sniffed("webp", 20, 30, 1)),
    "webp vp8l": (webp_vp8l(1, 16384), Sniffed("webp", 1, 16384, 1)),
    "webp vp8x": (webp_vp8x(200, 1), Sniffed("webp", 200, 1, 1)),
    "bmp": (bmp(100, 300), Sniffed("bmp", 100, 300, 1)),
    "bmp top-down": (bmp(100, -300), Sniffed("bmp", 100, 300, 1)),
    "bmp os/2": (bmp(40000, 2, core=True), Sniffed("bmp", 40000, 2, 1)),
    "tiff": (tiff({256: (3, 802), 257: (3, 670)}), Sniffed("tiff", 802, 670, 1)),
    "tiff big-endian rotated": (
        tiff({256: (4, 802), 257: (4, 670), 274: (3, 6)}, order=">"),
        Sniffed("tiff", 670, 802, 6),
    ),
    "tiff ifd at end": (
        tiff({256: (3, 800), 257: (3, 600), 259: (3, 1)}, gap=9000),
        Sniffed("tiff", 800, 600, 1),
    ),
    "bigtiff": (
        tiff({256: (16, 70000), 257: (4, 5), 274: (3, 2)}, big=True),
        Sniffed("tiff", 70000, 5, 2),
    ),
    "heic": (heif(1440, 960), Sniffed("heic", 1440, 960, 1)),
    "heic rotated": (heif(1440, 960, transforms=[(b"irot", 1)]), Sniffed("heic", 960, 1440, 8)),
    "heic mdat first": (heif(10, 20, mdat_first=True), Sniffed("heic", 10, 20, 1)),
    "avif": (
        heif(630, 420, item_type=b"av01", brands=[b"avif", b"mif1", b"miaf"]),
        Sniffed("avif", 630, 420, 1),
    ),
    "avif under mif1": (
        heif(630, 420, item_type=b"av01", brands=[b"mif1", b"mif1", b"avif"]),
        Sniffed("avif", 630, 420, 1),
    ),
    "heic clap": (
        heif(400, 300, clap=(399, 1, 201, 2, 0, 1, 0, 1)),
        Sniffed("heic", 399, 101, 1),
    ),
}


def recognised(fmt: str) -> Sniffed:
    """The answer for a format the workers cannot decode: its name, nothing more."""
    return Sniffed(fmt, None, None, 1)


RECOGNISED: dict[str, tuple[bytes, Sniffed]] = {
    "jp2": (
        b"\0\0\0\x0cjP  \r\n\x87\n" + box(b"ftyp", b"jp2 \0\0\0\0jp2 ") + bytes(32),
        recognised("jp2"),
    ),
    "j2k": (b"\xff\x4f\xff\x51\0\x29" + bytes(40), recognised("jp2")),
    "jxl": (b"\xff\x0a" + bytes(12), recognised("jxl")),
    "jxl container": (
        b"\0\0\0\x0cJXL \r\n\x87\n" + box(b"ftyp", b"jxl \0\0\0\0jxl ") + bytes(16),
        recognised("jxl"),
    ),
    "pnm": (b"P6\n# a comment\n640  480\n255\n" + bytes(30), recognised("pnm")),
    "pbm": (b"P4 7\t3\n" + bytes(3), recognised("pnm")),
    "pam": (b"P7\nWIDTH 4\nHEIGHT 3\nDEPTH 3\nENDHDR\n" + bytes(36), recognised("pnm")),
    "svg": (SVG, recognised("svg")),
    "svg bare with BOM": (b"\xef\xbb\xbf <svg:svg/>", recognised("svg")),
    "ico": (
        b"\0\0\1\0\1\0" + bytes([16, 16, 0, 0]) + struct.pack("<HHII", 1, 32, 40, 22) + bytes(40),
        recognised("ico"),
    ),
    "psd": (b"8BPS\0\x01" + bytes(6) + struct.pack(">HIIHH", 3, 300, 500, 8, 3), recognised("psd")),
    "qoi": (b"qoif" + struct.pack(">IIBB", 64, 32, 4, 0) + bytes(8), recognised("qoi")),
    "exr": (b"\x76\x2f\x31\x01\x02\0\0\0" + bytes(16), recognised("exr")),
}

ALL = {**VALID, **RECOGNISED}


# --------------------------------------------------------------------------- helpers


def follow(data: bytes) -> tuple[Sniffed, int, int]:
    """Stream ``data`` the way the API does, following NeedMore.at_least from one byte:
    (answer, head length it needed, number of sniff calls)."""
    n, calls = 1, 0
    while True:
        calls += 1
        found = sniff(data[:n], final=n >= len(data))
        if isinstance(found, Sniffed):
            return found, n, calls
        assert found.at_least > n
        n = min(found.at_least, len(data))


def whole(data: bytes) -> Sniffed:
    found = sniff(data, final=True)
    assert isinstance(found, Sniffed)
    return found


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", list(ALL))
def test_whole_file(name: str) -> None:
    data, expected = ALL[name]
    assert whole(data) == expected


@pytest.mark.parametrize("name", list(ALL))
def test_streaming_reaches_the_same_answer(name: str) -> None:
    data, expected = ALL[name]
    found, _, calls = follow(data)
    assert found == expected
    if expected.format not in ("svg", "pnm"):  # text headers are read one byte at a time
        assert calls <= 24


@pytest.mark.parametrize("name", [name for name in ALL if len(ALL[name][0]) < 12_000])
def test_one_byte_at_a_time(name: str) -> None:
    """Every prefix: NeedMore never asks past the first prefix that decides, the decision
    comes exactly where following at_least decides, and never changes afterwards."""
    data, expected = ALL[name]
    _, decided_at, _ = follow(data)
    asked = []
    for n in range(1, decided_at):
        found = sniff(data[:n], final=False)
        assert isinstance(found, NeedMore), n
        asked.append(found.at_least)
    assert max(asked, default=decided_at) <= decided_at
    for n in range(decided_at, min(len(data), decided_at + 64) + 1):
        assert sniff(data[:n], final=False) == expected


def test_content_types_and_supported() -> None:
    assert set(SUPPORTED) == {"jpeg", "png", "gif", "webp", "avif", "heic", "tiff", "bmp"}
    assert set(SUPPORTED) <= set(MIME_TYPES)
    for data, expected in ALL.values():
        assert whole(data).content_type == MIME_TYPES[expected.format]
    assert whole(png()).content_type == "image/png"
    assert whole(heif(item_type=b"av01")).content_type == "image/avif"


@pytest.mark.parametrize("name", list(RECOGNISED))
def test_recognised_formats_are_not_supported(name: str) -> None:
    assert whole(RECOGNISED[name][0]).format not in SUPPORTED


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"8BPS\0\x03", "psd"),  # unknown version, and cut short
        (b"qoif" + struct.pack(">II", 0, 32), "qoi"),  # 0 wide
        (b"P6\n640 abc\n", "pnm"),
        (b"P5 640 0 255\n", "pnm"),
        (b"\xff\x4f\xff\x51" + struct.pack(">HHIIII", 41, 0, 5, 5, 9, 0), "jp2"),  # negative
        (b"\0\0\0\x0cJXL \r\n\x87\n", "jxl"),
        (b"\0\0\1\0\1\0\x10\x10\0\0", "ico"),  # cut inside its directory
    ],
)
def test_recognised_formats_are_named_by_their_signature_alone(head: bytes, fmt: str) -> None:
    """Nothing past the signature is read: whatever follows, even a header that could not
    be decoded, the upload is refused as that format (415 unsupported-format)."""
    assert sniff(head, final=True) == recognised(fmt)
    assert follow(head)[0] == recognised(fmt)


def test_head_types() -> None:
    data = jpeg(orientation=6)
    answer = whole(data)
    assert sniff(bytearray(data), True) == answer
    assert sniff(memoryview(data), True) == answer
    assert sniff(memoryview(b"xx" + data)[2:], True) == answer


def test_empty_head() -> None:
    assert sniff(b"", final=False) == NeedMore(1)
    with pytest.raises(NotAnImage):
        sniff(b"", final=True)


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_orientation_swaps_displayed_size(orientation: int) -> None:
    found = whole(jpeg(640, 480, orientation=orientation))
    assert found.orientation == orientation
    swapped = orientation >= 5
    assert (found.width, found.height) == ((480, 640) if swapped else (640, 480))


@pytest.mark.parametrize("value", [0, 9, 65535])
def test_jpeg_orientation_out_of_range_is_1(value: int) -> None:
    assert whole(jpeg(640, 480, orientation=value)) == Sniffed("jpeg", 640, 480, 1)


def test_jpeg_uses_the_first_exif_segment_only() -> None:
    data = jpeg(640, 480, orientation=6)
    second = segment(0xE1, b"Exif\0\0" + exif(3))
    data = data[:2] + segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0<x/>") + data[2:]
    sof = sof_offset(data)
    data = data[:sof] + second + data[sof:]
    assert whole(data) == Sniffed("jpeg", 480, 640, 6)


def test_jpeg_broken_exif_means_orientation_1() -> None:
    broken = segment(0xE1, b"Exif\0\0II*\0\xff\xff\xff\x7f")
    data = jpeg(64, 32)
    assert whole(data[:2] + broken + data[2:]) == Sniffed("jpeg", 64, 32, 1)


@pytest.mark.parametrize(
    ("transforms", "orientation"),
    [
        ([], 1),
        ([(b"imir", 1)], 2),  # axis 1: left and right exchanged
        ([(b"irot", 2)], 3),
        ([(b"imir", 0)], 4),  # axis 0: top and bottom exchanged
        ([(b"irot", 1), (b"imir", 0)], 5),
        ([(b"irot", 3)], 6),  # 270 degrees anticlockwise = 90 clockwise
        ([(b"irot", 3), (b"imir", 0)], 7),
        ([(b"irot", 1)], 8),
        ([(b"irot", 2), (b"imir", 1)], 4),
        ([(b"irot", 1), (b"imir", 1)], 7),
        ([(b"imir", 0), (b"irot", 1)], 7),  # listed order is applied order
        ([(b"irot", 0xFD)], 8),  # only the low two bits count
    ],
)
def test_heif_transforms_to_exif(transforms: list[tuple[bytes, int]], orientation: int) -> None:
    found = whole(heif(400, 300, transforms=transforms))
    assert found.orientation == orientation
    assert (found.width, found.height) == ((300, 400) if orientation >= 5 else (400, 300))


def test_heif_clap_then_rotation() -> None:
    found = whole(heif(400, 300, clap=(200, 1, 100, 1, 0, 1, 0, 1), transforms=[(b"irot", 3)]))
    assert found == Sniffed("heic", 100, 200, 6)


def test_heif_format_follows_primary_item() -> None:
    assert whole(heif(item_type=b"av01", brands=[b"heic", b"mif1"])).format == "avif"
    assert whole(heif(item_type=b"grid", brands=[b"mif1", b"mif1", b"avif"])).format == "avif"
    assert whole(heif(item_type=b"grid", brands=[b"mif1", b"mif1", b"heic"])).format == "heic"


def test_mp4_is_not_an_image() -> None:
    with pytest.raises(NotAnImage):
        sniff(box(b"ftyp", b"isom\0\0\x02\0isomiso2mp41") + box(b"moov", bytes(64)), final=True)


# --------------------------------------------------------------------------- streaming


def test_jpeg_sof_behind_300k_of_app_segments() -> None:
    data = jpeg(4000, 3000, orientation=6, padding=300_000)
    found, needed, calls = follow(data)
    assert found == Sniffed("jpeg", 3000, 4000, 6)
    assert needed == sof_offset(data) + 10  # marker, length, precision, sizes, components
    assert calls <= 16
    # the head cap cut the file before the frame header: not corrupt, size unknown
    assert sniff(data[:200_000], final=True) == Sniffed("jpeg", None, None, 6)


def test_jpeg_asks_for_the_next_marker_past_each_segment() -> None:
    data = jpeg(64, 64, padding=100_000)
    first_app2 = data.index(b"\xff\xe2")
    (length,) = struct.unpack_from(">H", data, first_app2 + 2)
    assert sniff(data[: first_app2 + 4], final=False) == NeedMore(first_app2 + 2 + length + 4)


def test_tiff_ifd_at_the_end() -> None:
    data = tiff({256: (4, 800), 257: (4, 600), 273: (4, 8), 274: (3, 1)}, gap=80_000)
    found, needed, calls = follow(data)
    assert found == Sniffed("tiff", 800, 600, 1)
    assert needed == len(data) - 4  # the whole IFD0 entry table, not the next-IFD pointer
    assert calls <= 5
    assert sniff(data[:65536], final=True) == Sniffed("tiff", None, None, 1)


def test_png_head_cap_before_idat_keeps_the_size() -> None:
    data = png(32, 16, before_idat=[png_chunk(b"zTXt", bytes(5000))])
    assert sniff(data[:100], final=True) == Sniffed("png", 32, 16, 1)
    assert sniff(data[:100], final=False) == NeedMore(33 + 12 + 5000 + 8)


def test_png_stops_at_idat() -> None:
    data = png(32, 16, before_idat=[png_chunk(b"gAMA", bytes(4))])
    idat = data.index(b"IDAT") - 4
    assert follow(data)[1] == idat + 8


def test_heif_meta_after_mdat() -> None:
    data = heif(10, 20, mdat_first=True)
    meta = data.index(b"meta") - 4
    assert sniff(data[:40], final=False) == NeedMore(meta + 8)
    assert sniff(data[:meta], final=True) == Sniffed("heic", None, None, 1)


def test_needmore_when_final_never() -> None:
    for data, _ in ALL.values():
        for n in range(1, min(len(data), 400)):
            try:
                found = sniff(data[:n], final=True)
            except (NotAnImage, CorruptImage):
                continue
            assert isinstance(found, Sniffed)


# --------------------------------------------------------------------------- corrupt input


CORRUPT: dict[str, bytes] = {
    "png ihdr crc": png(bad_crc=True),
    "png colour type 1": png(colour=1),
    "png colour type 9": png(colour=9),
    "png bit depth 3": png(depth=3),
    "png bit depth 16 palette": png(depth=16, colour=3),
    "png compression 1": png(methods=(1, 0, 0)),
    "png filter 1": png(methods=(0, 1, 0)),
    "png interlace 2": png(methods=(0, 0, 2)),
    "png width 0": png(0, 16),
    "png height above 2^31-1": png(32, 2**31),
    "png first chunk not IHDR": b"\x89PNG\r\n\x1a\n" + png_chunk(b"CgBI", bytes(13)) + bytes(20),
    "png truncated IHDR": png()[:20],
    "png bad chunk type": png(before_idat=[b"\0\0\0\x04g@MA" + bytes(8)]),
    "jpeg width 0": jpeg(0, 480),
    "jpeg sos before sof": b"\xff\xd8" + segment(0xDA, bytes(10)) + bytes(10),
    "jpeg bad frame length": b"\xff\xd8" + segment(0xC0, bytes([8, 0, 4, 0, 4, 3])) + bytes(8),
    "gif 0x0": gif(0, 0),
    "gif truncated": b"GIF89a\x01",
    "bmp width 0": bmp(0, 10),
    "bmp negative width": bmp(-5, 10),
    "webp vp8 start code": webp_vp8(10, 10, start_code=b"\x9d\x01\x2b"),
    "webp unknown chunk": riff(b"ALPH", bytes(20)),
    "tiff no width": tiff({257: (3, 10)}),
    "tiff width 0": tiff({256: (3, 0), 257: (3, 10)}),
    "tiff empty ifd": tiff({}),
    "tiff ifd in header": b"II*\0\x04\0\0\0" + bytes(16),
    "heif ispe 0": heif(0, 300),
    "heif clap larger than image": heif(40, 30, clap=(41, 1, 30, 1, 0, 1, 0, 1)),
    "heif property index out of range": heif(10, 10).replace(b"\x81\x02", b"\x81\x09"),
    "heif box overruns parent": heif(10, 10).replace(b"\0\0\0\x14ispe", b"\0\0\x01\x14ispe"),
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_corrupt(name: str) -> None:
    with pytest.raises(CorruptImage) as raised:
        sniff(CORRUPT[name], final=True)
    assert raised.value.detail


def test_jpeg_height_0_is_unknown_not_corrupt() -> None:
    # Legal in theory (the height comes in a DNL segment after the first scan).
    assert whole(jpeg(640, 0, orientation=6)) == Sniffed("jpeg", None, None, 6)


def test_png_with_only_a_bad_idat_is_fine() -> None:
    data = png()
    idat = data.index(b"IDAT")
    data = data[: idat + 8] + b"\xff" + data[idat + 9 :]
    assert whole(data) == Sniffed("png", 32, 16, 1)


NOT_IMAGES: dict[str, bytes] = {
    "text": b"hello, world\n",
    "json": b'{"a": 1}',
    "html": b"<!DOCTYPE html>\n<html><body></body></html>",
    "xml not svg": b'<?xml version="1.0"?>\n<feed xmlns="http://www.w3.org/2005/Atom"/>',
    "pdf": b"%PDF-1.7\n",
    "zip": b"PK\x03\x04" + bytes(30),
    "png signature mangled by CRLF": b"\x89PNG\r\r\n\x1a\n" + bytes(30),
    "png signature with LF only": b"\x89PNG\n\x1a\n" + bytes(30),
    "riff wave": b"RIFF\x24\0\0\0WAVEfmt " + bytes(20),
    "bmp-looking text": b"BMW cars are fast, they say, and " + bytes(10),
    "pbm-looking text": b"P1 is the first item\n",
    "truncated jpeg signature": b"\xff\xd8",
    "truncated png signature": b"\x89PN",
    "zeros": bytes(64),
}


@pytest.mark.parametrize("name", list(NOT_IMAGES))
def test_not_an_image(name: str) -> None:
    with pytest.raises(NotAnImage):
        sniff(NOT_IMAGES[name], final=True)


def test_not_an_image_is_decided_early() -> None:
    with pytest.raises(NotAnImage):
        sniff(b"%PDF", final=False)
    with pytest.raises(NotAnImage):
        sniff(b"\x89PNG\r\r", final=False)
    assert sniff(b"\x89PNG\r", final=False) == NeedMore(8)


# --------------------------------------------------------------------------- robustness


@cache
def fuzz_seeds() -> list[bytes]:
    seeds = [data for data, _ in ALL.values()]
    seeds += list(CORRUPT.values())
    big = jpeg(64, 64, orientation=5, padding=70_000)
    seeds.append(big[:4000] + big[sof_offset(big) - 200 :])
    return seeds


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if not out:
            break
        at = rng.randrange(len(out))
        action = rng.random()
        if action < 0.4:
            out[at] = rng.randrange(256)
        elif action < 0.6:
            out[at] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFF))
        elif action < 0.8:
            del out[at : at + rng.randint(1, 16)]
        else:
            out[at:at] = rng.randbytes(rng.randint(1, 8))
    return bytes(out)


def check_domain_only(data: bytes, final: bool) -> None:
    try:
        found = sniff(data, final)
    except (NotAnImage, CorruptImage):
        return
    if isinstance(found, NeedMore):
        assert not final
        assert found.at_least > len(data)
        return
    assert 1 <= found.orientation <= 8
    assert found.format in MIME_TYPES
    assert (found.width is None) == (found.height is None)
    if found.width is not None and found.height is not None:
        assert found.width > 0 and found.height > 0


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_never_raises_anything_else(seed: int) -> None:
    rng = random.Random(seed)
    seeds = fuzz_seeds()
    makers: list[Callable[[], bytes]] = [
        lambda: rng.randbytes(rng.randint(0, 96)),
        lambda: mutate(rng, rng.choice(seeds)),
        lambda: mutate(rng, rng.choice(seeds))[: rng.randint(0, 600)],
        lambda: rng.choice(seeds)[: rng.randint(0, 600)],
    ]
    for _ in range(1000):
        data = rng.choice(makers)()
        check_domain_only(data, final=True)
        check_domain_only(data, final=False)
