"""A ThumbHash decoder for the tests: what a page's `thumbHashToRGBA` would paint.

Written separately from the encoder in worker/placeholder.py (it shares no code with it),
so a mistake in the bit layout shows up as a wrong picture rather than cancelling out.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

SIDE = 32  # the longer side of the decoded picture, as the reference decoder makes it


@dataclass(frozen=True, slots=True)
class Decoded:
    width: int
    height: int
    rgba: bytes  # not premultiplied, row by row
    has_alpha: bool
    aspect: float  # approximate width / height, from the header alone

    def pixel(self, x: int, y: int) -> tuple[int, int, int, int]:
        i = (y * self.width + x) * 4
        r, g, b, a = self.rgba[i : i + 4]
        return r, g, b, a

    def mean(self) -> tuple[float, float, float, float]:
        """Alpha-weighted mean colour (0-255) and mean alpha (0-255)."""
        alphas = self.rgba[3::4]
        weight = sum(alphas) or 1
        r, g, b = (
            sum(c * a for c, a in zip(self.rgba[i::4], alphas, strict=True)) / weight
            for i in range(3)
        )
        return r, g, b, sum(alphas) / len(alphas)


def decode(thumbhash: str | bytes) -> Decoded:
    """Render a ThumbHash (bytes, or their base64) at SIDE pixels on its longer side."""
    data = base64.b64decode(thumbhash) if isinstance(thumbhash, str) else thumbhash
    head = int.from_bytes(data[0:3], "little")
    tail = int.from_bytes(data[3:5], "little")
    has_alpha = bool(head >> 23 & 1)
    landscape = bool(tail >> 15 & 1)
    l_side, short = (5 if has_alpha else 7), tail & 7
    lx, ly = (l_side, short) if landscape else (short, l_side)
    dc = {
        "l": (head & 63) / 63,
        "p": (head >> 6 & 63) / 31.5 - 1,
        "q": (head >> 12 & 63) / 31.5 - 1,
        "a": (data[5] & 15) / 15 if has_alpha else 1.0,
    }
    scales = {
        "l": (head >> 18 & 31) / 31,
        # The reference decoder boosts colour by 1.25 against quantisation: so does this.
        "p": (tail >> 3 & 63) / 63 * 1.25,
        "q": (tail >> 9 & 63) / 63 * 1.25,
        "a": (data[5] >> 4) / 15 if has_alpha else 0.0,
    }
    nibbles = [n for byte in data[6 if has_alpha else 5 :] for n in (byte & 15, byte >> 4)]
    grids = {"l": (max(3, lx), max(3, ly)), "p": (3, 3), "q": (3, 3), "a": (5, 5)}
    terms: dict[str, list[tuple[int, int, float]]] = {}
    for name in ("l", "p", "q", "a") if has_alpha else ("l", "p", "q"):
        nx, ny = grids[name]
        cells = [(cx, cy) for cy in range(ny) for cx in range(nx) if cx * ny < nx * (ny - cy)]
        terms[name] = []
        for cx, cy in cells[1:]:
            value = (nibbles.pop(0) / 7.5 - 1) * scales[name]
            terms[name].append((cx, cy, value))

    aspect = lx / ly
    width = round(SIDE if aspect > 1 else SIDE * aspect)
    height = round(SIDE / aspect if aspect > 1 else SIDE)
    out = bytearray()
    for y in range(height):
        for x in range(width):
            v = {
                name: dc[name]
                + sum(
                    f
                    * math.cos(math.pi / width * (x + 0.5) * cx)
                    * math.cos(math.pi / height * (y + 0.5) * cy)
                    * 2
                    for cx, cy, f in terms.get(name, [])
                )
                for name in ("l", "p", "q", "a")
            }
            b = v["l"] - 2 / 3 * v["p"]
            r = (3 * v["l"] - b + v["q"]) / 2
            g = r - v["q"]
            out += bytes(_byte(c) for c in (r, g, b, v["a"]))
    return Decoded(width, height, bytes(out), has_alpha, aspect)


def _byte(value: float) -> int:
    return int(max(0.0, min(1.0, value)) * 255)
