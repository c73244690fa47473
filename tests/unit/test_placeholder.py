"""worker/placeholder.py: the ThumbHash is checked by painting it (tests/thumbhash.py, as a
page would) and against the reference encoder's bytes; the average colour by arithmetic."""

from __future__ import annotations

import base64
import logging
import math
import re
from pathlib import Path

import pytest
import pyvips
from PIL import Image

from core.models import Placeholder
from core.profiles import Profile, parse_profiles
from tests import pixels
from tests.pixels import BLUE, GREY, ORANGE, RED
from tests.thumbhash import Decoded, decode
from worker.convert import Conversion, DecodeLimits, ProbedOriginal, open_image
from worker.placeholder import average_colour, placeholder_of, rgba_to_thumbhash

LIMITS = DecodeLimits(max_pixels=10_000_000, max_frames=50)
WEBP_60 = parse_profiles('[profiles.default]\nformats = ["webp"]\nwidths = [60]', "t").require(None)
HEX = re.compile(r"#[0-9a-f]{6}")


def solid(colour: tuple[int, ...], width: int = 64, height: int = 64) -> pyvips.Image:
    image = pyvips.Image.black(width, height, bands=len(colour)) + list(colour)
    return image.cast("uchar").copy(interpretation="srgb")


def hex_of(colour: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


def painted(placeholder: Placeholder) -> Decoded:
    assert len(base64.b64decode(placeholder.thumbhash)) <= 25
    assert HEX.fullmatch(placeholder.color), placeholder.color
    return decode(placeholder.thumbhash)


def close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=False))


def converted(tmp_path: Path, data: bytes, fmt: str, prof: Profile = WEBP_60) -> Conversion:
    path = tmp_path / "original"
    path.write_bytes(data)
    return open_image(str(path), fmt, prof, LIMITS)


def pattern(width: int, height: int, alpha: bool) -> bytes:
    """Gradients and a product term: something with detail, made without any library."""
    out = bytearray()
    for y in range(height):
        for x in range(width):
            a = (x * 7 + y * 3) % 256 if alpha else 255
            out += bytes([x * 255 // (width - 1), y * 255 // (height - 1), (x * y) % 256, a])
    return bytes(out)


# ---------------------------------------------------------------- the ThumbHash


@pytest.mark.parametrize(
    "colour", [RED, BLUE, GREY, ORANGE, (255, 255, 255), (0, 0, 0), (255, 0, 0)]
)
def test_a_solid_colour_is_painted_in_that_colour(colour: tuple[int, int, int]) -> None:
    placeholder = placeholder_of(solid(colour, 300, 200))
    assert placeholder.color == hex_of(colour)
    shown = painted(placeholder)
    assert not shown.has_alpha
    # Everywhere, within what 5-6 bits per channel of the hash's average can say.
    for y in range(shown.height):
        for x in range(shown.width):
            assert close(shown.pixel(x, y), (*colour, 255), 8), (x, y, shown.pixel(x, y))


def test_the_bytes_are_the_reference_encoders() -> None:
    # What evanw's `thumbhash` 0.1.1 (npm), rgbaToThumbHash, makes of the same pixels: a
    # page's thumbHashToDataURL reads ours exactly as it reads its own.
    assert rgba_to_thumbhash(100, 75, pattern(100, 75, False)) == base64.b64decode(
        "HwgKLZpwdndwd3d3d2d3d5CACfh3"
    )
    assert rgba_to_thumbhash(40, 90, pattern(40, 90, True)) == base64.b64decode(
        "X/iFGgwXgKCIeHiwoAv2mHd4pmAXhHc="
    )


@pytest.mark.parametrize("alpha", [False, True])
@pytest.mark.parametrize("size", [(100, 100), (100, 56), (9, 100), (1, 1), (100, 1)])
def test_a_hash_is_at_most_25_bytes(size: tuple[int, int], alpha: bool) -> None:
    width, height = size
    # Noise is the worst case: every coefficient counts.
    noise = pyvips.Image.gaussnoise(width, height, sigma=80, mean=128)
    image = noise.bandjoin([noise.rot180(), noise.fliphor(), noise.flipver()]).cast("uchar")
    if not alpha:
        image = image[:3].bandjoin_const([255])
    rgba = bytes(image.write_to_memory())
    thumbhash = rgba_to_thumbhash(width, height, rgba)
    assert len(thumbhash) <= (25 if alpha else 24)


def test_the_same_image_always_gives_the_same_placeholder() -> None:
    image = pyvips.Image.perlin(640, 480, cell_size=64, seed=5)
    image = (image.bandjoin([image.rot180(), image.fliphor()]) * 120 + 128).cast("uchar")
    image = image.copy(interpretation="srgb")
    first = placeholder_of(image)
    assert placeholder_of(image.copy_memory()) == first
    assert placeholder_of(pyvips.Image.new_from_buffer(image.pngsave_buffer(), "")) == first


@pytest.mark.parametrize(
    ("width", "height"), [(300, 100), (400, 300), (1920, 1080), (200, 200), (100, 200), (90, 400)]
)
def test_the_aspect_ratio_is_kept(width: int, height: int) -> None:
    shown = painted(placeholder_of(solid(GREY, width, height)))
    # ThumbHash keeps it approximately: a ratio of whole numbers up to 7 (90x400, 0.225,
    # comes out as 2/7).
    assert abs(math.log(shown.aspect / (width / height))) < math.log(1.3), shown.aspect
    assert (shown.width > shown.height) == (width > height)
    assert (shown.width == shown.height) == (width == height)


def test_a_png_with_transparency_gets_a_see_through_placeholder(tmp_path: Path) -> None:
    # Opaque red on the left, nothing on the right.
    im = Image.new("RGBA", (200, 100), (0, 0, 0, 0))
    im.paste((*RED, 255), (0, 0, 100, 100))
    placeholder = converted(tmp_path, pixels.save(im, "PNG"), "png").placeholder()
    assert placeholder is not None
    shown = painted(placeholder)
    assert shown.has_alpha
    mid = shown.height // 2
    left, right = shown.pixel(3, mid), shown.pixel(shown.width - 4, mid)
    assert left[3] > 200 and close(left[:3], RED, 40), left
    assert right[3] < 60, right


def test_an_opaque_image_has_no_alpha_in_its_hash(tmp_path: Path) -> None:
    data = pixels.save(pixels.marked(300, 200), "JPEG", quality=90)
    placeholder = converted(tmp_path, data, "jpeg").placeholder()
    assert placeholder is not None
    assert not painted(placeholder).has_alpha


def test_the_placeholder_is_upright(tmp_path: Path) -> None:
    upright = Image.new("RGB", (300, 200), BLUE)
    upright.paste(RED, (0, 0, 150, 200))  # red left half, blue right half
    stored = pixels.stored_with_orientation(upright, 6)
    data = pixels.save(stored, "JPEG", quality=95, exif=pixels.exif_bytes(6))
    placeholder = converted(tmp_path, data, "jpeg").placeholder()
    assert placeholder is not None
    shown = painted(placeholder)
    assert shown.width > shown.height  # displayed 300x200, stored 200x300
    left, right = shown.pixel(2, shown.height // 2), shown.pixel(shown.width - 3, shown.height // 2)
    assert left[0] > left[2] + 60 and right[2] > right[0] + 60, (left, right)


def test_an_animation_is_shown_by_its_first_frame(tmp_path: Path) -> None:
    data = pixels.animated("GIF", [RED, BLUE, GREY])
    placeholder = converted(tmp_path, data, "gif").placeholder()
    assert placeholder is not None
    assert close(tuple(bytes.fromhex(placeholder.color[1:])), RED, 6), placeholder.color


@pytest.mark.parametrize("name", sorted(pixels.INPUTS))
def test_every_input_format_gets_a_placeholder(tmp_path: Path, name: str) -> None:
    fmt, build, _ = pixels.INPUTS[name]
    placeholder = converted(tmp_path, build(), fmt).placeholder()
    assert placeholder is not None
    shown = painted(placeholder)
    assert shown.has_alpha == (name in ("png-rgba", "webp-lossless", "heic-alpha", "tiff-rgba"))


def test_the_input_must_fit_100_pixels() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        rgba_to_thumbhash(101, 1, bytes(101 * 4))
    with pytest.raises(ValueError, match="are not"):
        rgba_to_thumbhash(2, 2, bytes(15))


def test_a_placeholder_that_cannot_be_made_fails_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = pixels.save(pixels.marked(400, 300), "JPEG", quality=90)
    # Its header reads, its pixels do not.
    broken = pyvips.Image.new_from_buffer(data[: len(data) // 2], "", fail_on="truncated")
    original = ProbedOriginal(str(tmp_path / "original"), "jpeg", 400, 300, 1)
    conversion = Conversion(original, broken, WEBP_60.plan(400, 300, False), WEBP_60, False)
    with caplog.at_level(logging.WARNING, logger="worker.convert"):
        assert conversion.placeholder() is None
    assert "no placeholder" in caplog.text


# ---------------------------------------------------------------- the average colour


def test_the_average_colour_weighs_pixels_by_their_alpha() -> None:
    # Left half opaque red, right half blue at a third: red counts three times as much.
    image = solid((255, 0, 0, 255), 50, 50).join(solid((0, 0, 255, 85), 50, 50), "horizontal")
    assert average_colour(bytes(image.write_to_memory())) == "#bf0040"  # 191.25, 63.75
    assert placeholder_of(image).color == "#bf0040"


def test_hidden_colours_do_not_count() -> None:
    visible = solid((*ORANGE, 255), 100, 100)
    hidden = solid((0, 255, 0, 0), 100, 100)  # green, fully transparent
    image = visible.join(hidden, "vertical")
    placeholder = placeholder_of(image)
    assert placeholder.color == hex_of(ORANGE)
    shown = painted(placeholder)
    top = shown.pixel(shown.width // 2, 2)
    assert close(top[:3], ORANGE, 40) and top[3] > 200, top


def test_nothing_visible_averages_to_black() -> None:
    assert placeholder_of(solid((200, 100, 50, 0), 20, 20)).color == "#000000"


def test_the_average_is_of_the_whole_picture_not_a_corner() -> None:
    # A 4000x10 strip: red then blue, 3 to 1, shrunk to 100x1 on the way.
    image = solid(RED, 3000, 10).join(solid(BLUE, 1000, 10), "horizontal")
    r, g, b = bytes.fromhex(placeholder_of(image).color[1:])
    expected = [(3 * c1 + c2) / 4 for c1, c2 in zip(RED, BLUE, strict=True)]
    assert all(abs(a - e) <= 2 for a, e in zip((r, g, b), expected, strict=True)), (r, g, b)
