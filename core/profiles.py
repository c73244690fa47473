"""Conversion profiles: which variants to make of an upload and how to encode them.

Profiles live in a TOML file named by `PICSTREAM_PROFILES` (the built-in `DEFAULT_TOML` below
when unset). The API checks `?profile=NAME` against them; the worker reads the details. No
image library here: planning is arithmetic on the displayed size.

    [profiles.default]
    formats = ["avif", "webp", "jpeg"]   # encoders, in the order variants are made
    widths = [256, 1024, 2048]           # box W wide, any height: variant name w{W}.{ext}
    boxes = ["256x256"]                  # optional box W x H: variant name {W}x{H}.{ext}
    background = "#ffffff"               # JPEG of an image with alpha is flattened on this
    animate = true                       # animated GIF/WebP stay animated in WebP variants

    [profiles.default.avif]              # optional, per format: any of
    quality = 50                         #   encoder quality 1-100
    effort = 4                           #   encoder effort (range per format, see ENCODERS)
    widths = [1024]                      #   sizes for this format only
    when = "alpha"                       #   only for inputs with transparency

Sizing rules (the same for every variant):
- A variant fits inside its box keeping the aspect ratio, upright (EXIF orientation applied).
- Never upscaled. Sizes whose box is at least as large as the image are made ONCE, at the
  original size, under the smallest such size's name; the larger ones are not made. So an
  800 px wide photo gets w256 (256 px) and w1024 (800 px), and no w2048.
- A box is also capped at the format's largest side (WebP 16383), so very long images
  still encode.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from core.errors import ProfileNotFound

DEFAULT_PROFILE = "default"

# Effort is pinned per format: encoder defaults differ between libraries and cost 2-10x.
# AVIF effort 2 measured on an 1800x1200 photo: 0.8 s and +1 dB PSNR over effort 0 (0.15 s)
# at the same size; effort 4 (the libvips/sharp default) took 5.5 s for nothing more.
DEFAULT_TOML = """
[profiles.default]
formats = ["avif", "webp", "jpeg"]
widths = [256, 1024, 2048]
background = "#ffffff"
animate = true

[profiles.default.avif]
quality = 50
effort = 2

[profiles.default.webp]
quality = 80
effort = 4

[profiles.default.jpeg]
quality = 80
"""

When = Literal["always", "alpha"]


@dataclass(frozen=True, slots=True)
class Encoder:
    """An output format: file extension, MIME type, its knobs' ranges and pinned defaults.

    `effort` means: AVIF libaom effort 0-9 (cpu-used = 9 - effort), WebP method 0-6,
    PNG zlib level 0-9; JPEG has none (always Huffman-optimised and progressive).
    """

    ext: str
    content_type: str
    quality: int
    effort: int
    max_effort: int
    max_side: int


ENCODERS: dict[str, Encoder] = {
    "avif": Encoder("avif", "image/avif", quality=50, effort=2, max_effort=9, max_side=16384),
    "webp": Encoder("webp", "image/webp", quality=80, effort=4, max_effort=6, max_side=16383),
    "jpeg": Encoder("jpg", "image/jpeg", quality=80, effort=0, max_effort=0, max_side=65535),
    "png": Encoder("png", "image/png", quality=100, effort=6, max_effort=9, max_side=2**31 - 1),
}


class ProfileError(ValueError):
    """The profiles file is invalid; the message says where."""


@dataclass(frozen=True, slots=True, order=True)
class Size:
    """A box: `width` x `height` pixels, or `width` wide and any height when height is None."""

    width: int
    height: int | None = None

    @property
    def name(self) -> str:
        return f"w{self.width}" if self.height is None else f"{self.width}x{self.height}"

    def scale(self, width: int, height: int, max_side: int) -> float:
        """The factor that fits a `width` x `height` image inside this box (> 1: it fits)."""
        box_w = min(self.width, max_side)
        box_h = min(self.height or max_side, max_side)
        return min(box_w / width, box_h / height)


@dataclass(frozen=True, slots=True)
class VariantSpec:
    """One variant to make: `name` is stable (`w1024.webp`), the key under the image prefix."""

    name: str
    format: str
    size: Size
    quality: int
    effort: int

    @property
    def encoder(self) -> Encoder:
        return ENCODERS[self.format]


@dataclass(frozen=True, slots=True)
class Output:
    """One format of a profile, with its sizes and condition."""

    format: str
    sizes: tuple[Size, ...]
    quality: int
    effort: int
    when: When = "always"


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    outputs: tuple[Output, ...]
    background: tuple[int, int, int] = (255, 255, 255)
    animate: bool = True

    def plan(
        self, width: int | None, height: int | None, alpha: bool | None
    ) -> tuple[VariantSpec, ...]:
        """The variants for an image of this displayed size. Unknown size (None): every
        size; unknown alpha (None): conditional outputs included. The worker plans again
        with what the decoder says, and that plan is the one that counts."""
        specs: list[VariantSpec] = []
        for out in self.outputs:
            if out.when == "alpha" and alpha is False:
                continue
            for size in _kept_sizes(out, width, height):
                name = f"{size.name}.{ENCODERS[out.format].ext}"
                specs.append(VariantSpec(name, out.format, size, out.quality, out.effort))
        return tuple(specs)


def _kept_sizes(out: Output, width: int | None, height: int | None) -> list[Size]:
    ordered = sorted(out.sizes, key=lambda s: (s.width, s.height or math.inf))
    if not width or not height:
        return ordered
    kept: list[Size] = []
    max_side = ENCODERS[out.format].max_side
    for size in ordered:
        kept.append(size)
        if size.scale(width, height, max_side) >= 1:
            break  # made at the original size; larger boxes would give the same pixels
    return kept


@dataclass(frozen=True, slots=True)
class Profiles:
    by_name: Mapping[str, Profile]

    def require(self, name: str | None) -> Profile:
        """The profile called `name` (the default for None); ProfileNotFound if there is none."""
        name = DEFAULT_PROFILE if name is None else name
        profile = self.by_name.get(name)
        if profile is None:
            known = ", ".join(sorted(self.by_name))
            raise ProfileNotFound(f"unknown profile {name!r} (profiles: {known})")
        return profile


def default_profiles() -> Profiles:
    return parse_profiles(DEFAULT_TOML, "built-in profiles")


def load_profiles(path: str) -> Profiles:
    """Read and check a profiles file. Raises ProfileError (or OSError) naming the problem."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8")
    return parse_profiles(text, path)


def parse_profiles(text: str, source: str) -> Profiles:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{source}: {exc}") from None
    tables = data.get("profiles")
    if not isinstance(tables, dict) or not tables:
        raise ProfileError(f"{source}: no [profiles.NAME] table")
    by_name = {
        name: _profile(name, table, f"{source}: profile {name!r}") for name, table in tables.items()
    }
    if DEFAULT_PROFILE not in by_name:
        raise ProfileError(f"{source}: a profile named {DEFAULT_PROFILE!r} is required")
    return Profiles(by_name)


_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BOX_RE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")
_COLOUR_RE = re.compile(r"#([0-9a-fA-F]{6})")
_PROFILE_KEYS = {"formats", "widths", "boxes", "background", "animate", *ENCODERS}
_OUTPUT_KEYS = {"quality", "effort", "widths", "boxes", "when"}


def _profile(name: str, table: Any, where: str) -> Profile:
    if not _NAME_RE.fullmatch(name):
        raise ProfileError(f"{where}: names are 1-64 characters from A-Z, a-z, 0-9, '_', '-'")
    t = _table(table, where, _PROFILE_KEYS)
    formats = t.get("formats")
    if not isinstance(formats, list) or not formats or not all(f in ENCODERS for f in formats):
        raise ProfileError(f"{where}: formats must list some of {', '.join(ENCODERS)}")
    if len(set(formats)) != len(formats):
        raise ProfileError(f"{where}: formats lists a format twice")
    sizes = _sizes(t, where)
    outputs = tuple(_output(fmt, t.get(fmt, {}), sizes, f"{where}, [{fmt}]") for fmt in formats)
    if not any(out.sizes for out in outputs):
        raise ProfileError(f"{where}: no sizes (set widths or boxes)")
    animate = t.get("animate", True)
    if not isinstance(animate, bool):
        raise ProfileError(f"{where}: animate must be true or false")
    return Profile(name, outputs, _colour(t.get("background", "#ffffff"), where), animate)


def _output(fmt: str, table: Any, sizes: tuple[Size, ...], where: str) -> Output:
    t = _table(table, where, _OUTPUT_KEYS)
    enc = ENCODERS[fmt]
    own = _sizes(t, where)
    when = t.get("when", "always")
    if when not in ("always", "alpha"):
        raise ProfileError(f'{where}: when must be "always" or "alpha"')
    return Output(
        fmt,
        own or sizes,
        _int(t, "quality", enc.quality, 1, 100, where),
        _int(t, "effort", enc.effort, 0, enc.max_effort, where),
        when,
    )


def _sizes(t: Mapping[str, Any], where: str) -> tuple[Size, ...]:
    widths = t.get("widths", [])
    boxes = t.get("boxes", [])
    if not isinstance(widths, list) or not all(
        isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 65535 for w in widths
    ):
        raise ProfileError(f"{where}: widths must be whole numbers of pixels, 1-65535")
    if not isinstance(boxes, list) or not all(
        isinstance(b, str) and _BOX_RE.fullmatch(b) for b in boxes
    ):
        raise ProfileError(f'{where}: boxes must be strings like "256x256"')
    found = [Size(w) for w in widths]
    for box in boxes:
        match = _BOX_RE.fullmatch(box)
        assert match is not None
        found.append(Size(int(match[1]), int(match[2])))
    if len(set(found)) != len(found):
        raise ProfileError(f"{where}: a size is listed twice")
    return tuple(found)


def _table(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProfileError(f"{where}: expected a table")
    unknown = set(value) - allowed
    if unknown:
        raise ProfileError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    return value


def _int(t: Mapping[str, Any], key: str, default: int, low: int, high: int, where: str) -> int:
    value = t.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProfileError(f"{where}: {key} must be a whole number from {low} to {high}")
    return value


def _colour(value: Any, where: str) -> tuple[int, int, int]:
    match = _COLOUR_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ProfileError(f'{where}: background must be a colour like "#ffffff"')
    rgb = bytes.fromhex(match[1])
    return rgb[0], rgb[1], rgb[2]
