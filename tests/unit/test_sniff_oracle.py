"""core.sniff against an independent oracle: imagesize (2.0.1, pinned) must read the same.

Two header parsers written apart that agree are both right, or wrong in the same way; where
they disagree one of them is wrong, and the test says which. The files come from Pillow (a
third implementation, the writer) and a seeded generator, so every run sees the same cases:
PNG, GIF, JPEG (baseline and progressive, EXIF orientation 1-8 in both byte orders, ICC
profiles that push the frame header past 64 KiB), WebP (lossy, lossless, alpha, EXIF,
animated), TIFF (orientation tag, several compressions, BigTIFF) and BMP, at many sizes. Then
the repository's own fixtures: tests/pixels.py, tests/images.py and the header fixtures of
test_sniff.py.

Every case checks three answers against each other: the size the writer was asked for, ours
(whole file, and streamed from one byte following NeedMore), and imagesize's, on the whole
file and on exactly the head our sniffer stopped at.

How imagesize 2.0.1 behaves (measured): a `bytes` argument is taken as a path, so it gets an
`io.BytesIO`; `get()` turns every error into (-1, -1), `get_info()` raises, so we call
`get_info()`; `rotation` is the EXIF orientation, -1 when the file has none (we say 1);
width/height are the displayed size (swapped for orientations 5-8) unless
`exif_rotation=False`, which gives the stored size.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import imagesize
import pytest
from PIL import Image, PngImagePlugin

from core.sniff import NeedMore, Sniffed, sniff
from tests import images, pixels
from tests.unit.test_sniff import VALID

CASES_PER_FORMAT = 48
# Pixels per generated image: enough for sides at each format's limit (1 x 65535), small
# enough that building a few hundred files stays under a few seconds.
MAX_PIXELS = 1 << 20


@dataclass(frozen=True)
class Case:
    data: bytes
    format: str
    stored: tuple[int, int] | None  # what the writer was asked for (None: not known here)


def stored_size(found: Sniffed) -> tuple[int | None, int | None]:
    """Undo the displayed-size swap of orientations 5-8."""
    if found.orientation >= 5:
        return found.height, found.width
    return found.width, found.height


def follow(data: bytes) -> tuple[Sniffed, int]:
    """Stream ``data`` from one byte as the API does: (answer, head length it needed)."""
    n = 1
    while True:
        found = sniff(data[:n], final=n >= len(data))
        if not isinstance(found, NeedMore):
            return found, n
        n = min(found.at_least, len(data))


def oracle(data: bytes, *, exif_rotation: bool) -> tuple[int, int, int]:
    # Size and rotation only: its DPI/colour readers walk further than the size needs.
    info = imagesize.get_info(
        io.BytesIO(data), exif_rotation=exif_rotation, dpi=False, colors=False, channels=False
    )
    return info.width, info.height, info.rotation


def check(case: Case, *, prefix: bool = True) -> None:
    ours = sniff(case.data, final=True)
    assert isinstance(ours, Sniffed)
    assert ours.format == case.format
    streamed, needed = follow(case.data)
    assert streamed == ours
    if case.stored is not None:
        assert stored_size(ours) == case.stored
    width, height, _ = oracle(case.data, exif_rotation=False)
    assert (width, height) == stored_size(ours), "stored size differs from imagesize"
    # imagesize 2.0.1 does not read PNG eXIf: rotation -1 and no swap (measured). We do, as
    # browsers and libvips do, so for PNG only the stored size is compared.
    if case.format != "png":
        width, height, rotation = oracle(case.data, exif_rotation=True)
        assert (width, height) == (ours.width, ours.height), "displayed size differs"
        assert ours.orientation == (1 if rotation == -1 else rotation)
    if prefix:
        # The head we stop at holds what imagesize needs too (for JPEG: everything up to
        # the frame header, which imagesize must have; see the HEIF exception below).
        width, height, _ = oracle(case.data[:needed], exif_rotation=False)
        assert (width, height) == stored_size(ours), f"imagesize differs on our {needed}-byte head"


# --------------------------------------------------------------------------- generated files


def save(im: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **params)
    return out.getvalue()


def sides(rng: random.Random, max_side: int) -> tuple[int, int]:
    """Mostly small and medium sizes; one case in five has a side at or near the format's
    largest, the other side as large as MAX_PIXELS allows."""
    roll = rng.random()
    if roll < 0.5:
        return rng.randint(1, 64), rng.randint(1, 64)
    if roll < 0.8:
        return rng.randint(65, 1500), rng.randint(65, 1500)
    long = max_side if roll < 0.9 else rng.randint(1501, max_side)
    short = rng.randint(1, MAX_PIXELS // long)
    return (long, short) if rng.random() < 0.5 else (short, long)


def exif(orientation: int, rng: random.Random) -> Image.Exif:
    tags = Image.Exif()
    tags.endian = rng.choice("<>")  # the byte order Pillow writes the TIFF structure in
    tags[0x010F] = "Cam" * rng.randint(0, 40)  # Make: > 4 bytes is stored out of line
    tags[0x0112] = orientation
    return tags


def displayed(stored: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (stored[1], stored[0]) if orientation >= 5 else stored


def make_png(rng: random.Random, i: int) -> Case:
    size = sides(rng, 65535)
    im = Image.new(("1", "L", "LA", "P", "RGB", "RGBA", "I;16")[i % 7], size)
    params: dict[str, object] = {}
    orientation = i % 9  # 0: no eXIf chunk
    if orientation:
        params["exif"] = exif(orientation, rng)
    if rng.random() < 0.3:
        text = PngImagePlugin.PngInfo()
        text.add_text("Comment", "x" * rng.randint(0, 20_000), zip=rng.random() < 0.5)
        params["pnginfo"] = text
    return Case(save(im, "PNG", **params), "png", size)


def make_gif(rng: random.Random, i: int) -> Case:
    # GIF sides are unsigned 16-bit, but imagesize 2.0.1 reads them signed: 65535 comes
    # back as -1 (measured). So the sides stay below 32768 here.
    size = sides(rng, 32767)
    im = Image.new(("P", "L", "RGB")[i % 3], size)
    if i % 4 == 3:  # animated: the logical screen is the first frame's size
        second = Image.new("P", (max(1, size[0] // 2), max(1, size[1] // 2)), 1)
        return Case(save(im, "GIF", save_all=True, append_images=[second]), "gif", size)
    return Case(save(im, "GIF"), "gif", size)


def make_jpeg(rng: random.Random, i: int) -> Case:
    size = sides(rng, 65500)
    mode = ("RGB", "L", "CMYK")[i % 3]
    params: dict[str, object] = {"progressive": i % 2 == 1, "quality": rng.randint(30, 95)}
    if mode == "RGB":
        params["subsampling"] = rng.choice((0, 1, 2))
    orientation = i % 9  # 0: no EXIF
    if orientation:
        params["exif"] = exif(orientation, rng)
    icc = rng.choice((0, 0, 1_000, 5_000, 70_000, 200_000))
    if icc:  # Pillow splits a large profile over several APP2 segments
        params["icc_profile"] = rng.randbytes(icc)
    data = save(Image.new(mode, size), "JPEG", **params)
    return Case(data, "jpeg", size)


def make_webp(rng: random.Random, i: int) -> Case:
    size = sides(rng, 16383)
    kind = i % 6
    if kind == 0:
        data = save(Image.new("RGB", size), "WEBP", quality=rng.randint(1, 100))  # VP8
    elif kind == 1:
        data = save(Image.new("RGB", size), "WEBP", lossless=True)  # VP8L
    elif kind == 2:
        data = save(Image.new("RGBA", size, (9, 9, 9, 100)), "WEBP")  # VP8X + ALPH
    elif kind == 3:
        data = save(Image.new("RGBA", size, (9, 9, 9, 100)), "WEBP", lossless=True)
    elif kind == 4:
        # VP8X with EXIF: browsers ignore it, and so do we and imagesize (orientation 1).
        data = save(Image.new("RGB", size), "WEBP", exif=exif(rng.randint(1, 8), rng))
    else:
        first, second = Image.new("RGB", size), Image.new("RGB", size, (200, 0, 0))
        data = save(first, "WEBP", save_all=True, append_images=[second], duration=100)
    return Case(data, "webp", size)


def make_tiff(rng: random.Random, i: int) -> Case:
    size = sides(rng, 65535)
    im = Image.new(("1", "L", "RGB", "RGBA", "I;16", "CMYK")[i % 6], size)
    compression = rng.choice((None, "tiff_lzw", "tiff_adobe_deflate", "packbits"))
    params: dict[str, object] = {"compression": compression, "big_tiff": i % 5 == 4}
    orientation = i % 9  # 0: no Orientation tag
    if orientation:
        params["tiffinfo"] = {0x0112: orientation}
    return Case(save(im, "TIFF", **params), "tiff", size)


def make_bmp(rng: random.Random, i: int) -> Case:
    size = sides(rng, 30000)
    im = Image.new(("1", "L", "P", "RGB", "RGBA")[i % 5], size)
    return Case(save(im, "BMP"), "bmp", size)


MAKERS: dict[str, Callable[[random.Random, int], Case]] = {
    "png": make_png,
    "gif": make_gif,
    "jpeg": make_jpeg,
    "webp": make_webp,
    "tiff": make_tiff,
    "bmp": make_bmp,
}


@pytest.mark.parametrize("fmt", list(MAKERS))
@pytest.mark.parametrize("i", range(CASES_PER_FORMAT))
def test_generated_files_agree_with_imagesize(fmt: str, i: int) -> None:
    check(MAKERS[fmt](random.Random(f"{fmt}-{i}"), i))


# --------------------------------------------------------------------------- repository fixtures

# Where imagesize 2.0.1 is wrong (each measured on that fixture; ours is checked by
# test_sniff.py). strict: once an upgrade fixes one, the test says so and the entry goes.
IMAGESIZE_WRONG = {
    # Reads the HEIF irot box with a wrong layout: "Invalid ISO box payload".
    "sniff heic rotated": "imagesize misreads HEIF irot",
    # An OS/2 1.x BMP (12-byte BITMAPCOREHEADER) of 40000x2 comes back as 171072x1572865.
    "sniff bmp os/2": "imagesize misreads OS/2 BMP headers",
    # The two scaling bits above VP8's 14-bit sizes are kept: 20x30 comes back 16404x49182.
    "sniff webp vp8 scaled": "imagesize keeps VP8 scaling bits in the size",
    # ImageWidth stored as LONG8 (BigTIFF type 16) is skipped: "missing dimensions".
    "sniff bigtiff": "imagesize ignores LONG8 TIFF values",
    # clap (the clean aperture) is ignored: the coded size comes back (400x300 for 399x101;
    # pillow-heif's 60x40 HEIC, coded as 64x64, comes back 64x64).
    "sniff heic clap": "imagesize ignores the HEIF clap box",
    "pixels heic-alpha": "imagesize ignores the HEIF clap box",
}
HEIF = ("heic", "avif")


Fixture = tuple[Callable[[], bytes], str, tuple[int, int] | None]  # build, format, stored


def repository_fixtures() -> dict[str, Fixture]:
    """name -> how to build it (in the test, not at collection), format, stored size."""
    cases: dict[str, Fixture] = {
        f"sniff {name}": (partial(bytes, data), expected.format, None)
        for name, (data, expected) in VALID.items()
    }
    for name, (fmt, build, size) in pixels.INPUTS.items():
        cases[f"pixels {name}"] = (build, fmt, size)
    for o in range(1, 9):
        stored = displayed((120, 80), o)  # transposed for 5-8, so that it displays 120x80
        cases[f"pixels jpeg orientation {o}"] = (
            partial(pixels.jpeg_with_orientation, o),
            "jpeg",
            stored,
        )
        cases[f"images png eXIf {o}"] = (
            partial(images.png, 5, 3, exif_orientation=o),
            "png",
            (5, 3),
        )
        cases[f"images jpeg {o} behind 70 KB"] = (
            partial(images.jpeg, 50, 30, orientation=o, pad=70_000),
            "jpeg",
            (50, 30),
        )
    colours = [pixels.RED, pixels.BLUE]
    return cases | {
        "pixels jpeg gps": (pixels.jpeg_with_gps, "jpeg", (120, 80)),
        "pixels animated gif": (partial(pixels.animated, "GIF", colours), "gif", (60, 40)),
        "pixels animated webp": (partial(pixels.animated, "WEBP", colours), "webp", (60, 40)),
        "pixels p3 jpeg": (lambda: pixels.display_p3(pixels.RED)[0], "jpeg", (64, 64)),
        "pixels p3 png": (lambda: pixels.display_p3(pixels.RED, ".png")[0], "png", (64, 64)),
        "images gif": (partial(images.gif, 7, 9), "gif", (7, 9)),
        "images png body": (images.Body(1 << 16).read_all, "png", (4000, 3000)),
    }


FIXTURES = repository_fixtures()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=IMAGESIZE_WRONG[name]))
        if name in IMAGESIZE_WRONG
        else name
        for name in FIXTURES
    ],
)
def test_repository_fixtures_agree_with_imagesize(name: str) -> None:
    build, fmt, stored = FIXTURES[name]
    case = Case(build(), fmt, stored)
    # imagesize cannot read a HEIF prefix: it checks box sizes against the stream's length.
    check(case, prefix=case.format not in HEIF)
