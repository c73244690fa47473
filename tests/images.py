"""Small, valid image headers built in code (the tests read no image files).

The API never decodes pixels, so a body needs a correct header; what follows it may be any
bytes. `big_png_body` streams a PNG header plus N pseudo-random bytes without holding them.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

from blake3 import blake3


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int = 3, height: int = 2, *, exif_orientation: int | None = None) -> bytes:
    """A complete, decodable 8-bit RGB PNG."""
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    rows = b"".join(b"\x00" + bytes([200, 30, 30]) * width for _ in range(height))
    exif = b""
    if exif_orientation is not None:
        exif = chunk(b"eXIf", tiff_orientation(exif_orientation))
    return (
        b"\x89PNG\r\n\x1a\n"
        + ihdr
        + exif
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def tiff_orientation(orientation: int) -> bytes:
    """A big-endian TIFF structure with one IFD entry: Orientation."""
    return b"MM\x00*" + struct.pack(">IHHHIHHI", 8, 1, 0x0112, 3, 1, orientation, 0, 0)


def jpeg(
    width: int,
    height: int,
    *,
    orientation: int | None = None,
    pad: int = 0,
    scan: bytes = b"\x00" * 64,
) -> bytes:
    """SOI, optional APP1 Exif, optional APP2 padding (like an ICC profile), SOF0, scan, EOI."""
    out = b"\xff\xd8"
    if orientation is not None:
        app1 = b"Exif\x00\x00" + tiff_orientation(orientation)
        out += b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1
    while pad > 0:
        size = min(pad, 65533)
        out += b"\xff\xe2" + struct.pack(">H", size + 2) + b"\x00" * size
        pad -= size
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    out += b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof
    return (
        out
        + b"\xff\xda"
        + struct.pack(">H", 12)
        + b"\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
        + scan
        + b"\xff\xd9"
    )


def gif(width: int = 4, height: int = 4) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b";"


class Body:
    """size bytes: a PNG header whose IDAT claims the rest, then deterministic filler.

    Iterating yields the bytes in `piece`-sized chunks; `.blake3` is the digest of all of them.
    """

    def __init__(
        self,
        size: int,
        *,
        piece: int = 1024 * 1024,
        width: int = 4000,
        height: int = 3000,
        seed: int = 1,
    ) -> None:
        head = b"\x89PNG\r\n\x1a\n" + chunk(
            b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        )
        self.head = head + struct.pack(">I", min(size - len(head) - 8, 2**31 - 1)) + b"IDAT"
        assert size > len(self.head)
        self.size = size
        self.piece = piece
        self.block = blake3(seed.to_bytes(8, "big")).digest(length=1024 * 1024)
        hasher = blake3()
        for part in self._chunks(4 * 1024 * 1024):
            hasher.update(part)
        self.blake3 = hasher.hexdigest()

    def _chunks(self, piece: int) -> Iterator[bytes]:
        yield self.head
        offset, left = 0, self.size - len(self.head)
        while left > 0:
            n = min(piece, left)
            yield self._filler(offset, n)
            offset += n
            left -= n

    def _filler(self, offset: int, n: int) -> bytes:
        out = bytearray()
        size = len(self.block)
        while n > 0:
            start = offset % size
            take = min(n, size - start)
            out += self.block[start : start + take]
            offset += take
            n -= take
        return bytes(out)

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks(self.piece)

    def read_all(self) -> bytes:
        return b"".join(self._chunks(4 * 1024 * 1024))
