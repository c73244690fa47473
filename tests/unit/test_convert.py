"""worker/convert.py on images built in code: pixels are checked, not only sizes."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
import pyvips
from PIL import Image

from core.profiles import Profile, parse_profiles
from core.settings import DEFAULT_FORMATS
from core.sniff import SUPPORTED
from tests import pixels
from tests.images import chunk
from tests.pixels import BLUE, GREY, ORANGE, RED
from worker.convert import (
    DECODABLE,
    Conversion,
    ConversionError,
    DecodeLimits,
    Rendered,
    open_image,
)

LIMITS = DecodeLimits(max_pixels=10_000_000, max_frames=50)


def profile(body: str) -> Profile:
    return parse_profiles("[profiles.default]\n" + body, "test").require(None)


PNG_60 = profile('formats = ["png"]\nwidths = [60]')
ALL_FORMATS = profile('formats = ["avif", "webp", "jpeg", "png"]\nwidths = [48]')


def open_bytes(
    tmp_path: Path, data: bytes, fmt: str, prof: Profile = PNG_60, limits: DecodeLimits = LIMITS
) -> Conversion:
    path = tmp_path / "original"
    path.write_bytes(data)
    return open_image(str(path), fmt, prof, limits)


def render_all(conversion: Conversion) -> dict[str, Rendered]:
    return {spec.name: conversion.render(spec) for spec in conversion.plan}


def decoded(rendered: Rendered) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(rendered.data, "")


def near(actual: list[float], expected: tuple[int, ...], tolerance: float) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=False))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_upright(tmp_path: Path, orientation: int) -> None:
    data = pixels.jpeg_with_orientation(orientation)
    conversion = open_bytes(tmp_path, data, "jpeg")
    assert (conversion.width, conversion.height) == (120, 80)  # displayed size

    out = decoded(render_all(conversion)["w60.png"])
    assert (out.width, out.height) == (60, 40)
    corners = {"top-left": (3, 3), "top-right": (56, 3), "bottom-left": (3, 36)}
    colours = {name: out(x, y)[:3] for name, (x, y) in corners.items()}
    assert near(colours["top-left"], RED, 40), colours
    assert near(colours["top-right"], BLUE, 40), colours
    assert near(colours["bottom-left"], GREY, 40), colours


def test_tiff_orientation_tag_is_applied(tmp_path: Path) -> None:
    stored = pixels.stored_with_orientation(pixels.marked(), 6)
    data = pixels.save(stored, "TIFF", exif=pixels.exif_bytes(6))
    out = decoded(render_all(open_bytes(tmp_path, data, "tiff"))["w60.png"])
    assert (out.width, out.height) == (60, 40)
    assert near(out(3, 3), RED, 10) and near(out(56, 3), BLUE, 10)


@pytest.mark.parametrize("fmt", [".jpg", ".png", ".webp", ".tif"])
def test_display_p3_is_converted_to_srgb(tmp_path: Path, fmt: str) -> None:
    # Saturated sRGB red lies well inside P3, at quite different P3 numbers: a converter
    # that dropped the profile would leave those numbers.
    data, p3_numbers = pixels.display_p3((255, 0, 0), fmt)
    assert not near(p3_numbers, (255, 0, 0), 20)
    sniffed = {".jpg": "jpeg", ".png": "png", ".webp": "webp", ".tif": "tiff"}[fmt]
    for rendered in render_all(open_bytes(tmp_path, data, sniffed, ALL_FORMATS)).values():
        out = decoded(rendered)
        assert near(out(20, 20), (255, 0, 0), 12), (rendered.spec.name, out(20, 20))
        assert not out.get_typeof("icc-profile-data")  # stripped: untagged means sRGB


def test_mid_tone_keeps_its_colour_through_p3(tmp_path: Path) -> None:
    data, p3_numbers = pixels.display_p3(ORANGE)
    assert not near(p3_numbers, ORANGE, 8)
    out = decoded(render_all(open_bytes(tmp_path, data, "jpeg"))["w60.png"])
    assert near(out(20, 20), ORANGE, 4)


def test_heic_with_an_icc_profile_is_converted_to_srgb(tmp_path: Path) -> None:
    p3 = pixels.patch((255, 0, 0)).icc_transform("p3", input_profile="srgb")
    im = Image.frombytes("RGB", (p3.width, p3.height), p3.write_to_memory())
    data = pixels.save(im, "HEIF", quality=95, icc_profile=pixels.p3_profile())
    out = decoded(render_all(open_bytes(tmp_path, data, "heic"))["w60.png"])
    assert near(out(20, 20), (255, 0, 0), 16), out(20, 20)


def test_cmyk_jpeg_comes_out_rgb(tmp_path: Path) -> None:
    data = pixels.INPUTS["jpeg-cmyk"][1]()
    out = decoded(render_all(open_bytes(tmp_path, data, "jpeg"))["w60.png"])
    assert out.bands == 3 and out.interpretation == "srgb"
    assert near(out(30, 30), GREY, 30) and near(out(3, 3), RED, 60)


def test_alpha_is_kept_where_the_format_has_it(tmp_path: Path) -> None:
    data = pixels.save(pixels.rgba_half(), "PNG")
    conversion = open_bytes(
        tmp_path, data, "png", profile('formats = ["avif", "webp", "png"]\nwidths = [60]')
    )
    for rendered in render_all(conversion).values():
        out = decoded(rendered)
        assert out.hasalpha(), rendered.spec.name
        assert out(45, 5)[3] <= 5, rendered.spec.name  # transparent half
        assert out(10, 5)[3] >= 250 and near(out(10, 5), RED, 12), rendered.spec.name
        assert 100 <= out(45, 30)[3] <= 156, rendered.spec.name  # the 50% band


def test_jpeg_of_a_transparent_image_is_flattened_on_the_background(tmp_path: Path) -> None:
    data = pixels.save(pixels.rgba_half(), "PNG")
    white = open_bytes(tmp_path, data, "png", profile('formats = ["jpeg"]\nwidths = [60]'))
    out = decoded(render_all(white)["w60.jpg"])
    assert out.bands == 3
    assert near(out(45, 5), (255, 255, 255), 6)  # transparent -> the background
    assert near(out(10, 5), RED, 12)
    assert near(out(45, 30), (238, 142, 142), 12)  # 50% red over white

    black_bg = profile('formats = ["jpeg"]\nwidths = [60]\nbackground = "#000000"')
    out = decoded(render_all(open_bytes(tmp_path, data, "png", black_bg))["w60.jpg"])
    assert near(out(45, 5), (0, 0, 0), 6)


def test_an_opaque_alpha_channel_is_dropped(tmp_path: Path) -> None:
    data = pixels.save(pixels.marked().convert("RGBA"), "PNG")
    conversion = open_bytes(tmp_path, data, "png")
    assert not decoded(render_all(conversion)["w60.png"]).hasalpha()


def test_png_only_for_inputs_with_alpha(tmp_path: Path) -> None:
    conditional = profile(
        'formats = ["webp", "png"]\nwidths = [60]\n[profiles.default.png]\nwhen = "alpha"'
    )
    with_alpha = open_bytes(tmp_path, pixels.save(pixels.rgba_half(), "PNG"), "png", conditional)
    opaque = open_bytes(tmp_path, pixels.save(pixels.marked(), "PNG"), "png", conditional)
    assert [s.name for s in with_alpha.plan] == ["w60.webp", "w60.png"]
    assert [s.name for s in opaque.plan] == ["w60.webp"]


def test_never_upscales_and_makes_the_original_size_once(tmp_path: Path) -> None:
    data = pixels.save(pixels.marked(300, 200), "PNG")
    prof = profile('formats = ["png", "webp"]\nwidths = [100, 256, 1024, 2048]')
    made = render_all(open_bytes(tmp_path, data, "png", prof))
    sizes = {name: (r.width, r.height) for name, r in made.items()}
    assert sizes == {
        "w100.png": (100, 67),
        "w256.png": (256, 171),
        "w1024.png": (300, 200),  # the original size, once; no w2048
        "w100.webp": (100, 67),
        "w256.webp": (256, 171),
        "w1024.webp": (300, 200),
    }


def test_boxes_fit_both_sides(tmp_path: Path) -> None:
    data = pixels.save(pixels.marked(300, 200), "PNG")
    prof = profile('formats = ["png"]\nboxes = ["50x50", "400x100"]')
    made = render_all(open_bytes(tmp_path, data, "png", prof))
    assert {n: (r.width, r.height) for n, r in made.items()} == {
        "50x50.png": (50, 33),
        "400x100.png": (150, 100),
    }


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_animation_is_kept_in_webp_and_first_frame_elsewhere(tmp_path: Path, fmt: str) -> None:
    data = pixels.animated(fmt.upper(), [RED, (30, 200, 30), BLUE])
    conversion = open_bytes(tmp_path, data, fmt, ALL_FORMATS)
    made = render_all(conversion)
    with Image.open(io.BytesIO(made["w48.webp"].data)) as webp:
        assert webp.n_frames == 3
        assert webp.size == (48, 32)
        webp.seek(2)
        assert near(webp.convert("RGB").getpixel((20, 20)), BLUE, 20)  # type: ignore[arg-type]
    for name in ("w48.avif", "w48.jpg", "w48.png"):
        out = decoded(made[name])
        assert (out.width, out.height) == (48, 32), name
        assert near(out(20, 20), RED, 20), name
    assert (made["w48.webp"].width, made["w48.webp"].height) == (48, 32)


def test_too_many_frames_become_a_still(tmp_path: Path) -> None:
    data = pixels.animated("GIF", [RED, BLUE, RED, BLUE])
    limits = DecodeLimits(10_000_000, max_frames=3)
    conversion = open_bytes(tmp_path, data, "gif", ALL_FORMATS, limits)
    with Image.open(io.BytesIO(render_all(conversion)["w48.webp"].data)) as webp:
        assert getattr(webp, "n_frames", 1) == 1


def test_apng_is_read_as_a_still(tmp_path: Path) -> None:
    data = pixels.animated("PNG", [RED, BLUE])
    made = render_all(open_bytes(tmp_path, data, "png", ALL_FORMATS))
    with Image.open(io.BytesIO(made["w48.webp"].data)) as webp:
        assert getattr(webp, "n_frames", 1) == 1
    assert near(decoded(made["w48.png"])(20, 20), RED, 10)


def test_no_variant_carries_exif_gps_or_xmp(tmp_path: Path) -> None:
    data = pixels.jpeg_with_gps()
    with Image.open(io.BytesIO(data)) as original:  # the fixture really has them
        assert original.getexif().get_ifd(0x8825)
    for name, rendered in render_all(open_bytes(tmp_path, data, "jpeg", ALL_FORMATS)).items():
        assert b"Exif" not in rendered.data, name
        assert b"xmpmeta" not in rendered.data, name
        with Image.open(io.BytesIO(rendered.data)) as im:
            assert not im.getexif(), name
            assert "icc_profile" not in im.info, name


@pytest.mark.parametrize("name", sorted(pixels.INPUTS))
def test_every_accepted_input_format_converts(tmp_path: Path, name: str) -> None:
    fmt, build, (width, height) = pixels.INPUTS[name]
    conversion = open_bytes(tmp_path, build(), fmt, ALL_FORMATS)
    assert (conversion.width, conversion.height) == (width, height)
    made = render_all(conversion)
    assert made, name
    for rendered in made.values():
        out = decoded(rendered)
        assert (out.width, out.height) == (48, round(48 * height / width)), rendered.spec.name
        assert out.interpretation == "srgb" and out.format == "uchar"
    # The red corner survives every decoder (palette, 1-bit and 4-bit grey only roughly).
    top_left = decoded(made["w48.png"])(1, 1)
    if name.startswith(("png-grey", "png-rgba", "webp-lossless", "tiff-rgba", "heic-alpha")):
        return
    assert near(top_left, RED, 60), (name, top_left)


@pytest.mark.parametrize(
    ("fmt", "data", "reason"),
    [
        ("jpeg", pixels.save(pixels.marked(400, 300), "JPEG")[:1500], "JPEG"),
        ("png", pixels.save(pixels.marked(), "PNG")[:-30], "PNG"),
        ("heic", pixels.INPUTS["heic"][1]()[:400], "HEIC"),
        ("bmp", pixels.save(pixels.marked(), "BMP")[:200], "BMP"),
        ("tiff", b"II*\x00" + b"\xff" * 64, "TIFF"),
        ("webp", b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 20, "WebP"),
        ("gif", pixels.save(pixels.marked(), "JPEG"), "GIF"),  # a JPEG claiming to be a GIF
    ],
)
def test_corrupt_and_truncated_inputs_fail_with_a_reason(
    tmp_path: Path, fmt: str, data: bytes, reason: str
) -> None:
    with pytest.raises(ConversionError) as info:
        render_all(open_bytes(tmp_path, data, fmt, ALL_FORMATS))
    message = str(info.value)
    assert reason in message and len(message) < 400
    assert "Traceback" not in message


def test_corrupt_png_data_fails_not_a_grey_picture(tmp_path: Path) -> None:
    data = bytearray(pixels.save(pixels.marked(), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 20 : idat + 40] = b"\x00" * 20  # damaged compressed data, CRC now wrong
    with pytest.raises(ConversionError, match="PNG"):
        render_all(open_bytes(tmp_path, bytes(data), "png"))


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    data = pixels.save(pixels.marked(400, 300), "PNG")
    with pytest.raises(ConversionError, match=r"400x300 is 120000 pixels, above the limit"):
        open_bytes(tmp_path, data, "png", limits=DecodeLimits(max_pixels=100_000, max_frames=10))
    # A header claiming 100000 x 100000 with no pixel data behind it: refused by the limit,
    # never read (a decoder would fail on the data instead).
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
    with pytest.raises(ConversionError, match="10000000000 pixels, above the limit"):
        open_bytes(tmp_path, bomb + chunk(b"IEND", b""), "png")


def test_converting_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    data = pixels.jpeg_with_orientation(6)
    first = render_all(open_bytes(tmp_path, data, "jpeg", ALL_FORMATS))
    second = render_all(open_bytes(tmp_path, data, "jpeg", ALL_FORMATS))
    assert {n: r.data for n, r in first.items()} == {n: r.data for n, r in second.items()}


def test_every_format_the_upload_accepts_has_a_decoder() -> None:
    # Adding a format to the upload without a decoder here would store images that can
    # never convert; the upload must answer 415 for those instead.
    assert frozenset(DEFAULT_FORMATS) == SUPPORTED == DECODABLE
    assert {fmt for fmt, *_ in pixels.INPUTS.values()} == DECODABLE
