"""Profiles: the TOML schema, its errors, and variant planning (no image library)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import BadRequest, ProfileNotFound
from core.profiles import ProfileError, Size, default_profiles, parse_profiles
from core.settings import ConfigError, Settings

BASE = {"S3_ENDPOINT": "http://127.0.0.1:8333", "S3_ACCESS_KEY": "k", "S3_SECRET_KEY": "s"}


def names(width: int | None, height: int | None, alpha: bool | None = None) -> list[str]:
    plan = default_profiles().require(None).plan(width, height, alpha)
    return [spec.name for spec in plan]


def test_the_default_profile_pins_every_encoder() -> None:
    profile = default_profiles().require("default")
    assert [(o.format, o.quality, o.effort) for o in profile.outputs] == [
        ("avif", 50, 2),
        ("webp", 80, 4),
        ("jpeg", 80, 0),
    ]
    assert names(4000, 3000) == [
        f"w{w}.{ext}" for ext in ("avif", "webp", "jpg") for w in (256, 1024, 2048)
    ]


def test_sizes_larger_than_the_image_collapse_into_one() -> None:
    assert names(800, 600) == [
        f"w{w}.{ext}" for ext in ("avif", "webp", "jpg") for w in (256, 1024)
    ]
    assert names(1024, 50) == [
        f"w{w}.{ext}" for ext in ("avif", "webp", "jpg") for w in (256, 1024)
    ]
    assert names(100, 100) == ["w256.avif", "w256.webp", "w256.jpg"]
    # Unknown size (the header could not tell): everything, the worker plans again.
    assert len(names(None, None)) == 9


def test_boxes_and_the_format_side_limit() -> None:
    assert Size(256, 256).name == "256x256" and Size(1024).name == "w1024"
    assert Size(256, 256).scale(1000, 500, 16383) == pytest.approx(0.256)
    # A 300 x 40000 strip in a 1024-wide box: WebP's 16383 side limit decides.
    assert Size(1024).scale(300, 40_000, 16383) == pytest.approx(16383 / 40_000)


def test_conditional_outputs_and_overrides() -> None:
    profiles = parse_profiles(
        """
        [profiles.default]
        formats = ["webp", "png"]
        widths = [512]

        [profiles.default.png]
        when = "alpha"
        widths = [128]
        effort = 9

        [profiles.thumbs]
        formats = ["jpeg"]
        boxes = ["200x200"]
        background = "#102030"
        """,
        "test",
    )
    default = profiles.require(None)
    assert [s.name for s in default.plan(1000, 1000, alpha=True)] == ["w512.webp", "w128.png"]
    assert [s.name for s in default.plan(1000, 1000, alpha=False)] == ["w512.webp"]
    assert default.plan(1000, 1000, alpha=True)[1].effort == 9
    thumbs = profiles.require("thumbs")
    assert thumbs.background == (0x10, 0x20, 0x30)
    assert [s.name for s in thumbs.plan(1000, 1000, None)] == ["200x200.jpg"]


def test_unknown_profile_is_a_bad_request() -> None:
    with pytest.raises(ProfileNotFound, match=r"unknown profile .nope.*default") as info:
        default_profiles().require("nope")
    assert isinstance(info.value, BadRequest)  # what callers that only need "400" catch


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ("formats = ['gif']\nwidths = [1]", "formats must list"),
        ("formats = ['webp', 'webp']\nwidths = [1]", "twice"),
        ("formats = ['webp']", "no sizes"),
        ("formats = ['webp']\nwidths = [0]", "widths"),
        ("formats = ['webp']\nwidths = [true]", "widths"),
        ("formats = ['webp']\nboxes = ['10 x 10']", "boxes"),
        ("formats = ['webp']\nwidths = [5, 5]", "twice"),
        ("formats = ['webp']\nwidths = [5]\nbackground = 'white'", "background"),
        ("formats = ['webp']\nwidths = [5]\nsize = 3", "unknown keys size"),
        ("formats = ['webp']\nwidths = [5]\n[profiles.default.webp]\neffort = 7", "effort"),
        ("formats = ['webp']\nwidths = [5]\n[profiles.default.webp]\nquality = 0", "quality"),
        ("formats = ['webp']\nwidths = [5]\n[profiles.default.webp]\nwhen = 'never'", "when"),
        ("formats = ['jpeg']\nwidths = [5]\n[profiles.default.jpeg]\neffort = 1", "effort"),
    ],
)
def test_invalid_profiles_say_what_is_wrong(body: str, complaint: str) -> None:
    with pytest.raises(ProfileError, match=complaint):
        parse_profiles("[profiles.default]\n" + body, "p.toml")


def test_a_default_profile_is_required_and_toml_errors_are_reported() -> None:
    with pytest.raises(ProfileError, match="'default' is required"):
        parse_profiles("[profiles.other]\nformats = ['webp']\nwidths = [5]", "p.toml")
    with pytest.raises(ProfileError, match=r"p\.toml"):
        parse_profiles("[profiles.default\n", "p.toml")


def test_settings_read_the_profiles_file(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text("[profiles.default]\nformats = ['webp']\nwidths = [64]\n")
    settings = Settings.from_env({**BASE, "PICSTREAM_PROFILES": str(path)})
    assert [s.name for s in settings.profiles.require(None).plan(100, 100, None)] == ["w64.webp"]
    path.write_text("[profiles.default]\nformats = ['bmp']\n")
    with pytest.raises(ConfigError, match=r"PICSTREAM_PROFILES.*formats"):
        Settings.from_env({**BASE, "PICSTREAM_PROFILES": str(path)})
    with pytest.raises(ConfigError, match="PICSTREAM_PROFILES: cannot read"):
        Settings.from_env({**BASE, "PICSTREAM_PROFILES": str(tmp_path / "missing.toml")})


def test_conversion_settings() -> None:
    settings = Settings.from_env(
        {
            **BASE,
            "PICSTREAM_RETRY_INTERVALS": "1, 2,3",
            "PICSTREAM_MAX_FRAMES": "7",
            "PICSTREAM_JOB_MEMORY": "512MiB",
        }
    )
    assert settings.retry_intervals == (1, 2, 3)
    assert (settings.max_frames, settings.job_memory) == (7, 512 * 2**20)
    for bad in ("soon", "1,-2", "1,,2"):
        with pytest.raises(ConfigError, match="PICSTREAM_RETRY_INTERVALS"):
            Settings.from_env({**BASE, "PICSTREAM_RETRY_INTERVALS": bad})
