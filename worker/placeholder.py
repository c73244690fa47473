"""Placeholders: what a page paints while an image's variants are still on their way.

Two things, made once per conversion from the image worker/convert.py has already decoded
(upright, sRGB, 8-bit, alpha kept): nothing is decoded a second time.

- A ThumbHash (https://evanw.github.io/thumbhash/), chosen over BlurHash because it encodes
  the alpha channel (a cut-out on transparency gets a see-through placeholder, not a grey
  box) and the aspect ratio (a page can reserve the right box from the hash alone), needs
  no component-count parameters to pick per image (BlurHash asks for x and y counts), and
  fits in at most 25 bytes (34 characters of base64) while keeping more detail than a
  BlurHash of that size. No ThumbHash package on PyPI is well kept (the pure-Python ports
  have had no release since 2023 and one crashes on alpha; a fork fixing that is months
  old; the Rust bindings have one release each), so the encoder is here, written from the
  format's description. Its bytes are those of evanw's reference encoder for the same
  pixels (tests/unit/test_placeholder.py), so the `thumbhash` npm package's
  `thumbHashToDataURL` paints them.
- The average colour, "#rrggbb": the alpha-weighted (premultiplied) mean of the displayed
  pixels in sRGB, so transparent pixels count for nothing. It is exact to 8 bits where the
  ThumbHash's own average is rounded to 5-6 bits, for a page that paints only a colour.

Both are computed from the image shrunk to fit 100x100 (the ThumbHash's input limit: a
larger input costs time and adds nothing to 25 bytes; a profile whose largest variant is
smaller gives a smaller decode, which is used as it is); a shrink keeps the mean colour.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from functools import lru_cache
from operator import mul

import pyvips

from core.models import Placeholder

MAX_SIDE = 100

# ThumbHash's colour space: L (luminance), P (yellow-blue) and Q (red-green), all 0..1 or
# -1..1, plus alpha. Each is kept as a triangle of low-frequency DCT coefficients.
_PQ_SIDE = 3
_ALPHA_SIDE = 5
# Coefficients this small are floating-point noise (the smallest that counts is 1/126).
_NOISE = 1e-9


def placeholder_of(image: pyvips.Image) -> Placeholder:
    """The ThumbHash and average colour of `image`, a decoded picture as worker/convert.py
    holds it. Raises pyvips.Error if its pixels cannot be read."""
    width, height, rgba = small_rgba(image)
    thumbhash = rgba_to_thumbhash(width, height, rgba)
    return Placeholder(
        thumbhash=base64.b64encode(thumbhash).decode("ascii"),
        color=average_colour(rgba),
    )


def small_rgba(image: pyvips.Image) -> tuple[int, int, bytes]:
    """`image` shrunk to fit MAX_SIDE x MAX_SIDE (never enlarged), as 8-bit sRGB RGBA bytes
    row by row: width, height, pixels."""
    if image.width > MAX_SIDE or image.height > MAX_SIDE:
        # Premultiplies alpha while it resamples, so transparent pixels do not bleed in.
        image = image.thumbnail_image(MAX_SIDE, height=MAX_SIDE, no_rotate=True)
    if image.interpretation != "srgb" or image.format != "uchar" or image.bands < 3:
        image = image.colourspace("srgb").cast("uchar")
    rgb = image.extract_band(0, n=3)
    opaque = not image.hasalpha()
    rgba = rgb.bandjoin_const([255]) if opaque else rgb.bandjoin(image[image.bands - 1])
    return rgba.width, rgba.height, bytes(rgba.write_to_memory())


def average_colour(rgba: bytes) -> str:
    """The alpha-weighted mean colour of RGBA pixels as "#rrggbb" (lower case); "#000000"
    when no pixel is visible at all."""
    red, green, blue, alpha = _bands(rgba)
    weight = sum(alpha)
    if not weight:
        return "#000000"
    # Integer sums: exact, so the same pixels give the same colour on every machine.
    means = (sum(map(mul, band, alpha)) / weight for band in (red, green, blue))
    return "#" + "".join(f"{_round(m):02x}" for m in means)


def rgba_to_thumbhash(width: int, height: int, rgba: bytes) -> bytes:
    """The ThumbHash of a `width` x `height` image (each at most MAX_SIDE) given as 8-bit
    RGBA bytes, row by row, not premultiplied. At most 25 bytes; the same input always
    gives the same bytes."""
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise ValueError(f"{width}x{height} does not fit in {MAX_SIDE}x{MAX_SIDE}")
    if len(rgba) != width * height * 4:
        raise ValueError(f"{len(rgba)} bytes are not {width}x{height} RGBA pixels")
    red, green, blue, alpha = _bands(rgba)
    weight = sum(alpha)
    has_alpha = weight < 255 * width * height
    average = [
        sum(map(mul, band, alpha)) / (255 * weight) if weight else 0.0
        for band in (red, green, blue)
    ]
    l_chan, p_chan, q_chan = _lpq(red, green, blue, alpha, average, has_alpha)

    # Fewer luminance coefficients when alpha needs room; their grid follows the aspect.
    l_limit = 5 if has_alpha else 7
    lx = max(1, _round(l_limit * width / max(width, height)))
    ly = max(1, _round(l_limit * height / max(width, height)))
    grid = _Grid(width, height)
    l_dc, l_ac, l_scale = grid.encode(l_chan, max(3, lx), max(3, ly))
    p_dc, p_ac, p_scale = grid.encode(p_chan, _PQ_SIDE, _PQ_SIDE)
    q_dc, q_ac, q_scale = grid.encode(q_chan, _PQ_SIDE, _PQ_SIDE)

    landscape = width > height
    header24 = (
        _round(63 * l_dc)
        | _round(31.5 + 31.5 * p_dc) << 6
        | _round(31.5 + 31.5 * q_dc) << 12
        | _round(31 * l_scale) << 18
        | has_alpha << 23
    )
    header16 = (
        (ly if landscape else lx)
        | _round(63 * p_scale) << 3
        | _round(63 * q_scale) << 9
        | landscape << 15
    )
    out = bytearray(
        [header24 & 255, header24 >> 8 & 255, header24 >> 16, header16 & 255, header16 >> 8]
    )
    factors = [*l_ac, *p_ac, *q_ac]
    if has_alpha:
        a_dc, a_ac, a_scale = grid.encode([a / 255 for a in alpha], _ALPHA_SIDE, _ALPHA_SIDE)
        out.append(_round(15 * a_dc) | _round(15 * a_scale) << 4)
        factors += a_ac
    out += _nibbles(factors)
    return bytes(out)


class _Grid:
    """The DCT of one channel of a width x height image, separably: each row against each
    horizontal cosine first, then those sums against each vertical cosine (in pure Python
    the direct double sum would cost ~50 times more)."""

    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height

    def encode(
        self, channel: Sequence[float], nx: int, ny: int
    ) -> tuple[float, list[float], float]:
        """The constant (DC) term, the varying (AC) terms scaled into 0..1, and the scale:
        the coefficients (cx, cy) with cx * ny < nx * (ny - cy), row by row of cy."""
        w, h = self.width, self.height
        rows = [channel[y * w : (y + 1) * w] for y in range(h)]
        by_row = [[_dot(row, _cosines(w, cx)) for row in rows] for cx in range(nx)]
        terms = [
            _dot(by_row[cx], _cosines(h, cy)) / (w * h)
            for cy in range(ny)
            for cx in range(nx)
            if cx * ny < nx * (ny - cy)
        ]
        dc, ac = terms[0], terms[1:]
        scale = max(map(abs, ac), default=0.0)
        if scale < _NOISE:
            # A flat channel: its AC terms are rounding noise, which scaling would blow up
            # into random nibbles (harmless, as the scale is 0, but not reproducible).
            return dc, [0.0] * len(ac), 0.0
        return dc, [0.5 + 0.5 / scale * f for f in ac], scale


def _lpq(
    red: bytes,
    green: bytes,
    blue: bytes,
    alpha: bytes,
    average: list[float],
    has_alpha: bool,
) -> tuple[list[float], list[float], list[float]]:
    """L, P and Q of every pixel, seen over the average colour where it is transparent (so
    that hidden colours leave no trace in the hash)."""
    if has_alpha:
        r, g, b = (
            [avg + (c / 255 - avg) * (a / 255) for c, a in zip(band, alpha, strict=True)]
            for band, avg in zip((red, green, blue), average, strict=True)
        )
    else:
        r, g, b = ([c / 255 for c in band] for band in (red, green, blue))
    rgb = list(zip(r, g, b, strict=True))
    l_chan = [(x + y + z) / 3 for x, y, z in rgb]
    p_chan = [(x + y) / 2 - z for x, y, z in rgb]
    q_chan = [x - y for x, y, _ in rgb]
    return l_chan, p_chan, q_chan


def _nibbles(factors: list[float]) -> bytearray:
    """Factors in 0..1 as 4-bit values, two to a byte, the first in the low half."""
    out = bytearray((len(factors) + 1) // 2)
    for i, f in enumerate(factors):
        out[i >> 1] |= _round(15 * f) << ((i & 1) * 4)
    return out


def _bands(rgba: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    return rgba[0::4], rgba[1::4], rgba[2::4], rgba[3::4]


@lru_cache(maxsize=256)
def _cosines(n: int, k: int) -> tuple[float, ...]:
    return tuple(math.cos(math.pi / n * k * (i + 0.5)) for i in range(n))


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    total: float = sum(map(mul, a, b))
    return total


def _round(x: float) -> int:
    """Half up, as JavaScript's Math.round (Python's round() goes to even): the reference
    encoder rounds so, and the same pixels should give the same hash everywhere."""
    return math.floor(x + 0.5)
