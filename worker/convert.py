"""Pixels in, bytes out: decode an original once, then encode every variant of its plan.

No Redis and no S3 here: a file path goes in, encoded variants come out, so all of it is
testable without servers.

Engines (measured, see README "Conversion"): libvips through pyvips decodes JPEG, PNG,
GIF, WebP, AVIF and TIFF with shrink-on-load and auto-rotation, and encodes every variant.
Pillow (with pillow-heif) decodes only what pyvips-binary cannot: HEIC and BMP; its pixels
are handed to libvips for the rest of the pipeline.

What every variant gets:
- upright (EXIF/TIFF orientation applied; HEIF irot/imir applied by libheif);
- sRGB: an embedded ICC profile (Display P3, Adobe RGB, CMYK...) is converted to sRGB,
  an untagged CMYK image goes through libvips' built-in CMYK profile;
- no metadata at all (EXIF, GPS, XMP, IPTC and ICC stripped; untagged means sRGB);
- alpha where the format has it; an alpha channel that is fully opaque is dropped; JPEG
  variants of transparent images are flattened on the profile's `background`;
- 8 bits per channel.

Animation: animated GIF and WebP stay animated in WebP variants (when the profile says
`animate`); AVIF, JPEG and PNG variants show the first frame. An animation with more than
`max_frames` frames, or whose frames hold more than `max_pixels` pixels in total, becomes a
still of its first frame everywhere. APNG is read as a still (libvips reads its default
image). Multi-page TIFF: the first page.

Placeholder: the same decoded image also gives the record's ThumbHash and average colour
(worker/placeholder.py, `Conversion.placeholder`); nothing is decoded twice.

Limits: the pixel count is checked from the header before any pixel is decoded.
Everything that is wrong with the input raises `ConversionError` with a sentence a person
can read; nothing else is raised for bad input.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import pillow_heif
import pyvips
from PIL import Image

from core.metrics import VARIANT_DURATION
from core.models import Placeholder
from core.profiles import Profile, VariantSpec
from worker.placeholder import placeholder_of

log = logging.getLogger(__name__)

# Only the loaders we name below may run, and none that libvips marks untrusted.
pyvips.block_untrusted_set(True)
# Each conversion runs once in a fresh process: an operation cache only holds memory.
pyvips.cache_set_max(0)
# One libvips worker per pipeline: parallelism comes from encoding several variants at once
# (`render_all`), as sharp does (its default concurrency is 1 here). With libvips' default
# (one worker per core) each of the two encoder threads started its own pool: 4+ threads on
# 2 cores, whose strips wait for any worker the kernel has preempted. Measured on a loaded
# 2-core machine, 4 MP PNG with alpha: 5.5-5.8 s -> 3.7-5.0 s wall, 2.7-2.9 -> 2.5-2.6 s CPU.
# It also pins the AVIF bytes: libaom's output depends on its thread count, which libvips
# takes from this setting, so the same original gives the same bytes on any machine.
pyvips.concurrency_set(1)
pillow_heif.register_heif_opener()

# libvips' largest coordinate: "any height" for width-only boxes.
_ANY = 10_000_000

# sniffed format -> (libvips loader that must be the one reading it, label for messages)
VIPS_FORMATS = {
    "jpeg": ("jpegload", "JPEG"),
    "png": ("pngload", "PNG"),
    "gif": ("gifload", "GIF"),
    "webp": ("webpload", "WebP"),
    "avif": ("heifload", "AVIF"),
    "tiff": ("tiffload", "TIFF"),
}
# sniffed format -> (Pillow plugin, label)
PILLOW_FORMATS = {"heic": ("HEIF", "HEIC"), "bmp": ("BMP", "BMP")}
ANIMATED_FORMATS = {"gif", "webp"}
# Encode time per pixel (per frame for an animated WebP), relative: see `Conversion._cost`.
_ENCODE_COST = {"avif": 6.0, "webp": 1.5, "png": 1.5, "jpeg": 0.4}
DECODABLE = frozenset(VIPS_FORMATS) | frozenset(PILLOW_FORMATS)


TOO_BIG = "needs more memory than a conversion may use"


class ConversionError(Exception):
    """The input, or one variant of it, cannot be converted. Permanent: retrying gives the
    same answer. The message is meant for the image's owner."""


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What an original may hold before it is decoded: pixels (all frames together, for an
    animation to stay animated) and frames."""

    max_pixels: int
    max_frames: int


@dataclass(frozen=True, slots=True)
class Rendered:
    spec: VariantSpec
    data: bytes
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class Failed:
    """A variant the encoder refused; `error` is for the image's owner."""

    spec: VariantSpec
    error: str


@dataclass(frozen=True, slots=True)
class ProbedOriginal:
    """An original opened header-only: nothing decoded yet."""

    path: str
    format: str
    width: int  # displayed size (orientation applied)
    height: int
    frames: int


def open_image(path: str, fmt: str, profile: Profile, limits: DecodeLimits) -> Conversion:
    """Check the header against the limits, decode once at the size of the largest variant
    of `profile`, and plan the variants. Raises ConversionError."""
    original = _probe(path, fmt)
    _check_pixels(original.width, original.height, limits.max_pixels)
    # Size the decode for every variant that might be made (alpha not known yet).
    largest = max(
        _target_width(spec, original.width, original.height)
        for spec in profile.plan(original.width, original.height, alpha=None)
    )
    base = _decode(original, largest)
    alpha = bool(base.hasalpha())
    plan = profile.plan(original.width, original.height, alpha)
    return Conversion(original, base, plan, profile, _animated(original, profile, limits))


class Conversion:
    """An original decoded once: upright, sRGB, 8-bit, held in memory at the size of the
    largest variant. `render` makes one variant of `plan` from it."""

    def __init__(
        self,
        original: ProbedOriginal,
        base: pyvips.Image,
        plan: tuple[VariantSpec, ...],
        profile: Profile,
        animated: bool,
    ) -> None:
        self.original = original
        self.base = base
        self.plan = plan
        self.profile = profile
        self.animated = animated
        # One resize per box, shared by the formats of that size (3 resizes instead of 9 in
        # the default profile): with alpha each resize premultiplies in float, ~25-60 ms
        # for a 4 MP PNG. Each box has a lock, so two encoder threads never resize it twice.
        self._sizes: dict[tuple[int, int], pyvips.Image] = {}
        self._size_locks: dict[tuple[int, int], threading.Lock] = {}
        self._locks_lock = threading.Lock()

    @property
    def width(self) -> int:
        return self.original.width

    @property
    def height(self) -> int:
        return self.original.height

    def placeholder(self) -> Placeholder | None:
        """The image's placeholder (worker/placeholder.py), from the decoded image already in
        memory. None, with a warning in the log, if it cannot be made: a page can do without
        one, so it never fails a conversion."""
        try:
            return placeholder_of(self.base)
        except Exception:  # whatever the cause: libvips, memory, a bug in the encoder
            log.warning("no placeholder for this image", exc_info=True)
            return None

    def render_all(self, threads: int) -> Generator[Rendered | Failed, None, None]:
        """Every variant of the plan, each as soon as it is made (completion order, not plan
        order), `threads` encoders at once (libvips releases the GIL, so single-threaded
        encoders overlap: measured 1.8 s -> 1.3 s for a 12 MP photo, 2 cores).

        The order they start in: the thumbnail (the smallest size, first in plan order),
        then the longest encodes for the other encoders, then the rest of the smallest size,
        then the others longest first (`_cost`). So a page has a thumbnail within tens of
        ms of the first encode, while the longest encode (a 2048 px AVIF: most of a photo's
        conversion; an animated WebP: most of a GIF's) still starts at once and nothing
        long is left alone at the end: the thumbnail first costs the time to `ready`
        nothing measurable (bench/e2e.py). With one encoder the whole smallest size comes
        first. Logs each encode's time (one INFO line).
        """

        def box(spec: VariantSpec) -> tuple[int, float]:
            return spec.size.width, spec.size.height or math.inf

        smallest = min(map(box, self.plan), default=None)
        small = [spec for spec in self.plan if box(spec) == smallest]
        large = sorted((s for s in self.plan if box(s) != smallest), key=self._cost, reverse=True)
        others = max(0, threads - 1)
        order = small[:1] + large[:others] + small[1:] + large[others:]
        took: dict[str, float] = {}

        def timed(spec: VariantSpec) -> Rendered | Failed:
            start = time.perf_counter()
            try:
                return self._render_or_fail(spec)
            finally:
                took[spec.name] = time.perf_counter() - start
                VARIANT_DURATION.labels(spec.format, spec.size.name).observe(took[spec.name])

        began = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="encode")
        try:
            futures = [pool.submit(timed, spec) for spec in order]
            for future in as_completed(futures):
                yield future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        log.info(
            "encoded %d variants, %d at once: render=%.0f %s",
            len(took),
            threads,
            (time.perf_counter() - began) * 1000,
            " ".join(f"encode:{name}={s * 1000:.0f}" for name, s in took.items()),
        )

    def _cost(self, spec: VariantSpec) -> float:
        """A variant's encode time, roughly: its pixels times its encoder's cost per pixel,
        times the frames for an animated WebP. Only the order matters (longest first: what a pool of
        encoders finishes soonest with), so the weights are coarse, from the encode times
        the worker logs: an 800x600 GIF took 286 ms as a still AVIF, 20 ms as a JPEG and
        1.7 s as a 24-frame animated WebP (71 ms a frame); a 12 MP photo's 2048 px AVIF is
        its longest encode."""
        scale = min(1.0, spec.size.width / self.width)
        if spec.size.height:
            scale = min(scale, spec.size.height / self.height)
        pixels = self.width * self.height * scale * scale
        frames = self.original.frames if self.animated and spec.format == "webp" else 1
        return pixels * _ENCODE_COST.get(spec.format, 1.0) * frames

    def _render_or_fail(self, spec: VariantSpec) -> Rendered | Failed:
        try:
            return self.render(spec)
        except ConversionError as exc:
            return Failed(spec, str(exc))

    def render(self, spec: VariantSpec) -> Rendered:
        """Encode one variant. Raises ConversionError if the encoder refuses it."""
        try:
            if self.animated and spec.format == "webp":
                image = self._animation(spec)
            else:
                image = self._resized(spec)
            data = _encode(image, spec, self.profile.background)
        except pyvips.Error as exc:
            raise ConversionError(f"{spec.name} could not be encoded: {_reason(exc)}") from None
        except MemoryError:
            raise ConversionError(f"{spec.name}: {TOO_BIG}") from None
        return Rendered(spec, data, image.width, _page_height(image))

    def _resized(self, spec: VariantSpec) -> pyvips.Image:
        """The base fitted into the variant's box, in memory, made once per box."""
        box = _box(spec)
        image = self.base
        if image.width <= box[0] and _page_height(image) <= box[1]:
            return image
        with self._locks_lock:
            lock = self._size_locks.setdefault(box, threading.Lock())
        with lock:
            if box not in self._sizes:
                resized = image.thumbnail_image(box[0], height=box[1], size="down", no_rotate=True)
                self._sizes[box] = resized.copy_memory()
            return self._sizes[box]

    def _animation(self, spec: VariantSpec) -> pyvips.Image:
        # Frames are streamed from the file for each animated variant instead of being held
        # in memory all at once: a decode per size, but memory of about one frame.
        box_w, box_h = _box(spec)
        image = pyvips.Image.thumbnail(
            f"{self.original.path}[n=-1]", box_w, height=box_h, size="down", fail_on="error"
        )
        return _to_srgb(image)


def _probe(path: str, fmt: str) -> ProbedOriginal:
    if fmt in VIPS_FORMATS:
        return _probe_vips(path, fmt)
    if fmt in PILLOW_FORMATS:
        return _probe_pillow(path, fmt)
    raise ConversionError(f"{fmt} images cannot be converted")


def _probe_vips(path: str, fmt: str) -> ProbedOriginal:
    loader, label = VIPS_FORMATS[fmt]
    try:
        header = pyvips.Image.new_from_file(path, access="sequential", fail_on="error")
    except pyvips.Error as exc:
        raise ConversionError(f"the {label} file could not be read: {_reason(exc)}") from None
    if header.get("vips-loader") != loader:
        raise ConversionError(f"the file is not a valid {label} image")
    width, height = header.width, _page_height(header)
    if _field(header, "orientation") in (5, 6, 7, 8):
        width, height = height, width
    return ProbedOriginal(path, fmt, width, height, _field(header, "n-pages") or 1)


def _probe_pillow(path: str, fmt: str) -> ProbedOriginal:
    plugin, label = PILLOW_FORMATS[fmt]
    try:
        with Image.open(path, formats=[plugin]) as im:
            width, height = im.size
            frames = getattr(im, "n_frames", 1)
    except (OSError, ValueError, SyntaxError, RuntimeError, EOFError) as exc:
        raise ConversionError(f"the {label} file could not be read: {exc}") from None
    return ProbedOriginal(path, fmt, width, height, frames)


def _check_pixels(width: int, height: int, max_pixels: int, frames: int = 1) -> None:
    if width < 1 or height < 1:
        raise ConversionError(f"the image claims an impossible size, {width}x{height}")
    pixels = width * height * frames
    if pixels > max_pixels:
        what = f"{frames} frames of {width}x{height}" if frames > 1 else f"{width}x{height}"
        raise ConversionError(f"{what} is {pixels} pixels, above the limit of {max_pixels}")


def _animated(original: ProbedOriginal, profile: Profile, limits: DecodeLimits) -> bool:
    if not profile.animate or original.format not in ANIMATED_FORMATS or original.frames < 2:
        return False
    if original.frames > limits.max_frames:
        return False
    try:
        _check_pixels(original.width, original.height, limits.max_pixels, original.frames)
    except ConversionError:
        return False
    return True


def _target_width(spec: VariantSpec, width: int, height: int) -> int:
    scale = min(1.0, spec.size.scale(width, height, spec.encoder.max_side))
    return max(1, math.ceil(width * scale))


def _box(spec: VariantSpec) -> tuple[int, int]:
    cap = spec.encoder.max_side
    return min(spec.size.width, cap), min(spec.size.height or _ANY, cap)


def _decode(original: ProbedOriginal, width: int) -> pyvips.Image:
    """The one decode: upright, sRGB, 8-bit, `width` pixels wide, in memory."""
    label = (VIPS_FORMATS.get(original.format) or PILLOW_FORMATS[original.format])[1]
    try:
        if original.format in VIPS_FORMATS:
            # thumbnail shrinks on load (JPEG DCT scaling, WebP/HEIF scaled decode) and
            # applies the orientation.
            image = pyvips.Image.thumbnail(
                original.path, width, height=_ANY, size="down", fail_on="error"
            )
        else:
            image = _pillow_decode(original, width)
        return _opaque(_to_srgb(image).copy_memory())
    except pyvips.Error as exc:
        raise ConversionError(f"the {label} image could not be decoded: {_reason(exc)}") from None
    except MemoryError:
        # Only under the work-horse's memory limit (PICSTREAM_JOB_MEMORY): permanent, as
        # the same image will need the same memory next time.
        raise ConversionError(f"the {label} image {TOO_BIG}") from None


def _pillow_decode(original: ProbedOriginal, width: int) -> pyvips.Image:
    plugin, label = PILLOW_FORMATS[original.format]
    try:
        with Image.open(original.path, formats=[plugin]) as opened:
            opened.load()
            icc = opened.info.get("icc_profile")
            mode = "RGBA" if _pillow_alpha(opened) else "RGB"
            im = opened if opened.mode == mode else opened.convert(mode)
            # Box-reduce by a whole factor first, leaving at least 2x for libvips' lanczos,
            # so a huge bitmap is never copied at full size.
            factor = max(1, im.width // (2 * width))
            if factor > 1:
                im = im.reduce(factor)
            data, size, bands = im.tobytes(), im.size, len(im.getbands())
    except (OSError, ValueError, SyntaxError, RuntimeError, EOFError) as exc:
        raise ConversionError(f"the {label} image could not be decoded: {exc}") from None
    image = pyvips.Image.new_from_memory(data, size[0], size[1], bands, "uchar")
    image = image.copy(interpretation="srgb")
    if icc:
        image.set_type(pyvips.GValue.blob_type, "icc-profile-data", icc)
    return image.thumbnail_image(width, height=_ANY, size="down", no_rotate=True)


def _pillow_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info


def _to_srgb(image: pyvips.Image) -> pyvips.Image:
    """Colour-convert to 8-bit sRGB with the embedded profile, if there is one."""
    if image.get_typeof("icc-profile-data"):
        try:
            image = image.icc_transform("srgb", embedded=True, input_profile="srgb")
        except pyvips.Error as exc:
            # A broken profile is not worth failing the image over: read it as sRGB.
            log.warning("ignoring an unusable ICC profile: %s", _reason(exc))
            image = image.copy()
            image.remove("icc-profile-data")
    elif image.interpretation == "cmyk":
        image = image.icc_transform("srgb", input_profile="cmyk")
    if image.interpretation != "srgb":
        image = image.colourspace("srgb")
    if image.format != "uchar":
        image = image.cast("uchar")
    return image


def _opaque(image: pyvips.Image) -> pyvips.Image:
    """Drop an alpha channel that is fully opaque (smaller files, and JPEG is then exact).
    `image` is in memory: the check reads pixels."""
    if image.hasalpha() and image[image.bands - 1].min() >= 255:
        return image.extract_band(0, n=image.bands - 1).copy_memory()
    return image


def _encode(image: pyvips.Image, spec: VariantSpec, background: Sequence[int]) -> bytes:
    q, effort = spec.quality, spec.effort
    if spec.format == "avif":
        data = image.heifsave_buffer(compression="av1", Q=q, effort=effort, bitdepth=8, keep="none")
    elif spec.format == "webp":
        data = image.webpsave_buffer(Q=q, effort=effort, keep="none")
    elif spec.format == "jpeg":
        if image.hasalpha():
            image = image.flatten(background=list(background))
        data = image.jpegsave_buffer(Q=q, optimize_coding=True, interlace=True, keep="none")
    elif spec.format == "png":
        data = image.pngsave_buffer(compression=effort, keep="none")
    else:
        raise ConversionError(f"{spec.format} is not an output format")
    return bytes(data)


def _page_height(image: pyvips.Image) -> int:
    page = _field(image, "page-height")
    return page if page and image.height % page == 0 else image.height


def _field(image: pyvips.Image, name: str) -> int | None:
    return int(image.get(name)) if image.get_typeof(name) else None


def _reason(exc: pyvips.Error) -> str:
    """libvips' own last words, without its call-stack noise."""
    lines = [line.strip() for line in (exc.detail or exc.message or "").splitlines()]
    useful = [line.split(": ", 1)[-1] for line in lines if line and "unable to call" not in line]
    return "; ".join(dict.fromkeys(useful))[:300] or "no details from the decoder (damaged file?)"
