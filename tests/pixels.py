"""Decodable test images, built in code with Pillow and pyvips (the tests read no image files).

Unlike tests/images.py (headers only, for the API), these carry real pixels, for the
conversion tests: a marked-corner picture for orientation, colour patches for colour
management, alpha, animation, metadata, and every input format the upload accepts.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pillow_heif
import pyvips
from PIL import Image

pillow_heif.register_heif_opener()

RED = (220, 30, 30)
BLUE = (30, 30, 220)
GREY = (128, 128, 128)
ORANGE = (200, 100, 50)

# exif_transpose's operation for orientation N turns the stored raster upright; its inverse
# turns an upright picture into what a camera stores with tag N.
_STORE_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def marked(width: int = 120, height: int = 80) -> Image.Image:
    """Upright picture: grey, a red top-left corner and a blue top-right corner."""
    im = Image.new("RGB", (width, height), GREY)
    side = min(width, height) // 4
    im.paste(RED, (0, 0, side, side))
    im.paste(BLUE, (width - side, 0, width, side))
    return im


def stored_with_orientation(upright: Image.Image, orientation: int) -> Image.Image:
    op = _STORE_AS[orientation]
    return upright if op is None else upright.transpose(op)


def save(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def exif_bytes(orientation: int | None = None, gps: bool = False) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "TestCam"  # Make
    if orientation is not None:
        exif[0x0112] = orientation
    if gps:
        # GPSInfo IFD: 48 deg 51' 30" N, 2 deg 17' 40" E (Paris).
        exif[0x8825] = {1: "N", 2: (48.0, 51.0, 30.0), 3: "E", 4: (2.0, 17.0, 40.0)}
    return exif.tobytes()


def jpeg_with_orientation(orientation: int, width: int = 120, height: int = 80) -> bytes:
    stored = stored_with_orientation(marked(width, height), orientation)
    return save(stored, "JPEG", quality=95, exif=exif_bytes(orientation))


XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'


def jpeg_with_gps() -> bytes:
    return save(marked(), "JPEG", quality=90, exif=exif_bytes(1, gps=True), xmp=XMP)


def patch(colour: tuple[int, int, int], size: int = 64) -> pyvips.Image:
    return (pyvips.Image.black(size, size) + list(colour)).cast("uchar").copy(interpretation="srgb")


def display_p3(colour: tuple[int, int, int], fmt: str = ".jpg") -> tuple[bytes, list[float]]:
    """An sRGB colour re-encoded as Display P3 pixels with the P3 profile embedded.
    Returns the file and the P3 pixel values (what a converter that drops the profile
    would show)."""
    p3 = patch(colour).icc_transform("p3", input_profile="srgb")
    saved = p3.write_to_buffer(fmt, Q=98) if fmt == ".jpg" else p3.write_to_buffer(fmt)
    return bytes(saved), list(p3(10, 10))


def p3_profile() -> bytes:
    return bytes(patch(GREY, 8).icc_transform("p3", input_profile="srgb").get("icc-profile-data"))


def rgba_half() -> Image.Image:
    """60x40: left half opaque red, right half fully transparent, a 50% red band below."""
    im = Image.new("RGBA", (60, 40), (0, 0, 0, 0))
    im.paste((*RED, 255), (0, 0, 30, 20))
    im.paste((*RED, 128), (0, 20, 60, 40))
    return im


def frames(
    colours: list[tuple[int, int, int]], size: tuple[int, int] = (60, 40)
) -> list[Image.Image]:
    return [Image.new("RGB", size, c) for c in colours]


def animated(fmt: str, colours: list[tuple[int, int, int]]) -> bytes:
    first, *rest = frames(colours)
    return save(first, fmt, save_all=True, append_images=rest, duration=100, loop=0)


def png_interlaced(im: Image.Image) -> bytes:
    """Pillow cannot write Adam7; libvips can."""
    v = pyvips.Image.new_from_memory(im.tobytes(), im.width, im.height, len(im.getbands()), "uchar")
    return bytes(v.pngsave_buffer(interlace=True))


def png_16bit(grey: bool) -> bytes:
    base = pyvips.Image.new_from_memory(marked().tobytes(), 120, 80, 3, "uchar")
    v = (base.cast("ushort") * 257).copy(interpretation="rgb16")
    if grey:
        v = v.colourspace("grey16")
    return bytes(v.pngsave_buffer(bitdepth=16))


# name -> (sniffed format, builder of the file, expected displayed size)
INPUTS: dict[str, tuple[str, Callable[[], bytes], tuple[int, int]]] = {
    "jpeg-baseline": ("jpeg", lambda: save(marked(), "JPEG", quality=90), (120, 80)),
    "jpeg-progressive": (
        "jpeg",
        lambda: save(marked(), "JPEG", quality=90, progressive=True),
        (120, 80),
    ),
    "jpeg-cmyk": ("jpeg", lambda: save(marked().convert("CMYK"), "JPEG", quality=95), (120, 80)),
    "png-rgb8": ("png", lambda: save(marked(), "PNG"), (120, 80)),
    "png-grey1": ("png", lambda: save(marked().convert("1"), "PNG"), (120, 80)),
    "png-grey4": ("png", lambda: save(marked().convert("L"), "PNG", bits=4), (120, 80)),
    "png-palette": ("png", lambda: save(marked().convert("P"), "PNG"), (120, 80)),
    "png-rgb16": ("png", lambda: png_16bit(grey=False), (120, 80)),
    "png-grey16": ("png", lambda: png_16bit(grey=True), (120, 80)),
    "png-interlaced": ("png", lambda: png_interlaced(marked()), (120, 80)),
    "png-rgba": ("png", lambda: save(rgba_half(), "PNG"), (60, 40)),
    "gif": ("gif", lambda: save(marked().convert("P"), "GIF"), (120, 80)),
    "webp-lossy": ("webp", lambda: save(marked(), "WEBP", quality=90), (120, 80)),
    "webp-lossless": ("webp", lambda: save(rgba_half(), "WEBP", lossless=True), (60, 40)),
    "avif": ("avif", lambda: save(marked(), "AVIF", quality=90), (120, 80)),
    "heic": ("heic", lambda: save(marked(), "HEIF", quality=90), (120, 80)),
    "heic-alpha": ("heic", lambda: save(rgba_half(), "HEIF", quality=90), (60, 40)),
    "tiff-lzw": ("tiff", lambda: save(marked(), "TIFF", compression="tiff_lzw"), (120, 80)),
    "tiff-rgba": ("tiff", lambda: save(rgba_half(), "TIFF"), (60, 40)),
    "bmp-24": ("bmp", lambda: save(marked(), "BMP"), (120, 80)),
    "bmp-8": ("bmp", lambda: save(marked().convert("P"), "BMP"), (120, 80)),
}
